"""The run configuration: :class:`RunConfig` (attrs), its :class:`ComponentSpec` sections, and
reading one from a JSON file. Presets, and the configuration ``ddpmkit run`` resolves from its
options, are in :mod:`ddpmkit.run.presets`.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from ddpmkit.diffusion import PREDICTIONS, VARIANCE_TYPES
from ddpmkit.errors import DdpmkitError
from ddpmkit.run.posthoc_ema import SIGMA_REL_MAX
from ddpmkit.sdk.kinds import SECTIONS

# The choices of RunConfig's string fields (the CLI offers the same lists)
LR_DECAYS = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "fp32", "bf16")


def _positive(inst, attribute, value):
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _positive_float(inst, attribute, value):
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _clusters(inst, attribute, value):
    if value != 0 and not (isinstance(value, int) and value >= 2):
        raise ValueError(f"clusters must be 0 (none) or >= 2, got {value}")


def _decay(inst, attribute, value):
    if value is not None and not 0 < value < 1:  # also refuses nan
        raise ValueError(f"{attribute.name} must lie in (0, 1) (or 0/None for no EMA), got {value}")


@attrs.define
class ComponentSpec:
    """A component chosen by name, with its options (raw, as given)."""

    name: str
    options: dict[str, Any] = attrs.field(factory=dict)


def _sigma_rels(value: Any) -> tuple[float, ...]:
    """``--posthoc-ema 0.05,0.10`` (or a list) → (0.05, 0.1), each in (0, √(1/12)), distinct."""
    if value is None or value == "" or value is False:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"posthoc_ema: relative EMA lengths such as 0.05,0.10, got {value!r}") from None
    if any(not 0 < v < SIGMA_REL_MAX for v in out) or len(set(out)) != len(out):
        raise ValueError(f"posthoc_ema: distinct relative EMA lengths in (0, 0.2887), got {value!r}")
    return out


@attrs.define
class RunConfig:
    """Everything ``ddpmkit run`` needs. Defaults are the laptop-sized run.

    ``schedule``/``predictor``/``loss``/``dataset`` name registered components;
    their options go in the matching :class:`ComponentSpec`.
    """

    schedule: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("linear"))
    process: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("vp"))
    predictor: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("unet2d"))
    loss: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("smoothl1"))
    dataset: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("mnist-5k"))
    sampler: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("ddpm"))
    timestep_sampler: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("uniform"))
    # Feed the dataset's labels to the predictor (class_labels=); None: when the dataset has labels
    # (and the predictor takes them), decided when the run is assembled
    class_conditional: bool | None = False
    # An unconditional run conditioned on K k-means clusters of its images (ddpmkit.run.clusters); 0: none
    clusters: int = attrs.field(default=0, validator=_clusters)
    # With this probability a label is replaced by the "no class" label K (classifier-free guidance)
    label_dropout: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)])
    prediction: str = attrs.field(default="epsilon", validator=attrs.validators.in_(PREDICTIONS))
    min_snr_gamma: float | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.gt(0.0)))
    epochs: int = attrs.field(default=1, validator=_positive)
    max_steps: int | None = attrs.field(default=None, validator=_positive)
    batch_size: int = attrs.field(default=32, validator=_positive)
    lr: float = attrs.field(default=2e-4, validator=_positive_float)
    warmup_steps: int = attrs.field(default=0)
    # After the warm-up the learning rate stays (constant) or falls to 0 at the last step (cosine, linear)
    lr_decay: str = attrs.field(default="constant", validator=attrs.validators.in_(LR_DECAYS))
    ema_decay: float | None = attrs.field(default=None, validator=_decay)
    # Post-hoc EMA (EDM2): the relative lengths σ_rel of the power-function EMA profiles tracked and
    # snapshotted during training (``ddpmkit ema`` reconstructs any length from them); (): off
    posthoc_ema: tuple[float, ...] = attrs.field(default=(), converter=_sigma_rels)
    posthoc_ema_every: int | None = attrs.field(default=None, validator=_positive)  # steps; None: 1/16 of the run
    seed: int = 0
    variance_type: str = attrs.field(default="fixed_small", validator=attrs.validators.in_(VARIANCE_TYPES))
    clip_sample: bool = False
    num_samples: int = attrs.field(default=64, validator=_positive)
    num_workers: int | None = None  # None: 0 for in-memory datasets, else up to 4 worker processes
    grad_accum: int = attrs.field(default=1, validator=_positive)
    grad_clip: float | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.gt(0.0)))
    precision: str = attrs.field(default="auto", validator=attrs.validators.in_(PRECISIONS))
    # The fast path (ddpmkit.run.accel.FastPath): None = auto, i.e. on for CUDA, off on the CPU.
    channels_last: bool | None = None
    tf32: bool | None = None
    compile: bool = False
    cuda_graphs: bool | None = None  # sampling only
    checkpoint_every: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # steps; 0: by epochs
    checkpoint_epochs: int = attrs.field(default=1, validator=_positive)  # every N epochs when checkpoint_every is 0
    keep_checkpoints: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    log_every: int = attrs.field(default=10, validator=_positive)
    grid_every: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # epochs; 0: only at the end
    metrics: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # metric plugins run after training
    metric_options: dict[str, Any] = attrs.field(factory=dict)
    eval_every: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # epochs; 0: only at the end
    eval_samples: int = attrs.field(default=1000, validator=_positive)
    loggers: tuple[str, ...] = attrs.field(default=("jsonl", "tensorboard"), converter=tuple)
    logger_options: dict[str, Any] = attrs.field(factory=dict)
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        for section in SECTIONS:
            if section in data and isinstance(data[section], dict):
                data[section] = ComponentSpec(**{k: v for k, v in data[section].items() if k in ("name", "options")})
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def load_config_file(path) -> RunConfig:
    """A :class:`RunConfig` from a JSON file: a run directory's ``config.json`` (its ``run`` section) or a
    JSON object of RunConfig fields. A missing or malformed file → :class:`DdpmkitError`."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DdpmkitError(f"--config: no such file '{path}'") from None
    except (OSError, ValueError) as exc:
        raise DdpmkitError(f"--config: '{path}' is not a JSON configuration ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("run"), dict):
        data = data["run"]
    if not isinstance(data, dict):
        raise DdpmkitError(f"--config: '{path}' holds no JSON object of RunConfig fields")
    unknown = sorted(set(data) - {f.name for f in attrs.fields(RunConfig)})
    if unknown:
        raise DdpmkitError(f"--config: '{path}' has fields RunConfig does not know: {', '.join(unknown)}")
    try:
        return RunConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise DdpmkitError(f"--config: '{path}': {exc}") from None
