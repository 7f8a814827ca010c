"""Training: Algorithm 1 over a dataset, with Adam, checkpoints that survive, and what a run leaves on disk.

A run directory holds::

    config.json                     resolved configuration: component names, plugins, versions, options
    model.safetensors               weights used for sampling (EMA weights when EMA is on) + config
    checkpoints/step-00000100.safetensors
                                    training state: model, EMA, optimizer, step, data position, RNG states
                                    (tensors in safetensors, the rest as JSON in its metadata); last K kept
    metrics.jsonl                   one JSON line per logged step and per epoch (loss, lr, images/s)
    samples.png                     a grid drawn with the run's sampler after training
    samples/epoch-0003.png          grids every ``grid_every`` epochs (the seed's Fig. 3)
    forward.png                     one image through the forward process at several t (Fig. 1/4)
    loss.png                        the loss curve
    tb/                             TensorBoard events, when tensorboard is installed

Multi-GPU / multi-machine: launch with ``torchrun --nproc_per_node=N -m ddpmkit run ...``.
``batch_size`` is the global batch; each of the N processes takes a contiguous slice of it, and
only rank 0 writes files and logs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from rich.console import Console

from ddpmkit.errors import DdpmkitError, Interrupted
from ddpmkit.run.accel import FastPath, tf32_mode
from ddpmkit.run.assembly import assemble, build_loggers, build_many, probe
from ddpmkit.run.config import ComponentSpec, RunConfig
from ddpmkit.run.model_file import save_model_file
from ddpmkit.run.pipeline import Pipeline, resolve_device, save_grid
from ddpmkit.run.posthoc_ema import PowerEMA, snapshot_every
from ddpmkit.run.progress import make_progress, sample_with_progress
from ddpmkit.run.rundir import RunLock, check_new_run_dir, clear_run_files
from ddpmkit.run.signals import on_stop_signals
from ddpmkit.run.train_state import (
    TrainState,
    latest_checkpoint,
    load_optimizer_tensors,
    load_rng_tensors,
    optimizer_tensors,
    prune_checkpoints,
    read_training_state,
    rng_tensors,
    write_training_state,
)
from ddpmkit.sdk.data import item_image
from ddpmkit.sdk.evaluation import MetricContext, evaluate_images, probe_metrics
from ddpmkit.sdk.files import write_json
from ddpmkit.sdk.kinds import SECTIONS
from ddpmkit.sdk.options import config_to_dict
from ddpmkit.sdk.registry import get_component

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
_images = item_image  # a batch from the loader is an item of stacked tensors


def default_workers(dataset) -> int:
    """0 for datasets held in memory (a batch is one gather), else up to 4 worker processes."""
    if getattr(dataset, "in_memory", False):
        return 0
    return max(1, min(4, (os.cpu_count() or 2)))


class EpochBatches(torch.utils.data.Sampler):
    """Batches of indices: a fresh permutation per epoch from (seed, epoch), full global batches,
    this process's contiguous slice of each; resumable at any batch (``set_epoch(e, start)``)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise DdpmkitError(f"batch size {global_batch} is not divisible by the {world} processes")
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.local = global_batch // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.global_batch - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        for b in range(self.start, self.n // self.global_batch):
            lo = b * self.global_batch + self.rank * self.local
            yield perm[lo: lo + self.local].tolist()


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int | None = None,
                generator: torch.Generator | None = None, shuffle: bool = True, seed: int = 0,
                rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """The DataLoader the runner uses: seeded per-epoch shuffling in full (global) batches,
    workers for file datasets, pinned memory on CUDA, persistent workers."""
    workers = default_workers(dataset) if num_workers is None else num_workers
    sampler = EpochBatches(len(dataset), batch_size, seed, rank, world)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, generator=generator,
    )


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def forward_strip(diffusion, x0: torch.Tensor, path: Path, n: int = 8, seed: int = 0) -> None:
    """One image through q(x_t | x_0) at n evenly spaced t, left to right (the seed's Fig. 1/4)."""
    T = diffusion.num_timesteps
    ts = torch.linspace(0, T - 1, n).round().long()
    noise = torch.randn((1, *x0.shape), generator=torch.Generator().manual_seed(seed)).expand(n, *x0.shape)
    xt = diffusion.q_sample(x0.unsqueeze(0).expand(n, *x0.shape), ts, noise)
    save_grid(torch.cat([x0.unsqueeze(0), xt]).clamp(-1, 1), path, nrow=n + 1)


# ---------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------
class Dist:
    """torch.distributed as torchrun sets it up (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self.started = True

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.detach().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every rank's ``value`` (same shape on each), concatenated along the first axis in rank order:
        the global batch's rows in the order one process would hold them."""
        if not self.enabled:
            return value
        parts = [torch.empty_like(value) for _ in range(self.world)]
        torch.distributed.all_gather(parts, value.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def stop(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------
# Resume: what may change, and what must not
# ---------------------------------------------------------------------------
RESUME_MAY_CHANGE = {"epochs", "max_steps", "num_samples", "num_workers", "log_every", "grid_every",
                     "keep_checkpoints", "checkpoint_every", "checkpoint_epochs", "metrics", "metric_options",
                     "eval_every", "eval_samples", "channels_last", "compile", "cuda_graphs", "loggers", "logger_options"}


def _plain(value):
    return json.loads(json.dumps(value))


def _show(value) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)


def resume_differences(config: RunConfig, stored: dict) -> list[str]:
    """What ``config`` changes of a run whose resolved configuration is ``stored``, beyond what a
    resumed run may change (:data:`RESUME_MAY_CHANGE`): ``["lr 0.5 (run has 0.001)", ...]``."""
    saved = RunConfig.from_dict(stored["run"])
    diffs = []
    for section in SECTIONS:
        mine, theirs = getattr(config, section), getattr(saved, section)
        if mine.name != theirs.name:
            diffs.append(f"{section} {mine.name} (run has {theirs.name})")
        saved_opts = stored.get("components", {}).get(section, {}).get("options", {})
        given = _plain(config_to_dict(get_component(section, mine.name).build_config(mine.options)))
        for key in sorted(set(mine.options) | set(theirs.options), key=list(given).index if given else None):
            if key in given and key in saved_opts and given[key] != saved_opts[key]:
                diffs.append(f"{section}.{key} {_show(given[key])} (run has {_show(saved_opts[key])})")
    new, old = _plain(config.to_dict()), _plain(saved.to_dict())
    for key in new:
        if key not in SECTIONS and key not in RESUME_MAY_CHANGE and new[key] != old.get(key):
            diffs.append(f"{key.replace('_', '-')} {_show(new[key])} (run has {_show(old.get(key))})")
    return diffs


def stored_config(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """The newest training-state file of ``run_dir`` and the resolved configuration stored in it."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise DdpmkitError(f"--resume: no checkpoint in '{run_dir}' (expected training-state files in {ckpt_dir}); "
                           "start a new run with --out instead")
    return path, read_training_state(path)[1]["config"]


def resumed_config(run_dir: str | os.PathLike, names: dict[str, str] | None = None,
                   options: dict[str, dict] | None = None, changes: dict | None = None) -> RunConfig:
    """The configuration stored in ``run_dir``'s newest checkpoint with ``changes`` applied; component
    ``names``/``options`` or ``changes`` that contradict the run → one line listing them."""
    path, stored = stored_config(run_dir)
    config = RunConfig.from_dict(stored["run"])
    for section, name in (names or {}).items():
        if name != getattr(config, section).name:
            setattr(config, section, ComponentSpec(name))
    for section, opts in (options or {}).items():
        getattr(config, section).options.update(opts)
    try:
        config = attrs.evolve(config, **(changes or {}))
    except (ValueError, TypeError) as exc:
        raise DdpmkitError(f"invalid option: {exc}") from None
    diffs = resume_differences(config, stored)
    if diffs:
        raise DdpmkitError("--resume: these flags differ from the run's configuration: " + "; ".join(diffs)
                           + ". Drop them to continue the run, or start a new one with --out")
    return config


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def train(config: RunConfig, run_dir: str | os.PathLike, device: str | torch.device | None = None,
          progress: bool = True, console: Console | None = None, sample_grid: bool = True,
          resume: bool = False, overwrite: bool = False, on_log: Callable[[dict], None] | None = None) -> Pipeline:
    """Train ε_θ with Algorithm 1 and write a run directory; returns the trained :class:`Pipeline`.

    Args:
        config: what to train (components by name and their options, epochs, batch, lr, seed, ...).
        run_dir: directory to write; created if missing. A directory that is not empty is refused
            unless ``resume`` or ``overwrite`` (see ``ddpmkit.rundir``); the run holds a lock on it.
        device: ``None``/``"auto"`` picks CUDA when present, else CPU. Under torchrun each process
            uses ``cuda:LOCAL_RANK`` (or the CPU with the gloo backend).
        progress: show a rich progress bar (epoch, step, loss, images/s, ETA).
        sample_grid: after training, draw ``config.num_samples`` images and save ``samples.png``.
        on_log: called (rank 0) with every record the loggers get — ``{"step", "epoch", "loss", ...}``
            and ``{"step", "eval": {result: value}, "final"?}`` — after them; an exception it raises
            stops the run (``ddpmkit sweep`` reports evaluations to Optuna and prunes this way).
        resume: continue from the newest checkpoint in ``run_dir/checkpoints``; ``config`` must
            agree with the configuration stored in it (only :data:`RESUME_MAY_CHANGE` may differ).
        overwrite: remove an earlier run's files (``ddpmkit.run.rundir.RUN_FILES``) from ``run_dir``
            once everything is checked, and start afresh.

    On SIGTERM or SIGINT the current step finishes, a training-state checkpoint is written and
    :class:`~ddpmkit.errors.Interrupted` is raised (a second signal stops at once).
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    dist = Dist()
    if dist.enabled and (device is None or str(device) == "auto"):
        device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.start(dev)
    fast = FastPath.from_run(config).resolve(dev)  # an impossible switch fails here, before anything is built
    created, lock, trainer = not run_dir.exists(), RunLock(run_dir) if dist.main else None, None
    try:
        if lock is not None:
            lock.acquire()
            if not resume:
                check_new_run_dir(run_dir, overwrite)
        with tf32_mode(fast.tf32):
            trainer = Trainer(config, run_dir, dev, fast, dist, progress=progress, console=console, on_log=on_log)
            if resume:
                trainer.resume()
            elif overwrite and dist.main:
                clear_run_files(run_dir)
            return trainer.run(sample_grid=sample_grid)
    finally:
        if lock is not None:
            lock.release()
        if created and dist.main and (trainer is None or not trainer.started):  # failed before it began
            shutil.rmtree(run_dir, ignore_errors=True)
        dist.stop()


def run_job(config: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False, device: str = "auto",
            progress: bool = True, console: Console | None = None, overwrite: bool = False,
            on_log: Callable[[dict], None] | None = None) -> str:
    """What ``ddpmkit run`` (and each sweep trial) does once its configuration is resolved: train a new
    run, or continue ``run_dir`` (``resume``), and return the line it prints: ``Trained in N s. Run
    directory: DIR`` (``Resumed and finished in N s. ...``). Arguments as :func:`train`."""
    t0 = time.perf_counter()
    train(config, run_dir, device=device, progress=progress, console=console, resume=resume,
          overwrite=overwrite, on_log=on_log)
    done = "Resumed and finished" if resume else "Trained"
    return f"{done} in {time.perf_counter() - t0:.0f} s. Run directory: {run_dir}"


@attrs.frozen
class TrainingPlan:
    """How a run's steps fall into epochs: computed once, from the configuration and the data size.

    Attributes:
        micro: images per process and forward pass (batch_size / grad_accum).
        steps_per_epoch: optimizer steps in one pass over the data.
        total: optimizer steps of the whole run (epochs × steps_per_epoch, capped by max_steps).
        epochs: epochs the run enters (the last one may be cut short by max_steps).
    """

    micro: int
    steps_per_epoch: int
    total: int
    epochs: int


def plan_training(config: RunConfig, n: int, world: int = 1) -> TrainingPlan:
    """The :class:`TrainingPlan` of ``config`` on ``n`` images and ``world`` processes; a batch that
    does not fit → :class:`DdpmkitError` (one line)."""
    c, name = config, config.dataset.name
    if c.batch_size > n:
        raise DdpmkitError(f"batch size {c.batch_size} is larger than dataset '{name}' ({n} images); "
                           f"use --batch-size {n} or less")
    micro = c.batch_size // c.grad_accum
    if micro * c.grad_accum != c.batch_size:
        raise DdpmkitError(f"batch size {c.batch_size} is not divisible by --grad-accum {c.grad_accum}")
    if micro % world:
        raise DdpmkitError(f"batch size {c.batch_size} / grad-accum {c.grad_accum} = {micro} is not "
                           f"divisible by the {world} processes")
    steps_per_epoch = (n // micro) // c.grad_accum
    if steps_per_epoch < 1:
        raise DdpmkitError(f"dataset '{name}' ({n} images) is smaller than one step ({c.batch_size} images)")
    total = steps_per_epoch * c.epochs
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    return TrainingPlan(micro, steps_per_epoch, total, math.ceil(total / steps_per_epoch))


class Trainer:
    """Algorithm 1 over a run's dataset: state as attributes, one method per step of the loop.

    ``Trainer(config, run_dir, device, fast, dist)`` assembles the run (``ddpmkit.assembly``) and
    probes every component; :meth:`resume` loads the newest checkpoint; :meth:`run` trains, writes
    the run directory and returns the :class:`Pipeline`. :meth:`state_dict` /
    :meth:`load_state_dict` are the training state a checkpoint holds.
    """

    def __init__(self, config: RunConfig, run_dir: str | os.PathLike, device: torch.device, fast: FastPath,
                 dist: Dist, progress: bool = True, console: Console | None = None,
                 on_log: Callable[[dict], None] | None = None):
        self.config, self.run_dir, self.dev, self.fast, self.dist = config, Path(run_dir), device, fast, dist
        self.progress, self.console = progress and dist.main, console
        self.on_log = on_log if dist.main else None
        self.parts = assemble(config)
        self.plan = plan_training(config, len(self.parts.dataset), dist.world)
        self.model = self.parts.model.to(device).train()
        if fast.channels_last:  # before the optimizer and the EMA copy are made, so they share the format
            self.model.to(memory_format=torch.channels_last)
        probe(self.parts, device)
        self.optimizer, self.scheduler, self.ema, self.ema_model, self.net = self._optimisation()
        self.phema = PowerEMA(self.model, config.posthoc_ema) if config.posthoc_ema else None
        self.phema_every = snapshot_every(self.total, config.posthoc_ema_every)
        self.noise_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
        # The loader gets its own generator: creating an iterator must not draw from the global RNG
        # (dropout's), or a resumed run would drift from an uninterrupted one.
        self.loader = make_loader(self.parts.dataset, self.micro, device, config.num_workers,
                                  generator=torch.Generator().manual_seed(config.seed), seed=config.seed,
                                  rank=dist.rank, world=dist.world)
        self.state = TrainState()
        self.resume_step: int | None = None
        self.last_saved: int | None = None  # the step of the newest checkpoint this run wrote
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 1-based step of the first non-finite loss
        self.loggers: list = []
        self.started = False  # the run directory has been written to
        self.stop_signal: int | None = None  # SIGTERM/SIGINT received: stop after the current step
        self.t0, self.images_seen = time.perf_counter(), 0  # for images/s (reset when the loop starts)
        self.metrics = build_many("metric", config.metrics, config.metric_options, device=device) \
            if config.metrics and dist.main else {}
        if self.metrics:
            probe_metrics(self.metrics, self.metric_context(self.sampling_pipeline()))

    # -- setting up ---------------------------------------------------------
    def _optimisation(self) -> tuple:
        """(optimizer, lr schedule, EMA or None, the EMA's model or None, the network the loop calls:
        the model, wrapped in DDP under torchrun and compiled when asked)."""
        c, model = self.config, self.model
        # On CUDA a small network's step is bound by kernel launches: Adam fused into one kernel and
        # the EMA as one foreach update (the default run's U-Net has 183 tensors: 549 launches per
        # step in diffusers' per-tensor loop, 2 as foreach). On the CPU both stay as they were (the
        # same bytes as before: foreach rounds differently).
        cuda = self.dev.type == "cuda"
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, **({"fused": True} if cuda else {}))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        ema = ema_model = None
        if c.ema_decay:
            from diffusers.training_utils import EMAModel

            # warm-up: min(decay, (1 + n)/(10 + n))
            ema = EMAModel(model.parameters(), decay=c.ema_decay, foreach=cuda)
            ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        net = model
        if self.dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        if self.fast.compile:
            net = torch.compile(net)
        return optimizer, scheduler, ema, ema_model, net

    # the plan's numbers, as attributes
    micro = property(lambda self: self.plan.micro)
    steps_per_epoch = property(lambda self: self.plan.steps_per_epoch)
    total = property(lambda self: self.plan.total)
    epochs = property(lambda self: self.plan.epochs)

    def _lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) over ``lr``: a linear warm-up over
        ``warmup_steps``, then constant, or a cosine or linear fall to 0 at the last of the run's steps."""
        c, warm = self.config, max(0, self.config.warmup_steps)
        if step < warm:
            return (step + 1) / warm
        if c.lr_decay == "constant":
            return 1.0
        left = max(1, self.total - warm)
        done = min(1.0, (step - warm) / left)
        return 0.5 * (1.0 + math.cos(math.pi * done)) if c.lr_decay == "cosine" else 1.0 - done

    # -- the training state -------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, metadata)``: model, EMA, optimizer and RNG states as tensors; position, optimizer
        groups, schedule and EMA counters, timestep-sampler state and the resolved config as JSON."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optim, groups = optimizer_tensors(self.optimizer)
        tensors.update(optim)
        ema_meta = None
        if self.ema is not None:
            tensors.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
            ema_meta = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        if self.phema is not None:
            tensors.update(self.phema.tensors())
        tensors.update(rng_tensors(self.noise_gen))
        ts = self.parts.timestep_sampler
        meta = {"state": attrs.asdict(self.state), "optimizer": groups, "ema": ema_meta,
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "timestep_sampler": ts.state_dict() if hasattr(ts, "state_dict") else None,
                "config": self.parts.resolved}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict, source: str = "checkpoint") -> None:
        """The inverse of :meth:`state_dict`."""
        try:
            self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        except RuntimeError:
            raise DdpmkitError(f"{source} does not match the model of this run's configuration") from None
        load_optimizer_tensors(self.optimizer, tensors, meta["optimizer"])
        self.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
        if self.ema is not None:
            if meta.get("ema") is None:
                raise DdpmkitError(f"{source} has no EMA weights but this run uses EMA")
            shadow = [tensors[f"ema.{i}"].to(self.dev) for i in range(len(self.ema.shadow_params))]
            self.ema.load_state_dict({**meta["ema"], "shadow_params": shadow})
        if self.phema is not None:
            self.phema.load_tensors(tensors, source)
        ts = self.parts.timestep_sampler
        if meta.get("timestep_sampler") is not None and hasattr(ts, "load_state_dict"):
            ts.load_state_dict(meta["timestep_sampler"])
        load_rng_tensors(tensors, self.noise_gen)
        self.state = TrainState(**meta["state"])

    def resume(self) -> None:
        """Continue from the newest training-state file, after checking that this run's
        configuration agrees with the one stored in it."""
        path, stored = stored_config(self.run_dir)
        diffs = resume_differences(self.config, stored)
        if diffs:
            raise DdpmkitError(f"resume: the configuration differs from the one stored in {path}: "
                               + "; ".join(diffs) + ". Continue with the run's own configuration, or start a new run")
        clusters = list(self.parts.shape.clusters or []) or None
        if (stored.get("data") or {}).get("clusters") != clusters:  # --clusters: the same clusters, or no resume
            raise DdpmkitError(f"resume: the training images' clusters differ from those stored in {path} (other "
                               "data, or another scikit-learn); start a new run")
        tensors, meta = read_training_state(path)
        self.load_state_dict(tensors, meta, source=f"checkpoint '{path}'")
        self.resume_step = self.state.step

    # -- what the loop calls -------------------------------------------------
    def sampling_pipeline(self) -> Pipeline:
        """The weights sampling uses (EMA weights when EMA is on), as a Pipeline; sampling puts the
        training model back in training mode itself."""
        weights = self.model
        if self.ema is not None:
            self.ema.copy_to(self.ema_model.parameters())
            weights = self.ema_model
        p = self.parts
        return Pipeline(weights, p.diffusion, p.shape.channels, p.shape.resolution, self.config, self.dev, p.resolved,
                        num_classes=p.shape.num_classes, classes=p.shape.classes)

    def metric_context(self, pipe: Pipeline) -> MetricContext:
        return MetricContext(pipeline=pipe, dataset=self.parts.dataset, seed=self.config.seed)

    def log(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log(record)
        if self.on_log is not None:
            self.on_log(record)

    def check_finite(self, value: torch.Tensor | None = None) -> float | None:
        """``value`` as a float (one host sync); stops the run if any loss so far was not finite."""
        bad = int(self.first_bad)
        if bad:
            last = latest_checkpoint(self.run_dir / "checkpoints")
            kept = f"; the last good training-state checkpoint is {last}" if last else ""
            c = self.config
            what = f"loss '{c.loss.name}', predicting {c.prediction}" + \
                (", with a learned variance" if c.variance_type == "learned_range" else "") + \
                (f", min-SNR γ = {c.min_snr_gamma:g}" if c.min_snr_gamma else "")
            raise DdpmkitError(f"loss became nan or inf at step {bad}; stopped ({what}: lower --lr or add "
                               f"--grad-clip){kept}")
        return None if value is None else value.item()

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """The batch's class labels, each replaced by the "no class" label K with probability
        ``label_dropout`` (drawn from the noise generator for the whole global batch, like t and ε)."""
        p = self.config.label_dropout
        if not p:
            return y
        drop = torch.rand(self.micro, generator=self.noise_gen, device=self.dev)
        drop = drop[self.dist.rank * y.shape[0]: (self.dist.rank + 1) * y.shape[0]] < p
        return torch.where(drop, torch.full_like(y, self.parts.shape.num_classes), y)

    def step(self, batches) -> torch.Tensor:
        """One optimisation step (Algorithm 1 over ``grad_accum`` micro-batches); the mean loss, on the device."""
        c, p = self.config, self.parts
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.dev)
        ts = p.timestep_sampler
        for _ in range(c.grad_accum):
            batch = next(batches)
            x0 = _images(batch).to(self.dev, non_blocking=True)
            conditions = {"class_labels": self.labels(batch[1].to(self.dev))} if self.parts.shape.num_classes else None
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.fast.precision == "bf16"):
                terms = p.diffusion.loss_terms(
                    self.net, x0, p.loss, generator=self.noise_gen, min_snr_gamma=c.min_snr_gamma,
                    global_batch=self.micro, offset=self.dist.rank * x0.shape[0], timestep_sampler=ts,
                    conditions=conditions, per_sample=p.needs_per_sample, loss_context=p.loss_takes_context)
            (terms.loss / c.grad_accum).backward()
            step_loss += terms.loss.detach().float() / c.grad_accum
            if terms.per_sample is not None and hasattr(ts, "update"):
                # every rank learns from the whole global batch, as one process would (improved-diffusion
                # gathers the same way): otherwise each rank's history, and so its draws of t, drift apart
                ts.update(self.dist.gather(terms.t), self.dist.gather(terms.per_sample.detach()))
        step_loss = self.dist.mean(step_loss)
        # No host sync per step: the first non-finite step is recorded on the device and read
        # only when a value is needed (logging, checkpoints, the end of an epoch).
        self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(step_loss), self.state.step + 1,
                                     self.first_bad)
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        if self.phema is not None:
            self.phema.update(self.model, self.state.step + 1)
            if self.dist.main and ((self.state.step + 1) % self.phema_every == 0 or self.state.step + 1 == self.total):
                self.phema.save_snapshots(self.model, self.run_dir, self.state.step + 1, self.parts.resolved)
        self.state.step += 1
        self.state.batch += 1
        self.images_seen += c.batch_size
        return step_loss

    def log_step(self, step_loss: torch.Tensor, bar, task, epoch: int) -> None:
        value = self.check_finite(step_loss)
        speed = self.images_seen / (time.perf_counter() - self.t0)
        bar.update(task, info=f"loss {value:.4f}  {speed:.0f} img/s")
        self.log({"step": self.state.step, "epoch": epoch + 1, "loss": value,
                  "lr": self.scheduler.get_last_lr()[0], "images_per_s": speed})

    def checkpoint(self) -> None:
        """A training-state file for the current step (rank 0), after every log record up to it is durable."""
        self.check_finite()  # never save weights that a non-finite loss has touched
        self.last_saved = self.state.step
        for logger in self.loggers:
            logger.flush()
        if self.dist.main:
            ckpt_dir = self.run_dir / "checkpoints"
            write_training_state(ckpt_dir, self.state.step, *self.state_dict())
            prune_checkpoints(ckpt_dir, self.config.keep_checkpoints)

    def end_of_epoch(self, epoch: int, epoch_loss: torch.Tensor, epoch_n: int) -> None:
        c = self.config
        self.state.epoch, self.state.batch = epoch + 1, 0
        if self.dist.main:
            self.log({"epoch": epoch + 1, "step": self.state.step,
                      "mean_loss": self.check_finite(epoch_loss / max(1, epoch_n)),
                      "elapsed_s": time.perf_counter() - self.t0})
        if not c.checkpoint_every and self.state.epoch % c.checkpoint_epochs == 0:
            self.checkpoint()
        if self.dist.main and c.grid_every and self.state.epoch % c.grid_every == 0:
            save_grid(self.sampling_pipeline().sample(min(16, c.num_samples), seed=c.seed),
                      self.run_dir / "samples" / f"epoch-{self.state.epoch:04d}.png")
        if self.metrics and c.eval_every and self.state.epoch % c.eval_every == 0 and self.state.step < self.total:
            self.evaluate(self.sampling_pipeline())

    def evaluate(self, pipe: Pipeline, final: bool = False) -> dict[str, float]:
        """Score ``eval_samples`` images with the run's metrics and log them (``final``: the end-of-run
        evaluation that eval.json keeps; its record says so, and a sweep's pruner does not see it)."""
        n = self.config.eval_samples
        if all(getattr(m, "needs_samples", True) is False for m in self.metrics.values()):  # e.g. nll: real images
            images = torch.zeros(n, pipe.channels, pipe.resolution, pipe.resolution)
        else:
            images = pipe.sample(n, seed=self.config.seed)
        context = attrs.evolve(self.metric_context(pipe), labels=pipe.data_classes(pipe.class_labels(n)))
        results = evaluate_images(images, self.metrics, context=context)
        self.log({"step": self.state.step, "epoch": self.state.epoch, "eval": results, **({"final": True} if final else {})})
        return results

    def epoch(self, bar, task) -> None:
        """One epoch (or what is left of it after a resume, or before ``max_steps``)."""
        c, epoch = self.config, self.state.epoch
        bar.update(task, description=f"epoch {epoch + 1}/{self.epochs}")
        self.loader.batch_sampler.set_epoch(epoch, self.state.batch * c.grad_accum)
        batches = iter(self.loader)
        epoch_loss, epoch_n = torch.zeros((), device=self.dev), 0
        while self.state.batch < self.steps_per_epoch and self.state.step < self.total:
            step_loss = self.step(batches)
            epoch_loss += step_loss
            epoch_n += 1
            if self.state.step % c.log_every == 0 or self.state.step == self.total:
                self.log_step(step_loss, bar, task, epoch)
            bar.update(task, completed=self.state.step)
            if c.checkpoint_every and self.state.step % c.checkpoint_every == 0:
                self.checkpoint()
            if self.should_stop():
                break
        del batches
        if self.stop_signal is not None:
            self.stop()
        if self.state.batch >= self.steps_per_epoch:
            self.end_of_epoch(epoch, epoch_loss, epoch_n)

    # -- the whole run ------------------------------------------------------------
    def start(self) -> None:
        """Write what a run directory holds from its start (rank 0) and open the loggers."""
        if not self.dist.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # loggers first: one that breaks the contract stops the run before it has started
        self.loggers = build_loggers(self.config, self.run_dir, self.parts.resolved, self.resume_step)
        self.started = True
        for note in self.parts.notes:  # what was chosen for the data, and why
            (self.console or Console(stderr=True)).print(note, markup=False, highlight=False, soft_wrap=True)
        write_json(self.run_dir / "config.json", self.parts.resolved)
        if not (self.run_dir / "forward.png").exists():
            forward_strip(self.parts.diffusion, _images(self.parts.dataset[0]), self.run_dir / "forward.png",
                          seed=self.config.seed)

    def finish(self, sample_grid: bool) -> Pipeline:
        """The last checkpoint, the model file, the final metrics and the sample grid."""
        if self.last_saved != self.state.step:
            self.checkpoint()
        self.dist.barrier()
        pipe = self.sampling_pipeline()
        if self.dist.main:
            save_model_file(self.run_dir / "model.safetensors", pipe.model.state_dict(), self.parts.resolved)
        if self.metrics:
            write_json(self.run_dir / "eval.json", {"step": self.state.step, "samples": self.config.eval_samples,
                                                    "results": self.evaluate(pipe, final=True)})
        return pipe

    # -- stopping on a signal ------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second signal: stop at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stop_signal = signum

    def should_stop(self) -> bool:
        """Whether a signal asked to stop; under torchrun every rank agrees at the same step."""
        if not self.dist.enabled:
            return self.stop_signal is not None
        flag = torch.tensor(float(self.stop_signal or 0), device=self.dev)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.stop_signal is None:
            self.stop_signal = int(flag.item())
        return bool(flag.item())

    def stop(self) -> None:
        """Checkpoint the step just finished and raise :class:`Interrupted` with the resume command."""
        if self.last_saved != self.state.step:
            self.checkpoint()
        # Under torchrun every rank is here at the same step: wait until rank 0's file is written, so
        # no rank names a checkpoint that does not exist yet, and all leave (and tear down) together.
        self.dist.barrier()
        path = self.run_dir / "checkpoints" / f"step-{self.state.step:08d}.safetensors"
        name = signal.Signals(self.stop_signal).name
        raise Interrupted(f"{name}: stopped at step {self.state.step} of {self.total}; checkpoint {path}. "
                          f"Continue with: ddpmkit run --resume {self.run_dir}", self.stop_signal)

    def _signals(self):
        """SIGTERM and SIGINT stop training after the current step (main thread only)."""
        return on_stop_signals(self._on_signal)

    def run(self, sample_grid: bool = True) -> Pipeline:
        """Train to ``total`` steps, then write the model file (and the grid); returns the Pipeline."""
        self.start()
        self.t0, self.images_seen = time.perf_counter(), 0
        try:
            with self._signals(), make_progress(self.console, self.progress) as bar:
                task = bar.add_task(f"epoch {self.state.epoch + 1}/{self.epochs}", total=self.total,
                                    completed=self.state.step, info="")
                while self.state.step < self.total:
                    self.epoch(bar, task)
            pipe = self.finish(sample_grid)
            if self.dist.main and sample_grid:  # before the loggers close: they may keep the grid (mlflow)
                save_grid(sample_with_progress(pipe, self.config.num_samples, self.console, self.progress,
                                               seed=self.config.seed), self.run_dir / "samples.png")
        finally:
            for logger in self.loggers:
                logger.close()
        return pipe
