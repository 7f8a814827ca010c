"""A trained model ready to sample: schedule + predictor + the DDPM process.

:func:`build_pipeline` assembles one from a :class:`~ddpmkit.run.config.RunConfig`;
:func:`load_checkpoint` rebuilds one from a checkpoint file.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.errors import DdpmkitError
from ddpmkit.run.accel import FastPath, accelerated
from ddpmkit.run.assembly import DataShape, build_diffusion, build_predictor, build_sampler
from ddpmkit.run.config import RunConfig
from ddpmkit.run.model_file import read_weights_file
from ddpmkit.sdk.files import atomic_write
from ddpmkit.sdk.metrics import to_uint8


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when present, else CPU; anything else as given. A CUDA device
    always comes back with its index (``cuda`` → ``cuda:N``, N the current device), which
    ``torch.cuda.set_device`` and per-device state need."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DdpmkitError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DdpmkitError(f"device '{device}' asked for but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class Pipeline:
    """A predictor ε_θ with its diffusion process; :meth:`sample` runs Algorithm 2.

    Attributes:
        model: the predictor (``torch.nn.Module``), in eval mode for sampling.
        diffusion: the :class:`~ddpmkit.diffusion.GaussianDiffusion`.
        channels, resolution: image shape the model works on.
        num_classes: classes of a class-conditional model, K (``None``: unconditional); the label K
            means "no class" (what classifier-free guidance's unconditional half uses).
        classes: their names, when the dataset gave them.
        config: the :class:`~ddpmkit.run.config.RunConfig` it was built from.
    """

    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion, channels: int, resolution: int,
                 config: RunConfig, device: torch.device, resolved: dict[str, Any] | None = None,
                 num_classes: int | None = None, classes: tuple[str, ...] | None = None):
        self.model, self.diffusion = model, diffusion
        self.channels, self.resolution, self.num_classes, self.classes = channels, resolution, num_classes, classes
        self.config, self.device, self.resolved = config, device, resolved or {}

    def sampler(self, sampler: str | None = None, sampler_options: dict | None = None) -> tuple[str, Any]:
        """(name, sampler object) that :meth:`sample` uses: ``sampler`` with ``sampler_options``, by
        default the run's own sampler with its options updated by ``sampler_options``. A sampler that
        does not serve this run's process, or a bad option → one-line :class:`DdpmkitError`."""
        if sampler is None:
            sampler, opts = self.config.sampler.name, dict(self.config.sampler.options)
            opts.update(sampler_options or {})
        else:
            opts = dict(sampler_options or {})
        return sampler, build_sampler(sampler, opts, self.diffusion)[0]

    @property
    def cluster_sizes(self) -> tuple[int, ...] | None:
        """For a run conditioned on clusters (``--clusters``), the training images in each; else ``None``."""
        sizes = ((self.resolved or {}).get("data") or {}).get("clusters")
        return tuple(int(v) for v in sizes) if sizes else None

    def data_classes(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """``labels`` as classes of the data, for metrics and file names: ``None`` for a run conditioned
        on clusters, whose labels are clusters, not the dataset's classes."""
        return None if self.cluster_sizes else labels

    def class_index(self, value) -> int:
        """A class by index or by name (``"7"``, ``7``, ``"cat"``) → its index; unknown → one line."""
        names = list(self.classes or [])
        if isinstance(value, str) and value in names:
            return names.index(value)
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < (self.num_classes or 0):
            listing = f"; classes: {', '.join(names)}" if names else ""
            raise DdpmkitError(f"unknown class {value!r}: give an index in 0..{(self.num_classes or 1) - 1} "
                               f"or a name{listing}")
        return index

    def class_labels(self, n: int, labels=None) -> torch.Tensor | None:
        """The labels of ``n`` images for a class-conditional model: ``labels`` (one class, or a list
        of classes by index or name, each taking an equal block of the images), default every class
        in equal blocks (0, 0, ..., 1, 1, ...), or for a run conditioned on clusters each cluster in a
        block of its share of the training images (so the images are of the marginal p(x)); ``None``
        when unconditional."""
        if self.num_classes is None:
            if labels is not None:
                raise DdpmkitError("this model is not class-conditional; it takes no class labels")
            return None
        if isinstance(labels, torch.Tensor) and labels.ndim == 1 and labels.numel() == n:
            wanted = [int(v) for v in labels]
            return torch.tensor([self.class_index(v) for v in wanted], dtype=torch.long)
        if labels is None and self.cluster_sizes:  # a cluster-conditioned run: p(c), so the images are of p(x)
            from ddpmkit.run.clusters import labels_by_frequency

            return labels_by_frequency(self.cluster_sizes, n)
        if labels is None:
            wanted = list(range(self.num_classes))
        elif isinstance(labels, (list, tuple)) or (isinstance(labels, torch.Tensor) and labels.ndim == 1):
            wanted = [self.class_index(v if not isinstance(v, torch.Tensor) else int(v)) for v in labels]
        else:
            wanted = [self.class_index(labels if not isinstance(labels, torch.Tensor) else int(labels))]
        if not wanted:
            raise DdpmkitError("no class given")
        blocks = torch.arange(n) * len(wanted) // n
        return torch.tensor(wanted, dtype=torch.long)[blocks]

    @torch.inference_mode()
    def sample(self, n: int, seed: int = 0, batch_size: int = 256,
               progress: Callable[[int, int], None] | None = None, sampler: str | None = None,
               sampler_options: dict[str, Any] | None = None, fast: FastPath | None = None,
               class_labels=None, guidance: float | None = None) -> torch.Tensor:
        """``n`` images in [-1, 1], shape ``(n, C, H, W)``, on CPU.

        Args:
            n: number of images.
            seed: the same seed (and ``batch_size``) gives the same images.
            batch_size: images per batch of network evaluations.
            progress: ``progress(done_steps, total_steps)`` after every reverse step.
            sampler: a sampler plugin by name; default the run's (``ddpm``: Algorithm 2).
            sampler_options: its options, e.g. ``{"steps": 50, "eta": 0.0}`` for ``ddim``.
            fast: how the network runs (:class:`~ddpmkit.run.accel.FastPath`); default the run's
                settings, which mean bf16 autocast, channels-last, TF32 and CUDA graphs on CUDA and
                plain fp32 on the CPU.
            class_labels: for a class-conditional model, one class, a list of classes (indices or
                names) or one label per image; default every class (see :meth:`class_labels`).
            guidance: classifier-free guidance weight W: ε = ε(x, ∅) + W·(ε(x, y) − ε(x, ∅)), one batched
                forward pass for both halves; W = 1 is plain conditional sampling and W = 0 the "no
                class" label, each exactly (one pass). Default 1. Works with every sampler.
        """
        if n < 1:
            raise DdpmkitError(f"number of samples must be >= 1, got {n}")
        sampler, sampler_obj = self.sampler(sampler, sampler_options)
        labels = self.class_labels(n, class_labels)
        w = _guidance_weight(guidance, labels is not None)
        if self.diffusion.variance_type == "learned_range" and not getattr(sampler_obj, "uses_learned_variance", False) \
                and sampler not in _WARNED_VARIANCE:
            _WARNED_VARIANCE.add(sampler)
            warnings.warn(f"sampler '{sampler}' ignores the model's learned variance (it sets its own σ_t); "
                          f"the ddpm sampler uses it", stacklevel=2)
        if self.diffusion.clip_sample and not getattr(sampler_obj, "uses_clip_sample", False) \
                and sampler not in _WARNED_CLIP:
            _WARNED_CLIP.add(sampler)
            warnings.warn(f"sampler '{sampler}' ignores the run's clipping of x̂_0 to ±{self.diffusion.clip_range:g} "
                          f"(--clip); every built-in sampler uses it", stacklevel=2)
        fast = FastPath.from_run(self.config) if fast is None else fast
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out, T = [], sampler_obj.num_steps
        batches = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        total = T * len(batches)
        try:
            with accelerated(self.model, fast, self.device) as model:
                for b_i, b in enumerate(batches):
                    cb = None if progress is None else (lambda k, _o=b_i * T: progress(_o + k, total))
                    net = model if labels is None else \
                        _guided(model, labels[b_i * batch_size:][:b].to(self.device), self.num_classes, w)
                    x = sampler_obj.sample(net, (b, self.channels, self.resolution, self.resolution),
                                           generator=gen, device=self.device, progress=cb)
                    out.append(x.float().clamp(-1, 1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out)


_WARNED_VARIANCE: set[str] = set()  # samplers already told (once per process)
_WARNED_CLIP: set[str] = set()


def _conditioned(model, class_labels: torch.Tensor):
    """The network as samplers call it, ``net(x_t, t)``, with the batch's class labels added."""
    return lambda x, t: model(x, t, class_labels=class_labels)


def _guidance_weight(guidance: float | None, conditional: bool) -> float:
    if guidance is None:
        return 1.0
    if not conditional:
        raise DdpmkitError("guidance needs a class-conditional model (train with --class-conditional)")
    if not math.isfinite(guidance) or guidance < 0:
        raise DdpmkitError(f"guidance must be a number >= 0 (0: unconditional, 1: conditional), got {guidance}")
    return float(guidance)


def _guided(model, y: torch.Tensor, null: int, w: float):
    """Classifier-free guidance (Ho & Salimans 2022) around the network, so every sampler gets it
    without knowing: ``net(x_t, t) = out(x_t, ∅) + w · (out(x_t, y) − out(x_t, ∅))`` from one forward
    pass over both halves; a learned variance is taken from the conditional half."""
    if w == 1.0:
        return _conditioned(model, y)
    if w == 0.0:
        return _conditioned(model, torch.full_like(y, null))
    both = torch.cat([y, torch.full_like(y, null)])

    def net(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), class_labels=both)
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        guided = uncond[:, :c] + w * (cond[:, :c] - uncond[:, :c])
        return guided if out.shape[1] == c else torch.cat([guided, cond[:, c:]], dim=1)

    return net


def _weights(file, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a file holds for ``model``: a model file's tensors; a training-state file's EMA
    weights (``ema.N`` in parameter order, buffers from ``model.*``) or, without EMA, its ``model.*``."""
    tensors = file.tensors
    if file.kind == "model":
        return tensors
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if "ema.0" in tensors:
        for i, (name, _) in enumerate(model.named_parameters()):
            if f"ema.{i}" in tensors:
                weights[name] = tensors[f"ema.{i}"]
    return weights


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None) -> Pipeline:
    """Rebuild a :class:`Pipeline` from a run directory, its model file (``model.safetensors``) or
    one of its training-state files (``checkpoints/step-*.safetensors``, sampled with EMA weights)."""
    return pipeline_from_file(read_weights_file(path), device=device, label=path)


def pipeline_from_file(file, device: str | torch.device | None = None, label: str | os.PathLike | None = None) -> Pipeline:
    """The :class:`Pipeline` of a file :func:`~ddpmkit.run.model_file.read_weights_file` has read; ``label``
    names it in errors (default its path)."""
    path = file.path if label is None else label
    try:
        config = RunConfig.from_dict(file.config["run"])
        shape = DataShape(**file.config["data"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DdpmkitError(f"checkpoint '{path}' has an incomplete configuration ({exc})") from None
    dev = resolve_device(device)
    diffusion, _ = build_diffusion(config)
    model, _ = build_predictor(config, shape)
    tensors = _weights(file, model)
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected or wrong:
        detail = wrong[:1] or missing[:1] or unexpected[:1]
        raise DdpmkitError(
            f"checkpoint '{path}' does not match its predictor '{config.predictor.name}': "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors (e.g. {detail[0]})"
        )
    model.load_state_dict(tensors)
    model.to(dev).eval()
    return Pipeline(model, diffusion, shape.channels, shape.resolution, config, dev, file.config,
                    num_classes=shape.num_classes, classes=shape.classes)


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


def _pixels(images: torch.Tensor):
    """Images in [-1, 1] ``(N, C, H, W)`` → uint8 numpy ``(N, H, W, C)``, as PNG files and .npz hold them."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def _safe(name: str) -> str:
    """A class name as a file-name part: letters, digits, '.', '_' and '-' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "class"


def save_image_files(images: torch.Tensor, folder: str | os.PathLike, labels: torch.Tensor | None = None,
                     classes: tuple[str, ...] | None = None) -> list[Path]:
    """One PNG per image in ``folder`` (created): ``00000.png``, ``00001.png``, ... (zero-padded to the
    count), or ``00000-<class>.png`` when ``labels`` are given (the class name when ``classes`` names it,
    else its index). Grayscale images are 8-bit gray PNGs, colour ones RGB; pixel = round((x + 1)·127.5).

    Args:
        images: ``(N, C, H, W)`` in [-1, 1], C in {1, 3}.
        labels: ``(N,)`` class indices, for a class-conditional model's samples. Default none.
        classes: the class names, indexed by label. Default: indices.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = _pixels(images)
    width = max(5, len(str(len(pixels) - 1)))
    paths = []
    for i, px in enumerate(pixels):
        tag = ""
        if labels is not None:
            y = int(labels[i])
            tag = "-" + _safe(classes[y] if classes and 0 <= y < len(classes) else str(y))
        path = folder / f"{i:0{width}d}{tag}.png"
        image = Image.fromarray(px[..., 0], "L") if px.shape[-1] == 1 else Image.fromarray(px, "RGB")
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def save_npz(images: torch.Tensor, path: str | os.PathLike, labels: torch.Tensor | None = None) -> Path:
    """The samples in guided-diffusion's ``.npz`` convention (what its evaluator and most FID tools read):
    ``arr_0`` uint8 ``(N, H, W, C)``, pixel = round((x + 1)·127.5); ``arr_1`` int64 ``(N,)`` the class
    labels, for a class-conditional model's samples. Written atomically.

    Args:
        images: ``(N, C, H, W)`` in [-1, 1].
        labels: ``(N,)`` class indices, or ``None``.
    """
    import numpy as np

    arrays = [_pixels(images)]
    if labels is not None:
        arrays.append(labels.cpu().numpy().astype(np.int64))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, *arrays)

    return atomic_write(path, write)
