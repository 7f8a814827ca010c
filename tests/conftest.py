import os

import pytest
import torch

# Tests must be reproducible and CPU-only.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_UNET = ["--set", "predictor.block_out_channels=8,16", "--set", "predictor.norm_num_groups=4",
             "--set", "predictor.layers_per_block=1", "--set", "predictor.attention_resolutions=8"]
TINY_RUN = ["--set", "dataset.limit=64", "--set", "dataset.resolution=16", "--set", "schedule.timesteps=20",
            *TINY_UNET, "--batch-size", "16", "--max-steps", "3", "--samples", "4", "--no-progress",
            "--device", "cpu"]


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test sees a freshly loaded plugin manager (entry points reloaded)."""
    import ddpmkit

    monkeypatch.delenv("DDPMKIT_PLUGINS", raising=False)
    ddpmkit.reset_manager()
    yield
    ddpmkit.reset_manager()


@pytest.fixture
def tiny_args():
    return list(TINY_RUN)
