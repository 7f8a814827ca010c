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
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .checkpoint import atomic_write, save_checkpoint, write_json
from .accel import FastPath, tf32_mode
from .config import RunConfig
from .errors import DdpmkitError
from .pipeline import Pipeline, make_diffusion, make_predictor, make_sampler, resolve_device, resolved_config, save_grid
from .plugins import get_component
from .state import TrainState, latest_checkpoint, load_train_state, prune_checkpoints, save_train_state


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def _dataset_shape(dataset) -> tuple[int, int]:
    channels, resolution = getattr(dataset, "channels", None), getattr(dataset, "resolution", None)
    if channels is None or resolution is None:
        item = dataset[0]
        x = item[0] if isinstance(item, (tuple, list)) else item
        channels, resolution = int(x.shape[0]), int(x.shape[-1])
    return int(channels), int(resolution)


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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
# Progress, logs, figures
# ---------------------------------------------------------------------------
def make_progress(console: Console | None = None, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )


def sample_with_progress(pipe: Pipeline, n: int, console: Console | None = None, enabled: bool = True,
                         **kwargs) -> torch.Tensor:
    """``pipe.sample(n, **kwargs)`` under a rich progress bar (reverse steps done / total)."""
    with make_progress(console, enabled) as bar:
        task = bar.add_task("sampling", total=None, info=f"{n} images")
        return pipe.sample(n, progress=lambda k, total: bar.update(task, completed=k, total=total), **kwargs)


def forward_strip(diffusion, x0: torch.Tensor, path: Path, n: int = 8, seed: int = 0) -> None:
    """One image through q(x_t | x_0) at n evenly spaced t, left to right (the seed's Fig. 1/4)."""
    T = diffusion.num_timesteps
    ts = torch.linspace(0, T - 1, n).round().long()
    noise = torch.randn((1, *x0.shape), generator=torch.Generator().manual_seed(seed)).expand(n, *x0.shape)
    xt = diffusion.q_sample(x0.unsqueeze(0).expand(n, *x0.shape), ts, noise)
    save_grid(torch.cat([x0.unsqueeze(0), xt]).clamp(-1, 1), path, nrow=n + 1)


def loss_curve(metrics_path: Path, out: Path) -> None:
    """loss.png from metrics.jsonl (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], lw=0.8, label="loss (logged steps)")
    ep = [r for r in rows if "mean_loss" in r]
    if ep:
        ax.plot([r["step"] for r in ep], [r["mean_loss"] for r in ep], "o-", ms=3, label="epoch mean")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _tensorboard(run_dir: Path):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(run_dir / "tb"))


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

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def stop(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def train(config: RunConfig, run_dir: str | os.PathLike, device: str | torch.device | None = None,
          progress: bool = True, console: Console | None = None, sample_grid: bool = True,
          resume: bool = False) -> Pipeline:
    """Train ε_θ with Algorithm 1 and write a run directory; returns the trained :class:`Pipeline`.

    Args:
        config: what to train (components by name and their options, epochs, batch, lr, seed, ...).
        run_dir: directory to write; created if missing.
        device: ``None``/``"auto"`` picks CUDA when present, else CPU. Under torchrun each process
            uses ``cuda:LOCAL_RANK`` (or the CPU with the gloo backend).
        progress: show a rich progress bar (epoch, step, loss, images/s, ETA).
        sample_grid: after training, draw ``config.num_samples`` images and save ``samples.png``.
        resume: continue from the newest checkpoint in ``run_dir/checkpoints``.
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
    try:
        with tf32_mode(fast.tf32):
            return _train(config, run_dir, dev, fast, dist, progress and dist.main, console, sample_grid, resume)
    finally:
        dist.stop()


def _train(config, run_dir, dev, fast, dist, progress, console, sample_grid, resume) -> Pipeline:
    torch.manual_seed(config.seed)

    # --- components --------------------------------------------------------
    ds_comp = get_component("dataset", config.dataset.name)
    ds_cfg = ds_comp.make_config(config.dataset.options)
    loss_comp = get_component("loss", config.loss.name)
    loss_cfg = loss_comp.make_config(config.loss.options)
    diffusion, sched_cfg = make_diffusion(config)
    _, sampler_cfg = make_sampler(config.sampler.name, config.sampler.options, diffusion)
    dataset = ds_comp.create(ds_cfg)
    if len(dataset) < 1:
        raise DdpmkitError(f"dataset '{config.dataset.name}' is empty")
    if config.batch_size > len(dataset):
        raise DdpmkitError(f"batch size {config.batch_size} is larger than dataset '{config.dataset.name}' "
                           f"({len(dataset)} images); use --batch-size {len(dataset)} or less")
    micro = config.batch_size // config.grad_accum
    if micro * config.grad_accum != config.batch_size:
        raise DdpmkitError(f"batch size {config.batch_size} is not divisible by --grad-accum {config.grad_accum}")
    if micro % dist.world:
        raise DdpmkitError(f"batch size {config.batch_size} / grad-accum {config.grad_accum} = {micro} is not "
                           f"divisible by the {dist.world} processes")
    channels, resolution = _dataset_shape(dataset)
    torch.manual_seed(config.seed)  # model init does not depend on how the dataset was built
    model, pred_cfg = make_predictor(config, channels, resolution)
    model.to(dev).train()
    if fast.channels_last:  # before the optimizer and the EMA copy are made, so they share the format
        model.to(memory_format=torch.channels_last)
    loss_fn = loss_comp.create(loss_cfg)
    if config.min_snr_gamma:
        try:
            loss_fn(torch.zeros(2, 1), torch.ones(2, 1), reduction="none")
        except TypeError:
            raise DdpmkitError(f"loss '{config.loss.name}' does not accept reduction='none', which min-SNR "
                               "weighting needs") from None
    resolved = resolved_config(config, channels, resolution,
                               {"schedule": sched_cfg, "predictor": pred_cfg, "loss": loss_cfg, "dataset": ds_cfg,
                                "sampler": sampler_cfg})

    # --- optimisation ------------------------------------------------------
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warm = max(0, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ema = ema_model = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=config.ema_decay)  # warm-up: min(decay, (1 + n)/(10 + n))
        ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    use_bf16 = fast.precision == "bf16"  # (fast.cuda_graphs is for sampling only)
    ddp_model = model
    if dist.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if fast.compile:
        ddp_model = torch.compile(ddp_model)

    noise_gen = torch.Generator(device=dev).manual_seed(config.seed + 1)
    # The loader gets its own generator: creating an iterator must not draw from the global RNG
    # (dropout's), or a resumed run would drift from an uninterrupted one.
    loader = make_loader(dataset, micro, dev, config.num_workers, generator=torch.Generator().manual_seed(config.seed),
                         seed=config.seed, rank=dist.rank, world=dist.world)
    batches: EpochBatches = loader.batch_sampler
    steps_per_epoch = (len(dataset) // micro) // config.grad_accum
    if steps_per_epoch < 1:
        raise DdpmkitError(f"dataset '{config.dataset.name}' ({len(dataset)} images) is smaller than one step "
                           f"({config.batch_size} images)")
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    epochs = math.ceil(total / steps_per_epoch)

    # --- resume ------------------------------------------------------------
    state = TrainState()
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise DdpmkitError(f"--resume: no checkpoint in '{ckpt_dir}'; start a new run with --out instead")
        state = load_train_state(path, model, optimizer, scheduler, ema, noise_gen, dev)
        if metrics_path.exists() and dist.main:  # forget what the killed run logged after the checkpoint
            keep = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.step]
            metrics_path.write_text("".join(line + "\n" for line in keep))
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", resolved)
        if not (run_dir / "forward.png").exists():
            forward_strip(diffusion, _images(dataset[0]), run_dir / "forward.png", seed=config.seed)
    writer = _tensorboard(run_dir) if dist.main else None

    last_saved = None  # the step of the newest checkpoint this run wrote

    def checkpoint():
        nonlocal last_saved
        check_finite()  # never save weights that a non-finite loss has touched
        last_saved = state.step
        if log:
            log.flush()  # every metric up to the checkpoint's step is on disk before the checkpoint is
            os.fsync(log.fileno())
        if dist.main:
            save_train_state(ckpt_dir, state, model, optimizer, scheduler, ema, noise_gen, resolved)
            prune_checkpoints(ckpt_dir, config.keep_checkpoints)

    evaluators = None
    if config.metrics and dist.main:
        from .evaluation import build_metrics

        evaluators = build_metrics(config.metrics, config.metric_options, dev)

    def run_metrics(pipe: Pipeline) -> dict[str, float]:
        from .evaluation import evaluate_images

        results = evaluate_images(pipe.sample(config.eval_samples, seed=config.seed), evaluators)
        if log:
            log.write(json.dumps({"step": state.step, "epoch": state.epoch, "eval": results}) + "\n")
            log.flush()
        if writer:
            for k, v in results.items():
                writer.add_scalar(f"eval/{k}", v, state.step)
        return results

    def sampling_pipeline() -> Pipeline:
        """The weights sampling uses (EMA weights when EMA is on), as a Pipeline; sampling puts the
        training model back in training mode itself."""
        weights = model
        if ema is not None:
            ema.copy_to(ema_model.parameters())
            weights = ema_model
        return Pipeline(weights, diffusion, channels, resolution, config, dev, resolved)

    # --- Algorithm 1 -------------------------------------------------------
    first_bad = torch.zeros((), dtype=torch.long, device=dev)  # 1-based step of the first non-finite loss

    def check_finite(value: torch.Tensor | None = None) -> float | None:
        """``value`` as a float (one host sync); stops the run if any loss so far was not finite."""
        bad = int(first_bad)
        if bad:
            last = latest_checkpoint(ckpt_dir)
            kept = f"; the last good checkpoint is {last}" if last else ""
            raise DdpmkitError(f"loss became nan or inf at step {bad}; stopped (lower --lr or add --grad-clip){kept}")
        return None if value is None else value.item()

    t0, images_seen = time.perf_counter(), 0
    log = open(metrics_path, "a") if dist.main else None  # noqa: SIM115 (closed in finally)
    try:
        with make_progress(console, progress) as bar:
            task = bar.add_task(f"epoch {state.epoch + 1}/{epochs}", total=total, completed=state.step, info="")
            while state.step < total:
                epoch = state.epoch
                bar.update(task, description=f"epoch {epoch + 1}/{epochs}")
                batches.set_epoch(epoch, state.batch * config.grad_accum)
                it = iter(loader)
                epoch_loss, epoch_n = torch.zeros((), device=dev), 0
                while state.batch < steps_per_epoch and state.step < total:
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = torch.zeros((), device=dev)
                    for k in range(config.grad_accum):
                        x0 = _images(next(it)).to(dev, non_blocking=True)
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                            loss = diffusion.training_loss(ddp_model, x0, loss_fn, generator=noise_gen,
                                                           min_snr_gamma=config.min_snr_gamma,
                                                           global_batch=micro, offset=dist.rank * x0.shape[0])
                        (loss / config.grad_accum).backward()
                        step_loss += loss.detach().float() / config.grad_accum
                    step_loss = dist.mean(step_loss)
                    # No host sync per step: the first non-finite step is recorded on the device and read
                    # only when a value is needed (logging, checkpoints, the end of an epoch).
                    first_bad = torch.where((first_bad == 0) & ~torch.isfinite(step_loss), state.step + 1, first_bad)
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    if ema is not None:
                        ema.step(model.parameters())
                    state.step += 1
                    state.batch += 1
                    images_seen += config.batch_size
                    epoch_loss += step_loss
                    epoch_n += 1
                    if state.step % config.log_every == 0 or state.step == total:
                        value = check_finite(step_loss)
                        speed = images_seen / (time.perf_counter() - t0)
                        bar.update(task, info=f"loss {value:.4f}  {speed:.0f} img/s")
                        if log:
                            lr = scheduler.get_last_lr()[0]
                            log.write(json.dumps({"step": state.step, "epoch": epoch + 1, "loss": value, "lr": lr,
                                                  "images_per_s": speed}) + "\n")
                            if writer:
                                writer.add_scalar("loss", value, state.step)
                                writer.add_scalar("lr", lr, state.step)
                                writer.add_scalar("images_per_s", speed, state.step)
                    bar.update(task, completed=state.step)
                    if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                        checkpoint()
                del it
                if state.batch >= steps_per_epoch:
                    state.epoch, state.batch = epoch + 1, 0
                    if log:
                        log.write(json.dumps({"epoch": epoch + 1, "step": state.step,
                                              "mean_loss": check_finite(epoch_loss / max(1, epoch_n)),
                                              "elapsed_s": time.perf_counter() - t0}) + "\n")
                        log.flush()
                    if not config.checkpoint_every and state.epoch % config.checkpoint_epochs == 0:
                        checkpoint()
                    if dist.main and config.grid_every and state.epoch % config.grid_every == 0:
                        save_grid(sampling_pipeline().sample(min(16, config.num_samples), seed=config.seed),
                                  run_dir / "samples" / f"epoch-{state.epoch:04d}.png")
                    if evaluators and config.eval_every and state.epoch % config.eval_every == 0 \
                            and state.step < total:
                        run_metrics(sampling_pipeline())
        if last_saved != state.step:
            checkpoint()
        dist.barrier()
        pipe = sampling_pipeline()
        if dist.main:
            save_checkpoint(run_dir / "model.safetensors", pipe.model.state_dict(), resolved)
        if evaluators:
            write_json(run_dir / "eval.json", {"step": state.step, "samples": config.eval_samples,
                                               "results": run_metrics(pipe)})
    finally:
        if log:
            log.close()
        if writer:
            writer.close()

    if dist.main:
        loss_curve(metrics_path, run_dir / "loss.png")
        if sample_grid:
            save_grid(sample_with_progress(pipe, config.num_samples, console, progress, seed=config.seed),
                      run_dir / "samples.png")
    return pipe
