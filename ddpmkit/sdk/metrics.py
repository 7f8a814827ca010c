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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from ddpmkit.errors import DdpmkitError
from ddpmkit.sdk.data import default_data_root, folder_fingerprint, item_image
from ddpmkit.sdk.files import write_tensors
from ddpmkit.sdk.registry import build, get_component

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


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats ``(N, C, H, W)`` → uint8 of the same shape, as saved to a PNG: round((x + 1)·127.5)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` → float32 in [-1, 1]: u/127.5 − 1 (``to_uint8`` gives the bytes back exactly)."""
    return images.float() / 127.5 - 1


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] on the 8-bit grid a saved image holds: ``from_uint8(to_uint8(images))``."""
    return from_uint8(to_uint8(images))


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 RGB, as saved to a PNG."""
    x = to_uint8(images)
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


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
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

    def backbone(self, device: torch.device | str) -> torch.nn.Module:
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

    def __init__(self, config: InceptionOptions, *, device: torch.device | str | None = None) -> None:
        self.config = config
        self.device = torch.device(device or "cpu")
        self.backbone = config.backbone(self.device)

    def outputs(self, images: torch.Tensor, min_count: int, what: str,
                progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool3 features, logits) of ``images`` after :func:`check_images` (at least ``min_count``)."""
        images = check_images(images, min_count, what)
        return extract(self.backbone, images, self.config.batch_size, self.device, progress)


# ---------------------------------------------------------------------------
# Kernel Inception Distance, precision/recall, nearest neighbours (on any (N, D) features)
# ---------------------------------------------------------------------------
def kernel_inception_distance(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 2020) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased estimate of MMD² with the polynomial kernel
    k(x, y) = (γ x·y + c)^d (γ = 1/D by default), averaged over ``subsets`` pairs of random subsets
    of ``subset_size`` rows of ``f1`` (N₁, D) and ``f2`` (N₂, D), drawn without replacement by
    ``numpy.random.RandomState(seed)`` (``f1``'s subset first, as torch-fidelity does). Float64.

        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / m²

    Returns (mean, population std) over the subsets.
    """
    n1, n2 = f1.shape[0], f2.shape[0]
    if subset_size < 2 or n1 < subset_size or n2 < subset_size:
        raise DdpmkitError(f"KID subsets of {subset_size} need at least that many images in each set "
                           f"(got {n1} and {n2}); lower subset_size")
    x_all, y_all = f1.double().cpu().numpy(), f2.double().cpu().numpy()
    g = 1.0 / x_all.shape[1] if gamma is None else gamma
    kernel = lambda a, b: (a @ b.T * g + coef0) ** degree  # noqa: E731
    rng = np.random.RandomState(seed)
    m = subset_size
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = x_all[rng.choice(n1, m, replace=False)]
        y = y_all[rng.choice(n2, m, replace=False)]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        mmds[i] = ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                   - 2 * k_xy.sum() / (m * m))
    return float(mmds.mean()), float(mmds.std())


def _kth_neighbour_radius(f: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of ``f`` to its k-th nearest other row (the k-NN ball radius)."""
    return torch.cat([torch.cdist(chunk, f).kthvalue(k + 1, dim=1).values for chunk in f.split(batch_size)])


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([(torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in queries.split(batch_size)])


def precision_recall(generated: torch.Tensor, real: torch.Tensor, neighbourhood: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``generated`` (N₁, D) against
    ``real`` (N₂, D) features. Each set's manifold is the union of balls around its points with
    radius the distance to the point's ``neighbourhood``-th nearest neighbour in the same set;
    precision is the share of generated points inside the real manifold, recall the share of
    real points inside the generated one. Exact distances (``torch.cdist``) in chunks of
    ``batch_size`` rows, so memory stays at ``batch_size × N`` distances.
    """
    for f, what in ((generated, "generated"), (real, "real")):
        if f.shape[0] <= neighbourhood:
            raise DdpmkitError(f"precision/recall with neighbourhood {neighbourhood} needs more than {neighbourhood} "
                               f"{what} images, got {f.shape[0]}")
    generated, real = generated.float(), real.float()
    r_real = _kth_neighbour_radius(real, neighbourhood, batch_size)
    r_gen = _kth_neighbour_radius(generated, neighbourhood, batch_size)
    precision = _inside_any_ball(generated, real, r_real, batch_size).double().mean()
    recall = _inside_any_ball(real, generated, r_gen, batch_size).double().mean()
    return float(precision), float(recall)


EXACT_SEARCH_LIMIT = 200_000


def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int = 3, batch_size: int = 512,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``keys`` (M, D) to each row of ``queries`` (N, D) in Euclidean
    distance: (distances (N, k) float64, ascending; indices (N, k) long).

    ``backend``: ``torch`` (exact: ``torch.cdist`` over chunks of ``batch_size`` queries, then the
    k distances recomputed in float64), ``faiss`` (exact search with FAISS's ``IndexFlatL2``, for
    key sets past a few hundred thousand rows; ``pip install 'ddpmkit[faiss]'``), or ``auto``
    (torch up to :data:`EXACT_SEARCH_LIMIT` keys, FAISS beyond when it is installed).
    """
    if backend not in ("auto", "torch", "faiss"):
        raise DdpmkitError(f"unknown nearest-neighbour backend '{backend}'; backends: auto, torch, faiss")
    if keys.shape[0] < k:
        raise DdpmkitError(f"nearest neighbours: {keys.shape[0]} reference images are fewer than k = {k}")
    q, kk = queries.reshape(queries.shape[0], -1).float(), keys.reshape(keys.shape[0], -1).float()
    if backend == "auto":
        backend = "torch"
        if kk.shape[0] > EXACT_SEARCH_LIMIT:
            try:
                import faiss  # noqa: F401

                backend = "faiss"
            except ImportError:
                pass
    if backend == "faiss":
        try:
            import faiss
        except ImportError:
            raise DdpmkitError("the faiss backend needs FAISS: pip install 'ddpmkit[faiss]'") from None
        index = faiss.IndexFlatL2(kk.shape[1])
        index.add(kk.contiguous().numpy())
        _, idx = index.search(q.contiguous().numpy(), k)
        idx = torch.from_numpy(idx).long()
    else:
        idx = torch.cat([torch.cdist(chunk, kk).topk(k, dim=1, largest=False).indices for chunk in q.split(batch_size)])
    dist = torch.cat([(qc.double().unsqueeze(1) - kk[ic].double()).norm(dim=2)  # exact, float64
                      for qc, ic in zip(q.split(batch_size), idx.split(batch_size))])
    dist, order = dist.sort(dim=1)
    return dist, idx.gather(1, order)


# ---------------------------------------------------------------------------
# Feature spaces and real reference features (fid, kid, precision-recall, memorization)
# ---------------------------------------------------------------------------
@attrs.define(kw_only=True)
class ReferenceOptions(InceptionOptions):
    """Options of metrics that compare with a dataset's real images (plus :class:`InceptionOptions`).

    dataset: the real images, a dataset plugin by name. Default ``mnist-5k``.
    data_root: that dataset's data_root, if it needs one. Default: its own default.
    reference_images: at most this many real images. Default 10000.
    cache_dir: where real statistics and features are kept. Default ``<cache>/ddpmkit/fid-stats``.
    """

    dataset: str = "mnist-5k"
    data_root: str | None = None
    reference_images: int = attrs.field(default=10000, validator=attrs.validators.ge(2))
    cache_dir: str | None = None

    def reference_key(self, resolution: int, **extra) -> tuple[str, str]:
        """(a digest naming these real images at ``resolution`` and ``extra``, the JSON it digests)."""
        import json

        root = Path(self.data_root).expanduser().resolve() if self.data_root else None
        key = json.dumps({"dataset": self.dataset,
                          "data_root": str(root) if root else str(default_data_root().resolve()),
                          "contents": folder_fingerprint(root) if root else None, "resolution": resolution,
                          "n": self.reference_images, "protocol": self.protocol, "weights": file_digest(self.weights),
                          **extra}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16], key

    def cache_path(self, stem: str, resolution: int, digest: str) -> Path:
        cache = Path(self.cache_dir) if self.cache_dir else default_data_root().parent / "fid-stats"
        return cache / f"{stem}{self.dataset}-{resolution}-{digest}.safetensors"

    def reference_set(self, resolution: int) -> torch.Tensor:
        """Up to ``reference_images`` images of ``dataset`` at ``resolution``, (N, C, H, W) in [-1, 1]."""
        options: dict = {"resolution": resolution, "limit": self.reference_images}
        if self.data_root:
            options["data_root"] = str(Path(self.data_root).expanduser().resolve())
        return dataset_images(build("dataset", self.dataset, options))


def split_options(name: str, options: dict, resolution: int, split: str = "test",
                  data_root: str | None = None) -> tuple[dict, bool]:
    """Options that build dataset plugin ``name`` at ``resolution`` from another run's ``options``
    (those it knows, ``limit`` dropped), with ``split`` when it has a ``split`` option and ``data_root``
    when given; and whether it has a split (so held-out images can be asked of it)."""
    comp = get_component("dataset", name)
    fields = {f.name for f in attrs.fields(comp.config_class)} if attrs.has(comp.config_class) else set()
    opts = {k: v for k, v in options.items() if k in fields and k != "limit"}
    if "split" in fields:
        opts["split"] = split
    if data_root:
        opts["data_root"] = data_root
    opts["resolution"] = resolution
    return opts, "split" in fields


def random_subset(dataset: Any, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fixed random subset of up to ``count`` items, in dataset order (only those items are read):
    images (N, C, H, W) and integer labels (N,), or ``None`` for a dataset without labels."""
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    items = [dataset[int(i)] for i in keep]
    labelled = isinstance(items[0], (tuple, list))
    images = torch.stack([it[0] if labelled else it for it in items])
    return images, (torch.tensor([int(it[1]) for it in items]) if labelled else None)


def dataset_images(dataset: Any, limit: int | None = None) -> torch.Tensor:
    """The images of a dataset plugin's dataset (labels dropped), stacked: (N, C, H, W)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([item_image(dataset[i]) for i in range(n)])


@attrs.define(kw_only=True)
class FeatureOptions(ReferenceOptions):
    """Options of metrics computed on image features (plus :class:`ReferenceOptions`).

    features: the feature space. ``inception``: InceptionV3 pool3 (2048-d) of ``protocol`` and
        ``weights``; or the name of a metric plugin whose object has ``features(images) -> (N, D)``
        (and optionally ``features_name``, a description) — ``digit-score``: its digit classifier's
        128-d penultimate layer; or ``auto``: Inception
        when ``weights`` are given, else ``digit-score`` for 1-channel images, else Inception
        (pretrained download). Default ``auto``.
    """

    features: str = "auto"


_FEATURE_MEMO: dict = {}


class FeatureMetric:
    """Base of metric plugins that compare features of images with features of real images.

    ``feature_space`` names the space once resolved (it is written beside the results).
    """

    def __init__(self, config: FeatureOptions, *, device: torch.device | str | None = None) -> None:
        self.config = config
        self.device = torch.device(device or "cpu")
        self._extractor = None
        self.feature_space: str | None = None

    def _resolve(self, channels: int) -> str:
        name = self.config.features
        if name == "auto":
            name = "inception" if self.config.weights or channels == 3 else "digit-score"
        return name

    def extractor(self, channels: int) -> tuple[str, Callable[..., torch.Tensor]]:
        """(space name, callable images → (N, D) features)."""
        if self._extractor is None:
            name = self._resolve(channels)
            if name == "inception":
                backbone = self.config.backbone(self.device)
                fn = lambda x, progress=None: extract(backbone, x, self.config.batch_size, self.device,  # noqa: E731
                                                      progress)[0]
                self.feature_space = f"inception pool3 ({self.config.protocol} protocol, " \
                                     f"{'weights ' + Path(self.config.weights).name if self.config.weights else 'pretrained'})"
            else:
                from ddpmkit.sdk.registry import build, get_component

                other = build("metric", name, {}, device=self.device)
                if not callable(getattr(other, "features", None)):
                    raise DdpmkitError(f"features='{name}': metric '{name}' has no features(images); use 'inception' "
                                       f"or a metric that provides features (e.g. digit-score)")
                fn = lambda x, progress=None: other.features(x)  # noqa: E731
                self.feature_space = getattr(other, "features_name", None) or f"{name} features"
                self._version = get_component("metric", name).version
            self._extractor = (name, fn)
        return self._extractor

    def features(self, images: torch.Tensor, progress: Callable[[int], None] | None = None, min_count: int = 2,
                 what: str = "images") -> torch.Tensor:
        """Features (N, D) float32 of checked ``images``; the same images asked twice in a row by
        metrics of the same space (one ``evaluate`` with several metrics) are computed once."""
        name, fn = self.extractor(images.shape[1])
        key = (name, self.config.protocol, self.config.weights, images.data_ptr(), tuple(images.shape),
               float(images.detach().double().sum()))
        memo = _FEATURE_MEMO.get("last")
        if memo is not None and memo[0] == key:
            return memo[1]
        f = fn(check_images(images, min_count, what), progress).float().cpu()
        _FEATURE_MEMO["last"] = (key, f)
        return f

    def reference_features(self, resolution: int, channels: int) -> torch.Tensor:
        """The real images' features, cached on disk per dataset, resolution, count and space."""
        name, fn = self.extractor(channels)
        digest, key = self.config.reference_key(resolution, features=name,
                                                version=getattr(self, "_version", None))
        path = self.config.cache_path("features-", resolution, digest)
        from safetensors.torch import load_file

        if path.exists():
            return load_file(str(path))["features"]
        f = fn(self.config.reference_set(resolution)).float().cpu().contiguous()
        write_tensors(path, {"features": f}, {"key": key})
        return f
