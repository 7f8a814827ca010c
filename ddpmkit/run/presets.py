"""Presets (``laptop``, the default; ``laptop-vp``, the default before issue 30; ``tiny``; ``mnist`` and
``aircraft``, the seed's Table 1) and the run configuration that ``ddpmkit run`` (and each sweep trial)
resolves from a preset and options."""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import attrs

from ddpmkit.errors import DdpmkitError
from ddpmkit.run.config import RunConfig
from ddpmkit.sdk import registry
from ddpmkit.sdk.kinds import SECTIONS
from ddpmkit.sdk.options import config_fields

# Presets: overrides applied to RunConfig's defaults. ``laptop`` (below) is the default: `ddpmkit run`
# finishes in under 10 minutes on 2 CPU cores with 28×28 digits. ``mnist`` and ``aircraft`` are the seed
# report's Table 1, exactly.
PRESETS: dict[str, dict[str, Any]] = {
    # 16×16 digits, the default before 28×28 (1,716 steps: 8 min 41 s on 2 cores when a step took 0.30 s)
    "tiny": {
        "schedule": {"name": "linear", "options": {"timesteps": 1000}},
        "predictor": {"name": "unet2d", "options": {"block_out_channels": (32, 64, 64),
                                                      "attention_resolutions": (8,),
                                                      "layers_per_block": 1, "norm_num_groups": 8}},
        "loss": {"name": "smoothl1"},
        "dataset": {"name": "mnist-5k", "options": {"resolution": 16}},
        "epochs": 22, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.995,
        "clip_sample": True, "num_samples": 64,
    },
    "mnist": {
        "schedule": {"name": "linear", "options": {"timesteps": 300, "beta_start": 1e-4, "beta_end": 0.02}},
        "predictor": {"name": "unet2d", "options": {"dropout": 0.01}},
        "loss": {"name": "smoothl1"},
        "dataset": {"name": "mnist", "options": {"resolution": 32, "split": "train"}},
        "epochs": 15, "batch_size": 32, "lr": 2e-4,
    },
    "aircraft": {
        "schedule": {"name": "linear", "options": {"timesteps": 500, "beta_start": 1e-4, "beta_end": 0.02}},
        "predictor": {"name": "unet2d", "options": {"dropout": 0.01}},
        "loss": {"name": "smoothl1"},
        "dataset": {"name": "aircraft", "options": {"resolution": 64, "split": "all"}},
        "epochs": 20, "batch_size": 32, "lr": 2e-4,
    },
}


# The default before issue 30, kept as ``laptop-vp`` (its bytes: `ddpmkit run --preset laptop-vp`): MNIST's
# own 28×28 in under 10 minutes on 2 CPU cores, the recipe chosen by the ablation in docs/benchmarks.md:
# the tiny network behind a 2×2 space-to-depth stem (28 + 2·2 = 32 → 16×16 inside), T = 500, lr 5e-3
# falling to 0 on a cosine; class-conditional on MNIST's labels (label dropout 0.1, so `ddpmkit sample
# --guidance W` works on it too), 858 steps; a 10×10 grid, a row per digit, from 20 Euler-ancestral steps.
PRESETS["laptop-vp"] = {
    **PRESETS["tiny"],
    "schedule": {"name": "linear", "options": {"timesteps": 500}},
    "predictor": {"name": "unet2d", "options": {**PRESETS["tiny"]["predictor"]["options"], "patch_size": 2, "pad": 2}},
    "dataset": {"name": "mnist-5k", "options": {"resolution": 28}},
    "sampler": {"name": "euler-ancestral", "options": {"steps": 20}},
    "class_conditional": True, "label_dropout": 0.1,
    "epochs": 11, "lr": 5e-3, "lr_decay": "cosine", "num_samples": 100,
    # No x̂_0 clipping: Euler-ancestral ignored --clip when this recipe was measured, and clipping it
    # (now honoured) scored no better on the default run (README, "Every built-in sampler honours --clip").
    "clip_sample": False,
}

# The default (issue 30, docs/benchmarks.md "A recipe for two judges"): the same network, data and
# optimizer settings as laptop-vp, trained as a flow (the linear interpolant) with logit-normal times at
# batch 32 for 18 epochs (2,808 steps: 1.6 times laptop-vp's images, at about the same cost per image);
# the grid from Heun at 8 steps (15 calls).
PRESETS["laptop"] = {
    **PRESETS["laptop-vp"],
    "process": {"name": "flow", "options": {"time": "logit-normal"}},
    "sampler": {"name": "heun", "options": {"steps": 8}},
    "batch_size": 32, "epochs": 18,
}

# A preset's vp form: the preset `ddpmkit run` starts from when the run asks for the vp process — by
# `--process vp`, or by an option only vp has (a schedule, --prediction, --min-snr, --variance,
# --learn-variance, a timestep sampler, a sampler that serves only vp) without naming a process.
VP_FORMS = {"laptop": "laptop-vp"}
VP_ONLY_FIELDS = ("prediction", "min_snr_gamma", "variance_type")

# A preset's unconditional form: what `--unconditional` changes besides dropping the labels, unless the run
# sets it itself (e.g. `--clusters 0`). The default's is 100 k-means clusters of the digits as the network's
# labels (ddpmkit.run.clusters; docs/benchmarks.md, "The unconditional run at the same budget").
UNCONDITIONAL_FORMS: dict[str, dict[str, Any]] = {"laptop": {"clusters": 100}}

# tiny, class-conditional with label dropout 0.1 (classifier-free guidance at sampling), a 10×10 grid
PRESETS["tiny-cond"] = {**PRESETS["tiny"], "class_conditional": True, "label_dropout": 0.1, "num_samples": 100}


# What a preset chose for its own dataset: run with another dataset (`--dataset NAME`), these settings
# go back to "chosen for the data when the run is assembled" (None) unless the user sets them: the
# stem from the images' side (unet2d's patch_size/pad), the conditioning from the dataset's labels.
DATASET_TIED: dict[str, dict[str, dict[str, Any]]] = {
    "laptop": {"predictor": {"patch_size": None, "pad": None}, "run": {"class_conditional": None}},
}
DATASET_TIED["laptop-vp"] = DATASET_TIED["laptop"]


def preset_config(name: str | None) -> RunConfig:
    """RunConfig for a preset (``None`` → ``laptop``)."""
    name = name or "laptop"
    if name not in PRESETS:
        close = difflib.get_close_matches(name, sorted(PRESETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DdpmkitError(f"unknown preset '{name}'{hint} available: {', '.join(sorted(PRESETS))}")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
    for section in SECTIONS:
        if section in data:
            data[section] = {"name": data[section]["name"], "options": dict(data[section].get("options", {}))}
    cfg = RunConfig.from_dict(data)
    cfg.preset = name
    return cfg


def asks_for_vp(names: dict, overrides: dict, changes: dict) -> bool:
    """Whether a run's options ask for the vp process: ``--process vp``, or, with no process named, an
    option only vp has (see :data:`VP_FORMS`)."""
    if "process" in names:
        return names["process"] == "vp"
    if "schedule" in names or "schedule" in overrides or "timestep_sampler" in overrides \
            or names.get("timestep_sampler", "uniform") != "uniform":
        return True
    if any(changes.get(f) is not None for f in VP_ONLY_FIELDS):
        return True
    if "sampler" in names and names["sampler"] in registry.available("sampler"):
        served = getattr(registry.get_component("sampler", names["sampler"]).factory, "processes", ("vp",))
        return "ode" not in served and "flow" not in served
    return False


def list_kind_changes(changes: dict[str, Any], overrides: dict[str, dict]) -> dict[str, Any]:
    """``changes`` with the rules of the RunConfig fields that are lists of components: options given
    as ``--set metric.X=V`` / ``--set logger.X=V`` (taken out of ``overrides``) go into
    ``metric_options`` / ``logger_options``; and ``ema_decay`` 0 means no EMA (``None``)."""
    for kind, field in (("metric", "metric_options"), ("logger", "logger_options")):
        if overrides.get(kind):
            changes[field] = {**changes.get(field, {}), **overrides.pop(kind)}
    if changes.get("ema_decay") == 0:
        changes["ema_decay"] = None
    return changes


def resolve_run_config(preset: str | None, names: dict | None = None, overrides: dict | None = None,
                       changes: dict | None = None, data_root: str | None = None,
                       base: RunConfig | None = None, strict: bool = True) -> RunConfig:
    """The run configuration ``ddpmkit run`` (and each sweep trial) trains with: ``base`` (default: the
    ``preset``, itself defaulting to ``laptop``) with component ``names`` (``{section: name}``), component
    ``overrides`` (``{section: {option: value}}``) and RunConfig ``changes`` applied. Every name and option is
    checked here, before anything is written: a bad one → :class:`DdpmkitError` (one line). ``strict``
    (default): a schedule asked for on a process that reads none is one too; a sweep trial passes False,
    since a space that chooses the process and the schedule draws a schedule for every trial."""
    names, overrides, changes = names or {}, overrides or {}, changes or {}
    if base is None and (preset or "laptop") in VP_FORMS and asks_for_vp(names, overrides, changes):
        preset = VP_FORMS[preset or "laptop"]  # the preset's own vp recipe, not its flow one with vp swapped in
    config = base if base is not None else preset_config(preset)
    tied = DATASET_TIED.get(config.preset or "", {}) \
        if base is None and names.get("dataset", config.dataset.name) != config.dataset.name else {}
    for section in SECTIONS:
        spec = getattr(config, section)
        if names.get(section, spec.name) != spec.name:
            spec.name, spec.options = names[section], {}
            default_loss = getattr(registry.get_component(section, spec.name).factory, "default_loss", None) \
                if section == "process" else None
            if default_loss and "loss" not in names:  # a process's own loss, unless the user chose one
                names = {**names, "loss": default_loss}
        elif section in tied:  # the preset's own component, fitted to the preset's dataset: refit it
            spec.options.update(tied[section])
        if section == "dataset" and config.preset in ("mnist", "aircraft") \
                and spec.name not in registry.available(section):
            raise DdpmkitError(f"preset '{config.preset}' needs the full dataset plugin '{spec.name}', which is not "
                               f"installed; run `ddpmkit run` for the offline default (mnist-5k)")
        comp = registry.get_component(section, spec.name)
        spec.options.update(overrides.get(section, {}))
        if section == "dataset" and data_root is not None:  # --data-root: for datasets that have the option
            if comp.config_class is None or "data_root" not in config_fields(comp.config_class):
                warnings.warn(f"dataset '{spec.name}' has no data_root option; --data-root is ignored (its options: "
                              f"--set dataset.OPTION=VALUE)", stacklevel=2)
            else:
                spec.options["data_root"] = data_root
        comp.build_config(spec.options)  # a bad option fails here, before anything is written
    try:
        config = attrs.evolve(config, **{**tied.get("run", {}), **changes})
    except (ValueError, TypeError) as exc:
        raise DdpmkitError(f"invalid option: {exc}") from None
    form = UNCONDITIONAL_FORMS.get(config.preset or "", {}) if base is None and not tied else {}
    if config.class_conditional is False and form:
        config = attrs.evolve(config, **{k: v for k, v in form.items() if k not in changes})
    if strict and ("schedule" in names or "schedule" in overrides):
        _check_schedule_is_read(config)
    return config


def _check_schedule_is_read(config: RunConfig) -> None:
    """A schedule asked for (``--schedule``, ``--set schedule.*``) on a process that does not read it
    (a continuous one, unless it says ``uses_schedule = True``) → one line, not a silent no-op."""
    from ddpmkit.run.assembly import build_process

    process, _, _ = build_process(config)
    if not getattr(process, "uses_schedule", not getattr(process, "continuous", False)):
        raise DdpmkitError(f"--schedule sets the vp process's β schedule; process '{config.process.name}' has its own "
                           f"time distribution and reads none (drop --schedule / --set schedule.*, or use --process vp)")
