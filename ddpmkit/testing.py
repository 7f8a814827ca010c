"""Contract tests for plugin authors: run them on your component, as ddpmkit does on its own.

Each ``check_<kind>(name, **options)`` builds the registered component ``name`` and asserts the
contract of its kind (shapes, ranges, config round trip, determinism); it raises
``AssertionError`` with a message naming the component when something is off. With pytest::

    import pytest
    import ddpmkit.testing as contract

    @pytest.mark.parametrize("name", contract.names("schedule"))
    def test_schedule_contract(name):
        contract.check_schedule(name)

``check(kind, name)`` dispatches on the kind.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import torch

from .config import build_config, config_to_dict
from .diffusion import GaussianDiffusion
from .plugins import available, get_component

__all__ = ["names", "check", "check_config_round_trip", "check_schedule", "check_predictor", "check_loss",
           "check_dataset", "check_sampler", "check_metric"]


def names(kind: str) -> list[str]:
    """Every registered component of ``kind`` (for ``pytest.mark.parametrize``)."""
    return available(kind)


def check_config_round_trip(kind: str, name: str, options: dict[str, Any] | None = None) -> None:
    """The config is an attrs class whose JSON form rebuilds an equal config (as checkpoints need)."""
    comp = get_component(kind, name)
    if comp.config_class is None:
        return
    cfg = build_config(comp, options or {})
    data = json.loads(json.dumps(config_to_dict(cfg)))
    again = build_config(comp, data)
    assert again == cfg, f"{kind} '{name}': config does not survive a JSON round trip: {cfg!r} → {again!r}"
    for field in attrs.fields(comp.config_class):
        assert field.default is not attrs.NOTHING or (options and field.name in options), \
            f"{kind} '{name}': option '{field.name}' has no default"


def check_schedule(name: str, **options) -> torch.Tensor:
    """Betas: shape (T,), float64, 0 < β < 1, ᾱ strictly decreasing; T follows ``timesteps``."""
    check_config_round_trip("schedule", name, options)
    comp = get_component("schedule", name)
    betas = comp.build(options)
    assert isinstance(betas, torch.Tensor) and betas.ndim == 1 and betas.numel() >= 1, \
        f"schedule '{name}': betas must be a 1-D tensor, got {getattr(betas, 'shape', type(betas))}"
    assert betas.dtype == torch.float64, f"schedule '{name}': betas must be float64, got {betas.dtype}"
    assert bool(((betas > 0) & (betas < 1)).all()), f"schedule '{name}': betas must lie in (0, 1)"
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all()), f"schedule '{name}': ᾱ_t must decrease"
    cfg = comp.make_config(options)
    if cfg is not None and hasattr(cfg, "timesteps"):
        assert betas.shape == (cfg.timesteps,), f"schedule '{name}': expected {cfg.timesteps} betas, got {betas.shape}"
        short = comp.build({**options, "timesteps": 10})
        assert short.shape == (10,), f"schedule '{name}': timesteps=10 gave shape {tuple(short.shape)}"
    assert torch.equal(betas, comp.build(options)), f"schedule '{name}': not deterministic"
    return betas


def check_predictor(name: str, channels: int = 1, resolution: int = 16, **options) -> torch.nn.Module:
    """A module mapping (x_t (B,C,R,R), t (B,)) → a tensor shaped like x_t; gradients flow; state dict round trip."""
    check_config_round_trip("predictor", name, options)
    comp = get_component("predictor", name)
    torch.manual_seed(0)
    model = comp.build(options, channels=channels, resolution=resolution)
    assert isinstance(model, torch.nn.Module), f"predictor '{name}' must be a torch.nn.Module"
    x = torch.randn(2, channels, resolution, resolution)
    t = torch.tensor([0, 9])
    out = model(x, t)
    assert out.shape == x.shape, f"predictor '{name}': output {tuple(out.shape)} for input {tuple(x.shape)}"
    out.float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), \
        f"predictor '{name}': no gradient reaches the parameters"
    torch.manual_seed(1)
    other = comp.build(options, channels=channels, resolution=resolution)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), other(x, t)), f"predictor '{name}': state dict round trip changes the output"
    return model


def check_loss(name: str, **options):
    """Scalar, zero when prediction == target, positive otherwise, differentiable; reduction='none' if offered."""
    check_config_round_trip("loss", name, options)
    loss = get_component("loss", name).build(options)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 4, 4, generator=g, requires_grad=True)
    b = torch.randn(3, 1, 4, 4, generator=g)
    value = loss(a, b)
    assert value.ndim == 0, f"loss '{name}' must return a scalar, got shape {tuple(value.shape)}"
    assert value.item() > 0 and loss(b, b).item() == 0, f"loss '{name}': must be 0 exactly when prediction == target"
    value.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0, f"loss '{name}': no gradient"
    try:
        per = loss(a.detach(), b, reduction="none")
    except TypeError:
        return loss
    assert per.shape == a.shape, f"loss '{name}': reduction='none' must keep the shape"
    torch.testing.assert_close(per.mean(), loss(a.detach(), b), msg=f"loss '{name}': mean of 'none' ≠ 'mean'")
    return loss


def check_dataset(name: str, **options):
    """Items are float (C, H, W) tensors in [-1, 1] (or (image, label)); all the same shape."""
    check_config_round_trip("dataset", name, options)
    ds = get_component("dataset", name).build(options)
    assert len(ds) >= 1, f"dataset '{name}' is empty"
    shapes = set()
    for i in sorted({0, len(ds) // 2, len(ds) - 1}):
        item = ds[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.ndim == 3, \
            f"dataset '{name}': item {i} must be a float32 (C, H, W) tensor"
        assert x.min() >= -1 and x.max() <= 1, f"dataset '{name}': item {i} is outside [-1, 1]"
        shapes.add(tuple(x.shape))
    assert len(shapes) == 1, f"dataset '{name}': items of different shapes {shapes}"
    c, h, w = shapes.pop()
    assert h == w and c in (1, 3), f"dataset '{name}': expected square 1- or 3-channel images, got {(c, h, w)}"
    return ds


def check_sampler(name: str, timesteps: int = 100, **options):
    """Deterministic for a seed, shaped like asked, and right on a network that knows x_0.

    With a fixed x_0 and an ε-oracle, ε(x_t) = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t), every sampler must
    return x_0 up to the noise of the first training step, √(1 − ᾱ_1) (a sampler may stop there,
    as DDIM with ``trailing`` spacing does).
    """
    check_config_round_trip("sampler", name, options)
    d = GaussianDiffusion(torch.linspace(1e-4, 0.2, timesteps, dtype=torch.float64))
    sampler = get_component("sampler", name).build(options, diffusion=d)
    assert 1 <= sampler.num_steps <= timesteps, f"sampler '{name}': num_steps {sampler.num_steps} not in 1..T"
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1

    def oracle(x, t):
        a = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a * x0) / s

    calls = []
    out = sampler.sample(oracle, (2, 1, 4, 4), generator=torch.Generator().manual_seed(1),
                         progress=calls.append, dtype=torch.float64)
    assert out.shape == (2, 1, 4, 4), f"sampler '{name}': wrong output shape {tuple(out.shape)}"
    tol = 4 * d.sqrt_one_minus_alphas_cumprod[0].item() + 1e-6
    err = (out - x0).abs().max().item()
    assert err <= tol, f"sampler '{name}' does not recover x_0 from an oracle (max error {err:.3g} > {tol:.3g})"
    assert calls and calls[-1] == sampler.num_steps, f"sampler '{name}': progress not reported per step"
    noise_model = lambda x, t: torch.tanh(x)  # noqa: E731
    a = sampler.sample(noise_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    b = sampler.sample(noise_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b), f"sampler '{name}': not deterministic for a fixed generator"
    return sampler


def check_metric(name: str, images: torch.Tensor | None = None, **options):
    """Returns a dict of finite floats for images in [-1, 1]."""
    check_config_round_trip("metric", name, options)
    metric = get_component("metric", name).build(options, device=torch.device("cpu"))
    if images is None:
        images = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = metric(images)
    assert isinstance(result, dict) and result, f"metric '{name}' must return a non-empty dict"
    for k, v in result.items():
        assert isinstance(v, float) and v == v and abs(v) != float("inf"), f"metric '{name}': {k} = {v!r}"
    return result


_CHECKS = {"schedule": check_schedule, "predictor": check_predictor, "loss": check_loss,
           "dataset": check_dataset, "sampler": check_sampler, "metric": check_metric}


def check(kind: str, name: str, **options):
    """Run the contract of ``kind`` on the component ``name``."""
    return _CHECKS[kind](name, **options)
