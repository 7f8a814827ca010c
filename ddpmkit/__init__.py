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

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402
from .errors import DdpmkitError, PluginError  # noqa: E402
from .kinds import KINDS, KIND_TABLE  # noqa: E402
from .plugins import (  # noqa: E402
    Component,
    available,
    build,
    get_component,
    get_manager,
    register_plugin,
    reset_manager,
    unregister_plugin,
)
from .diffusion import GaussianDiffusion, LossContext, ModelOutput  # noqa: E402
from .contract import ContractError  # noqa: E402
from .config import ComponentSpec, RunConfig, PRESETS, preset_config  # noqa: E402
from .pipeline import Pipeline, load_checkpoint, save_grid, resolve_device  # noqa: E402
from .training import Trainer, train  # noqa: E402
from .evaluation import MetricContext  # noqa: E402
from .accel import FastPath  # noqa: E402
from . import accel, assembly, checkpoint, contract, data, metrics, state, validators  # noqa: E402,F401

__all__ = [
    "__version__", "hookimpl", "DdpmkitError", "PluginError", "KINDS", "Component", "available", "build",
    "get_component", "get_manager", "register_plugin", "reset_manager", "unregister_plugin",
    "GaussianDiffusion", "ComponentSpec", "RunConfig", "PRESETS", "preset_config", "Pipeline",
    "load_checkpoint", "save_grid", "resolve_device", "train", "Trainer", "FastPath", "KIND_TABLE", "LossContext",
    "ModelOutput", "MetricContext", "ContractError",
]
