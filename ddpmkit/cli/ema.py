"""``ddpmkit ema``: rebuild the EMA of any length from a run's post-hoc EMA snapshots (EDM2), and
optionally score each length to pick the best."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ddpmkit.errors import DdpmkitError


def _lengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DdpmkitError(f"--sigma-rel takes relative EMA lengths such as 0.05,0.08,0.12, got '{text}'") from None
    if not values:
        raise DdpmkitError("--sigma-rel needs at least one relative EMA length, e.g. 0.08")
    return values


@click.command("ema")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--sigma-rel", "sigma_rel", required=True, metavar="SIGMA[,SIGMA...]",
              help="Relative EMA lengths to rebuild, e.g. 0.08 or 0.03,0.05,0.08,0.12 (0 < σ_rel < 0.2887).")
@click.option("--step", type=int, default=None, help="Rebuild the EMA as it was at this step (default: the last snapshot).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="With one length: the model file to write (default RUN/ema-sigma-X.safetensors).")
@click.option("--metric", "metric_names", multiple=True,
              help="Score each length with these metrics, comma-separated or repeated (as `ddpmkit evaluate`), and "
                   "report the best.")
@click.option("--objective", default=None, help="The result that picks the best (default: the first metric's own).")
@click.option("-n", "--num", "n", type=int, default=1000, show_default=True, help="Images sampled per length.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sampler", default=None, help="Sampler (default: the run's).")
@click.option("--steps", type=int, default=None, help="Sampler steps.")
@click.option("--set", "sets", multiple=True, metavar="metric.OPTION=VALUE", help="Metric or sampler option.")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def ema_cmd(run_dir, sigma_rel, step, out, metric_names, objective, n, seed, sampler, steps, sets, device, no_progress):
    """Rebuild the post-hoc EMA of RUN_DIR (trained with --posthoc-ema) at each relative length: a model
    file per length that `sample` and `evaluate` take; with --metric, score each and name the best."""
    from ddpmkit.run.posthoc_ema import reconstruct
    from ddpmkit.sdk.files import write_json, write_tensors

    lengths = _lengths(sigma_rel)
    if out and len(lengths) > 1:
        raise DdpmkitError("--out names one file: give one --sigma-rel, or none for RUN/ema-sigma-X.safetensors")
    files = []
    for s in lengths:
        state, meta, weights, at = reconstruct(run_dir, s, step)
        path = Path(out) if out else Path(run_dir) / f"ema-sigma-{s:.3f}.safetensors"
        write_tensors(path, state, {"format": meta["format"], "config": meta["config"],
                                    "phema": json.dumps({"sigma_rel": s, "step": at, "reconstructed": True})})
        span = f"{float(weights.min()):+.3f}..{float(weights.max()):+.3f}"
        click.echo(f"σ_rel {s:.3f}: {len(weights)} snapshots (coefficients {span}) → {path}")
        files.append(path)
    if not metric_names:
        return
    from ddpmkit.cli.evaluate import _evaluate, _metric_list
    from ddpmkit.run.assembly import build_many

    metric_names = _metric_list(metric_names)
    metrics = build_many("metric", metric_names, {})
    first = metrics[metric_names[0]]
    key = objective or next(iter(getattr(first, "directions", {}) or {}), None)
    if key is None:
        raise DdpmkitError(f"metric '{metric_names[0]}' names no result to optimise; give --objective KEY")
    direction = next((m.directions[key] for m in metrics.values() if key in getattr(m, "directions", {})), "maximize")
    rows = []
    for s, path in zip(lengths, files):
        json_out = path.with_suffix(".json")
        _evaluate(str(path), None, metric_names, n, str(json_out), None, (), None, seed=seed, batch_size=256,
                  sampler=sampler, steps=steps, sets=sets, device=device, no_progress=no_progress, fast={})
        results = json.loads(json_out.read_text())["results"]
        if key not in results:
            raise DdpmkitError(f"--objective {key}: the metrics gave {', '.join(results)}")
        rows.append({"sigma_rel": s, "file": str(path), key: results[key], "results": results})
    best = (max if direction == "maximize" else min)(rows, key=lambda r: r[key])
    for r in rows:
        click.echo(f"σ_rel {r['sigma_rel']:.3f}: {key} {r[key]:.6g}" + ("   ← best" if r is best else ""))
    write_json(Path(run_dir) / "ema.json", {"objective": key, "direction": direction, "lengths": rows, "best": best})
    click.echo(f"Best σ_rel {best['sigma_rel']:.3f} ({key} {best[key]:.6g}): {best['file']}; wrote {Path(run_dir) / 'ema.json'}")
