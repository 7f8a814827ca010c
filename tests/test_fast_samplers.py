"""The solver samplers (dpm-solver++, unipc, heun, euler-ancestral) against their diffusers schedulers.

The reference loop below is written here from diffusers' documented API (set_timesteps,
scale_model_input, step), with a scheduler configured independently from the same betas. Both loops
run in float64 on the same deterministic fake network and the same noise; every network input (so
every step's x) and the final sample must agree to 1e-5. One documented difference: the network gets
long t (the predictor contract), the nearest training timestep where the scheduler's falls between
two, and the reference loop gives its network the same. diffusers keeps its ᾱ and σ tables in
float32 whatever the input's dtype, as does the sampler, so the agreement is exact here rather than
within float32 rounding.
"""

import itertools

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler

import ddpmkit

REFERENCE = {"dpm-solver++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
             "heun": HeunDiscreteScheduler, "euler-ancestral": EulerAncestralDiscreteScheduler}
PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 1, 4, 4)


def fake(x, t):
    """Deterministic and sensitive to both x and t."""
    return torch.tanh(0.8 * x + t.double().view(-1, 1, 1, 1) / 700) * 0.9


def recorded(calls):
    def net(x, t):
        calls.append((x.clone(), t.clone()))
        return fake(x, t)
    return net


def reference_loop(cls, kwargs, steps, seed, stochastic):
    s = cls(**kwargs)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * float(s.init_noise_sigma)
    calls = []
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        tb = torch.full((SHAPE[0],), float(t), dtype=torch.float64).round()
        calls.append((inp.clone(), tb))
        out = fake(inp, tb)
        x = s.step(out, t, x, **({"generator": g} if stochastic else {})).prev_sample
    return x, calls


def compare(name, options, T, prediction, clip=False, betas_scale=1.0, seed=0):
    betas = ddpmkit.build("schedule", "linear", {"timesteps": T})
    d = ddpmkit.GaussianDiffusion(betas, prediction=prediction, clip_sample=clip)
    sampler = ddpmkit.build("sampler", name, options, diffusion=d)
    calls = []
    got = sampler.sample(recorded(calls), SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kwargs = {"num_train_timesteps": T, "trained_betas": (betas * betas_scale).numpy(),
              "prediction_type": PREDICTION[prediction],
              "timestep_spacing": options.get("timestep_spacing", "linspace")}
    stochastic = name == "euler-ancestral" or options.get("algorithm") == "sde-dpmsolver++"
    if name == "dpm-solver++":
        kwargs.update(solver_order=options.get("order", 2), algorithm_type=options.get("algorithm", "dpmsolver++"),
                      use_karras_sigmas=options.get("karras_sigmas", False))
    elif name == "unipc":
        bh1 = options.get("solver_type") == "bh1"  # bh1 ends at σ_min: at σ = 0 diffusers' bh1 gives NaN
        kwargs.update(solver_order=options.get("order", 2), solver_type=options.get("solver_type", "bh2"),
                      use_karras_sigmas=options.get("karras_sigmas", False),
                      final_sigmas_type="sigma_min" if bh1 else "zero")
    elif name == "heun":
        kwargs.update(use_karras_sigmas=options.get("karras_sigmas", False), clip_sample=clip)
    want, want_calls = reference_loop(REFERENCE[name], kwargs, options["steps"], seed, stochastic)
    assert sampler.num_steps == len(want_calls)
    for k, ((x, t), (wx, wt)) in enumerate(zip(calls, want_calls)):
        assert t.dtype == torch.long, f"{name} {options}: the network gets long t"
        torch.testing.assert_close(t.double(), wt, rtol=0, atol=0, msg=f"{name} {options}: timestep of call {k}")
        torch.testing.assert_close(x, wx, rtol=1e-5, atol=1e-5, msg=f"{name} {options}: network input of call {k}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} {options}: the sample")
    assert bool(torch.isfinite(got).all())
    return got


GRID = list(itertools.product([300, 1000], [1, 5, 20, 50], ["leading", "trailing", "linspace"], ["epsilon", "v"]))


@pytest.mark.parametrize("name,extra", [
    ("dpm-solver++", [{"order": 1}, {"order": 2}, {"order": 3}, {"algorithm": "sde-dpmsolver++"},
                      {"karras_sigmas": True}]),
    ("unipc", [{"order": 1}, {"order": 2, "solver_type": "bh1"}, {"order": 3}, {"karras_sigmas": True}]),
    ("heun", [{}, {"karras_sigmas": True}]),
    ("euler-ancestral", [{}]),
])
def test_solver_matches_diffusers_every_step(name, extra):
    """T ∈ {300, 1000} × steps ∈ {1, 5, 20, 50} × each spacing × ε and v, each option set in turn."""
    for i, (T, steps, spacing, prediction) in enumerate(GRID):
        options = {"steps": steps, "timestep_spacing": spacing, **extra[i % len(extra)]}
        compare(name, options, T, prediction, seed=i)
    for options in extra:  # every option set on one full configuration too
        compare(name, {"steps": 20, **options}, 1000, "epsilon")


def test_x0_prediction_and_clipping():
    for name in ("dpm-solver++", "unipc", "heun"):
        compare(name, {"steps": 10}, 300, "x0")
    compare("heun", {"steps": 10}, 300, "epsilon", clip=True)  # the run's clipping reaches heun
    d = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 30}), prediction="x0")
    with pytest.raises(ddpmkit.DdpmkitError, match="euler-ancestral: x0 prediction is not supported"):
        ddpmkit.build("sampler", "euler-ancestral", {"steps": 5}, diffusion=d)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_a_wrong_coefficient_fails(name):
    """The comparison is sharp: the reference built from betas off by 0.1 % disagrees."""
    with pytest.raises(AssertionError):
        compare(name, {"steps": 20}, 1000, "epsilon", betas_scale=1.001)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_steps_out_of_range_is_one_line(name):
    d = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 30}))
    with pytest.raises(ddpmkit.DdpmkitError, match=rf"^{name.replace('+', '[+]')}: --steps 31 is more than the model's T = 30$"):
        ddpmkit.build("sampler", name, {"steps": 31}, diffusion=d)
    with pytest.raises(ddpmkit.DdpmkitError, match="steps"):
        ddpmkit.build("sampler", name, {"steps": 0}, diffusion=d)
