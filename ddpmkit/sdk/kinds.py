"""The kinds of component, in one table that the plugin manager, configuration, CLI, testing kit
and docs all read.

Each :class:`Kind` names its pluggy hook, the section of :class:`~ddpmkit.run.config.RunConfig` that
chooses it (``None`` for kinds chosen by a list, such as metrics and loggers), and the keyword
context its factory receives besides its config.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Kind:
    """One kind of component.

    name: the kind as users type it (``--set KIND.OPTION=VALUE``, ``ddpm.build(KIND, ...)``).
    hook: the hook that registers it (``register_<plural>``).
    context: the keyword arguments its factory receives besides its config.
    section: the :class:`~ddpmkit.run.config.RunConfig` field that holds its ``ComponentSpec``, if
        one component of this kind is chosen per run.
    summary: one line for docs and ``ddpmkit plugins``.
    """

    name: str
    hook: str
    context: tuple[str, ...]
    section: str | None
    summary: str

    @property
    def plural(self) -> str:
        return self.hook[len("register_"):]


KIND_TABLE: tuple[Kind, ...] = (
    Kind("schedule", "register_schedules", (), "schedule", "noise schedules: the betas β_1..β_T"),
    Kind("process", "register_processes", ("betas", "variance_type", "clip_sample", "prediction"), "process",
         "diffusion processes: how data is noised, what the network predicts, how samples are drawn"),
    Kind("predictor", "register_predictors", ("channels", "resolution", "num_classes"), "predictor",
         "noise predictors ε_θ (networks)"),
    Kind("loss", "register_losses", (), "loss", "training losses"),
    Kind("dataset", "register_datasets", (), "dataset", "datasets of images (and labels)"),
    Kind("sampler", "register_samplers", ("diffusion",), "sampler", "reverse processes (samplers)"),
    Kind("timestep_sampler", "register_timestep_samplers", ("num_timesteps",), "timestep_sampler",
         "how training draws t (uniform, importance sampling)"),
    Kind("metric", "register_metrics", ("device",), None, "sample-quality and model metrics"),
    Kind("distiller", "register_distillers", ("process",), None,
         "distillation methods: a trained run into a student that samples in a few calls"),
    Kind("logger", "register_loggers", ("run_dir", "run_config", "resume_step"), None,
         "where training results go (files, trackers)"),
)

KIND_BY_NAME: dict[str, Kind] = {k.name: k for k in KIND_TABLE}
KIND_BY_HOOK: dict[str, Kind] = {k.hook: k for k in KIND_TABLE}
KINDS: tuple[str, ...] = tuple(k.name for k in KIND_TABLE)
# The kinds a RunConfig chooses one of, in the order config.json lists them.
SECTIONS: tuple[str, ...] = tuple(k.section for k in KIND_TABLE if k.section)
