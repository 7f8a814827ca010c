"""The plugin interface of ddpmkit: one hook per kind of component (the kinds: ``ddpmkit.kinds``).

A plugin is any module (or object) with functions marked ``@ddpmkit.hookimpl``
whose names are among the hooks below. Each hook receives a ``register``
callback; call it once per component the plugin provides::

    import attrs, ddpmkit

    @attrs.define
    class MyScheduleConfig:
        timesteps: int = 1000

    @ddpmkit.hookimpl
    def register_schedules(register):
        register("my-schedule", make_betas, MyScheduleConfig, "what it is")

``register(name, factory, config_class=None, description="")``: ``factory`` is
called with an instance of ``config_class`` (an attrs class or a dataclass whose
defaults and validators define the component's options) plus the keyword context
documented for each kind below; a factory receives only the context keywords it
names (or all of them with ``**context``), so a context that grows never breaks it.
Installed packages make their plugin known through the setuptools entry-point
group ``ddpmkit``. Every component is probed once when a run starts
(``ddpmkit.contract``): a wrong shape, dtype or range stops the run in one line.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

#: The callback every hook receives: ``register(name, factory, config_class=None, description="")``.
Register = Callable[..., None]

hookspec = pluggy.HookspecMarker("ddpmkit")
hookimpl = pluggy.HookimplMarker("ddpmkit")


@hookspec
def register_schedules(register: Register) -> None:
    """Register noise schedules.

    ``factory(config) -> torch.Tensor``: the betas β_1..β_T, shape ``(T,)``,
    float64, every value in (0, 1).
    """


@hookspec
def register_processes(register: Register) -> None:
    """Register diffusion processes (``vp``: DDPM's, the default; ``flow``: flow matching).

    ``factory(config, *, betas, variance_type, clip_sample, prediction)`` — the factory takes the
    context keywords it names: ``betas`` (the schedule plugin's, float64 ``(T,)``) and the run's
    ``variance_type``, ``clip_sample`` and ``prediction``. A discrete process returns a
    :class:`~ddpmkit.diffusion.GaussianDiffusion`. A continuous one returns an object with
    ``name``, ``continuous = True``, ``num_timesteps`` (the grid forward.png is drawn on),
    ``clip_sample``, ``loss_terms(model, x0, loss_fn, generator=..., global_batch=..., offset=...,
    conditions=..., per_sample=...) -> LossTerms`` (training), ``q_sample(x0, t, noise)``, and its
    probability-flow ODE for the samplers that serve ``ode`` processes: ``prior(shape, generator,
    device, dtype)``, ``grid(steps, device)`` (times from the prior to 0), ``net_input(x, t)`` and
    ``net_time(t)`` (what the network gets: its image input, and its noise level as a float) and
    ``drift(output, x, t)`` (dx/dt).

    Optional attribute of the factory: ``default_loss`` (a loss name, e.g. edm's ``"mse"``): a run that
    switches to this process trains with that loss unless the user names one (``--loss``); a run with
    another loss is told so in one note.
    """


@hookspec
def register_predictors(register: Register) -> None:
    """Register noise predictors ε_θ.

    ``factory(config, *, channels: int, resolution: int, num_classes: int | None) -> torch.nn.Module``
    whose ``forward(x_t, t)`` takes ``x_t`` of shape ``(B, channels, resolution, resolution)`` and
    integer timesteps ``t`` of shape ``(B,)`` (0-based: index ``t`` is the paper's step ``t + 1``)
    and returns a tensor in ``x_t``'s dtype. Optional attributes of the module:

    * ``conditions``: keyword inputs ``forward`` accepts, e.g. ``("class_labels",)``; a class-
      conditional run calls ``forward(x_t, t, class_labels=y)`` with ``y`` long ``(B,)``.
      ``num_classes`` is the dataset's class count (``None`` when it has none). Default ``()``.
    * ``outputs``: what the output holds along the channel axis. ``("prediction",)`` (default):
      ``C`` channels, the prediction (ε, x₀ or v). ``("prediction", "variance")``: ``2C``
      channels, the prediction then the improved-DDPM variance interpolation v ∈ [-1, 1]
      (log σ² = (v+1)/2 · log β_t + (1−v)/2 · log β̃_t); the run then uses ``variance_type``
      ``learned_range``.
    * ``notes``: lines the run prints about what the module chose for the data (``unet2d``: its
      stem when ``patch_size``/``pad`` were left to be chosen).
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register training losses.

    ``factory(config) -> callable(prediction, target, reduction="mean") -> tensor``: a scalar
    for ``reduction="mean"``; per-element losses for ``reduction="none"`` (needed by min-SNR
    weighting and by timestep samplers that weight or learn from per-sample losses). A loss whose
    callable has a keyword parameter ``context`` also receives a
    :class:`~ddpmkit.diffusion.LossContext`: x₀, x_t, t, ε, the full model output (prediction and
    learned variance) and the diffusion process, as a variational-bound term needs.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets.

    ``factory(config) -> torch.utils.data.Dataset`` whose items are float32 tensors ``(C, H, W)``
    (square, C in {1, 3}) scaled to [-1, 1], or ``(image, label)`` pairs with an integer label.
    Optional attributes: ``channels``, ``resolution``, and ``classes`` (class names) or
    ``num_classes``, which class-conditional runs need; ``recommended``, a dict such as
    ``{"class_conditional": False, "predictor": {"patch_size": 1}}`` that fills what a run leaves to
    be chosen for the data (values that are ``None``; a user's or preset's own value wins). A dataset
    that reads files from a folder opts into ``--data-root`` by having a ``data_root`` option.
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register metrics.

    ``factory(config, *, device) -> callable(images) -> dict[str, float]`` where
    ``images`` is a float tensor ``(N, C, H, W)`` in [-1, 1]. The callable may take a
    ``progress`` keyword (``progress(done_images)``) and a ``context`` keyword, which receives a
    :class:`~ddpmkit.sdk.evaluation.MetricContext` with the trained pipeline and the run's dataset
    (``None`` where there is none, as for ``ddpmkit evaluate --images``). Optional attributes of
    the object: ``features(images) -> (N, D)`` (and ``features_name``) makes it a feature space that
    ``kid``, ``precision-recall`` and ``memorization`` can use (``features=NAME``);
    ``feature_space`` (str), set after a call, names the space its results were computed in;
    ``figures(directory) -> list[Path]`` writes figures of the last call (``evaluate --figures``);
    ``needs_samples = False``: the metric scores the model on real data itself (``nll``), so
    ``evaluate`` draws no samples when no other metric needs them (it passes ``N`` placeholders);
    ``directions``: ``{result: "maximize" | "minimize"}``, which results ``ddpmkit sweep`` may optimise
    and which way is better (the first is the default objective).
    """


@hookspec
def register_samplers(register: Register) -> None:
    """Register samplers (reverse processes).

    ``factory(config, *, diffusion) -> sampler`` where ``diffusion`` is the trained model's
    :class:`~ddpmkit.diffusion.GaussianDiffusion` and ``sampler`` has ``num_steps`` (int) and
    ``sample(model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32)``
    returning x_0 of ``shape``; ``progress(k)`` is called after the k-th network evaluation.
    A sampler that uses a learned variance (the model's ``2C`` output) says so with the attribute
    ``uses_learned_variance = True``; with any other, a learned-variance run warns once. Likewise a
    sampler that clips x̂_0 when ``diffusion.clip_sample`` is on (to ``±diffusion.clip_range``) says
    ``uses_clip_sample = True``; with any other, a clipping run warns once.
    """


@hookspec
def register_distillers(register: Register) -> None:
    """Register distillation methods: how ``ddpmkit distill`` turns a trained run (the teacher) into a
    student that samples in a few network calls.

    ``factory(config, *, process) -> distiller``, ``process`` the teacher's probability-flow ODE
    (``ddpmkit.sdk.ode.ode_view``: ``grid``, ``prior``, ``q_sample``, ``drift``). A factory that cannot
    serve the process, or a number of calls it cannot reach, raises ``DdpmkitError`` (one line). The
    distiller has ``stages``, a list of :class:`~ddpmkit.sdk.distill.Stage` (training steps, and the
    student's calls after them), ``sampler(calls) -> (name, options)`` (how the student is drawn), and
    ``loss(student, teacher, x0, labels, stage, generator) -> scalar``, where ``student`` and ``teacher``
    are drift functions ``f(x, t, labels) -> dx/dt`` (t float64 ``(B,)`` ODE times; ``labels`` long
    ``(B,)`` or ``None``) and ``x0``, ``labels`` a batch of the teacher's training data. Optional:
    ``chain = True`` (each stage's teacher is the previous stage's student: progressive distillation),
    ``prepare(teacher, *, shape, num_classes, generator, directory, progress)`` (data built once before
    training, kept in ``directory`` so a resumed distillation reuses it: reflow's couplings), and
    ``uses_data = False`` (the teacher's dataset is not read; ``x0`` is zeros of the batch's shape).
    """


@hookspec
def register_timestep_samplers(register: Register) -> None:
    """Register timestep samplers: how Algorithm 1 draws t.

    ``factory(config, *, num_timesteps) -> sampler`` with ``sample(batch, device, generator)``
    returning ``(t, weights)``: ``t`` long ``(batch,)`` in ``[0, T)`` and per-sample loss weights
    ``(batch,)`` or ``None``. Optional: ``update(t, losses)`` receives each step's per-sample
    losses (detached), and ``state_dict()`` / ``load_state_dict(d)`` (JSON-able) make a resumed
    run continue exactly.
    """


@hookspec
def register_loggers(register: Register) -> None:
    """Register loggers: where training results go.

    ``factory(config, *, run_dir, run_config, resume_step) -> logger | None`` with
    ``log(record)`` (a dict with ``step`` and float values: ``loss``, ``lr``, ... per logged
    step; ``mean_loss`` per epoch; ``eval`` results), ``flush()`` (called before each checkpoint)
    and ``close()``. ``run_config`` is the resolved configuration (JSON-able); ``resume_step`` is
    the checkpoint's step when a run resumes (forget records after it), else ``None``. Return
    ``None`` when the logger cannot run here (a missing optional package).
    """
