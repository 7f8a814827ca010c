"""``ddpmkit run``: train a model (Algorithm 1) from a preset and options."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from ddpmkit.cli._common import (
    _parse_sets,
    err_console,
    fast_options,
)
from ddpmkit.diffusion import PREDICTIONS, VARIANCE_TYPES
from ddpmkit.errors import DdpmkitError
from ddpmkit.run.config import LR_DECAYS
from ddpmkit.run.posthoc_ema import DEFAULT_SIGMA_RELS
from ddpmkit.run.presets import list_kind_changes
from ddpmkit.sdk.kinds import SECTIONS

# Flags of `ddpmkit run` that set a RunConfig field of the same name (None: not given).
RUN_FIELDS = ("epochs", "max_steps", "batch_size", "lr", "seed", "num_samples", "variance_type", "clip_sample",
              "num_workers", "prediction", "min_snr_gamma", "ema_decay", "posthoc_ema", "warmup_steps", "lr_decay", "grad_accum",
              "grad_clip", "checkpoint_every", "checkpoint_epochs", "keep_checkpoints", "log_every", "grid_every", "eval_every",
              "eval_samples", "class_conditional", "label_dropout", "clusters")


def _run_request(opts: dict) -> tuple[dict, dict, dict]:
    """Component names, component options and RunConfig changes asked for by `ddpmkit run`'s flags."""
    overrides = _parse_sets(opts["sets"])
    changes = {k: opts[k] for k in RUN_FIELDS if opts[k] is not None}
    changes.update(opts["fast"])
    for kind, names_field in (("metric", "metrics"), ("logger", "loggers")):
        if opts[f"{kind}_names"]:
            changes[names_field] = tuple(opts[f"{kind}_names"])
    list_kind_changes(changes, overrides)
    names = {k: opts[k] for k in SECTIONS if opts[k] is not None}
    if opts["steps"] is not None:
        overrides.setdefault("sampler", {})["steps"] = str(opts["steps"])
    if opts["learn_variance"]:  # the predictor outputs 2C channels; sampling and the bound use its variance
        if opts["variance_type"] not in (None, "learned_range"):
            raise DdpmkitError(f"--learn-variance learns σ_t²; it cannot be combined with --variance {opts['variance_type']}")
        overrides.setdefault("predictor", {})["learn_variance"] = "true"
        changes["variance_type"] = "learned_range"
    return names, overrides, changes


@click.command()
@click.option("--preset", default=None,
              help="Start from a preset: laptop (default: 28×28, class-conditional, a flow), laptop-vp (the "
                   "default before: DDPM; --process vp or a vp-only option such as --schedule starts from it), tiny "
                   "(16×16, for slower machines), tiny-cond, mnist, aircraft (the seed's Table 1).")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Start from a configuration file instead of a preset: an earlier run's config.json (run it again "
                   "like that one) or a JSON object of RunConfig fields. The other flags change it.")
@click.option("--data-root", default=None, type=click.Path(file_okay=False),
              help="Where the dataset lives or is downloaded to (datasets with a data_root option; "
                   "default ~/.cache/ddpmkit/datasets).")
@click.option("--schedule", default=None, help="Noise schedule by name (see `ddpmkit plugins`).")
@click.option("--process", default=None,
              help="Diffusion process: vp (DDPM), flow (flow matching) or edm (default: the preset's; laptop: flow).")
@click.option("--predictor", default=None, help="Noise predictor by name.")
@click.option("--loss", default=None, help="Loss by name.")
@click.option("--dataset", default=None, help="Dataset by name.")
@click.option("--sampler", default=None,
              help="Sampler for the final grid (vp: ddpm (Algorithm 2), ddim, dpm-solver++, unipc, heun, "
                   "euler-ancestral; flow and edm: euler, heun; edm: edm-sde).")
@click.option("--timestep-sampler", "timestep_sampler", default=None,
              help="How training draws t (default uniform, Algorithm 1).")
@click.option("--steps", type=int, default=None, help="Sampler steps (ddim and the solvers: any number up to T).")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=None,
              help="What the network predicts: the noise ε (default), x_0, or v.")
@click.option("--min-snr", "min_snr_gamma", type=float, default=None,
              help="Min-SNR loss weighting with this γ (e.g. 5).")
@click.option("--set", "sets", multiple=True, metavar="KIND.OPTION=VALUE",
              help="Set a component option, e.g. --set schedule.timesteps=300 (repeatable).")
@click.option("--epochs", type=int, default=None, help="Training epochs.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, default=None, help="Images per step.")
@click.option("--lr", type=float, default=None, help="Adam learning rate.")
@click.option("--seed", type=int, default=None, help="Seed: same seed, same machine → same weights and samples.")
@click.option("--samples", "num_samples", type=int, default=None, help="Images in the final grid.")
@click.option("--variance", "variance_type", type=click.Choice(VARIANCE_TYPES),
              default=None, help="σ_t² of Algorithm 2: β̃_t (fixed_small), β_t (fixed_large), or learned by the "
                                 "predictor (learned_range).")
@click.option("--learn-variance", is_flag=True,
              help="Learn σ_t² (improved DDPM): the predictor outputs a variance too (unet2d: learn_variance) and "
                   "--variance is learned_range; train it with --loss hybrid.")
@click.option("--clip/--no-clip", "clip_sample", default=None, help="Clip the predicted x_0 to [-1, 1] while sampling.")
@click.option("--class-conditional/--unconditional", "class_conditional", default=None,
              help="Give the predictor the dataset's class labels (class_labels=).")
@click.option("--clusters", type=int, default=None, metavar="K",
              help="With --unconditional: condition the network on K k-means clusters of the training images (no "
                   "labels used; sampling draws the clusters by their frequency, so the images are of p(x)); 0: none. "
                   "Default: the preset's (laptop: 100, the others 0).")
@click.option("--label-dropout", type=float, default=None,
              help="With --class-conditional: replace a label by 'no class' with this probability (e.g. 0.1), "
                   "so one network learns p(x|y) and p(x) for classifier-free guidance.")
@click.option("--workers", "num_workers", type=int, default=None,
              help="DataLoader worker processes (default: 0 for in-memory datasets, else up to 4).")
@click.option("--ema", "ema_decay", type=float, default=None, help="EMA decay of the weights (e.g. 0.999); 0: off.")
@click.option("--posthoc-ema", "posthoc_ema", default=None, is_flag=False, metavar="[SIGMA_RELS]",
              flag_value=",".join(map(str, DEFAULT_SIGMA_RELS)),
              help="Track power-function EMA profiles of these relative lengths (default 0.05,0.10, EDM2's) and "
                   "store 16 snapshots of each in RUN/posthoc-ema/; `ddpmkit ema RUN --sigma-rel X` rebuilds any length.")
@click.option("--warmup", "warmup_steps", type=int, default=None, help="Learning-rate warm-up steps.")
@click.option("--lr-decay", type=click.Choice(LR_DECAYS), default=None,
              help="After the warm-up: keep the learning rate (constant) or bring it down to 0 at the last step.")
@click.option("--grad-accum", type=int, default=None, help="Accumulate gradients over N micro-batches per step.")
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--checkpoint-every", type=int, default=None, help="Checkpoint every N steps (default: by epochs).")
@click.option("--checkpoint-epochs", type=int, default=None, help="Checkpoint every N epochs (default 1).")
@click.option("--keep", "keep_checkpoints", type=int, default=None, help="Checkpoints to keep (default 3).")
@click.option("--log-every", type=int, default=None, help="Log metrics every N steps (default 10).")
@click.option("--grid-every", type=int, default=None, help="Save a sample grid every N epochs (default: only at the end).")
@click.option("--metric", "metric_names", multiple=True,
              help="Metric to compute after training (repeatable), e.g. digit-score; options via --set metric.X=Y.")
@click.option("--eval-every", type=int, default=None, help="Also compute the metrics every N epochs.")
@click.option("--eval-samples", type=int, default=None, help="Images sampled for the metrics (default 1000).")
@click.option("--logger", "logger_names", multiple=True,
              help="Where results go (repeatable; default jsonl and tensorboard); options via --set logger.X=Y.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its newest checkpoint.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default runs/<date-time>); must be new or empty.")
@click.option("--overwrite", is_flag=True,
              help="Reuse a non-empty --out: remove the earlier run's files (config, model, checkpoints, logs, "
                   "figures) first.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@fast_options
def run(**opts):
    """Train a noise predictor (Algorithm 1), save a checkpoint and a grid of samples (Algorithm 2)."""
    from ddpmkit.run.trainer import resumed_config, run_job

    names, overrides, changes = _run_request(opts)
    resume_dir, progress = opts["resume_dir"], not opts["no_progress"]
    if resume_dir is not None:
        if opts["preset"] is not None or opts["config_file"] is not None or opts["out_dir"] is not None \
                or opts["overwrite"]:
            raise DdpmkitError("--resume continues a run as it was configured; drop --preset/--config/--out/--overwrite")
        if opts["data_root"] is not None:
            overrides.setdefault("dataset", {})["data_root"] = opts["data_root"]
        config = resumed_config(resume_dir, names, overrides, changes)
        click.echo(run_job(config, resume_dir, resume=True, device=opts["device"], progress=progress, console=err_console))
        return
    from ddpmkit.run.config import load_config_file
    from ddpmkit.run.presets import resolve_run_config

    if opts["config_file"] is not None and opts["preset"] is not None:
        raise DdpmkitError("--config and --preset both give the starting configuration; choose one")
    base = load_config_file(opts["config_file"]) if opts["config_file"] else None
    config = resolve_run_config(opts["preset"], names, overrides, changes, opts["data_root"], base=base)
    run_dir = Path(opts["out_dir"]) if opts["out_dir"] else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    click.echo(run_job(config, run_dir, device=opts["device"], progress=progress, console=err_console,
                       overwrite=opts["overwrite"]))
    click.echo(f"  checkpoint: {run_dir / 'model.safetensors'}")
    click.echo(f"  samples:    {run_dir / 'samples.png'}")
