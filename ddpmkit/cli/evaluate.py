"""``ddpmkit evaluate`` and ``ddpmkit analyze``: score samples (or a folder of images) with metric plugins."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ddpmkit.cli._common import (
    _class_list,
    _fast_path,
    _metric_list,
    _parse_sets,
    err_console,
    plain,
    sampling_options,
)
from ddpmkit.errors import DdpmkitError


@click.command()
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--images", "images_dir", type=click.Path(), default=None,
              help="Evaluate a folder of images, or an .npz (arr_0 uint8 N×H×W×C, arr_1 labels), instead.")
@click.option("--metric", "metric_names", multiple=True, required=True,
              help="Metrics by name, comma-separated or repeated: fid,kid,precision-recall,digit-score,memorization, ...")
@click.option("-n", "--num", "n", type=int, default=10000, show_default=True, help="Images to sample from CHECKPOINT.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--figures", "figures_dir", type=click.Path(file_okay=False), default=None,
              help="Write the metrics' figures (e.g. memorization's nearest.png) into this folder.")
@click.option("--class", "classes", multiple=True, metavar="CLASS[,CLASS...]",
              help="Classes to draw from a class-conditional CHECKPOINT (default: every class, in equal blocks).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance weight W (default 1).")
@sampling_options
def evaluate(checkpoint, images_dir, metric_names, n, json_out, figures_dir, classes, guidance, **opts):
    """Score samples from a CHECKPOINT (sampling -n images once for every metric) or a folder (--images DIR):
    one table, and with --json one JSON file."""
    _evaluate(checkpoint, images_dir, _metric_list(metric_names), n, json_out, figures_dir, classes, guidance, **opts)


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("-n", "--num", "n", type=int, default=500, show_default=True, help="Images to sample.")
@click.option("--metric", "metric_names", multiple=True,
              help="More metrics in the same pass (comma-separated or repeated), e.g. kid,precision-recall.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where the figures and analysis.json go (default RUN_DIR/analysis).")
@sampling_options
def analyze(run_dir, n, metric_names, out_dir, **opts):
    """Does the model copy its training images? Samples -n images from RUN_DIR, finds each one's nearest training
    images in pixel and feature space, and writes nearest.png, distances.png and analysis.json."""
    out = Path(out_dir) if out_dir else Path(run_dir) / "analysis"
    names = _metric_list(("memorization",) + tuple(metric_names))
    _evaluate(run_dir, None, names, n, str(out / "analysis.json"), str(out), (), None, **opts)


def _evaluate(checkpoint, images_dir, metric_names, n, json_out, figures_dir, classes, guidance, *, seed, batch_size,
              sampler, steps, sets, device, no_progress, fast):
    import torch

    from ddpmkit.run.assembly import build_many
    from ddpmkit.run.pipeline import load_checkpoint, resolve_device
    from ddpmkit.run.progress import make_progress, sample_with_progress
    from ddpmkit.sdk.evaluation import MetricContext, evaluate_images, load_images
    from ddpmkit.sdk.metrics import quantize

    if (checkpoint is None) == (images_dir is None):
        raise DdpmkitError("give either a CHECKPOINT or --images DIR")
    overrides = _parse_sets(sets, ("metric", "sampler"), "evaluate")
    metric_opts, sampler_opts = overrides.get("metric", {}), overrides.get("sampler", {})
    if steps is not None:
        sampler_opts["steps"] = steps
    dev = resolve_device(device)
    metrics = build_many("metric", metric_names, metric_opts, device=dev)
    pipe = labels = None
    if images_dir is not None:
        images, labels = load_images(images_dir)  # a folder of images, or an .npz (with its labels)
        source = {"images": str(images_dir), "count": images.shape[0]}
    else:
        if n < 1:
            raise DdpmkitError(f"-n must be >= 1, got {n}")
        pipe = load_checkpoint(checkpoint, device=dev)
        wanted = _class_list(classes)
        labels = pipe.class_labels(n, wanted)
        source = {"checkpoint": str(checkpoint), "count": n, "seed": seed, "guidance": guidance, "classes": wanted,
                  "sampler": sampler or pipe.config.sampler.name, "sampler_options": sampler_opts}
        if all(getattr(m, "needs_samples", True) is False for m in metrics.values()):  # e.g. nll: real images
            images = torch.zeros(n, pipe.channels, pipe.resolution, pipe.resolution)
            source["sampler"] = None
        else:
            pipe.sampler(sampler, sampler_opts or None)  # one that cannot run here fails before any sampling
            images = sample_with_progress(pipe, n, err_console, not no_progress, seed=seed, batch_size=batch_size,
                                          sampler=sampler, sampler_options=sampler_opts or None,
                                          fast=_fast_path(pipe, fast), class_labels=labels, guidance=guidance)
            # scored as the 8-bit images `ddpmkit sample` saves: `evaluate --images` on them gives the same values
            images = quantize(images)
    per_metric: dict[str, dict[str, float]] = {}
    with make_progress(err_console, not no_progress) as bar:
        context = MetricContext(pipeline=pipe, seed=seed, labels=labels if pipe is None else pipe.data_classes(labels))
        for name, metric in metrics.items():
            per_metric[name] = evaluate_images(images, {name: metric}, bar=bar, context=context)
    _report(images.shape[0], metrics, per_metric, metric_names, metric_opts, source, json_out, figures_dir)


def _report(count: int, metrics: dict, per_metric: dict, metric_names, metric_opts: dict, source: dict, json_out,
            figures_dir) -> None:
    """The table, the feature spaces and data each metric used, its figures, and the JSON."""
    from ddpmkit.sdk.files import write_json

    spaces = {name: m.feature_space for name, m in metrics.items() if getattr(m, "feature_space", None)}
    data = {name: m.data for name, m in metrics.items() if isinstance(getattr(m, "data", None), str)}
    figures = []
    if figures_dir:
        for metric in metrics.values():
            if callable(getattr(metric, "figures", None)):
                figures += [str(p) for p in metric.figures(figures_dir)]
    table = Table(title=f"{count} images", title_justify="left")
    for col in ("metric", "result", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for name, results in per_metric.items():
        for i, (key, value) in enumerate(results.items()):
            table.add_row(plain(name if i == 0 else ""), plain(key), f"{value:.6g}")
    out_console = Console(width=max(100, Console().width))
    out_console.print(table)
    for name, space in spaces.items():
        click.echo(f"{name} features: {space}")
    for name, what in data.items():
        click.echo(f"{name} data: {what}")
    for path in figures:
        click.echo(f"Wrote {path}")
    if json_out:
        results = {k: v for r in per_metric.values() for k, v in r.items()}
        write_json(json_out, {"results": results, "by_metric": per_metric, "metrics": list(metric_names),
                              "feature_spaces": spaces, "data": data, "figures": figures, "options": metric_opts, **source})
        click.echo(f"Wrote {json_out}")
