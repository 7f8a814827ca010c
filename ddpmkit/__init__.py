"""ddpmkit: Denoising Diffusion Probabilistic Models with plugins.

Library use::

    import ddpmkit

    config = ddpmkit.preset_config("laptop")          # or ddpmkit.RunConfig(...)
    config.max_steps = 100
    pipe = ddpmkit.train(config, "runs/demo")          # Algorithm 1, writes runs/demo/
    images = pipe.sample(16, seed=0)                   # Algorithm 2, (16, 1, 28, 28) in [-1, 1]
    pipe = ddpmkit.load_checkpoint("runs/demo/model.safetensors")
    betas = ddpmkit.build("schedule", "linear", {"timesteps": 300})
"""

import sys

from ddpmkit import run, sdk  # noqa: F401  (ddpmkit.sdk.metrics, ddpmkit.run.assembly, ...)
from ddpmkit._version import __version__
from ddpmkit.diffusion import GaussianDiffusion, LossContext, ModelOutput
from ddpmkit.errors import DdpmkitError, PluginError
from ddpmkit.run import accel, assembly
from ddpmkit.run.accel import FastPath
from ddpmkit.run.config import ComponentSpec, RunConfig
from ddpmkit.run.pipeline import Pipeline, load_checkpoint, resolve_device, save_grid
from ddpmkit.run.presets import PRESETS, preset_config
from ddpmkit.run.trainer import Trainer, train
from ddpmkit.sdk import contract, data, evaluation, metrics, testing, validators
from ddpmkit.sdk.contract import ContractError
from ddpmkit.sdk.evaluation import MetricContext
from ddpmkit.sdk.hookspecs import hookimpl
from ddpmkit.sdk.kinds import KIND_TABLE, KINDS
from ddpmkit.sdk.registry import (
    Component,
    available,
    build,
    get_component,
    get_manager,
    register_plugin,
    reset_manager,
    unregister_plugin,
)

# Modules that lived at the top before the layers became folders keep their old import paths
# (``import ddpmkit.testing``, ``from ddpmkit.metrics import ...``): the same module objects.
for _module in (contract, data, evaluation, metrics, testing, validators, accel, assembly):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
del _module

__all__ = [
    "__version__", "hookimpl", "DdpmkitError", "PluginError", "KINDS", "Component", "available", "build",
    "get_component", "get_manager", "register_plugin", "reset_manager", "unregister_plugin",
    "GaussianDiffusion", "ComponentSpec", "RunConfig", "PRESETS", "preset_config", "Pipeline",
    "load_checkpoint", "save_grid", "resolve_device", "train", "Trainer", "FastPath", "KIND_TABLE", "LossContext",
    "ModelOutput", "MetricContext", "ContractError",
]
