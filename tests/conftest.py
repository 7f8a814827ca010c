import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

# Tests must be reproducible and CPU-only: CUDA is hidden, except with DDPMKIT_TEST_CUDA=1 (on a GPU
# machine, for the CUDA tests of tests/test_accel.py: benchmarks/gpu_lease.sh). Under pytest-xdist
# (the README's `-n auto`) the cores are shared out between the workers, and processes the tests
# start get the same share.
if os.environ.get("DDPMKIT_TEST_CUDA") != "1":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)

# The small training run the tests use: the tiny preset on 64 digits at 16×16, T = 20, a U-Net of
# widths (8, 16), 3 steps of batch 16, a grid of 4, on the CPU without a progress bar.
SMALL_RUN = {"preset": "tiny", "dataset.limit": 64, "dataset.resolution": 16, "schedule.timesteps": 20,
             "predictor.block_out_channels": "8,16", "predictor.norm_num_groups": 4,
             "predictor.layers_per_block": 1, "predictor.attention_resolutions": 8,
             "batch-size": 16, "max-steps": 3, "samples": 4, "no-progress": True, "device": "cpu"}


def small_run(changes: dict | None = None, **more) -> list[str]:
    """``ddpmkit run`` arguments for :data:`SMALL_RUN` with ``changes``: a key with a dot is a
    ``--set KEY=VALUE``, any other key an option ``--KEY VALUE`` (``True``: a flag; ``None``: left out).
    Keyword arguments are options with ``_`` for ``-`` (``small_run(seed=3, max_steps=None)``)."""
    wanted = {**SMALL_RUN, **(changes or {}), **{k.replace("_", "-"): v for k, v in more.items()}}
    args = []
    for key, value in wanted.items():
        if value is None or value is False:
            continue
        if "." in key:
            args += ["--set", f"{key}={value}"]
        else:
            args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


NO_UNET = {k: None for k in SMALL_RUN if k.startswith("predictor.")}  # changes: the preset's own U-Net
TINY_UNET = small_run({k: None for k in SMALL_RUN if not k.startswith("predictor.")})  # only the small U-Net
TINY_RUN = small_run()


def resume_equals_uninterrupted(run, again, last_checkpoint: str) -> None:
    """Copy the finished ``run`` to ``again`` without its model file and ``last_checkpoint``, resume it
    (`ddpmkit run --resume`), and assert the resumed run's weights equal the uninterrupted ones bit for bit."""
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from ddpmkit.cli import cli

    shutil.copytree(run, again)
    (again / "checkpoints" / last_checkpoint).unlink()
    (again / "model.safetensors").unlink()
    r = CliRunner().invoke(cli, ["run", "--resume", str(again), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    a, b = load_file(str(run / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` (each half a minute or more on one thread) run first: under xdist's
    worksteal they start on one worker while the other takes the short ones, and the session ends
    on short tests instead of waiting for a long one that happened to come last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test sees a freshly loaded plugin manager (entry points reloaded)."""
    import ddpmkit

    monkeypatch.delenv("DDPMKIT_PLUGINS", raising=False)
    ddpmkit.reset_manager()
    yield
    ddpmkit.reset_manager()


@pytest.fixture(scope="session")
def digit_cache(tmp_path_factory):
    """One folder for digit-score's classifier, trained once (about half a minute) for the whole session:
    under xdist the workers share it (the first trains it under a file lock, the others wait and load)."""
    import fcntl

    from ddpmkit_plugins.metrics.digit_score import load_classifier

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    path = root / "digit-cache"
    path.mkdir(exist_ok=True)
    with open(root / "digit-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load_classifier(str(path))
    return str(path)


@pytest.fixture
def tiny_args():
    return list(TINY_RUN)


def _jpeg(path, array):
    Image.fromarray(array).save(path, quality=95)


@pytest.fixture
def aircraft_tree(tmp_path):
    """A small FGVC-Aircraft 2013b tree in torchvision's exact layout; each image has a white
    20-pixel banner at the bottom over a red picture."""
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172"]
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    splits = {"train": [], "val": [], "test": []}
    rng = np.random.default_rng(0)
    for i in range(12):
        name = f"{1000000 + i:07d}"
        img = np.zeros((120, 160, 3), np.uint8)
        img[..., 0] = 200
        img[:100] += rng.integers(0, 30, (100, 160, 3), dtype=np.uint8)
        img[100:] = 255  # the banner
        _jpeg(data / "images" / f"{name}.jpg", img)
        splits[("train", "val", "test")[(i // 3) % 3]].append(f"{name} {variants[i % 3]}")
    for split, lines in splits.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    (data / "images_variant_trainval.txt").write_text("\n".join(splits["train"] + splits["val"]) + "\n")
    return tmp_path


class U8(torch.utils.data.Dataset):
    """uint8 images as torch-fidelity takes them (the same pixels the PNG folders hold)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def image_sets(n=20, seed=0):
    """Two different sets of structured 32×32 RGB images (smooth random colour fields), uint8."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(2):
        low = torch.rand(n, 3, 4 + 2 * k, 4 + 2 * k, generator=g)
        x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False)
        x = x + 0.15 * torch.rand(n, 3, 32, 32, generator=g) * k
        out.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    return out


@pytest.fixture(scope="session")
def fidelity_weights(tmp_path_factory):
    """A random state dict in torch-fidelity's Inception 2015-12-05 format: neutral batch-norm statistics and
    He-initialised convolutions. Random pool3 features share a large common component, which gives every image
    the same class (IS ≈ 1, a test that could not fail); so the final layer is chosen from the features of the
    test images: random directions orthogonal to their mean, scaled by their spread. IS is then well above 1
    and differs between the two image sets."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    orig_load, orig_url = cls.load_state_dict, fe.load_state_dict_from_url
    cls.load_state_dict = lambda self, sd, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        net = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = orig_load, orig_url
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, value in net.state_dict().items():
        if key.endswith("running_mean") or (key.endswith(".bias") and ".bn." in key):
            sd[key] = torch.zeros_like(value)
        elif key.endswith("running_var") or (key.endswith(".weight") and ".bn." in key):
            sd[key] = torch.ones_like(value)
        elif key.endswith("conv.weight"):
            sd[key] = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / value[0].numel())
        else:
            sd[key] = torch.zeros_like(value)
    torch.nn.Module.load_state_dict(net, sd)
    with torch.no_grad():
        feats = torch.cat([net(x)[0] for x in image_sets()]).double()
    mu, sd_f = feats.mean(0), feats.std(0) + 1e-8
    w = torch.randn(1008, 2048, generator=g, dtype=torch.float64) / sd_f
    w = w - (w @ mu).unsqueeze(1) * mu.unsqueeze(0) / mu.dot(mu)  # no common offset: W·μ = 0
    logits = feats @ w.T
    w = w * (4.0 / logits.std())
    sd["fc.weight"] = w.float()
    sd["fc.bias"] = torch.randn(1008, generator=g)
    path = tmp_path_factory.mktemp("fidelity") / "pt_inception-random.pth"
    torch.save(sd, path)
    return path


class FakeCudaGraphs:
    """CUDA graph capture stood in for on the CPU, so ``ddpmkit.run.accel._Graphed``'s own input handling
    runs in the suite.

    While a graph is being captured, every call of the fast path's eager network (``_Eager``) is
    recorded with the very tensors it received — the graph's static inputs, as a real capture records
    kernels that read those buffers — and ``replay()`` runs the recorded calls again, writing into the
    same output tensor. A wrapper that forgot to copy one input (say, the class labels) into its static
    buffer replays with stale values, exactly as a real graph would. ``FastPath.resolve`` is let through
    with ``cuda_graphs=True`` on the CPU; ``captures`` and ``calls`` count captures and eager calls.
    """

    def __init__(self, monkeypatch):
        import contextlib
        import functools

        import attrs

        from ddpmkit import accel

        self.active, self.captures, self.calls = None, 0, 0
        fake = self

        class Graph:
            def __init__(self):
                self.recorded = []

            def replay(self):
                for call, args, kwargs, out in self.recorded:
                    out.copy_(call(*args, **kwargs))

        class Stream:
            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def graph(g):
            fake.active, fake.captures = g, fake.captures + 1
            try:
                yield
            finally:
                fake.active = None

        eager_call = accel._Eager.__call__

        def recording(eager, x, t, **conditions):
            fake.calls += 1
            out = eager_call(eager, x, t, **conditions)
            if fake.active is not None:
                fake.active.recorded.append((functools.partial(eager_call, eager), (x, t), conditions, out))
            return out

        resolve = accel.FastPath.resolve

        def resolve_anywhere(path, device):
            return attrs.evolve(resolve(attrs.evolve(path, cuda_graphs=False), device),
                                cuda_graphs=bool(path.cuda_graphs))

        monkeypatch.setattr(accel._Eager, "__call__", recording)
        monkeypatch.setattr(accel.FastPath, "resolve", resolve_anywhere)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    return FakeCudaGraphs(monkeypatch)
