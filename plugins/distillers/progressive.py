"""Distiller ``progressive``: progressive distillation (Salimans & Ho 2022) on the teacher's
probability-flow ODE, for any process that has one (``vp``, ``edm``, ``flow``).

Each stage halves the student's calls: the student learns to take in one Euler step what its teacher
takes in two. With the student's N-step grid t_0 > t_1 > ... > t_N = 0 (the process's ``grid(N)``,
whose points are every other point of ``grid(2N)``; t_m = grid(2N)[2i + 1] lies between t_i and t_{i+1}):

    i ~ U{0..N−1},  x = q(x_0, t_i, ε)                               a training image noised to t_i
    x'  = x + (t_m − t_i)·f_T(x, t_i)                                 the teacher's first Euler step
    x'' = x' + (t_{i+1} − t_m)·f_T(x', t_m)                           and its second
    x_s = x + (t_{i+1} − t_i)·f_S(x, t_i)                             the student's one step
    L   = max(1, t_i²) · mean((x_s − x'')²) / (t_{i+1} − t_i)²

f = dx/dt from the network's output (the process's ``drift``). Dividing by the step measures the
error in drift space; the weight max(1, t²) is the paper's "truncated SNR" weighting where the ODE's
time is σ (``vp``: x̃ = x_0 + σ·ε, and ``edm``): the x̂_0 error weighted by max(SNR, 1), so the first
steps from pure noise still count. On ``flow`` (t ≤ 1) the weight is 1: the velocity's squared error.

With ``inputs = "teacher"`` the one stage (start = 2·calls) trains on the teacher's own trajectories
instead of noised training images: before training, ``pairs`` noises are integrated by the first
teacher (its two steps per student step, as above) and its states at the student's grid points are
kept (``trajectories.safetensors`` in the student's directory, so a resumed distillation reuses them);
each training example is then one trajectory's x at t_i with its x'' at t_{i+1}, and training calls
no teacher. The student learns on the states it will meet when it samples, and each optimizer step
costs the student's forward and backward only.

The first stage's teacher is the trained run sampled with Euler at ``start`` steps (DDIM η = 0 on
``vp``), its student takes start/2; each later stage's teacher is the previous stage's student (``chain``). The student starts
from its teacher's weights.

With ``solver = "heun"`` the first stage's teacher takes its two steps with Heun's method instead (the
``heun`` sampler's step; the step that ends at t = 0 stays Euler's), so the first student learns from
a teacher of second order: 2·start − 1 calls of the trained run instead of start. On the default
flow run the teacher's Heun at 4 steps (7 calls) is already nearer real digits than its Euler at 16
(docs/distillation.md), so a 4-call student distilled in one stage from ``start = 8, solver = heun``
has a better target than one distilled from Euler at 16 in two.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.sdk.distill import METRICS, Stage, distance, euler_step, heun_step, per_image, times
from ddpmkit.sdk.files import write_tensors


@attrs.define
class ProgressiveConfig:
    """Options of ``progressive``.

    start: the Euler steps of the first stage's teacher (the trained run); its student takes start/2. Default 16.
    calls: the last stage's student calls: start halved once per stage, >= 1. Default 1.
    steps: optimizer steps per stage. Default 150.
    solver: how the first stage's teacher (the trained run) takes its two steps: "euler" or "heun". Later
        stages' teachers are students, drawn with Euler. Default "euler".
    metric: the distance in drift space: "mse" (as in the module doc) or "pseudo-huber"
        (``ddpmkit.sdk.distill.distance``; the weight scales each image's term). Default "mse".
    inputs: what the student learns on: "data" (training images noised to t_i, the teacher called at
        each step) or "teacher" (the first teacher's trajectories from ``pairs`` noises, drawn once
        before training; one stage only, start = 2·calls). Default "data".
    pairs: the trajectories drawn with inputs = "teacher". Default 4096.
    """

    start: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    calls: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    steps: int = attrs.field(default=150, validator=attrs.validators.ge(1))
    solver: str = attrs.field(default="euler", validator=attrs.validators.in_(("euler", "heun")))
    metric: str = attrs.field(default="mse", validator=attrs.validators.in_(METRICS))
    inputs: str = attrs.field(default="data", validator=attrs.validators.in_(("data", "teacher")))
    pairs: int = attrs.field(default=4096, validator=attrs.validators.ge(1))


TRAJECTORIES = "trajectories.safetensors"


class Progressive:
    """See the module doc."""

    name = "progressive"
    chain = True

    def __init__(self, config: ProgressiveConfig, process):
        self.config, self.process = config, process
        calls, stages = config.start, []
        while calls > config.calls:
            if calls % 2:
                break
            calls //= 2
            stages.append(Stage(config.steps, calls))
        if not stages or stages[-1].calls != config.calls:
            reachable = []
            c = config.start
            while c % 2 == 0:
                c //= 2
                reachable.append(str(c))
            raise ddpmkit.DdpmkitError(
                f"progressive distillation halves the calls from start = {config.start}: it cannot reach "
                f"{config.calls} (reachable: {', '.join(reachable) or 'none; use an even start'}); "
                "set --calls or distiller.start")
        self.stages = stages
        self.bank = self.bank_labels = None
        if config.inputs == "teacher":
            if len(stages) != 1:
                raise ddpmkit.DdpmkitError(
                    f"distiller.inputs=teacher distils in one stage: set distiller.start={2 * config.calls} "
                    f"(2 × --calls), not {config.start}")
            self.uses_data = False  # it trains on the teacher's trajectories: the run's dataset is not read
            self.prepare = self._trajectories
        grid = process.grid(config.start)  # a process may refuse a grid it cannot make (vp: start > T)
        if len(grid) != config.start + 1:
            raise ddpmkit.DdpmkitError(f"process '{process.name}' has no {config.start}-step grid for the first "
                                       "teacher; use a smaller distiller.start")

    @torch.no_grad()
    def _trajectories(self, teacher, *, shape: tuple[int, int, int], num_classes: int | None,
                      generator: torch.Generator, directory: Path, progress=None, batch_size: int = 256,
                      device="cpu") -> None:
        """Draw the first teacher's trajectories (or read them back from ``directory``): ``self.bank``
        ``(pairs, calls + 1, *shape)``, the states at the student's grid points, t_0 (noise) first."""
        path, n, calls = Path(directory) / TRAJECTORIES, self.config.pairs, self.stages[0].calls
        if path.exists():
            saved = load_file(str(path))
            if tuple(saved["x"].shape) == (n, calls + 1, *shape):
                self.bank = saved["x"].to(device)
                self.bank_labels = saved["labels"].to(device) if "labels" in saved else None
                return
        labels = torch.arange(n, device=device) % num_classes if num_classes else None
        fine = self.process.grid(2 * calls, device)
        step = heun_step if self.config.solver == "heun" else euler_step
        banks = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = self.process.prior((b, *shape), generator=generator, device=device)
            y = None if labels is None else labels[start: start + b]
            states = [x]
            for j in range(2 * calls):
                x = step(teacher, x, times(fine[j], x), times(fine[j + 1], x), y)
                if j % 2:
                    states.append(x)
            banks.append(torch.stack(states, 1))
            if progress is not None:
                progress(start + b, n)
        self.bank, self.bank_labels = torch.cat(banks), labels
        tensors = {"x": self.bank.cpu().contiguous()}
        if labels is not None:
            tensors["labels"] = labels.cpu()
        write_tensors(path, tensors, {"format": "ddpmkit-progressive-trajectories-1"})

    def sampler(self, calls: int) -> tuple[str, dict]:
        """The student is drawn with Euler steps on the same grid it was trained on."""
        return "euler", {"steps": calls}

    def loss(self, student, teacher, x0: torch.Tensor, labels: torch.Tensor | None, stage: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
        n = self.stages[stage].calls
        fine = self.process.grid(2 * n, x0.device)
        b = x0.shape[0]
        if self.bank is not None:  # inputs = "teacher": a trajectory's state at t_i and its state at t_{i+1}
            k = torch.randint(0, self.bank.shape[0], (b,), generator=generator, device=x0.device)
            i = torch.randint(0, n, (b,), generator=generator, device=x0.device)
            x, x_target = self.bank[k, i], self.bank[k, i + 1]
            t, t_next = fine[2 * i], fine[2 * i + 2]
            labels = None if self.bank_labels is None else self.bank_labels[k]
            h = per_image(t_next - t, x)
            return distance((x + h * student(x, t, labels) - x_target) / h, self.config.metric,
                            weight=t.clamp(min=1.0) ** 2)
        i = torch.randint(0, n, (b,), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t, t_mid, t_next = fine[2 * i], fine[2 * i + 1], fine[2 * i + 2]
        x = self.process.q_sample(x0, t, eps)
        step = heun_step if stage == 0 and self.config.solver == "heun" else euler_step
        with torch.no_grad():
            x_target = step(teacher, step(teacher, x, t, t_mid, labels), t_mid, t_next, labels)
        h = per_image(t_next - t, x)
        x_student = x + h * student(x, t, labels)
        return distance((x_student - x_target) / h, self.config.metric, weight=t.clamp(min=1.0) ** 2)


def make(config: ProgressiveConfig, *, process) -> Progressive:
    return Progressive(config, process)


@ddpmkit.hookimpl
def register_distillers(register):
    register("progressive", make, ProgressiveConfig,
             "progressive distillation (Salimans & Ho 2022): halve the Euler steps per stage (vp, edm, flow)")
