"""Helpers for metric plugins: the Inception Score and Fréchet distance math, InceptionV3
backbones, and input checks.

Inception Score (seed report eq. 12–14):

    IS(G) = exp( (1/N) Σ_i KL( p(y|x_i) ‖ p̂(y) ) ),   p̂(y) = (1/N) Σ_i p(y|x_i),

computed in float64 in K splits, reported as mean ± std over the splits.

Two protocols:

* ``seed``: timm's InceptionV3 (1000 ImageNet classes), as the seed report used: grayscale → 3
  channels, bilinear resize to 299×299, the normalisation the weights expect, softmax of the
  logits; splits as torchmetrics' ``InceptionScore`` (``torch.chunk``, optional random
  permutation, sample std).
* ``torch-fidelity``: the Inception 2015-12-05 graph of published IS/FID figures, through
  torch-fidelity's ``FeatureExtractorInceptionV3``: uint8 input, TF1-style bilinear resize,
  (x − 128)/128, logits = pool3 · fc weightᵀ without bias (1008 classes),
  ``RandomState(2020)`` permutation, float64, population std.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from .errors import DdpmkitError

PROTOCOLS = ("seed", "torch-fidelity")


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------
def check_images(images: torch.Tensor, min_count: int = 1, what: str = "images") -> torch.Tensor:
    """``(N, C, H, W)`` float in [-1, 1], C in {1, 3}, no NaN; anything else → one-line DdpmkitError."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DdpmkitError(f"{what} must be a (N, C, H, W) tensor with 1 or 3 channels, got {shape}")
    if images.shape[0] < min_count:
        raise DdpmkitError(f"{what}: {images.shape[0]} images is fewer than needed ({min_count})")
    images = images.float()
    if not torch.isfinite(images).all():
        raise DdpmkitError(f"{what} contain NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.0001 or hi > 1.0001:
        raise DdpmkitError(f"{what} must lie in [-1, 1], found values in [{lo:.3g}, {hi:.3g}]")
    return images.clamp(-1, 1)


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 RGB, as saved to a PNG."""
    x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ---------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------
def inception_score(logits: torch.Tensor, splits: int = 10, protocol: str = "seed",
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """IS mean and std from classifier logits ``(N, classes)``, in float64 (eq. 12–14).

    ``protocol="seed"``: torch.chunk splits, a permutation from ``generator`` when given (no
    shuffling otherwise), sample std — as torchmetrics. ``"torch-fidelity"``: splits
    ``[i·N/K, (i+1)·N/K)`` after ``RandomState(2020).permutation``, population std.
    """
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise DdpmkitError(f"Inception Score needs at least as many images as splits: {n} images, {splits} splits")
    logits = logits.double()
    if protocol == "torch-fidelity":
        logits = logits[torch.from_numpy(np.random.RandomState(2020).permutation(n))]
        chunks = [logits[i * n // splits:(i + 1) * n // splits] for i in range(splits)]
    else:
        if generator is not None:
            logits = logits[torch.randperm(n, generator=generator)]
        chunks = list(logits.chunk(splits, dim=0))
    scores = []
    for chunk in chunks:
        log_p = chunk.log_softmax(dim=1)                          # log p(y|x_i)
        p = log_p.exp()
        log_p_hat = p.mean(dim=0, keepdim=True).log()             # log p̂(y), eq. (13)
        terms = p * (log_p - log_p_hat)                           # KL(p(y|x_i) ‖ p̂(y)), with 0 · log 0 = 0
        kl = torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=1)
        scores.append(kl.mean().exp())                            # eq. (14)
    s = torch.stack(scores)
    std = s.std(unbiased=False) if protocol == "torch-fidelity" else (s.std() if len(s) > 1 else torch.zeros(()))
    return float(s.mean()), float(std)


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of ``(N, D)`` features, as for FID."""
    f = features.double().cpu().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}) (Heusel et al. 2017), with scipy's sqrtm."""
    import warnings

    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products (few images) are handled below
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from ``torch.load(weights_only=True)`` (never arbitrary pickle)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DdpmkitError(f"weights file '{p}' does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DdpmkitError(f"cannot read weights file '{p}': {str(exc).splitlines()[0]}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DdpmkitError(f"weights file '{p}' is not a state dict of tensors")
    return sd


def file_digest(path: str | os.PathLike | None) -> str:
    if path is None:
        return "pretrained"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], path, what: str) -> None:
    own = model.state_dict()
    bad = [k for k in own if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        got = tuple(sd[k].shape) if k in sd else "missing"
        raise DdpmkitError(f"weights file '{path}' does not fit {what}: {len(bad)} tensors of the wrong shape or "
                           f"missing (e.g. {k}: {got}, expected {tuple(own[k].shape)})")
    model.load_state_dict({k: sd[k] for k in own})


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or ``host`` does not resolve within ``timeout`` seconds,
    so an offline machine gets its one-line answer at once instead of after minutes of retries."""
    import concurrent.futures
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout)
        return True
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


class SeedInception(torch.nn.Module):
    """timm's InceptionV3; ``forward(images in [-1, 1]) -> (pool3 (N, 2048), logits (N, 1000))``.

    ``channels_last`` (default True) runs the convolutions in NHWC memory format, about 1.3×
    faster on a CPU (oneDNN) and on tensor-core GPUs; the results agree with NCHW to float32
    rounding.
    """

    def __init__(self, weights: str | None = None, pretrained: bool = True, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        import timm

        if weights is None and pretrained:
            try:
                if not hub_reachable():
                    raise ConnectionError("huggingface.co cannot be reached")
                self.net = timm.create_model("inception_v3", pretrained=True)
            except Exception:
                raise DdpmkitError(
                    "could not download timm's InceptionV3 weights (offline?); pass a local file with "
                    "--set metric.weights=PATH (safetensors or a state dict of timm's inception_v3)"
                ) from None
        else:
            self.net = timm.create_model("inception_v3", pretrained=False)
            if weights is not None:
                _load_into(self.net, load_state_dict_file(weights), weights, "timm's inception_v3")
        self.net.eval().requires_grad_(False)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net.forward_head(self.net.forward_features(self.preprocess(images)), pre_logits=True)
        return feats, self.net.get_classifier()(feats)


class FidelityInception(torch.nn.Module):
    """torch-fidelity's Inception 2015-12-05 graph; ``forward(images in [-1, 1]) -> (pool3, logits_unbiased)``.

    The weights file (torch-fidelity's ``pt_inception-2015-12-05`` format) is read with
    ``weights_only=True`` (or from safetensors) and checked before torch-fidelity sees it.
    """

    def __init__(self, weights: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        features = ["2048", "logits_unbiased"]
        if weights is None:
            try:
                if not hub_reachable("github.com"):
                    raise ConnectionError("github.com cannot be reached")
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", features)
            except Exception:
                raise DdpmkitError(
                    "could not download torch-fidelity's Inception 2015-12-05 weights (offline?); pass "
                    "--set metric.weights=PATH (pt_inception-2015-12-05-6726825d.pth)"
                ) from None
            return
        sd = load_state_dict_file(weights)
        with tempfile.TemporaryDirectory() as tmp:
            clean = Path(tmp) / "weights.pt"
            torch.save(sd, clean)  # plain tensors only: safe for torch-fidelity's own torch.load
            try:
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", features,
                                                       feature_extractor_weights_path=str(clean))
            except RuntimeError as exc:
                first = str(exc).splitlines()
                detail = next((l.strip() for l in first if "size mismatch" in l or "Missing" in l), first[0])
                raise DdpmkitError(f"weights file '{weights}' does not fit torch-fidelity's InceptionV3: {detail}") from None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(to_uint8_rgb(images))


@attrs.define(kw_only=True)
class InceptionOptions:
    """Options of every metric built on an InceptionV3 (subclass it for a metric's config).

    protocol: ``seed`` (timm InceptionV3) or ``torch-fidelity``. Default ``seed``.
    weights: a local weights file (safetensors, or a state dict read with weights_only=True):
        timm's inception_v3 for ``seed``, pt_inception-2015-12-05 for ``torch-fidelity``.
        Default: download the pretrained weights.
    pretrained: ``seed`` only: with no weights file, download timm's weights (True) or use a
        random network (False; for tests). Default True.
    batch_size: images per forward pass. Default 64.
    """

    protocol: str = attrs.field(default="seed", validator=attrs.validators.in_(PROTOCOLS))
    weights: str | None = None
    pretrained: bool = True
    batch_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))

    def backbone(self, device) -> torch.nn.Module:
        """The InceptionV3 these options describe, in eval mode on ``device``."""
        return make_backbone(self.protocol, self.weights, self.pretrained).to(device).eval()


def make_backbone(protocol: str, weights: str | None, pretrained: bool = True,
                  channels_last: bool = True) -> torch.nn.Module:
    """The InceptionV3 of a protocol. ``torch-fidelity`` always runs in torch-fidelity's own
    (NCHW) layout, so that its figures are reproduced to the last digit."""
    if protocol not in PROTOCOLS:
        raise DdpmkitError(f"unknown protocol '{protocol}'; protocols: {', '.join(PROTOCOLS)}")
    if protocol == "torch-fidelity":
        return FidelityInception(weights)
    return SeedInception(weights, pretrained, channels_last)


@torch.inference_mode()
def extract(backbone: Callable, images: torch.Tensor, batch_size: int, device: torch.device,
            progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` over ``images`` in batches → (pool3 features, logits), float32, on CPU."""
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f, lg = backbone(images[i:i + batch_size].to(device))
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
        if progress is not None:
            progress(min(i + batch_size, images.shape[0]))
    return torch.cat(feats), torch.cat(logits)


class InceptionMetric:
    """Base of metric plugins built on an InceptionV3: holds the options (an
    :class:`InceptionOptions`), the device and the backbone, and runs it over checked images."""

    def __init__(self, config: InceptionOptions, *, device=None):
        self.config = config
        self.device = torch.device(device or "cpu")
        self.backbone = config.backbone(self.device)

    def outputs(self, images: torch.Tensor, min_count: int, what: str,
                progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool3 features, logits) of ``images`` after :func:`check_images` (at least ``min_count``)."""
        images = check_images(images, min_count, what)
        return extract(self.backbone, images, self.config.batch_size, self.device, progress)
