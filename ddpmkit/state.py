"""Training state checkpoints: everything needed to continue a run bit for bit.

One file per checkpoint, ``checkpoints/step-00000100.safetensors``:

* tensors: ``model.*`` (raw weights), ``ema.N`` (EMA shadow parameters), ``optim.N.NAME`` (Adam's
  moments and step counts), ``rng.torch`` / ``rng.noise`` / ``rng.cuda.N`` (random generator states);
* metadata (JSON): the step, epoch and batch within the epoch (the data order is a function of
  the seed and the epoch, so this position restores it), the optimizer's hyper-parameters, the
  learning-rate schedule's counters, the EMA's counters, and the resolved run configuration.

Files are written to a temporary name, fsynced and renamed (``atomic_write``), so a kill during a
write never leaves a truncated file under a checkpoint's name; a newest checkpoint that still
cannot be read is skipped for the one before it, with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import write_tensors
from .errors import DdpmkitError

FORMAT = "ddpmkit-train-state-1"
_NAME = re.compile(r"^step-(\d{8})\.safetensors$")


@attrs.define
class TrainState:
    """Where training is: optimizer steps done, the epoch, and full steps done within it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that can be opened (a damaged newest one is skipped with a warning)."""
    for path in reversed(checkpoints(ckpt_dir)):
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("format") == FORMAT:
                    return path
        except (SafetensorError, OSError, ValueError, RuntimeError):
            pass
        warnings.warn(f"checkpoint {path} is damaged; using the one before it", stacklevel=2)
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; remove leftovers of interrupted writes."""
    for tmp in ckpt_dir.glob(".step-*.tmp"):
        tmp.unlink(missing_ok=True)
    if keep > 0:
        for old in checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def cuda_rng_states(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The saved ``rng.cuda.N`` states in device order (``rng.cuda.10`` after ``rng.cuda.9``)."""
    keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    return [tensors[k] for k in keys]


def save_train_state(ckpt_dir: Path, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, ema, noise_gen: torch.Generator, resolved: dict[str, Any]) -> Path:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, value in st.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
    ema_meta = None
    if ema is not None:
        for i, p in enumerate(ema.shadow_params):
            tensors[f"ema.{i}"] = p
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.noise"] = noise_gen.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "format": FORMAT,
        "state": json.dumps(attrs.asdict(state)),
        "optimizer": json.dumps(_json_safe(opt["param_groups"])),
        "scheduler": json.dumps(_json_safe(sched)),
        "ema": json.dumps(ema_meta),
        "config": json.dumps(resolved, sort_keys=True),
    }
    return write_tensors(ckpt_dir / f"step-{state.step:08d}.safetensors", tensors, meta)


def load_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, ema,
                     noise_gen: torch.Generator, device: torch.device) -> TrainState:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise DdpmkitError(f"cannot read checkpoint '{path}': {exc}") from None
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd)
    except RuntimeError:
        raise DdpmkitError(f"checkpoint '{path}' does not match the model of this run's configuration") from None
    groups = json.loads(meta["optimizer"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    sched = json.loads(meta["scheduler"])
    scheduler.load_state_dict({**sched, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    ema_meta = json.loads(meta.get("ema", "null"))
    if ema is not None:
        if ema_meta is None:
            raise DdpmkitError(f"checkpoint '{path}' has no EMA weights but this run uses EMA")
        shadow = [tensors[f"ema.{i}"].to(device) for i in range(len(ema.shadow_params))]
        ema.load_state_dict({**ema_meta, "shadow_params": shadow})
    torch.set_rng_state(tensors["rng.torch"])
    noise_gen.set_state(tensors["rng.noise"])
    cuda_states = cuda_rng_states(tensors)
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return TrainState(**json.loads(meta["state"]))
