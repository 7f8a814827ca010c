"""Distiller ``reflow``: rectified-flow reflow (Liu et al. 2023) for a ``flow`` teacher.

The teacher's ODE couples each noise z with the image it integrates to, x = ODE_T(z) (Heun,
``teacher_steps`` steps); the student, starting from the teacher's weights, learns the straight path
between the two:

    x_t = (1 − t)·x + t·z,   t ~ U(0, 1), a share ``one_call`` of each batch at t = 1
    L   = mean((f_S(x_t, t) − (z − x))²)

A straight path is integrated exactly by any number of Euler steps: where the teacher's couplings
can be joined by paths that do not cross, one step from z lands on x. The share at t = 1 trains the
one-call step z → z − f_S(z, 1) directly (Liu et al.'s distillation after reflow, on the same
network). The couplings (``pairs`` of them; for a class-conditional teacher the labels cycle through
the classes) are drawn once, before training, into the student's directory
(``couplings.safetensors``), so a resumed distillation reuses them. Each training batch draws its
pairs from them; the teacher's training images are not used.

``metric = "pseudo-huber"`` replaces the squared error by Song & Dhariwal's (2023) pseudo-Huber
distance per image (``ddpmkit.sdk.distill.distance``): sqrt(‖f_S − (z − x)‖² + c²) − c with
c = 0.00054·√d (d: the numbers in one image). At t = 1 the velocity's error is the one-call image's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.sdk.distill import METRICS, Stage, distance, heun
from ddpmkit.sdk.files import write_tensors

COUPLINGS = "couplings.safetensors"


@attrs.define
class ReflowConfig:
    """Options of ``reflow``.

    pairs: couplings (noise, teacher's image) drawn before training. Default 4096.
    teacher_steps: Heun steps of the teacher's ODE per coupling (2·steps − 1 calls). Default 8.
    steps: optimizer steps. Default 700.
    calls: the Euler steps the student is drawn with by default (any number works). Default 4.
    one_call: the share of each batch trained at t = 1, the one-call step. Default 0.25.
    times: where the rest of each batch is trained: ``uniform`` on (0, 1) (Liu et al.), or ``grid``, the
        times of the student's own Euler grid (t = 1, 1 − 1/calls, ...), where it is drawn. Default uniform.
    couplings: a couplings.safetensors of an earlier reflow of the same teacher to reuse (with as many
        pairs), instead of drawing new ones. Default none.
    metric: the distance between the student's velocity and z − x: ``mse`` (the squared error) or
        ``pseudo-huber`` (see the module doc). Default mse.
    """

    pairs: int = attrs.field(default=4096, validator=attrs.validators.ge(1))
    teacher_steps: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    steps: int = attrs.field(default=700, validator=attrs.validators.ge(1))
    calls: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    one_call: float = attrs.field(default=0.25, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
    times: str = attrs.field(default="uniform", validator=attrs.validators.in_(("uniform", "grid")))
    couplings: str | None = None
    metric: str = attrs.field(default="mse", validator=attrs.validators.in_(METRICS))


class Reflow:
    """See the module doc."""

    name = "reflow"
    chain = False
    uses_data = False  # it trains on its couplings: the run's dataset is not read

    def __init__(self, config: ReflowConfig, process):
        if getattr(process, "prediction", None) != "velocity":
            raise ddpmkit.DdpmkitError(
                f"reflow straightens the straight-line paths of a flow-matching teacher; process "
                f"'{getattr(process, 'name', '?')}' is not one (use --method progressive, or a teacher trained "
                "with --process flow)")
        self.config, self.process = config, process
        self.stages = [Stage(config.steps, config.calls)]
        self.z = self.x = self.labels = None

    def sampler(self, calls: int) -> tuple[str, dict]:
        return "euler", {"steps": calls}

    @torch.no_grad()
    def prepare(self, teacher, *, shape: tuple[int, int, int], num_classes: int | None, generator: torch.Generator,
                directory: Path, progress=None, batch_size: int = 256, device="cpu") -> None:
        """Draw the couplings (or read them back from ``directory``)."""
        path = Path(directory) / COUPLINGS
        n = self.config.pairs
        source = Path(self.config.couplings) if self.config.couplings else path
        if self.config.couplings and not source.is_file():
            raise ddpmkit.DdpmkitError(f"distiller.couplings: no file '{source}' (an earlier reflow's "
                                       f"{COUPLINGS})")
        if source.exists():
            saved = load_file(str(source))
            if self.config.couplings and (saved["z"].shape[0] != n or tuple(saved["z"].shape[1:]) != tuple(shape)):
                raise ddpmkit.DdpmkitError(f"distiller.couplings: '{source}' holds {saved['z'].shape[0]} pairs of "
                                           f"{tuple(saved['z'].shape[1:])}; this reflow wants {n} of {tuple(shape)}")
            if saved["z"].shape[0] == n and tuple(saved["z"].shape[1:]) == tuple(shape):
                self.z, self.x = saved["z"].to(device), saved["x"].to(device)
                self.labels = saved["labels"].to(device) if "labels" in saved else None
                if source != path:  # the student keeps its own copy, for resuming
                    shutil.copyfile(source, path)
                return
        labels = torch.arange(n, device=device) % num_classes if num_classes else None
        zs, xs = [], []
        ts = self.process.grid(self.config.teacher_steps, device)
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            z = self.process.prior((b, *shape), generator=generator, device=device)
            y = None if labels is None else labels[start: start + b]
            zs.append(z)
            xs.append(heun(teacher, z, ts, y))
            if progress is not None:
                progress(start + b, n)
        self.z, self.x, self.labels = torch.cat(zs), torch.cat(xs), labels
        tensors = {"z": self.z.cpu().contiguous(), "x": self.x.cpu().contiguous()}
        if labels is not None:
            tensors["labels"] = labels.cpu()
        write_tensors(path, tensors, {"format": "ddpmkit-reflow-couplings-1"})

    def loss(self, student, teacher, x0: torch.Tensor, labels: torch.Tensor | None, stage: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
        b = x0.shape[0]
        idx = torch.randint(0, self.z.shape[0], (b,), generator=generator, device=x0.device)
        z, x = self.z[idx], self.x[idx]
        y = None if self.labels is None else self.labels[idx]
        if self.config.times == "uniform":
            t = torch.rand(b, generator=generator, device=x0.device, dtype=torch.float64)
        else:  # the student's grid: 1, 1 − 1/calls, ..., 1/calls
            k = torch.randint(0, self.config.calls, (b,), generator=generator, device=x0.device)
            t = 1 - k.double() / self.config.calls
        t = torch.where(torch.arange(b, device=x0.device) < round(self.config.one_call * b), torch.ones_like(t), t)
        xt = self.process.q_sample(x, t, z)
        return distance(student(xt, t, y) - (z - x), self.config.metric)


def make(config: ReflowConfig, *, process) -> Reflow:
    return Reflow(config, process)


@ddpmkit.hookimpl
def register_distillers(register):
    register("reflow", make, ReflowConfig,
             "rectified-flow reflow (Liu et al. 2023): straighten a flow teacher's paths with its own couplings")
