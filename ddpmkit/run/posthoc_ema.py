"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and Algorithms 2–3): track power-function EMA profiles during training, store
snapshots of them, and after training reconstruct the EMA of any length as a least-squares
combination of the snapshots.

A power-function EMA of exponent γ averages the weights θ_τ of steps τ ≤ t with weights ∝ τ^γ:

    θ̂_t = β_t·θ̂_{t−1} + (1 − β_t)·θ_t,    β_t = (1 − 1/t)^(γ+1)             (EDM2 eq. 3)

and its relative standard deviation, its length as a share of training time, is

    σ_rel = √((γ + 1) / ((γ + 2)²·(γ + 3)))                                     (EDM2 eq. 4)

(γ = 0: the plain running mean, σ_rel = √(1/12) ≈ 0.289; larger γ, shorter EMA). A snapshot of
profile γ_i at step t_i has the averaging profile p_i(τ) = (γ_i + 1)·τ^γ_i / t_i^(γ_i+1) on [0, t_i].
The EMA (γ_r, t_r) is reconstructed as Σ_i x_i·θ̂_i with x the least-squares solution of
A·x = b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_r⟩, the inner products in closed form (Algorithm 3).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ddpmkit.errors import DdpmkitError
from ddpmkit.sdk.files import write_tensors

SNAPSHOT_DIR = "posthoc-ema"
SNAPSHOT_FORMAT = "ddpmkit-checkpoint-1"  # a snapshot is a model file: sample or evaluate it directly
SIGMA_REL_MAX = math.sqrt(1 / 12)  # γ = 0; a longer EMA would need γ < 0, whose profile is not integrable
DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's two tracked profiles
_NAME = re.compile(r"^phema-(\d+)-(\d{8})\.safetensors$")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of the power-function EMA of relative length ``sigma_rel`` (0 < σ_rel < √(1/12)): the
    largest real root of γ³ + 7γ² + (16 − σ⁻²)·γ + (12 − σ⁻²) = 0 (eq. 4 rearranged)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise DdpmkitError(f"--sigma-rel must be in (0, {SIGMA_REL_MAX:.4f}) (the relative EMA length; EDM2 "
                           f"tracks 0.05 and 0.10), got {sigma_rel}")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the profile of exponent γ (eq. 4)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_dot(t_a: torch.Tensor, g_a: torch.Tensor, t_b: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """⟨p_a, p_b⟩ = ∫ p_a(τ)·p_b(τ) dτ for power-function profiles (γ_a, t_a) and (γ_b, t_b), broadcast:
    (γ_a+1)(γ_b+1)·min(t_a, t_b)^(γ_a+γ_b+1) / ((γ_a+γ_b+1)·t_a^(γ_a+1)·t_b^(γ_b+1))."""
    t_a, g_a, t_b, g_b = (v.double() for v in (t_a, g_a, t_b, g_b))
    m = torch.minimum(t_a, t_b)
    log = ((g_a + g_b + 1) * m.log() - (g_a + 1) * t_a.log() - (g_b + 1) * t_b.log())
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * log.exp()


def solve_weights(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> torch.Tensor:
    """Coefficients x (float64, one per snapshot) with Σ x_i·p_i ≈ p_(γ, step) in least squares."""
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, torch.tensor(float(step), dtype=torch.float64), torch.tensor(gamma, dtype=torch.float64))
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]


class PowerEMA:
    """Power-function EMA profiles of a model's floating-point parameters (buffers are copied).

    sigma_rels: the profiles' relative lengths (e.g. EDM2's 0.05 and 0.10).
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Iterable[float]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if len(set(self.sigma_rels)) != len(self.sigma_rels) or not self.sigma_rels:
            raise DdpmkitError(f"--posthoc-ema needs distinct relative lengths, got {list(self.sigma_rels)}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = [k for k, p in model.named_parameters() if p.dtype.is_floating_point]
        self._tracked = set(self.names)
        self.shadows = [[p.detach().clone() for k, p in model.named_parameters() if k in self._tracked]
                        for _ in self.gammas]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (1-based: step 1 copies them)."""
        params = [p for k, p in model.named_parameters() if k in self._tracked]
        for gamma, shadow in zip(self.gammas, self.shadows):
            beta = (1 - 1 / step) ** (gamma + 1)
            torch._foreach_lerp_(shadow, params, 1 - beta)

    def state_dict(self, model: torch.nn.Module, k: int) -> dict[str, torch.Tensor]:
        """Profile ``k`` as the model's state dict (the model's own buffers)."""
        own = dict(zip(self.names, self.shadows[k]))
        return {name: own.get(name, v).detach().clone() for name, v in model.state_dict().items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the training-state file."""
        return {f"phema.{k}.{i}": p for k, shadow in enumerate(self.shadows) for i, p in enumerate(shadow)}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        try:
            for k, shadow in enumerate(self.shadows):
                for i, p in enumerate(shadow):
                    p.copy_(tensors[f"phema.{k}.{i}"])
        except KeyError:
            raise DdpmkitError(f"{source} has no post-hoc EMA profiles but this run tracks them (--posthoc-ema)") from None

    def save_snapshots(self, model: torch.nn.Module, run_dir: Path, step: int, config: dict) -> None:
        """One model file per profile: ``RUN/posthoc-ema/phema-K-STEP.safetensors``."""
        for k, (sigma_rel, gamma) in enumerate(zip(self.sigma_rels, self.gammas)):
            write_tensors(run_dir / SNAPSHOT_DIR / f"phema-{k}-{step:08d}.safetensors", self.state_dict(model, k),
                          {"format": SNAPSHOT_FORMAT, "config": json.dumps(config, sort_keys=True, allow_nan=False),
                           "phema": json.dumps({"sigma_rel": sigma_rel, "gamma": gamma, "step": step})})


def snapshot_every(total_steps: int, every: int | None) -> int:
    """Steps between snapshots: ``every``, else 1/16 of the run (EDM2 keeps hundreds; 16 per profile is
    enough for lengths between the tracked ones, measured in docs/benchmarks.md)."""
    return every if every else max(1, math.ceil(total_steps / 16))


def snapshots(run_dir: str | os.PathLike) -> list[tuple[Path, float, int]]:
    """The stored snapshots of a run: (path, γ, step), sorted by step."""
    from safetensors import safe_open

    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for path in sorted(folder.glob("phema-*.safetensors")) if folder.is_dir() else ():
        if _NAME.match(path.name):
            with safe_open(str(path), "pt") as f:
                info = json.loads((f.metadata() or {}).get("phema", "{}"))
            if "gamma" in info:
                found.append((path, float(info["gamma"]), int(info["step"])))
    return sorted(found, key=lambda s: (s[2], s[1]))


def reconstruct(run_dir: str | os.PathLike, sigma_rel: float, step: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor, int]:
    """The EMA of relative length ``sigma_rel`` at ``step`` (default: the last snapshot's) from a run's
    snapshots: (state dict, the snapshots' model-file metadata, the coefficients, the step)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    found = snapshots(run_dir)
    if not found:
        raise DdpmkitError(f"'{run_dir}' has no post-hoc EMA snapshots ({SNAPSHOT_DIR}/); train it with "
                           f"`ddpmkit run --posthoc-ema`")
    last = max(s[2] for s in found)
    step = last if step is None else step
    if not 0 < step <= last:
        raise DdpmkitError(f"--step must be in 1..{last} (the last snapshot), got {step}")
    found = [s for s in found if s[2] <= step]  # a later snapshot holds weights from after step
    x = solve_weights([s[2] for s in found], [s[1] for s in found], step, sigma_rel_to_gamma(sigma_rel))
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for (path, _, _), w in zip(found, x.tolist()):
        for name, v in load_file(str(path)).items():
            dtypes[name] = v.dtype
            if v.dtype.is_floating_point:
                out[name] = out.get(name, torch.zeros_like(v, dtype=torch.float64)) + w * v.double()
            else:
                out[name] = v
    with safe_open(str(found[-1][0]), "pt") as f:
        meta = dict(f.metadata() or {})
    return {name: v.to(dtypes[name]) for name, v in out.items()}, meta, x, step
