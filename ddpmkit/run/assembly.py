"""Assembling a run from a :class:`~ddpmkit.run.config.RunConfig`: the one place components are built.

Training, ``load_checkpoint`` (and so ``sample``, ``evaluate`` and ``export``) build their parts
here. Every ``build_*`` function takes the configuration, builds the named component through the
plugin registry, checks its answer against the contract (``ddpmkit.contract``) and returns it with
its config object. :func:`probe` calls each component of a run once on small inputs of the run's
shapes, so a faulty plugin stops a run in one line before any training time is spent.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import torch

from ddpmkit._version import __version__
from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.errors import DdpmkitError
from ddpmkit.run.config import ComponentSpec, RunConfig
from ddpmkit.sdk import contract
from ddpmkit.sdk.data import item_image
from ddpmkit.sdk.kinds import SECTIONS
from ddpmkit.sdk.options import config_fields, config_to_dict
from ddpmkit.sdk.registry import Component, available, get_component, takes_keyword


def _names(value):
    return None if value is None else tuple(str(v) for v in value)


def _sizes(value):
    return None if value is None else tuple(int(v) for v in value)


@attrs.frozen
class DataShape:
    """What the predictor is built for: image channels, side, and for class-conditional runs the
    class count K and the class names (label K is "no class", for classifier-free guidance). A run
    conditioned on clusters (``--clusters K``, :mod:`ddpmkit.run.clusters`) has K "classes" that are
    clusters, and ``clusters`` holds how many training images each has (sampling draws them so)."""

    channels: int
    resolution: int
    num_classes: int | None = None
    classes: tuple[str, ...] | None = attrs.field(default=None, converter=_names)
    clusters: tuple[int, ...] | None = attrs.field(default=None, converter=_sizes)


def component(config: RunConfig, kind: str) -> Component:
    return get_component(kind, getattr(config, kind).name)


def build_process(config: RunConfig) -> tuple[Any, Any, Any]:
    """The run's process (``vp``: a :class:`GaussianDiffusion` on the schedule plugin's betas, checked),
    the schedule's config and the process's config."""
    comp = component(config, "schedule")
    cfg = comp.build_config(config.schedule.options)
    betas = contract.check_betas(comp, comp.build(config=cfg))
    pcomp = component(config, "process")
    pcfg = pcomp.build_config(config.process.options)
    process = pcomp.build(config=pcfg, betas=betas, variance_type=config.variance_type, clip_sample=config.clip_sample,
                          prediction=config.prediction)
    if getattr(process, "continuous", False):
        if config.min_snr_gamma:
            raise DdpmkitError(f"--min-snr weights the vp process's timesteps; process '{pcomp.name}' has none (drop it)")
        if config.timestep_sampler.name != "uniform":
            raise DdpmkitError(f"--timestep-sampler {config.timestep_sampler.name} draws the vp process's timesteps; "
                               f"process '{pcomp.name}' draws its own times (see its options: ddpmkit plugins --options)")
    elif not isinstance(process, GaussianDiffusion):
        contract.fail(pcomp, contract.describe(process), "a GaussianDiffusion, or a continuous process (continuous = True)")
    return process, cfg, pcfg


def build_diffusion(config: RunConfig) -> tuple[Any, Any]:
    """The run's process (for ``vp`` the :class:`GaussianDiffusion` on the schedule plugin's betas) and
    the schedule's config."""
    process, cfg, _ = build_process(config)
    return process, cfg


def process_name(diffusion: Any) -> str:
    """The name of the process ``diffusion`` is (``vp`` for a GaussianDiffusion)."""
    return getattr(diffusion, "name", "vp") if getattr(diffusion, "continuous", False) else "vp"


def build_dataset(config: RunConfig) -> tuple[Any, Any, DataShape]:
    """The dataset, its config and its shape (checked on its first, middle and last items).

    The shape carries the class count when the run is class-conditional: ``config.class_conditional``
    True (the dataset must have labels), or ``None`` and the dataset has labels and a class count."""
    comp = component(config, "dataset")
    cfg = comp.build_config(config.dataset.options)
    dataset = comp.build(config=cfg)
    channels, resolution, labelled = contract.check_dataset(comp, dataset)
    num_classes = contract.dataset_num_classes(dataset) if labelled else None
    if config.class_conditional and not num_classes:
        raise DdpmkitError(f"{comp.label()} has no class labels (items (image, label) and a `classes` or "
                           "`num_classes` attribute), which a class-conditional run needs; drop --class-conditional "
                           "(or pass --unconditional)")
    if config.class_conditional is False or not num_classes:
        return dataset, cfg, DataShape(channels, resolution, None)
    names = getattr(dataset, "classes", None)
    return dataset, cfg, DataShape(channels, resolution, num_classes,
                                   names if names is not None and len(names) == num_classes else None)


def cluster_labelled(config: RunConfig, dataset: Any, shape: DataShape) -> tuple[Any, DataShape]:
    """With ``config.clusters`` = K > 0: the dataset with each image's k-means cluster as its label, and
    the shape of a K-cluster run (:mod:`ddpmkit.run.clusters`); otherwise both unchanged. The run must
    not also be class-conditional (clusters take the labels' place)."""
    if not config.clusters:
        return dataset, shape
    if config.class_conditional:
        raise DdpmkitError("--clusters conditions the network on k-means clusters of the images in place of "
                           "labels; use it with --unconditional (or drop --clusters)")
    from ddpmkit.run.clusters import ClusterLabelled, cluster_images, cluster_sizes

    try:
        assignments = cluster_images(dataset, config.clusters, config.seed)
    except ValueError as exc:
        raise DdpmkitError(str(exc)) from None
    return ClusterLabelled(dataset, assignments), DataShape(shape.channels, shape.resolution, config.clusters,
                                                            clusters=cluster_sizes(assignments, config.clusters))


def training_data(config: RunConfig) -> tuple[RunConfig, Any, Any, DataShape]:
    """What a run trains on: :func:`build_dataset`, with the dataset's ``recommended`` settings filled
    into ``config`` and (``--clusters``) its images' clusters as labels; (config, dataset, its config, shape)."""
    dataset, ds_cfg, shape = build_dataset(config)
    config = recommended(config, dataset)
    if config.class_conditional is False and shape.num_classes:  # the dataset recommended no conditioning
        shape = DataShape(shape.channels, shape.resolution)
    dataset, shape = cluster_labelled(config, dataset, shape)
    return config, dataset, ds_cfg, shape


def recommended(config: RunConfig, dataset: Any) -> RunConfig:
    """``config`` with the dataset's ``recommended`` settings (an optional dataset attribute, a dict:
    ``{"predictor": {option: value}, "class_conditional": bool}``) filled into what the run leaves to
    be chosen for the data (``None``): a user's or preset's own value always wins."""
    rec = getattr(dataset, "recommended", None) or {}
    if not isinstance(rec, dict):
        return config
    changes = {}
    if "class_conditional" in rec and config.class_conditional is None:
        changes["class_conditional"] = bool(rec["class_conditional"])
    options = {k: v for k, v in (rec.get("predictor") or {}).items()
               if k in config.predictor.options and config.predictor.options[k] is None}
    if options:
        changes["predictor"] = ComponentSpec(config.predictor.name, {**config.predictor.options, **options})
    return attrs.evolve(config, **changes) if changes else config


def conditioning_note(config: RunConfig, shape: DataShape) -> str:
    """One line on the conditioning chosen for the data (``class_conditional`` None)."""
    if shape.clusters:
        return f"no labels: unconditional, conditioned on {shape.num_classes} k-means clusters of the images"
    if shape.num_classes:
        names = list(shape.classes or [])
        listed = f": {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else ""
        return f"labels ({shape.num_classes} classes{listed}): class-conditional"
    return "no labels: unconditional"


def build_predictor(config: RunConfig, shape: DataShape, check_labels: bool = True) -> tuple[torch.nn.Module, Any]:
    """The predictor for images of ``shape``; its declared outputs and conditions must fit the run
    (``check_labels=False``: a class-conditional shape whose predictor takes no labels is the caller's
    to handle)."""
    comp = component(config, "predictor")
    cfg = comp.build_config(config.predictor.options)
    model = contract.check_predictor_module(comp, comp.build(config=cfg, channels=shape.channels,
                                                             resolution=shape.resolution,
                                                             num_classes=shape.num_classes))
    learned = "variance" in contract.predictor_outputs(model)
    if learned != (config.variance_type == "learned_range"):
        raise DdpmkitError(f"{comp.label()} outputs a learned variance; run it with --variance learned_range"
                           if learned else f"--variance learned_range needs a predictor that outputs a variance "
                           f"(outputs = ('prediction', 'variance')); {comp.label()} does not")
    if check_labels and shape.num_classes and "class_labels" not in contract.predictor_conditions(model):
        raise DdpmkitError(f"{comp.label()} takes no class labels (its module declares no "
                           "conditions = ('class_labels',)); drop --class-conditional or pick another predictor")
    return model, cfg


def build_sampler(name: str, options: dict[str, Any] | None, diffusion: GaussianDiffusion) -> tuple[Any, Any]:
    """A sampler plugin for ``diffusion``."""
    comp = get_component("sampler", name)
    served, process = getattr(comp.factory, "processes", ("vp",)), process_name(diffusion)
    if process not in served and not ("ode" in served and getattr(diffusion, "continuous", False)):
        fits = [n for n in available("sampler") if _serves(get_component("sampler", n), diffusion)]
        raise DdpmkitError(f"sampler '{name}' does not serve the '{process}' process; samplers that do: {', '.join(fits)}")
    cfg = comp.build_config(options or {})
    sampler = contract.check_sampler_object(comp, comp.build(config=cfg, diffusion=diffusion))
    return sampler, cfg


def _serves(comp: Component, diffusion: Any) -> bool:
    served = getattr(comp.factory, "processes", ("vp",))
    return process_name(diffusion) in served or ("ode" in served and getattr(diffusion, "continuous", False))


def build_loss(config: RunConfig) -> tuple[Any, Any, bool]:
    """The loss, its config, and whether it asks for a ``context`` (a keyword parameter of that name)."""

    comp = component(config, "loss")
    cfg = comp.build_config(config.loss.options)
    loss = comp.build(config=cfg)
    if not callable(loss):
        contract.fail(comp, contract.describe(loss), "a callable loss(prediction, target, reduction='mean')")
    return loss, cfg, takes_keyword(loss, "context")


def build_timestep_sampler(config: RunConfig, num_timesteps: int) -> tuple[Any, Any]:
    comp = component(config, "timestep_sampler")
    cfg = comp.build_config(config.timestep_sampler.options)
    sampler = comp.build(config=cfg, num_timesteps=num_timesteps)
    if not callable(getattr(sampler, "sample", None)):
        contract.fail(comp, contract.describe(sampler), "an object with sample(batch, device, generator)")
    return sampler, cfg


def _options_for(comp: Component, options: dict[str, Any]) -> dict[str, Any]:
    fields = set()
    if comp.config_class is not None:
        fields = set(config_fields(comp.config_class))
    return {k: v for k, v in options.items() if k in fields}


def build_many(kind: str, names, options: dict[str, Any], **context) -> dict[str, Any]:
    """Several metrics (or loggers) by name; each gets the options its config knows, and an option
    that none of them knows is an error."""
    built, used = {}, set()
    for name in names:
        comp = get_component(kind, name)
        mine = _options_for(comp, options)
        used |= set(mine)
        built[name] = comp.build(mine, **context)
    unused = sorted(set(options) - used)
    if unused:
        raise DdpmkitError(f"option(s) {', '.join(f'{kind}.{u}' for u in unused)} match none of the {kind}s "
                           f"{', '.join(names)}")
    return built


def build_loggers(config: RunConfig, run_dir, run_config: dict[str, Any], resume_step: int | None) -> list[Any]:
    """The run's loggers (a logger that answers ``None`` cannot run here and is left out)."""
    loggers = build_many("logger", config.loggers, config.logger_options, run_dir=run_dir, run_config=run_config,
                         resume_step=resume_step)
    return [contract.check_logger(get_component("logger", n), lg) for n, lg in loggers.items() if lg is not None]


def resolved_config(config: RunConfig, shape: DataShape, configs: dict[str, Any]) -> dict[str, Any]:
    """The JSON written next to every checkpoint: names, plugins, versions, every option."""
    components = {}
    for kind in SECTIONS:
        comp = component(config, kind)
        components[kind] = {"name": comp.name, "plugin": comp.plugin, "version": comp.version,
                            "options": config_to_dict(configs.get(kind))}
    data = {k: v for k, v in attrs.asdict(shape).items() if v is not None}  # num_classes: conditional runs only
    return {"ddpmkit_version": __version__, "run": config.to_dict(), "components": components, "data": data}


# ---------------------------------------------------------------------------
# The probe: every component once, on the run's shapes, before training
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _untouched(model: torch.nn.Module, device: torch.device):
    """Run a probe without moving any random generator or leaving the model in eval mode."""
    was = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            yield
        finally:
            model.train(was)


def probe_predictor(comp: Component, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                    conditions: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, t, **conditions)
    return contract.check_predictor_output(comp, out, x, contract.predictor_outputs(model))


def probe(parts, device: torch.device) -> None:
    """Call every component of ``parts`` (a :class:`ddpmkit.run.trainer.RunParts`) once; raise one
    :class:`~ddpmkit.sdk.contract.ContractError` line for the first broken answer."""
    cfg = parts.config
    g = torch.Generator().manual_seed(0)
    with _untouched(parts.model, device):  # (an item may draw a random flip)
        items = [parts.dataset[i] for i in range(min(2, len(parts.dataset)))]
        x0 = torch.stack([item_image(it) for it in items]).to(device)
        b = x0.shape[0]
        conditions = {}
        if parts.shape.num_classes:
            labels = [int(it[1]) for it in items]
            if cfg.label_dropout:  # the "no class" label K must be accepted too
                labels[-1] = parts.shape.num_classes
            conditions["class_labels"] = torch.tensor(labels, device=device)
        if getattr(parts.diffusion, "continuous", False):  # the noise-level input a continuous process gives
            t = parts.diffusion.net_time(parts.diffusion.grid(b)[:b]).to(device)
        else:
            t = torch.randint(0, parts.diffusion.num_timesteps, (b,), generator=g).to(device)
        probe_predictor(component(cfg, "predictor"), parts.model, x0, t, conditions)
        ts_comp = component(cfg, "timestep_sampler")
        contract.check_timesteps(ts_comp, parts.timestep_sampler.sample(b, device, torch.Generator(device).manual_seed(0)),
                                 b, parts.diffusion.num_timesteps)
        _probe_loss(parts, x0, conditions)
    _probe_sampler(parts, device)


def _probe_loss(parts, x0: torch.Tensor, conditions: dict[str, torch.Tensor]) -> None:
    comp, b = component(parts.config, "loss"), x0.shape[0]

    def checked(prediction, target, reduction="mean", **kw):
        return contract.check_loss_value(comp, parts.loss(prediction, target, reduction=reduction, **kw), b, reduction)

    per_sample = parts.needs_per_sample
    terms = parts.diffusion.loss_terms(parts.model, x0, checked, generator=torch.Generator(x0.device).manual_seed(0),
                                            min_snr_gamma=parts.config.min_snr_gamma,
                                            timestep_sampler=parts.timestep_sampler, conditions=conditions,
                                            per_sample=per_sample, loss_context=parts.loss_takes_context)
    if not terms.loss.requires_grad:
        contract.fail(comp, "a loss that carries no gradient (detached)", "a loss computed from the prediction")
    if per_sample:
        contract.check_loss_value(comp, terms.per_sample, b, "none")


def _probe_sampler(parts, device: torch.device) -> None:
    """The run's sampler on a stand-in network (zeros), one image: shape, dtype, finite values."""
    sampler, _ = build_sampler(parts.config.sampler.name, parts.config.sampler.options, parts.diffusion)
    shape = (1, parts.shape.channels, parts.shape.resolution, parts.shape.resolution)
    k = len(contract.predictor_outputs(parts.model))
    zeros = lambda x, t: torch.zeros((x.shape[0], x.shape[1] * k, *x.shape[2:]), device=x.device, dtype=x.dtype)  # noqa: E731
    out = sampler.sample(zeros, shape, generator=torch.Generator(device).manual_seed(0), device=device)
    contract.check_samples(component(parts.config, "sampler"), out, shape)


# ---------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------
@attrs.define
class RunParts:
    """Everything a training run is made of, built from its :class:`RunConfig`."""

    config: RunConfig
    dataset: Any
    shape: DataShape
    diffusion: GaussianDiffusion
    model: torch.nn.Module
    loss: Any
    loss_takes_context: bool
    timestep_sampler: Any
    resolved: dict[str, Any]
    notes: tuple[str, ...] = ()  # what was chosen for the data, a line each (the run prints them)

    @property
    def needs_per_sample(self) -> bool:
        """Whether training needs per-sample losses (a timestep sampler that learns from them)."""
        return callable(getattr(self.timestep_sampler, "update", None))


def assemble(config: RunConfig) -> RunParts:
    """Build every component of a training run (the model is seeded with ``config.seed`` whatever
    building the dataset drew from the global generator)."""
    torch.manual_seed(config.seed)
    config, dataset, ds_cfg, shape = training_data(config)
    diffusion, sched_cfg, proc_cfg = build_process(config)
    _, sampler_cfg = build_sampler(config.sampler.name, config.sampler.options, diffusion)
    tsampler, ts_cfg = build_timestep_sampler(config, diffusion.num_timesteps)
    loss, loss_cfg, takes_context = build_loss(config)
    torch.manual_seed(config.seed)  # model init does not depend on how the dataset was built
    model, pred_cfg = build_predictor(config, shape, check_labels=config.class_conditional is not None
                                      and not shape.clusters)
    notes = [conditioning_note(config, shape)] if config.class_conditional is None or shape.clusters else []
    if shape.num_classes and "class_labels" not in contract.predictor_conditions(model):  # chosen, not asked for
        if shape.clusters:
            raise DdpmkitError(f"--clusters conditions the network on clusters, but predictor "
                               f"'{config.predictor.name}' takes no class labels; drop --clusters")
        shape = DataShape(shape.channels, shape.resolution)
        torch.manual_seed(config.seed)
        model, pred_cfg = build_predictor(config, shape)
        notes = [f"labels, but predictor '{config.predictor.name}' takes none: unconditional"]
    notes += [str(n) for n in getattr(model, "notes", ())]
    wanted = getattr(component(config, "process").factory, "default_loss", None)
    if wanted and config.loss.name != wanted:  # e.g. edm's λ(σ) weighting holds for a squared error only
        notes.append(f"process '{config.process.name}' is meant to train with loss '{wanted}'; this run uses "
                     f"'{config.loss.name}' (see the process's own documentation)")
    if config.min_snr_gamma:
        try:
            loss(torch.zeros(2, 1), torch.ones(2, 1), reduction="none")
        except TypeError:
            raise DdpmkitError(f"loss '{config.loss.name}' does not accept reduction='none', which min-SNR "
                               "weighting needs") from None
    resolved = resolved_config(config, shape, {"schedule": sched_cfg, "process": proc_cfg, "predictor": pred_cfg,
                                               "loss": loss_cfg,
                                               "dataset": ds_cfg, "sampler": sampler_cfg, "timestep_sampler": ts_cfg})
    return RunParts(config, dataset, shape, diffusion, model, loss, takes_context, tsampler, resolved, tuple(notes))
