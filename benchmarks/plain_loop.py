"""The training loop a user would write by hand (Algorithm 1, Adam, no framework): the baseline
that benchmarks/training_overhead.py and benchmarks/gpu_fast_path.py hold ddpmkit against."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import ddpmkit


def plain_loop(config, steps: int, device: str | torch.device = "cpu", warm: int = 3) -> float:
    """Seconds per step over ``steps`` steps after ``warm`` untimed ones; SmoothL1 loss, fp32."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ds = ddpmkit.build("dataset", config.dataset.name, config.dataset.options)
    torch.manual_seed(config.seed)
    model = ddpmkit.build("predictor", config.predictor.name, config.predictor.options,
                          channels=ds.channels, resolution=ds.resolution).to(dev).train()
    betas = ddpmkit.build("schedule", config.schedule.name, config.schedule.options)
    alpha_bar = torch.cumprod(1 - betas, 0).float().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = torch.utils.data.DataLoader(ds, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         pin_memory=dev.type == "cuda")
    it = iter(loader)
    t0 = None
    for i in range(warm + steps):
        if i == warm:
            sync()
            t0 = time.perf_counter()
        try:
            x0, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x0, _ = next(it)
        x0 = x0.to(dev, non_blocking=True)
        t = torch.randint(0, len(betas), (x0.shape[0],), device=dev)
        eps = torch.randn_like(x0)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        loss = F.smooth_l1_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps
