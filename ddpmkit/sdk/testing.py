"""Contract tests for plugin authors: run them on your component, as ddpmkit does on its own.

Each ``check_<kind>(name, **options)`` builds the registered component ``name`` and asserts the
contract of its kind (shapes, ranges, config round trip, determinism); it raises
``AssertionError`` with a message naming the component when something is off. With pytest::

    import pytest
    from ddpmkit.sdk import testing as contract

    @pytest.mark.parametrize("name", contract.names("schedule"))
    def test_schedule_contract(name):
        contract.check_schedule(name)

``check(kind, name)`` dispatches on the kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ddpmkit.diffusion import GaussianDiffusion, LossContext, ModelOutput
from ddpmkit.sdk import contract
from ddpmkit.sdk.evaluation import MetricContext, evaluate_images
from ddpmkit.sdk.options import build_config, config_defaults_missing, config_to_dict
from ddpmkit.sdk.registry import Component, available, build, get_component, takes_keyword

__all__ = ["names", "check", "check_config_round_trip", "check_schedule", "check_predictor", "check_loss",
           "check_dataset", "check_sampler", "check_metric", "check_timestep_sampler", "check_logger"]

# Failures raise ddpmkit.sdk.contract.ContractError (an AssertionError): the same checks, and the same
# one-line messages, as the probe that runs when a run starts.


def names(kind: str) -> list[str]:
    """Every registered component of ``kind`` (for ``pytest.mark.parametrize``)."""
    return available(kind)


def check_config_round_trip(kind: str, name: str, options: dict[str, Any] | None = None) -> None:
    """The config (attrs class or dataclass) survives a JSON round trip (as checkpoints need), and
    every option has a default."""
    comp = get_component(kind, name)
    if comp.config_class is None:
        return
    cfg = build_config(comp, options or {})
    data = json.loads(json.dumps(config_to_dict(cfg)))
    again = build_config(comp, data)
    assert again == cfg, f"{kind} '{name}': config does not survive a JSON round trip: {cfg!r} → {again!r}"
    for field in config_defaults_missing(comp.config_class):
        assert options and field in options, f"{kind} '{name}': option '{field}' has no default"


def check_schedule(name: str, **options) -> torch.Tensor:
    """Betas: shape (T,), float64, 0 < β < 1, ᾱ strictly decreasing; T follows ``timesteps``."""
    check_config_round_trip("schedule", name, options)
    comp = get_component("schedule", name)
    cfg = comp.build_config(options)
    betas = contract.check_betas(comp, comp.build(config=cfg), getattr(cfg, "timesteps", None))
    if cfg is not None and hasattr(cfg, "timesteps"):
        contract.check_betas(comp, comp.build({**options, "timesteps": 10}), 10)
    assert torch.equal(betas, comp.build(options)), f"schedule '{name}': not deterministic"
    return betas


def check_predictor(name: str, channels: int = 1, resolution: int = 16, num_classes: int | None = None,
                    **options) -> torch.nn.Module:
    """A module whose output is in x_t's dtype and shape (2C channels with a learned variance),
    through which gradients reach the parameters (also when its last layer starts at zero), and whose
    state dict round trip keeps its output. With ``num_classes`` it must take ``class_labels``."""
    check_config_round_trip("predictor", name, options)
    comp = get_component("predictor", name)
    torch.manual_seed(0)
    model = contract.check_predictor_module(comp, comp.build(options, channels=channels, resolution=resolution,
                                                             num_classes=num_classes))
    conditions = {}
    if num_classes:
        assert "class_labels" in contract.predictor_conditions(model), \
            f"{comp.label()} declares no conditions = ('class_labels',) although it was given num_classes"
        conditions["class_labels"] = torch.tensor([0, num_classes - 1])
    x = torch.randn(2, channels, resolution, resolution, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 9])
    out = contract.check_predictor_output(comp, model(x, t, **conditions), x, contract.predictor_outputs(model))
    # A random direction, not out², so that a zero-initialised last layer still gets a gradient.
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * direction).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), \
        f"{comp.label()}: no gradient reaches the parameters"
    torch.manual_seed(1)
    other = comp.build(options, channels=channels, resolution=resolution, num_classes=num_classes)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, **conditions), other(x, t, **conditions)), \
            f"{comp.label()}: state dict round trip changes the output"
    return model


def check_loss(name: str, **options: Any) -> Any:
    """Scalar, zero when prediction == target, positive otherwise, differentiable; reduction='none'
    (first axis B) if offered. A loss that takes ``context`` gets one from a small diffusion with a
    learned variance (``ModelOutput(prediction, variance)``); such a loss may add terms that do not
    vanish at the target (a variational bound), so for it the value at the target need only be ≥ 0
    and below the value away from it."""
    check_config_round_trip("loss", name, options)
    comp = get_component("loss", name)
    loss = comp.build(options)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 4, 4, generator=g, requires_grad=True)
    b = torch.randn(3, 1, 4, 4, generator=g)
    kw = {}
    try:
        if takes_keyword(loss, "context"):
            d = GaussianDiffusion(torch.linspace(1e-4, 0.02, 10, dtype=torch.float64), variance_type="learned_range")
            t = torch.tensor([0, 4, 9])
            v = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
            kw["context"] = LossContext(b, d.q_sample(b, t, a.detach()), t, a.detach(), ModelOutput(a, v), b, None, d)
    except (TypeError, ValueError):
        pass
    value = contract.check_loss_value(comp, loss(a, b, **kw), 3)
    at_target = loss(b, b, **kw).item()
    if kw:
        assert 0 <= at_target < value.item(), f"loss '{name}': must be smallest (and >= 0) at the target"
    else:
        assert value.item() > 0 and at_target == 0, f"loss '{name}': must be 0 exactly when prediction == target"
    value.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0, f"loss '{name}': no gradient"
    try:
        per = loss(a.detach(), b, reduction="none", **kw)
    except TypeError:
        return loss
    contract.check_loss_value(comp, per, 3, "none")
    if per.shape == a.shape:
        torch.testing.assert_close(per.mean(), loss(a.detach(), b, **kw), msg=f"loss '{name}': mean of 'none' ≠ 'mean'")
    return loss


def check_dataset(name: str, **options: Any) -> Any:
    """Items are float32 (C, H, W) tensors in [-1, 1] (or (image, label)); square, C in {1, 3}, one shape."""
    check_config_round_trip("dataset", name, options)
    comp = get_component("dataset", name)
    ds = comp.build(options)
    contract.check_dataset(comp, ds)
    return ds


def check_sampler(name: str, timesteps: int = 100, **options: Any) -> Any:
    """Deterministic for a seed, shaped like asked, and right on a network that knows x_0.

    With a fixed x_0 and an ε-oracle, ε(x_t) = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t), every sampler must
    return x_0 up to the noise of the first training step, √(1 − ᾱ_1) (a sampler may stop there,
    as DDIM with ``trailing`` spacing does).
    """
    check_config_round_trip("sampler", name, options)
    comp = get_component("sampler", name)
    served = getattr(comp.factory, "processes", ("vp",))
    if "vp" not in served:
        return _check_ode_sampler(comp, options, "flow" if "ode" in served or "flow" in served else served[0])
    d = GaussianDiffusion(torch.linspace(1e-4, 0.2, timesteps, dtype=torch.float64))
    sampler = contract.check_sampler_object(comp, comp.build(options, diffusion=d))
    assert 1 <= sampler.num_steps <= timesteps, f"sampler '{name}': num_steps {sampler.num_steps} not in 1..T"
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a * x0) / s

    calls = []
    out = sampler.sample(oracle, (2, 1, 4, 4), generator=torch.Generator().manual_seed(1),
                         progress=calls.append, dtype=torch.float64)
    contract.check_samples(comp, out, (2, 1, 4, 4), torch.float64)
    tol = 4 * d.sqrt_one_minus_alphas_cumprod[0].item() + 1e-6
    err = (out - x0).abs().max().item()
    assert err <= tol, f"sampler '{name}' does not recover x_0 from an oracle (max error {err:.3g} > {tol:.3g})"
    assert calls and calls[-1] == sampler.num_steps, f"sampler '{name}': progress not reported per step"
    noise_model = lambda x, t: torch.tanh(x)  # noqa: E731
    a = sampler.sample(noise_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    b = sampler.sample(noise_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    contract.check_samples(comp, a, (2, 1, 4, 4))
    assert torch.equal(a, b), f"sampler '{name}': not deterministic for a fixed generator"
    return sampler


def check_metric(name: str, images: torch.Tensor | None = None, context: MetricContext | None = None,
                 **options: Any) -> dict[str, float]:
    """Returns a dict of finite floats for images in [-1, 1] (checked as a run checks it)."""
    check_config_round_trip("metric", name, options)
    metric = get_component("metric", name).build(options, device=torch.device("cpu"))
    if images is None:
        images = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return evaluate_images(images, {name: metric}, context=context)


def check_timestep_sampler(name: str, num_timesteps: int = 50, **options: Any) -> Any:
    """``sample`` gives long t in [0, T) and None or non-negative weights; same generator, same draw."""
    check_config_round_trip("timestep_sampler", name, options)
    comp = get_component("timestep_sampler", name)
    sampler = comp.build(options, num_timesteps=num_timesteps)
    draw = lambda: sampler.sample(64, torch.device("cpu"), torch.Generator().manual_seed(0))  # noqa: E731
    t, w = contract.check_timesteps(comp, draw(), 64, num_timesteps)
    t2, w2 = draw()
    assert torch.equal(t, t2) and (w is None) == (w2 is None), f"{comp.label()}: not deterministic for a generator"
    if hasattr(sampler, "update"):
        sampler.update(t, torch.rand(64, dtype=torch.float64))
        contract.check_timesteps(comp, draw(), 64, num_timesteps)
    return sampler


def check_logger(name: str, run_dir: str | Path, **options: Any) -> Any:
    """Builds in ``run_dir``, takes a step record, an epoch record and an eval record, flushes, closes."""
    check_config_round_trip("logger", name, options)
    comp = get_component("logger", name)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    logger = comp.build(options, run_dir=run_dir, run_config={"run": {}}, resume_step=None)
    if logger is None:
        return None
    contract.check_logger(comp, logger)
    logger.log({"step": 1, "epoch": 1, "loss": 0.5, "lr": 1e-3, "images_per_s": 10.0})
    logger.log({"epoch": 1, "step": 1, "mean_loss": 0.5, "elapsed_s": 1.0})
    logger.log({"step": 1, "epoch": 1, "eval": {"score": 1.0}})
    logger.flush()
    logger.close()
    return logger


def _check_ode_sampler(comp: Component, options: dict[str, Any], process_name: str) -> Any:
    """A sampler of continuous processes, on the built-in ``flow`` (or ``edm``) process: with an oracle
    network whose denoised estimate is x_0 it must return x_0; deterministic for a seed."""
    process = build("process", process_name, {}, clip_sample=False)
    sampler = contract.check_sampler_object(comp, comp.build(options, diffusion=process))
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1

    def oracle(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if process_name == "edm":  # F with c_skip·x + c_out·F = x_0, x = (network input)/c_in, σ = e^{4c}
            sigma = (c.double() * 4 / process.config.noise_scale).exp().view(-1, 1, 1, 1)
            x = x / process.c_in(sigma)
            return (x0 - process.c_skip(sigma) * x) / process.c_out(sigma)
        t = (c.double() / process.config.time_scale).view(-1, 1, 1, 1)  # flow: v = (x_t − x_0)/t
        return (x - x0) / t

    calls = []
    out = sampler.sample(oracle, (2, 1, 4, 4), generator=torch.Generator().manual_seed(1),
                         progress=calls.append, dtype=torch.float64)
    contract.check_samples(comp, out, (2, 1, 4, 4), torch.float64)
    err = (out - x0).abs().max().item()
    assert err <= 1e-6, f"sampler '{comp.name}' does not recover x_0 from a velocity oracle (max error {err:.3g})"
    assert calls and calls[-1] == sampler.num_steps, f"sampler '{comp.name}': progress not reported per call"
    a = sampler.sample(lambda x, t: torch.tanh(x), (2, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    b = sampler.sample(lambda x, t: torch.tanh(x), (2, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b), f"sampler '{comp.name}': not deterministic for a fixed generator"
    return sampler


def check_process(name: str, **options: Any) -> Any:
    """Builds from the run's context. A discrete process is a :class:`GaussianDiffusion` on the betas
    it was given; a continuous one trains (a finite scalar loss with a gradient from a small network,
    per-sample losses of shape (B,)) and offers its ODE: a prior of the asked shape and a grid from
    the prior's time down to 0."""
    check_config_round_trip("process", name, options)
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    process = build("process", name, options, betas=betas, variance_type="fixed_small", clip_sample=False,
                    prediction="epsilon")
    if not getattr(process, "continuous", False):
        assert isinstance(process, GaussianDiffusion), f"process '{name}': neither a GaussianDiffusion nor continuous"
        assert torch.equal(process.betas, betas), f"process '{name}': does not use the schedule's betas"
        return process
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t: net(x) * (1 + t.view(-1, 1, 1, 1) / 1000)  # noqa: E731
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mse = lambda p, q, reduction="mean": torch.nn.functional.mse_loss(p, q, reduction=reduction)  # noqa: E731
    terms = process.loss_terms(model, x0, mse, generator=torch.Generator().manual_seed(0), per_sample=True)
    assert terms.loss.ndim == 0 and torch.isfinite(terms.loss) and terms.loss.requires_grad, f"process '{name}': loss"
    assert terms.per_sample.shape == (3,), f"process '{name}': per-sample losses of shape {terms.per_sample.shape}"
    grid = process.grid(8)
    assert grid.shape == (9,) and float(grid[-1]) == 0.0 and bool((grid[1:] < grid[:-1]).all()), \
        f"process '{name}': grid(8) must fall from the prior's time to 0 in 9 points"
    assert process.prior((2, 1, 4, 4), generator=torch.Generator().manual_seed(0)).shape == (2, 1, 4, 4)
    return process


_CHECKS = {"schedule": check_schedule, "process": check_process, "predictor": check_predictor, "loss": check_loss,
           "dataset": check_dataset, "sampler": check_sampler, "metric": check_metric,
           "timestep_sampler": check_timestep_sampler, "logger": check_logger}


def check(kind: str, name: str, **options: Any) -> Any:
    """Run the contract of ``kind`` on the component ``name``."""
    return _CHECKS[kind](name, **options)
