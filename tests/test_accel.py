"""The fast path (ddpmkit.accel): what each switch resolves to, that it runs the same function, and
that it leaves the model and PyTorch's global settings as it found them.

The CUDA-only checks (graphs, bf16 on the GPU, compile + graphs) run where CUDA is present (the
benchmark machine); on the CPU they are skipped and the CPU paths are checked instead.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from conftest import small_run

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.accel import FastPath, _Eager, _Graphed, accelerated, is_eager, model_memory_format, tf32_mode
from ddpmkit.run.assembly import build_diffusion
from ddpmkit.run.pipeline import Pipeline

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_unet(seed=0):
    torch.manual_seed(seed)
    return ddpmkit.build("predictor", "unet2d", {"block_out_channels": (16, 32), "attention_resolutions": (4,),
                                                 "layers_per_block": 1, "norm_num_groups": 8},
                         channels=1, resolution=8).eval()


def laptop(max_steps, limit=200, timesteps=None, **changes):
    """The tiny preset (16×16) cut down to a few steps on a few images."""
    config = ddpmkit.preset_config("tiny")
    config.max_steps, config.ema_decay = max_steps, None
    config.dataset.options["limit"] = limit
    if timesteps:
        config.schedule.options["timesteps"] = timesteps
    for k, v in changes.items():
        setattr(config, k, v)
    return config


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_auto_resolves_per_device():
    auto = FastPath()
    assert auto.resolve(CPU) == FastPath(precision="fp32", channels_last=False, tf32=False, compile=False,
                                         cuda_graphs=False)
    assert is_eager(auto, CPU)
    assert auto.resolve(CUDA) == FastPath(precision="bf16", channels_last=True, tf32=True, compile=False,
                                          cuda_graphs=True)
    assert not is_eager(auto, CUDA)
    explicit = FastPath(precision="fp32", channels_last=False, tf32=False, cuda_graphs=False)
    assert is_eager(explicit, CUDA)
    assert FastPath(precision="bf16").resolve(CPU).precision == "bf16"
    with pytest.raises(ddpmkit.DdpmkitError, match="cuda-graphs needs a CUDA device"):
        FastPath(cuda_graphs=True).resolve(CPU)
    with pytest.raises(ValueError):
        FastPath(precision="fp16")


def test_resolve_device_gives_cuda_its_index(monkeypatch):
    """`torch.cuda.set_device` refuses an index-less "cuda" (the default `ddpmkit run` on a GPU
    machine failed so): a CUDA device always comes back as cuda:N."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert ddpmkit.resolve_device("auto") == torch.device("cuda", 0)
    assert ddpmkit.resolve_device(None) == torch.device("cuda", 0)
    assert ddpmkit.resolve_device("cuda") == torch.device("cuda", 0)
    assert ddpmkit.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert ddpmkit.resolve_device("cpu") == CPU


def test_plain_fp32_sampling_turns_cudnn_tf32_off():
    """fp32 means full fp32: PyTorch runs cuDNN convolutions in TF32 by default, so the plain eager
    path (nothing else to wrap) still sets TF32 off around the network, and restores it after."""
    config = laptop(1, timesteps=5)
    diffusion, _ = build_diffusion(config)
    seen, net = [], small_unet()

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t, **conditions):
            seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
            return self.net(x, t, **conditions)

    pipe = Pipeline(Spy(), diffusion, 1, 8, config, CPU)
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    try:
        pipe.sample(2, seed=0, fast=FastPath.eager())
        assert seen and set(seen) == {(False, "highest")}
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


def test_from_run_takes_the_config_and_overrides():
    config = ddpmkit.preset_config("laptop")
    config.channels_last, config.precision = True, "bf16"
    fast = FastPath.from_run(config, compile=True, precision=None)
    assert (fast.precision, fast.channels_last, fast.compile, fast.cuda_graphs) == ("bf16", True, True, None)


def test_tf32_mode_restores_global_settings():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with tf32_mode(True):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    with tf32_mode(False):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize("start", [torch.contiguous_format, torch.channels_last])
def test_channels_last_same_function_and_model_restored(start):
    model = small_unet().to(memory_format=start)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.inference_mode():
        ref = model(x, t)
        with accelerated(model, FastPath(precision="fp32", channels_last=True), CPU) as fn:
            assert model_memory_format(model) == torch.channels_last
            out = fn(x, t)
    assert model_memory_format(model) == start
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert rel(out, ref) < 1e-5
    # the weights are ordinary tensors again: the model can be trained after sampling
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(x, t).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_autocast_on_cpu_is_bf16_and_close():
    model = small_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.inference_mode():
        ref = model(x, t)
        with accelerated(model, FastPath(precision="bf16"), CPU) as fn:
            out = fn(x, t)
    err = rel(out, ref)
    assert out.dtype == torch.float32
    assert 1e-4 < err < 3e-2, err  # bf16 rounding is visible, and small


def test_pipeline_sample_fast_path_on_cpu(tmp_path):
    config = laptop(2, timesteps=20)
    pipe = ddpmkit.train(config, tmp_path / "run", device="cpu", progress=False, sample_grid=False)
    ref = pipe.sample(8, seed=3)
    again = pipe.sample(8, seed=3, fast=FastPath(precision="fp32", channels_last=False))
    assert torch.equal(ref, again)  # the CPU default is plain fp32 eager
    cl = pipe.sample(8, seed=3, fast=FastPath(channels_last=True))
    assert (cl - ref).abs().max() < 1e-4
    bf = pipe.sample(8, seed=3, fast=FastPath(precision="bf16"))
    assert 0 < (bf - ref).abs().mean() < 0.05
    assert model_memory_format(pipe.model) == torch.contiguous_format


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compile_runs_the_same_function():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x, t):
            return self.body(x) + t.float().view(-1, 1, 1, 1) / 1000

    net = Net().eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.inference_mode():
        ref = net(x, t)
        with accelerated(net, FastPath(precision="fp32", compile=True), CPU) as fn:
            out = fn(x, t)
    assert rel(out, ref) < 1e-5


@pytest.mark.slow
def test_training_with_channels_last_and_bf16_on_cpu(tmp_path):
    config = laptop(3, timesteps=50, log_every=1)
    base = ddpmkit.train(config, tmp_path / "a", device="cpu", progress=False, sample_grid=False)
    config.channels_last = True
    cl = ddpmkit.train(config, tmp_path / "b", device="cpu", progress=False, sample_grid=False)
    for (k, a), (_, b) in zip(base.model.state_dict().items(), cl.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-4), k
    config.channels_last, config.precision = False, "bf16"
    bf = ddpmkit.train(config, tmp_path / "c", device="cpu", progress=False, sample_grid=False)
    diff = max((a - b).abs().max().item() for a, b in zip(base.model.state_dict().values(),
                                                          bf.model.state_dict().values()))
    assert 0 < diff < 0.1  # trained in bf16: close to fp32, not identical
    # the checkpoint of a channels-last run loads and samples like any other
    pipe = ddpmkit.load_checkpoint(tmp_path / "b" / "model.safetensors")
    assert pipe.sample(2, seed=0).shape == (2, 1, 16, 16)


def test_cli_cuda_graphs_on_cpu_is_one_line(tmp_path):
    config = laptop(1, limit=100, timesteps=10)
    ddpmkit.train(config, tmp_path / "run", device="cpu", progress=False, sample_grid=False)
    r = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "-n", "2", "--cuda-graphs", "--device", "cpu",
                                 "--out", str(tmp_path / "s.png"), "--no-progress"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["Error: --cuda-graphs needs a CUDA device; drop it (or use --device cuda)"]
    r = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "-n", "2", "--precision", "bf16",
                                 "--channels-last", "--device", "cpu", "--out", str(tmp_path / "s.png"),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").exists()


def test_graph_capture_failure_falls_back_to_eager(monkeypatch):
    """A network that cannot be captured (say, it reads a value back to the host) still samples."""
    model = small_unet()
    eager = _Eager(model, FastPath(precision="fp32", channels_last=False).resolve(CPU), CPU)
    graphed = _Graphed(eager)

    def refuse(x, t):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graphed, "_capture", refuse)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.inference_mode():
        with pytest.warns(UserWarning, match="could not be captured as a CUDA graph \\(operation not permitted"):
            out = graphed(x, t)
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            again = graphed(x, t)  # no second attempt, no second warning
        assert later == []
        assert torch.equal(out, model(x, t)) and torch.equal(again, out)
    assert graphed.failed == "operation not permitted when stream is capturing"


def test_graph_bookkeeping_replays_new_inputs_and_returns_copies(fake_cuda_graphs):
    """_Graphed's own logic, on the CPU (conftest's FakeCudaGraphs stands in for capture): inputs go
    into the static buffers before each replay, the output handed back is a copy, one capture per input
    shape after the warm-up calls."""
    fake = fake_cuda_graphs
    model = small_unet()
    graphed = _Graphed(_Eager(model, FastPath.eager().resolve(CPU), CPU), warmup=3)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.inference_mode():
        first = graphed(x, t)
        assert (fake.captures, fake.calls) == (1, 4)  # 3 warm-up calls, then the capture
        second = graphed(x * 0.5, t.flip(0))          # replayed: no new capture, no eager call
        assert (fake.captures, fake.calls) == (1, 4)
        assert torch.allclose(first, model(x, t), atol=1e-6)
        assert torch.allclose(second, model(x * 0.5, t.flip(0)), atol=1e-6)
        assert not torch.allclose(first, second)   # the first result was not overwritten by the replay
        third = graphed(torch.randn(2, 1, 8, 8), t[:2])  # a new batch shape: its own graph
        assert fake.captures == 2 and third.shape == (2, 1, 8, 8)
        graphed(x, t)
        assert fake.captures == 2
    # Through Algorithm 2 (which reuses its timestep buffer at every step): the same samples.
    diffusion = ddpmkit.GaussianDiffusion(torch.linspace(1e-4, 0.02, 20))
    replayed = diffusion.sample(graphed, (4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    plain = diffusion.sample(model, (4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    assert fake.captures == 2 and torch.allclose(replayed, plain, atol=1e-5)


# ---------------------------------------------------------------------------
# CUDA (run on the GPU machine; skipped on the CPU)
# ---------------------------------------------------------------------------
@cuda_only
def test_cuda_graphs_replay_the_eager_function():
    model = small_unet().to(CUDA)
    x, t = torch.randn(4, 1, 8, 8, device=CUDA), torch.tensor([0, 10, 500, 999], device=CUDA)
    eager = FastPath(precision="fp32", channels_last=False, tf32=False, cuda_graphs=False)
    graphed = FastPath(precision="fp32", channels_last=False, tf32=False, cuda_graphs=True)
    with torch.inference_mode():
        with accelerated(model, eager, CUDA) as fn:
            ref, ref2 = fn(x, t), fn(x * 0.5, t)
        with accelerated(model, graphed, CUDA) as fn:
            outs = [fn(x, t), fn(x * 0.5, t)]  # second call: the graph is replayed with new inputs
    assert rel(outs[0], ref) < 1e-6 and rel(outs[1], ref2) < 1e-6
    assert not torch.equal(outs[0], outs[1])  # outputs are copies, not the graph's buffer


@cuda_only
def test_cuda_fast_path_samples_close_to_fp32(tmp_path):
    config = laptop(20, limit=500, timesteps=50)
    pipe = ddpmkit.train(config, tmp_path / "run", device="cuda", progress=False, sample_grid=False)
    trained_format = model_memory_format(pipe.model)  # training on CUDA's defaults leaves channels-last weights
    ref = pipe.sample(16, seed=1, fast=FastPath.eager())
    graphs = pipe.sample(16, seed=1, fast=FastPath(precision="fp32", channels_last=False, tf32=False,
                                                    cuda_graphs=True))
    assert (graphs - ref).abs().max() < 1e-4
    fast = pipe.sample(16, seed=1)  # the CUDA default: bf16 + channels-last + TF32 + graphs
    assert 0 < (fast - ref).abs().mean() < 0.05
    assert model_memory_format(pipe.model) == trained_format  # sampling gives the weights back as it found them


def test_training_reads_the_loss_only_when_it_logs(tmp_path, monkeypatch):
    """No host sync per step: the loss is read at log steps (and epoch ends, checkpoints), not every step."""
    config = laptop(20, limit=2000, log_every=10, checkpoint_every=10**6)
    import sys

    reads = []
    item = torch.Tensor.item

    def counted(self):
        if "ddpmkit" in sys._getframe(1).f_code.co_filename:  # reads by ddpmkit (Adam reads its CPU step count)
            reads.append(1)
        return item(self)

    run = ddpmkit.Trainer.run

    def counting_run(self, *args, **kwargs):  # count from the start of the training loop: the probe of
        monkeypatch.setattr(torch.Tensor, "item", counted)  # every component before it reads CPU values
        return run(self, *args, **kwargs)

    monkeypatch.setattr(ddpmkit.Trainer, "run", counting_run)
    ddpmkit.train(config, tmp_path / "run", device="cpu", progress=False, sample_grid=False)
    monkeypatch.undo()
    assert 2 <= len(reads) <= 4, len(reads)  # steps 10 and 20 (+ the final checkpoint), not 20 reads
    logged = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 2


@cuda_only
def test_cuda_cli_run_with_the_default_device(tmp_path):
    """`ddpmkit run` with no --device on a GPU machine: the CUDA defaults, through the final grid."""
    r = CliRunner().invoke(cli, ["run", *small_run(device=None, out=str(tmp_path / "run"))])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (tmp_path / "run" / "samples.png").exists() and config["run"]["max_steps"] == 3


@cuda_only
def test_cuda_sampling_loop_never_syncs():
    model = small_unet().to(CUDA)
    diffusion = ddpmkit.GaussianDiffusion(torch.linspace(1e-4, 0.02, 20))
    gen = torch.Generator(device=CUDA).manual_seed(0)
    diffusion.sample(model, (2, 1, 8, 8), generator=gen, device=CUDA)  # warm-up (tables move to the device once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        diffusion.sample(model, (2, 1, 8, 8), generator=gen, device=CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_training_with_compile_follows_eager(tmp_path):
    config = laptop(3, log_every=1)
    config.dataset.options["resolution"] = 8
    config.predictor.options.update(block_out_channels=(16, 32), attention_resolutions=(4,))
    eager = ddpmkit.train(config, tmp_path / "a", device="cpu", progress=False, sample_grid=False)
    config.compile = True
    compiled = ddpmkit.train(config, tmp_path / "b", device="cpu", progress=False, sample_grid=False)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x] for d in ("a", "b")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4)
