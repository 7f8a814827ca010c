"""Training: Algorithm 1 over a dataset, with Adam, and what a run leaves on disk.

A run directory holds::

    config.json         resolved configuration: component names, plugins, versions, options
    model.safetensors   weights used for sampling (EMA weights when EMA is on) + config
    metrics.jsonl       one JSON line per logged step and per epoch
    samples.png         a grid drawn with Algorithm 2 after training
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .checkpoint import save_checkpoint, write_json
from .config import RunConfig
from .errors import DdpmkitError
from .pipeline import Pipeline, make_diffusion, make_predictor, make_sampler, resolve_device, resolved_config, save_grid
from .plugins import get_component


def _dataset_shape(dataset) -> tuple[int, int]:
    channels, resolution = getattr(dataset, "channels", None), getattr(dataset, "resolution", None)
    if channels is None or resolution is None:
        item = dataset[0]
        x = item[0] if isinstance(item, (tuple, list)) else item
        channels, resolution = int(x.shape[0]), int(x.shape[-1])
    return int(channels), int(resolution)


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def default_workers(dataset) -> int:
    """0 for datasets held in memory (a batch is one gather), else up to 4 worker processes."""
    if getattr(dataset, "in_memory", False):
        return 0
    return max(1, min(4, (os.cpu_count() or 2)))


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int | None = None,
                generator: torch.Generator | None = None, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """The DataLoader the runner uses: shuffled, full batches, workers for file datasets,
    pinned memory on CUDA, persistent workers."""
    workers = default_workers(dataset) if num_workers is None else num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, generator=generator,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def make_progress(console: Console | None = None, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )


def train(config: RunConfig, run_dir: str | os.PathLike, device: str | torch.device | None = None,
          progress: bool = True, console: Console | None = None, sample_grid: bool = True,
          log_every: int = 10) -> Pipeline:
    """Train ε_θ with Algorithm 1 and write a run directory; returns the trained :class:`Pipeline`.

    Args:
        config: what to train (components by name and their options, epochs, batch, lr, seed, ...).
        run_dir: directory to write; created if missing.
        device: ``None``/``"auto"`` picks CUDA when present, else CPU.
        progress: show a rich progress bar (epoch, step, loss, images/s, ETA).
        sample_grid: after training, draw ``config.num_samples`` images and save ``samples.png``.
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    torch.manual_seed(config.seed)

    # --- components --------------------------------------------------------
    ds_comp = get_component("dataset", config.dataset.name)
    ds_cfg = ds_comp.make_config(config.dataset.options)
    loss_comp = get_component("loss", config.loss.name)
    loss_cfg = loss_comp.make_config(config.loss.options)
    diffusion, sched_cfg = make_diffusion(config)
    dataset = ds_comp.factory(ds_cfg) if ds_cfg is not None else ds_comp.factory()
    if len(dataset) < 1:
        raise DdpmkitError(f"dataset '{config.dataset.name}' is empty")
    if config.batch_size > len(dataset):
        raise DdpmkitError(f"batch size {config.batch_size} is larger than dataset '{config.dataset.name}' "
                           f"({len(dataset)} images); use --batch-size {len(dataset)} or less")
    channels, resolution = _dataset_shape(dataset)
    torch.manual_seed(config.seed)  # model init does not depend on how the dataset was built
    model, pred_cfg = make_predictor(config, channels, resolution)
    model.to(dev).train()
    loss_fn = loss_comp.factory(loss_cfg) if loss_cfg is not None else loss_comp.factory()
    _, sampler_cfg = make_sampler(config.sampler.name, config.sampler.options, diffusion)
    if config.min_snr_gamma:
        try:
            loss_fn(torch.zeros(2, 1), torch.ones(2, 1), reduction="none")
        except TypeError:
            raise DdpmkitError(f"loss '{config.loss.name}' does not accept reduction='none', which min-SNR "
                               "weighting needs") from None
    resolved = resolved_config(config, channels, resolution,
                               {"schedule": sched_cfg, "predictor": pred_cfg, "loss": loss_cfg, "dataset": ds_cfg,
                                "sampler": sampler_cfg})
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", resolved)

    # --- optimisation ------------------------------------------------------
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warm = max(0, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ema = None
    if config.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)

    data_gen = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(config.seed + 1)
    loader = make_loader(dataset, config.batch_size, dev, config.num_workers, data_gen)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    epochs = math.ceil(total / steps_per_epoch)

    step, t0 = 0, time.perf_counter()
    metrics_path = run_dir / "metrics.jsonl"
    with open(metrics_path, "w") as log, make_progress(console, progress) as bar:
        task = bar.add_task(f"epoch 1/{epochs}", total=total, info="")
        for epoch in range(epochs):
            bar.update(task, description=f"epoch {epoch + 1}/{epochs}")
            epoch_loss, epoch_n = 0.0, 0
            for batch in loader:
                if step >= total:
                    break
                x0 = _images(batch).to(dev, non_blocking=True)
                loss = diffusion.training_loss(model, x0, loss_fn, generator=noise_gen,
                                               min_snr_gamma=config.min_snr_gamma)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                value = loss.item()
                if not math.isfinite(value):
                    raise DdpmkitError(f"loss became {value} at step {step}; lower --lr or check the data")
                epoch_loss += value
                epoch_n += 1
                elapsed = time.perf_counter() - t0
                speed = step * config.batch_size / elapsed
                bar.update(task, advance=1, info=f"loss {value:.4f}  {speed:.0f} img/s")
                if step % log_every == 0 or step == total:
                    log.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": value,
                                          "lr": scheduler.get_last_lr()[0], "images_per_s": speed}) + "\n")
            log.write(json.dumps({"epoch": epoch + 1, "step": step, "mean_loss": epoch_loss / max(1, epoch_n),
                                  "elapsed_s": time.perf_counter() - t0}) + "\n")
            log.flush()

    weights = ema.module if ema is not None else model
    state = {k: v for k, v in weights.state_dict().items()}
    save_checkpoint(run_dir / "model.safetensors", state, resolved)
    sample_model = weights
    sample_model.eval()
    pipe = Pipeline(sample_model, diffusion, channels, resolution, config, dev, resolved)
    if sample_grid:
        with make_progress(console, progress) as bar:
            task = bar.add_task("sampling", total=None, info=f"{config.num_samples} images")
            images = pipe.sample(config.num_samples, seed=config.seed,
                                 progress=lambda k, n: bar.update(task, completed=k, total=n))
        save_grid(images, run_dir / "samples.png")
    return pipe
