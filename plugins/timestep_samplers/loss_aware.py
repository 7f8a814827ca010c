"""Timestep sampler ``loss-aware``: importance-sampled t (Nichol & Dhariwal 2021, §3.3).

Keeps the last ``history`` losses of every t; until every t has that many, t is uniform. Then

    p_t ∝ √E[L_t²]   (over the history),  mixed with ``uniform_prob`` of the uniform distribution,

and each sample's loss is weighted by 1 / (T · p_t), so the objective's expectation is unchanged
(an unbiased estimate of the same sum over t with less variance: L_vlb's terms differ by orders of
magnitude across t). The history is part of the training state (``state_dict``), so a resumed run
draws exactly the t an uninterrupted one would.
"""

from __future__ import annotations

import attrs
import torch

import ddpmkit


@attrs.define
class LossAwareConfig:
    """Options of ``loss-aware``.

    history: losses kept per timestep. Default 10.
    uniform_prob: share of the uniform distribution mixed in. Default 0.001.
    """

    history: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    uniform_prob: float = attrs.field(default=0.001, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])


class LossAwareTimesteps:
    def __init__(self, config: LossAwareConfig, *, num_timesteps: int):
        self.config, self.T = config, num_timesteps
        self.losses = torch.zeros(num_timesteps, config.history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.config.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t, ``(T,)`` float64: uniform until warmed up."""
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = (self.losses ** 2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1 - self.config.uniform_prob) + self.config.uniform_prob / self.T

    def sample(self, batch: int, device, generator=None):
        p = self.probabilities()
        if not self.warmed_up():  # exactly the built-in uniform draws until then
            return torch.randint(0, self.T, (batch,), device=device, generator=generator), None
        t = torch.multinomial(p.to(device), batch, replacement=True, generator=generator)
        weights = 1.0 / (self.T * p.to(device)[t])
        return t, weights.float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Push each sample's loss into its timestep's history (oldest dropped when full)."""
        h = self.config.history
        for ti, li in zip(t.cpu().tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[ti] == h:
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li
            else:
                self.losses[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.tolist(), "counts": self.counts.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.losses = torch.tensor(state["losses"], dtype=torch.float64)
        self.counts = torch.tensor(state["counts"], dtype=torch.long)


@ddpmkit.hookimpl
def register_timestep_samplers(register):
    register("loss-aware", LossAwareTimesteps, LossAwareConfig,
             "importance-sampled t, p_t ∝ √E[L_t²] of the last 10 losses (improved DDPM)")
