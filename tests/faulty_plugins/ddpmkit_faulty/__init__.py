"""One faulty component of every kind, as a careless third-party author would write them, plus two
that are fine (a dataclass config, a dataset without a data_root option).

tests/test_faulty_plugins.py pip-installs this package and checks that each fault ends in one line
naming the distribution, before any training, while everything else keeps working.
"""

import dataclasses

import torch

import ddpmkit


# -- schedules ---------------------------------------------------------------------------------
@dataclasses.dataclass
class DataclassScheduleConfig:  # a dataclass config: accepted
    timesteps: int = 20
    beta: float = 0.01

    def __post_init__(self):
        if not 0 < self.beta < 1:
            raise ValueError(f"beta must lie in (0, 1), got {self.beta}")


class PlainConfig:  # neither attrs nor a dataclass: this component is dropped
    timesteps = 20


@ddpmkit.hookimpl
def register_schedules(register):
    register("linear", lambda c: torch.full((10,), 0.5, dtype=torch.float64))  # a built-in's name
    register("plain-config", lambda c: torch.full((10,), 0.01, dtype=torch.float64), PlainConfig)
    register("dc-const", lambda c: torch.full((c.timesteps,), c.beta, dtype=torch.float64), DataclassScheduleConfig,
             "constant β with a dataclass config")


# -- predictors --------------------------------------------------------------------------------
class Float64Net(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x).double()  # answers in float64


@ddpmkit.hookimpl
def register_predictors(register):
    register("float64-net", lambda *, channels, resolution: Float64Net(channels), None, "answers in float64")


# -- datasets ----------------------------------------------------------------------------------
class Images(torch.utils.data.Dataset):
    def __init__(self, make):
        self.make = make

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return self.make(i), 0


def _gray(i):
    return torch.linspace(-1, 1, 16 * 16).reshape(1, 16, 16) * (1 - i / 64)


@ddpmkit.hookimpl
def register_datasets(register):
    register("hw-images", lambda: Images(lambda i: _gray(i)[0]), None, "(H, W) items")
    register("uint8-images", lambda: Images(lambda i: ((_gray(i) + 1) * 127.5).to(torch.uint8)), None, "uint8 items")
    register("byte-range-images", lambda: Images(lambda i: (_gray(i) + 1) * 127.5), None, "floats in [0, 255]")
    register("shapes", lambda: Images(_gray), None, "fine, and has no data_root option")


# -- losses ------------------------------------------------------------------------------------
@ddpmkit.hookimpl
def register_losses(register):
    def per_sample(prediction, target, reduction="mean"):
        return (prediction - target).pow(2).flatten(1).mean(1)  # (B,) whatever reduction says

    register("per-sample-loss", lambda: per_sample, None, "returns (B,) for reduction='mean'")


# -- metrics -----------------------------------------------------------------------------------
@ddpmkit.hookimpl
def register_metrics(register):
    register("tensor-metric", lambda *, device: (lambda images: {"mean": images.mean()}), None, "answers tensors")


# -- samplers ----------------------------------------------------------------------------------
class HalfSampler:
    num_steps = 1

    def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32):
        return torch.zeros(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=device)  # the wrong size


@ddpmkit.hookimpl
def register_samplers(register):
    register("half-sampler", lambda *, diffusion: HalfSampler(), None, "returns half-size images")


# -- timestep samplers -------------------------------------------------------------------------
class OneBased:
    def __init__(self, num_timesteps):
        self.T = num_timesteps

    def sample(self, batch, device, generator=None):
        return torch.randint(1, self.T + 1, (batch,), device=device, generator=generator), None  # 1-based


@ddpmkit.hookimpl
def register_timestep_samplers(register):
    register("one-based", lambda *, num_timesteps: OneBased(num_timesteps), None, "draws t in 1..T")


# -- loggers -----------------------------------------------------------------------------------
@ddpmkit.hookimpl
def register_loggers(register):
    register("print-only", lambda: print, None, "a function, not a logger object")
