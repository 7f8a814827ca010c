"""Every execution switch of the fast path × every predictor capability × every sampler, on the CPU,
through ``Pipeline.sample`` — compared with plain fp32 eager sampling of the same model and seed.

Switches: ``channels-last`` (fp32), ``bf16`` autocast, ``graphs`` (the CUDA-graph wrapper's input
handling, with conftest's FakeCudaGraphs standing in for capture) and ``compile`` (``torch.compile``,
on the conditional and guided models with one sampler: a compile costs seconds). Capabilities: an unconditional
model, a class-conditional one (W = 1), guided (W = 3: the doubled batch), and a learned variance.
The models are small random-weight U-Nets at 8×8 with T = 20, so the whole matrix runs in seconds;
their outputs are not images, but every input the contract allows reaches them and changes them.

Tolerances (max |difference| from fp32 eager over the samples, which lie in [-1, 1]):
  * graphs: 0 (bitwise: the replayed computation is the eager one on the same values);
  * channels-last and compile: 1e-5 (fp32 with another kernel order; measured ≤ 1.8e-6);
  * bf16: 0.1 max and 0.01 mean (8-bit mantissas through every step; measured max 0.026, with
    guidance W = 3 and Euler-ancestral, mean ≤ 0.003), and never 0 (the switch must take effect).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.accel import FastPath
from ddpmkit.run.assembly import DataShape, build_diffusion, build_predictor
from ddpmkit.run.model_file import save_model_file
from ddpmkit.run.pipeline import Pipeline
from ddpmkit.sdk.options import config_to_dict

CPU = torch.device("cpu")
CAPABILITIES = ("unconditional", "conditional", "guided", "learned-variance")
SAMPLERS = {"ddpm": {}, "ddim": {"steps": 5}, "dpm-solver++": {"steps": 5}, "unipc": {"steps": 5},
            "heun": {"steps": 3}, "euler-ancestral": {"steps": 5}}
SWITCHES = {
    "channels-last": FastPath(precision="fp32", channels_last=True),
    "bf16": FastPath(precision="bf16", channels_last=False),
    "graphs": FastPath(precision="fp32", channels_last=False, cuda_graphs=True),
    "bf16+channels-last+graphs": FastPath(precision="bf16", channels_last=True, cuda_graphs=True),
}
TOLERANCE = {"channels-last": 1e-5, "compile": 1e-5, "graphs": 0.0, "bf16": 0.1, "bf16+channels-last+graphs": 0.1}
_PIPES: dict[str, Pipeline] = {}
_REFERENCE: dict[tuple[str, str], torch.Tensor] = {}


def pipeline(capability: str) -> Pipeline:
    """A random-weight 8×8 U-Net pipeline (T = 20) with the capability asked for (built once)."""
    if capability not in _PIPES:
        config = ddpmkit.preset_config("tiny")
        config.schedule.options["timesteps"] = 20
        config.predictor.options.update(block_out_channels=(16, 32), attention_resolutions=(4,),
                                        layers_per_block=1, norm_num_groups=8,
                                        learn_variance=capability == "learned-variance")
        if capability == "learned-variance":
            config.variance_type = "learned_range"
        conditional = capability in ("conditional", "guided")
        config.class_conditional = conditional
        shape = DataShape(1, 8, 10 if conditional else None)
        diffusion, _ = build_diffusion(config)
        torch.manual_seed(0)
        model, _ = build_predictor(config, shape)
        _PIPES[capability] = Pipeline(model.eval(), diffusion, 1, 8, config, CPU, num_classes=shape.num_classes)
    return _PIPES[capability]


def draw(capability: str, sampler: str, fast: FastPath) -> torch.Tensor:
    """8 samples in two batches of 4: for a conditional model the second batch has other labels
    (classes 5..9) at the same shape, so a graph that kept its first labels would show."""
    pipe = pipeline(capability)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # solvers ignore a learned variance, and say so
        return pipe.sample(8, seed=1, batch_size=4, sampler=sampler, sampler_options=SAMPLERS[sampler], fast=fast,
                           guidance=3.0 if capability == "guided" else None)


def check(switch: str, capability: str, sampler: str, out: torch.Tensor) -> None:
    if (capability, sampler) not in _REFERENCE:
        _REFERENCE[capability, sampler] = draw(capability, sampler, FastPath.eager())
    ref = _REFERENCE[capability, sampler]
    assert out.shape == ref.shape == (8, 1, 8, 8) and torch.isfinite(out).all()
    diff = (out - ref).abs()
    if TOLERANCE[switch] == 0.0:
        assert torch.equal(out, ref), f"{switch}: max difference {diff.max():.3g}, expected bitwise equality"
    else:
        assert diff.max() <= TOLERANCE[switch], f"{switch}: max difference {diff.max():.3g}"
    if switch.startswith("bf16"):
        assert diff.max() > 0 and diff.mean() <= 0.01, f"bf16: mean difference {diff.mean():.3g}"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_switch_capability_sampler(switch, capability, sampler, request):
    if "graphs" in switch:
        fake = request.getfixturevalue("fake_cuda_graphs")
    out = draw(capability, sampler, SWITCHES[switch])
    if "graphs" in switch:
        # one capture per batch shape: both batches of 4 share it (2 batches, replayed with new inputs)
        assert fake.captures == 1, fake.captures
    check(switch, capability, sampler, out)


def test_conditions_reach_the_network_under_every_switch(fake_cuda_graphs):
    """The labels change the samples (so the checks above compare something that depends on them)."""
    pipe = pipeline("conditional")
    for fast in [FastPath.eager(), *SWITCHES.values()]:
        a = pipe.sample(4, seed=1, sampler="ddim", sampler_options={"steps": 3}, fast=fast, class_labels=2)
        b = pipe.sample(4, seed=1, sampler="ddim", sampler_options={"steps": 3}, fast=fast, class_labels=7)
        assert (a - b).abs().max() > 1e-3, fast


def test_graph_static_inputs_follow_every_condition(fake_cuda_graphs):
    """Keyword inputs are static inputs of the graph: new values at the same shape are copied in and
    replayed; a new shape or dtype (a continuous noise level instead of integer t) captures anew."""
    from ddpmkit.run.accel import _Eager, _Graphed

    class Net(torch.nn.Module):
        def forward(self, x, t, class_labels=None, sigma=None):
            out = x + t.double().view(-1, 1, 1, 1).float() / 100
            if class_labels is not None:
                out = out + class_labels.view(-1, 1, 1, 1)
            if sigma is not None:
                out = out * sigma.view(-1, 1, 1, 1)
            return out

    net, fake = Net(), fake_cuda_graphs
    graphed = _Graphed(_Eager(net, FastPath.eager().resolve(CPU), CPU), warmup=1)
    x, t = torch.randn(3, 1, 2, 2), torch.tensor([1, 2, 3])
    for labels in (torch.tensor([0, 1, 2]), torch.tensor([5, 5, 5])):
        assert torch.equal(graphed(x, t, class_labels=labels), net(x, t, class_labels=labels))
    assert fake.captures == 1
    both = torch.tensor([5, 5, 5, 10, 10, 10])  # guidance's doubled batch: a graph of its own
    assert torch.equal(graphed(torch.cat([x, x]), torch.cat([t, t]), class_labels=both),
                       net(torch.cat([x, x]), torch.cat([t, t]), class_labels=both))
    assert fake.captures == 2
    for s in (torch.tensor([0.5, 1.0, 2.0]), torch.tensor([3.0, 3.0, 3.0])):  # a continuous input
        tc = torch.tensor([0.25, 0.5, 0.75])
        assert torch.equal(graphed(x, tc, class_labels=labels, sigma=s), net(x, tc, class_labels=labels, sigma=s))
    assert fake.captures == 3
    assert torch.equal(graphed(x, t), net(x, t)) and fake.captures == 4  # no labels: another signature


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compile_with_labels_and_guidance():
    """torch.compile with the class labels as a keyword input, at W = 1 and at W = 3 (the doubled batch
    recompiles once); the other capabilities add nothing compile sees differently (unconditional: no
    keyword; learned variance: more output channels), and each compile costs ~15 s on 2 cores."""
    for capability in ("conditional", "guided"):
        check("compile", capability, "ddim", draw(capability, "ddim", FastPath(precision="fp32", compile=True)))


@pytest.mark.parametrize("flag", [["--precision", "bf16"], ["--channels-last"], ["--precision", "bf16", "--channels-last"]])
def test_cli_sample_conditional_with_each_switch(flag, tmp_path):
    pipe = pipeline("conditional")
    run = tmp_path / "run"
    run.mkdir()
    save_model_file(run / "model.safetensors", pipe.model.state_dict(),
                    {"run": config_to_dict(pipe.config), "data": {"channels": 1, "resolution": 8, "num_classes": 10}})
    r = CliRunner().invoke(cli, ["sample", str(run), "-n", "4", "--sampler", "ddim", "--steps", "3", "--guidance", "3",
                                 "--device", "cpu", "--out", str(tmp_path / "s.png"), "--no-progress", *flag])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").stat().st_size > 0


def test_cli_cuda_graphs_on_cpu_refused_in_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["run", "--preset", "tiny-cond", "--cuda-graphs", "--device", "cpu", "--max-steps", "1",
                                 "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["Error: --cuda-graphs needs a CUDA device; drop it (or use --device cuda)"]


def test_cli_run_default_conditional_bf16_draws_its_grid(tmp_path):
    """`ddpmkit run --precision bf16` on the (class-conditional) default: trains, saves, draws the grid."""
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", "--precision", "bf16", "--max-steps", "2", "--batch-size", "4", "--samples", "2",
                                 "--set", "dataset.limit=64", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").exists() and (out / "samples.png").stat().st_size > 0
    pipe = ddpmkit.load_checkpoint(out)
    assert pipe.num_classes == 10 and pipe.config.precision == "bf16"
