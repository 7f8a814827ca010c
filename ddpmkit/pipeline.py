"""A trained model ready to sample: schedule + predictor + the DDPM process.

:func:`build_pipeline` assembles one from a :class:`~ddpmkit.config.RunConfig`;
:func:`load_checkpoint` rebuilds one from a checkpoint file.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .accel import FastPath, accelerated, is_eager
from .checkpoint import atomic_write, read_checkpoint
from .config import RunConfig, config_to_dict
from .diffusion import GaussianDiffusion
from .errors import DdpmkitError
from .plugins import get_component


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when present, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DdpmkitError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DdpmkitError(f"device '{device}' asked for but CUDA is not available here; use --device cpu")
    return dev


def make_diffusion(config: RunConfig) -> tuple[GaussianDiffusion, Any]:
    """Build the schedule plugin's betas and the diffusion process around them."""
    comp = get_component("schedule", config.schedule.name)
    sched_cfg = comp.make_config(config.schedule.options)
    betas = comp.create(sched_cfg)
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 1:
        raise DdpmkitError(f"schedule '{comp.name}' (plugin {comp.plugin}) returned betas of shape {tuple(betas.shape)}; expected (T,) with T >= 1")
    if not bool(torch.isfinite(betas).all() & ((betas > 0) & (betas < 1)).all()):
        raise DdpmkitError(f"schedule '{comp.name}' (plugin {comp.plugin}) returned betas outside (0, 1)")
    alpha_bar = torch.cumprod(1 - betas, 0)
    if betas.numel() > 1 and not bool((alpha_bar[1:] < alpha_bar[:-1]).all()):
        raise DdpmkitError(f"schedule '{comp.name}' (plugin {comp.plugin}) gives an ᾱ_t that is not decreasing")
    diffusion = GaussianDiffusion(betas, variance_type=config.variance_type, clip_sample=config.clip_sample,
                                  prediction=config.prediction)
    return diffusion, sched_cfg


def make_sampler(name: str, options: dict[str, Any] | None, diffusion: GaussianDiffusion):
    """Build a sampler plugin for ``diffusion``."""
    comp = get_component("sampler", name)
    cfg = comp.make_config(options or {})
    sampler = comp.create(cfg, diffusion=diffusion)
    return sampler, cfg


def make_predictor(config: RunConfig, channels: int, resolution: int) -> tuple[torch.nn.Module, Any]:
    comp = get_component("predictor", config.predictor.name)
    cfg = comp.make_config(config.predictor.options)
    model = comp.create(cfg, channels=channels, resolution=resolution)
    if not isinstance(model, torch.nn.Module):
        raise DdpmkitError(f"predictor '{comp.name}' (plugin {comp.plugin}) did not return a torch.nn.Module")
    return model, cfg


def resolved_config(config: RunConfig, channels: int, resolution: int, configs: dict[str, Any]) -> dict[str, Any]:
    """The JSON written next to every checkpoint: names, plugins, versions, every option."""
    components = {}
    for kind in ("schedule", "predictor", "loss", "dataset", "sampler"):
        spec = getattr(config, kind)
        comp = get_component(kind, spec.name)
        components[kind] = {"name": spec.name, "plugin": comp.plugin, "version": comp.version,
                            "options": config_to_dict(configs.get(kind))}
    return {"ddpmkit_version": __version__, "run": config.to_dict(), "components": components,
            "data": {"channels": channels, "resolution": resolution}}


class Pipeline:
    """A predictor ε_θ with its diffusion process; :meth:`sample` runs Algorithm 2.

    Attributes:
        model: the predictor (``torch.nn.Module``), in eval mode for sampling.
        diffusion: the :class:`~ddpmkit.diffusion.GaussianDiffusion`.
        channels, resolution: image shape the model works on.
        config: the :class:`~ddpmkit.config.RunConfig` it was built from.
    """

    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion, channels: int, resolution: int,
                 config: RunConfig, device: torch.device, resolved: dict[str, Any] | None = None):
        self.model, self.diffusion = model, diffusion
        self.channels, self.resolution = channels, resolution
        self.config, self.device, self.resolved = config, device, resolved or {}

    @torch.inference_mode()
    def sample(self, n: int, seed: int = 0, batch_size: int = 256,
               progress: Callable[[int, int], None] | None = None, sampler: str | None = None,
               sampler_options: dict[str, Any] | None = None, fast: FastPath | None = None) -> torch.Tensor:
        """``n`` images in [-1, 1], shape ``(n, C, H, W)``, on CPU.

        Args:
            n: number of images.
            seed: the same seed (and ``batch_size``) gives the same images.
            batch_size: images per batch of network evaluations.
            progress: ``progress(done_steps, total_steps)`` after every reverse step.
            sampler: a sampler plugin by name; default the run's (``ddpm``: Algorithm 2).
            sampler_options: its options, e.g. ``{"steps": 50, "eta": 0.0}`` for ``ddim``.
            fast: how the network runs (:class:`~ddpmkit.accel.FastPath`); default the run's
                settings, which mean bf16 autocast, channels-last, TF32 and CUDA graphs on CUDA and
                plain fp32 on the CPU.
        """
        if n < 1:
            raise DdpmkitError(f"number of samples must be >= 1, got {n}")
        if sampler is None:
            sampler, opts = self.config.sampler.name, dict(self.config.sampler.options)
            opts.update(sampler_options or {})
        else:
            opts = dict(sampler_options or {})
        sampler_obj, _ = make_sampler(sampler, opts, self.diffusion)
        fast = FastPath.from_run(self.config) if fast is None else fast
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out, T = [], sampler_obj.num_steps
        batches = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        total = T * len(batches)
        try:
            with contextlib.ExitStack() as stack:
                model = self.model
                if not is_eager(fast, self.device):
                    model = stack.enter_context(accelerated(self.model, fast, self.device))
                for b_i, b in enumerate(batches):
                    cb = None if progress is None else (lambda k, _o=b_i * T: progress(_o + k, total))
                    x = sampler_obj.sample(model, (b, self.channels, self.resolution, self.resolution),
                                           generator=gen, device=self.device, progress=cb)
                    out.append(x.float().clamp(-1, 1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None) -> Pipeline:
    """Rebuild a :class:`Pipeline` from a checkpoint file (or a run directory)."""
    tensors, resolved = read_checkpoint(path)
    try:
        config = RunConfig.from_dict(resolved["run"])
        channels, resolution = resolved["data"]["channels"], resolved["data"]["resolution"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DdpmkitError(f"checkpoint '{path}' has an incomplete configuration ({exc})") from None
    dev = resolve_device(device)
    diffusion, _ = make_diffusion(config)
    model, _ = make_predictor(config, channels, resolution)
    missing, unexpected, wrong = [], [], []
    own = model.state_dict()
    for k, v in own.items():
        if k not in tensors:
            missing.append(k)
        elif tuple(tensors[k].shape) != tuple(v.shape):
            wrong.append(f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}")
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected or wrong:
        detail = wrong[:1] or missing[:1] or unexpected[:1]
        raise DdpmkitError(
            f"checkpoint '{path}' does not match its predictor '{config.predictor.name}': "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors (e.g. {detail[0]})"
        )
    model.load_state_dict(tensors)
    model.to(dev).eval()
    return Pipeline(model, diffusion, channels, resolution, config, dev, resolved)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
              scale: int | None = None) -> Path:
    """Save images in [-1, 1] as one PNG grid (atomically).

    Args:
        images: ``(N, C, H, W)`` in [-1, 1].
        nrow: images per row; default ⌈√N⌉.
        scale: integer upscaling (nearest neighbour) so small images can be seen;
            default makes each cell at least 64 pixels (×4 at 16, ×2 at 32).
    """
    from torchvision.utils import save_image

    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    scale = scale or max(1, 64 // images.shape[-1])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    return atomic_write(path, lambda tmp: save_image((images + 1) / 2, tmp, nrow=nrow, padding=2, format="PNG"))
