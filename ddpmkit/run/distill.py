"""``ddpmkit distill``: a trained run (the teacher) into a student run that samples in a few calls.

The method is a distiller plugin (``register_distillers``: ``progressive``, ``reflow``); this module
runs it. The student starts as a copy of the teacher's network and trains, stage by stage, on the
distiller's loss, which sees both networks as drift functions on the teacher's probability-flow ODE
(``ddpmkit.sdk.distill``). The student directory is a run of its own::

    STUDENT/
        config.json                   the teacher, the method and its options, the training settings
        couplings.safetensors         data the method builds once before training (reflow's)
        checkpoints/step-*.safetensors  training state (student weights, Adam, the step): resume after a kill
        stages/calls-N.safetensors    the student after each stage: a model file drawn in N calls
        stages/calls-N.png            a grid of it
        model.safetensors             the last stage's student; ``ddpmkit sample STUDENT`` draws in its calls
        samples.png                   its grid
        metrics.jsonl                 the loss, per logged step
        distill.json                  the report: each stage's calls, steps, loss and wall time

A class-conditional teacher gives a class-conditional student, distilled at one guidance weight W
(default 1, plain p(x | y)): the teacher is sampled with W; the student has the teacher's network,
which has no input for W, and draws at that W with one call per step (``distill.guidance`` in its
configuration records which).

Every step's batch, noise and times come from a generator seeded by (seed, step), so a distillation
resumed from a checkpoint takes the same steps as one that never stopped.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ddpmkit.errors import DdpmkitError, Interrupted
from ddpmkit.run.assembly import training_data
from ddpmkit.run.config import RunConfig
from ddpmkit.run.model_file import MODEL_FORMAT, read_weights_file, save_model_file
from ddpmkit.run.pipeline import Pipeline, _guided, pipeline_from_file, resolve_device, save_grid
from ddpmkit.run.progress import make_progress
from ddpmkit.run.rundir import RunLock, check_new_run_dir, clear_run_files, contents
from ddpmkit.run.signals import on_stop_signals
from ddpmkit.run.train_state import (
    latest_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    prune_checkpoints,
    read_training_state,
    write_training_state,
)
from ddpmkit.sdk.data import item_image
from ddpmkit.sdk.files import write_json
from ddpmkit.sdk.ode import ode_view
from ddpmkit.sdk.registry import get_component

# What a distillation writes; --overwrite removes these and nothing else.
DISTILL_FILES = ("config.json", "couplings.safetensors", "checkpoints", "stages", "model.safetensors", "samples.png",
                 "metrics.jsonl", "distill.json")
SETTINGS = ("batch_size", "lr", "lr_decay", "seed", "guidance", "checkpoint_every", "log_every", "num_samples")


def drift_function(model: torch.nn.Module, ode: Any, channels: int, num_classes: int | None, guidance: float = 1.0):
    """The network as the drift ``f(x, t, labels) -> dx/dt`` of the ODE ``ode``; with ``labels``, the
    network's classifier-free guidance at weight ``guidance`` (1: plain conditional)."""

    def f(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        inp, level = ode.net_input(x, t), ode.net_time(t)
        out = model(inp, level) if labels is None else _guided(model, labels, num_classes, guidance)(inp, level)
        return ode.drift(out[:, :channels], x, t)

    return f


def _teacher_file(path: str) -> Any:
    """The teacher's model file; a run still training (or a training-state file) is refused."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").exists():
        raise DdpmkitError(f"'{path}' is not a finished run (no model.safetensors): finish or resume its training "
                           "first, or give a model file")
    file = read_weights_file(p)
    if file.kind != "model":
        raise DdpmkitError(f"'{path}' is a training-state checkpoint, not a finished run; give the run directory or "
                           "its model.safetensors")
    return file


class Distillation:
    """One distillation into ``out`` (see the module doc); :meth:`run` trains it to the end."""

    def __init__(self, teacher: str, out: str | Path, method: str, options: dict[str, Any] | None = None, *,
                 batch_size: int = 64, lr: float = 3e-4, lr_decay: float = 0.0, seed: int = 0, guidance: float = 1.0,
                 checkpoint_every: int = 100, log_every: int = 10, num_samples: int = 64, device: str = "auto",
                 console: Console | None = None, progress: bool = True):
        if batch_size < 1:
            raise DdpmkitError(f"--batch-size must be >= 1, got {batch_size}")
        if not lr > 0:
            raise DdpmkitError(f"--lr must be > 0, got {lr}")
        if not 0 <= lr_decay <= 1:
            raise DdpmkitError(f"--lr-decay is the share of each stage over which the learning rate falls to 0: "
                               f"0 to 1, got {lr_decay}")
        if guidance < 0:
            raise DdpmkitError(f"--guidance must be >= 0, got {guidance}")
        self.teacher_path, self.out, self.method = str(teacher), Path(out), method
        self.settings = {"batch_size": batch_size, "lr": lr, "lr_decay": lr_decay, "seed": seed, "guidance": guidance,
                         "checkpoint_every": checkpoint_every, "log_every": log_every, "num_samples": num_samples}
        self.console, self.progress = console or Console(stderr=True), progress
        self.dev = resolve_device(device)
        self.file = _teacher_file(teacher)
        self.pipe = pipeline_from_file(self.file, device=self.dev, label=self.teacher_path)
        if self.pipe.num_classes is None and guidance != 1.0:
            raise DdpmkitError("--guidance needs a class-conditional teacher; this one is unconditional")
        self.ode = ode_view(self.pipe.diffusion)
        comp = get_component("distiller", method)
        self.options = comp.build_config(options or {})
        self.distiller = comp.build(config=self.options, process=self.ode)
        self.stages = list(self.distiller.stages)
        self.channels, self.num_classes = self.pipe.channels, self.pipe.num_classes

    # -- the student's files ----------------------------------------------------
    def student_config(self, calls: int, stage: int) -> dict[str, Any]:
        """The teacher's resolved configuration with the student's sampler and a ``distill`` record."""
        config = copy.deepcopy(self.file.config)
        name, options = self.distiller.sampler(calls)
        config["run"]["sampler"] = {"name": name, "options": options}
        comp = get_component("sampler", name)
        config.setdefault("components", {})["sampler"] = {"name": name, "plugin": comp.plugin, "version": comp.version,
                                                          "options": options}
        config["distill"] = {"teacher": self.teacher_path, "method": self.method, "options": _plain(self.options),
                             "stage": stage + 1, "stages": len(self.stages), "calls": calls,
                             "guidance": self.settings["guidance"]}
        return config

    def _config_json(self) -> dict[str, Any]:
        return {"teacher": self.teacher_path, "method": self.method, "options": _plain(self.options), **self.settings}

    # -- training -----------------------------------------------------------------
    def _batch(self, dataset, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dataset is None:
            shape = (self.settings["batch_size"], self.channels, self.pipe.resolution, self.pipe.resolution)
            return torch.zeros(shape, device=self.dev), None
        idx = torch.randint(0, len(dataset), (self.settings["batch_size"],), generator=generator).tolist()
        items = [dataset[i] for i in idx]
        images = torch.stack([item_image(it) for it in items]).to(self.dev)
        if self.num_classes is None:
            return images, None
        return images, torch.tensor([int(it[1]) for it in items], dtype=torch.long, device=self.dev)

    def _stage_of(self, step: int) -> int:
        end = 0
        for k, s in enumerate(self.stages):
            end += s.steps
            if step < end:
                return k
        return len(self.stages) - 1

    def _stage_end(self, k: int) -> int:
        return sum(s.steps for s in self.stages[: k + 1])

    def _lr(self, step: int, stage: int) -> float:
        """Adam's learning rate at ``step`` (0-based) of ``stage``: ``lr``, falling linearly to 0 over the stage's
        last ``lr_decay`` share of steps (so the stage ends on settled weights, not a noisy last step)."""
        lr, share = self.settings["lr"], self.settings["lr_decay"]
        if share == 0:
            return lr
        end = self._stage_end(stage)
        return lr * min(1.0, (end - step) / (share * self.stages[stage].steps))

    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        return torch.Generator(device=self.dev).manual_seed(self.settings["seed"] * 1_000_003 + step * 7 + salt)

    def run(self, resume: bool = False, overwrite: bool = False, stop_after: int | None = None) -> Path:
        """Train the student to the end (or, for tests, stop after ``stop_after`` steps with a checkpoint);
        returns the student's model file."""
        lock = RunLock(self.out)
        if not resume:
            check_new_run_dir(self.out, overwrite)
        lock.acquire()
        try:
            return self._run(resume, overwrite, stop_after)
        finally:
            lock.release()

    def _run(self, resume: bool, overwrite: bool, stop_after: int | None) -> Path:
        out = self.out
        if overwrite and not resume:
            clear_run_files(out, DISTILL_FILES)
        write_json(out / "config.json", self._config_json())
        (out / "stages").mkdir(exist_ok=True)
        teacher_net = self.pipe.model.eval().requires_grad_(False)
        first_teacher = drift_function(teacher_net, self.ode, self.channels, self.num_classes, self.settings["guidance"])
        student, step, elapsed, optim_state = self._start(teacher_net, resume)
        elapsed += self._prepare(first_teacher, counted=optim_state is None and step == 0)
        t_run = time.perf_counter()
        step = self._train(student, first_teacher, step, elapsed, optim_state, stop_after)
        if step < self._stage_end(len(self.stages) - 1):
            return out / "checkpoints"
        final = self.stages[-1].calls
        model_path = out / "model.safetensors"
        save_model_file(model_path, student.state_dict(), self.student_config(final, len(self.stages) - 1))
        (out / "samples.png").write_bytes((out / "stages" / f"calls-{final}.png").read_bytes())
        self._report(elapsed + time.perf_counter() - t_run)
        return model_path

    def _start(self, teacher_net: torch.nn.Module, resume: bool):
        """The student (the teacher's copy, or the newest checkpoint's weights), the step, the wall time
        so far, and Adam's saved state (``None`` at a stage's start)."""
        step, elapsed, optim_state = 0, 0.0, None
        student = copy.deepcopy(teacher_net).requires_grad_(True).train()
        state_path = latest_checkpoint(self.out / "checkpoints") if resume else None
        if state_path is not None:
            tensors, meta = read_training_state(state_path)
            student.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
            step, elapsed = int(meta["step"]), float(meta.get("elapsed", 0.0))
            if "optimizer" in meta:
                optim_state = (tensors, meta["optimizer"])
            self.console.print(f"Resuming the distillation at step {step} from {state_path}", markup=False,
                               highlight=False)
        return student, step, elapsed, optim_state

    def _prepare(self, teacher, counted: bool) -> float:
        """The method's data built once before training (reflow's couplings); its wall time if ``counted``."""
        prepare = getattr(self.distiller, "prepare", None)
        if prepare is None:
            return 0.0
        t0 = time.perf_counter()
        shape = (self.channels, self.pipe.resolution, self.pipe.resolution)
        with make_progress(self.console, self.progress) as bar:
            task = bar.add_task("teacher couplings", total=None, info="")
            prepare(teacher, shape=shape, num_classes=self.num_classes, generator=self._generator(0, salt=5),
                    directory=self.out, device=self.dev, progress=lambda done, n: bar.update(task, completed=done, total=n))
        return time.perf_counter() - t0 if counted else 0.0

    def _stage_teacher(self, k: int, student: torch.nn.Module, first_teacher):
        """Stage k's teacher: the trained run, or (``chain``) the previous stage's student, read from its file."""
        if not getattr(self.distiller, "chain", False) or k == 0:
            return first_teacher
        prev = read_weights_file(self.out / "stages" / f"calls-{self.stages[k - 1].calls}.safetensors")
        model = copy.deepcopy(student).requires_grad_(False).eval()
        model.load_state_dict(prev.tensors)
        return drift_function(model, self.ode, self.channels, self.num_classes)

    def _train(self, student, first_teacher, step: int, elapsed: float, optim_state, stop_after: int | None) -> int:
        """Optimizer steps to the end (or to ``stop_after``, or a stop signal); returns the step reached."""
        # a method that trains on its own data (reflow: the couplings) gets placeholders of the batch's shape
        dataset = training_data(self.pipe.config)[1] if getattr(self.distiller, "uses_data", True) else None
        total, every = self._stage_end(len(self.stages) - 1), self.settings["log_every"]
        log = _Log(self.out / "metrics.jsonl", step)
        stop: list[int] = []
        stage, teacher, optimizer, losses = -1, first_teacher, None, []
        t_run = time.perf_counter()
        f_student = drift_function(student, self.ode, self.channels, self.num_classes)
        try:
            with on_stop_signals(lambda signum, frame: stop.append(signum)), \
                    make_progress(self.console, self.progress) as bar:
                task = bar.add_task("distilling", total=total, completed=step, info="")
                while step < total:
                    k = self._stage_of(step)
                    if k != stage:
                        stage, losses = k, []
                        teacher = self._stage_teacher(k, student, first_teacher)
                        optimizer = torch.optim.Adam(student.parameters(), lr=self.settings["lr"])
                        if optim_state is not None:
                            load_optimizer_tensors(optimizer, *optim_state)
                            optim_state = None
                    gen = self._generator(step)
                    x0, labels = self._batch(dataset, gen)
                    loss = self.distiller.loss(f_student, teacher, x0, labels, stage, gen)
                    if not torch.isfinite(loss):
                        raise DdpmkitError(f"the distillation loss is {loss.item()} at step {step + 1}; lower --lr")
                    for group in optimizer.param_groups:
                        group["lr"] = self._lr(step, stage)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                    optimizer.step()
                    step += 1
                    losses.append(loss.item())
                    now = elapsed + time.perf_counter() - t_run
                    if step % every == 0 or step == total:
                        log.write({"step": step, "stage": stage + 1, "calls": self.stages[stage].calls,
                                   "loss": sum(losses[-every:]) / len(losses[-every:]), "seconds": round(now, 3)})
                    bar.update(task, completed=step, info=f"stage {stage + 1}/{len(self.stages)} → "
                                                          f"{self.stages[stage].calls} calls · loss {losses[-1]:.4g}")
                    at_end = step == self._stage_end(stage)
                    if at_end:
                        self._finish_stage(student, stage, losses, now)
                    stopping = bool(stop) or (stop_after is not None and step >= stop_after)
                    if at_end or stopping or step % self.settings["checkpoint_every"] == 0:
                        self._checkpoint(student, None if at_end else optimizer, step, stage, now)
                    if stop and step < total:
                        raise Interrupted(f"Distillation stopped at step {step} on signal {stop[0]}; continue with "
                                          f"ddpmkit distill --resume {self.out}", stop[0])
                    if stopping:
                        break
        finally:
            log.close()
        return step

    def _checkpoint(self, student, optimizer, step: int, stage: int, elapsed: float) -> None:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
        meta: dict[str, Any] = {"step": step, "stage": stage, "elapsed": elapsed,
                                "config": self.student_config(self.stages[stage].calls, stage)}
        if optimizer is not None:
            opt, groups = optimizer_tensors(optimizer)
            tensors.update({k: v.cpu() for k, v in opt.items()})
            meta["optimizer"] = groups
        write_training_state(self.out / "checkpoints", step, tensors, meta)
        prune_checkpoints(self.out / "checkpoints", 2)

    def _finish_stage(self, student, stage: int, losses: list[float], elapsed: float) -> None:
        calls = self.stages[stage].calls
        config = self.student_config(calls, stage)
        path = self.out / "stages" / f"calls-{calls}.safetensors"
        save_model_file(path, student.state_dict(), config)
        tail = losses[-50:]
        record = {"stage": stage + 1, "calls": calls, "steps": self.stages[stage].steps,
                  "loss": sum(tail) / max(1, len(tail)), "seconds": round(elapsed, 1), "file": str(path)}
        stages = _read_json(self.out / "distill.json").get("stages", [])
        stages = [s for s in stages if s["stage"] < stage + 1] + [record]
        write_json(self.out / "distill.json", {**_read_json(self.out / "distill.json"), "stages": stages})
        n = self.settings["num_samples"]
        if n > 0:
            was = student.training
            pipe = Pipeline(student.eval(), self.pipe.diffusion, self.channels, self.pipe.resolution,
                            RunConfig.from_dict(config["run"]), self.dev, config, num_classes=self.num_classes,
                            classes=self.pipe.classes)
            images = pipe.sample(n, seed=self.settings["seed"])
            student.train(was)
            save_grid(images, self.out / "stages" / f"calls-{calls}.png")

    def _report(self, seconds: float) -> None:
        report = _read_json(self.out / "distill.json")
        report.update({"teacher": self.teacher_path, "method": self.method, "options": _plain(self.options),
                       **self.settings, "calls": self.stages[-1].calls, "seconds": round(seconds, 1),
                       "model": str(self.out / "model.safetensors"), "format": MODEL_FORMAT})
        write_json(self.out / "distill.json", report)


class _Log:
    """metrics.jsonl: one line per logged step; a resumed run forgets the lines after its checkpoint."""

    def __init__(self, path: Path, keep_until: int):
        lines = []
        if path.exists() and keep_until > 0:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until]
        path.write_text("".join(ln + "\n" for ln in lines))
        self.fh = path.open("a")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _plain(config: Any) -> dict[str, Any]:
    from ddpmkit.sdk.options import config_to_dict

    return config_to_dict(config) or {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resume_settings(out: str | Path) -> dict[str, Any]:
    """What ``ddpmkit distill --resume STUDENT`` continues with: the student's config.json."""
    path = Path(out) / "config.json"
    if not contents(Path(out)) or not path.exists():
        raise DdpmkitError(f"nothing to resume in '{out}': it holds no distillation (config.json); start one with "
                           "ddpmkit distill TEACHER --method M --out STUDENT")
    data = _read_json(path)
    if "teacher" not in data or "method" not in data:
        raise DdpmkitError(f"'{path}' is not a distillation's config.json (no teacher and method)")
    return data


def distill(teacher: str, out: str | Path, method: str = "progressive", options: dict[str, Any] | None = None,
            resume: bool = False, overwrite: bool = False, **settings: Any) -> Path:
    """Library entry point: distill ``teacher`` (a finished run or its model file) into ``out`` with the
    distiller ``method`` (its ``options``); ``settings``: batch_size, lr, seed, guidance, device, ...
    Returns the student's model file."""
    return Distillation(teacher, out, method, options, **settings).run(resume=resume, overwrite=overwrite)


__all__ = ["Distillation", "distill", "drift_function", "resume_settings", "SETTINGS"]
