"""The ``ddpmkit`` command line: run, sample, evaluate, export, plugins."""

from __future__ import annotations

import functools
import json
import time
import warnings
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import DdpmkitError, Interrupted
from .kinds import KIND_BY_NAME, KINDS, SECTIONS

err_console = Console(stderr=True)


def plain(value, style: str = "") -> Text:
    """A table cell or title printed as written: text from plugins and users (descriptions, class names,
    paths, option values) may hold brackets that rich would otherwise read as markup."""
    return Text(str(value), style=style)


class Group(click.Group):
    """Turns a DdpmkitError into one line on stderr and exit code 2 (a traceback only with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdpmkitError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)
        except Interrupted as exc:  # training (or a sweep) stopped on a signal, with a checkpoint
            click.echo(str(exc), err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"Error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", err=True)
            ctx.exit(1)


FAST_FLAGS = ("precision", "channels_last", "tf32", "compile", "cuda_graphs")


def fast_options(f):
    """The fast-path flags (ddpmkit.accel.FastPath), collected into one ``fast`` dict (None: not given)."""
    options = [
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
                     help="auto: bf16 autocast on CUDA, fp32 on the CPU."),
        click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory format (default: on CUDA)."),
        click.option("--tf32/--no-tf32", default=None, help="TF32 matrix products and convolutions (default: on CUDA)."),
        click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the network (default: off)."),
        click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                     help="Replay the network as a CUDA graph while sampling (default: on CUDA)."),
    ]

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        kwargs["compile"] = kwargs.pop("compile_")
        fast = {k: kwargs.pop(k) for k in FAST_FLAGS}
        return f(*args, fast={k: v for k, v in fast.items() if v is not None}, **kwargs)

    for opt in reversed(options):
        wrapper = opt(wrapper)
    return wrapper


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {message}", err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="ddpmkit")
@click.pass_context
def cli(ctx, debug):
    """ddpmkit: train and sample Denoising Diffusion Probabilistic Models (Ho et al. 2020)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not debug:
        warnings.showwarning = _one_line_warnings
        # what a library below says to its own developers (numpy 2's __array__ copy keyword in diffusers'
        # schedulers) is not for the user of a command; --debug shows it
        for module in ("diffusers", "torch", "numpy", "timm"):
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def _parse_sets(sets: tuple[str, ...], allowed: tuple[str, ...] = KINDS, command: str = "run") -> dict[str, dict[str, str]]:
    """``--set KIND.OPTION=VALUE`` items as ``{kind: {option: value}}``; ``allowed``: the kinds this
    command takes options for."""
    out: dict[str, dict[str, str]] = {}
    for item in sets:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise DdpmkitError(f"--set expects KIND.OPTION=VALUE (e.g. schedule.beta_end=0.02), got '{item}'")
        if section not in KINDS:
            raise DdpmkitError(f"--set '{item}': unknown kind '{section}'; kinds are: {', '.join(KINDS)}")
        if section not in allowed:
            raise DdpmkitError(f"ddpmkit {command} only takes --set "
                               + " or ".join(f"{k}.OPTION=VALUE" for k in allowed))
        out.setdefault(section, {})[name] = value
    return out


# Flags of `ddpmkit run` that set a RunConfig field of the same name (None: not given).
RUN_FIELDS = ("epochs", "max_steps", "batch_size", "lr", "seed", "num_samples", "variance_type", "clip_sample",
              "num_workers", "prediction", "min_snr_gamma", "ema_decay", "warmup_steps", "lr_decay", "grad_accum",
              "grad_clip", "checkpoint_every", "checkpoint_epochs", "keep_checkpoints", "log_every", "grid_every", "eval_every",
              "eval_samples", "class_conditional", "label_dropout")


def _run_request(opts: dict) -> tuple[dict, dict, dict]:
    """Component names, component options and RunConfig changes asked for by `ddpmkit run`'s flags."""
    overrides = _parse_sets(opts["sets"])
    lists = {"metric": ("metrics", "metric_options"), "logger": ("loggers", "logger_options")}
    changes = {k: opts[k] for k in RUN_FIELDS if opts[k] is not None}
    changes.update(opts["fast"])
    for kind, (names_field, options_field) in lists.items():
        if opts[f"{kind}_names"]:
            changes[names_field] = tuple(opts[f"{kind}_names"])
        if overrides.get(kind):
            changes[options_field] = overrides.pop(kind)
    if changes.get("ema_decay") == 0:
        changes["ema_decay"] = None
    names = {k: opts[k] for k in SECTIONS if opts[k] is not None}
    if opts["steps"] is not None:
        overrides.setdefault("sampler", {})["steps"] = str(opts["steps"])
    if opts["learn_variance"]:  # the predictor outputs 2C channels; sampling and the bound use its variance
        if opts["variance_type"] not in (None, "learned_range"):
            raise DdpmkitError(f"--learn-variance learns σ_t²; it cannot be combined with --variance {opts['variance_type']}")
        overrides.setdefault("predictor", {})["learn_variance"] = "true"
        changes["variance_type"] = "learned_range"
    return names, overrides, changes


@cli.command()
@click.option("--preset", default=None, help="Start from a preset: laptop (default: 28×28, class-conditional), tiny (16×16, for slower machines), tiny-cond, mnist, aircraft (the seed's Table 1).")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Start from a configuration file instead of a preset: an earlier run's config.json (run it again "
                   "like that one) or a JSON object of RunConfig fields. The other flags change it.")
@click.option("--data-root", default=None, type=click.Path(file_okay=False),
              help="Where the dataset lives or is downloaded to (datasets with a data_root option; "
                   "default ~/.cache/ddpmkit/datasets).")
@click.option("--schedule", default=None, help="Noise schedule by name (see `ddpmkit plugins`).")
@click.option("--predictor", default=None, help="Noise predictor by name.")
@click.option("--loss", default=None, help="Loss by name.")
@click.option("--dataset", default=None, help="Dataset by name.")
@click.option("--sampler", default=None, help="Sampler for the final grid (ddpm: Algorithm 2; ddim, dpm-solver++, unipc, heun, euler-ancestral).")
@click.option("--timestep-sampler", "timestep_sampler", default=None,
              help="How training draws t (default uniform, Algorithm 1).")
@click.option("--steps", type=int, default=None, help="Sampler steps (ddim and the solvers: any number up to T).")
@click.option("--prediction", type=click.Choice(["epsilon", "x0", "v"]), default=None,
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
@click.option("--variance", "variance_type", type=click.Choice(["fixed_small", "fixed_large", "learned_range"]),
              default=None, help="σ_t² of Algorithm 2: β̃_t (fixed_small), β_t (fixed_large), or learned by the "
                                 "predictor (learned_range).")
@click.option("--learn-variance", is_flag=True,
              help="Learn σ_t² (improved DDPM): the predictor outputs a variance too (unet2d: learn_variance) and "
                   "--variance is learned_range; train it with --loss hybrid.")
@click.option("--clip/--no-clip", "clip_sample", default=None, help="Clip the predicted x_0 to [-1, 1] while sampling.")
@click.option("--class-conditional/--unconditional", "class_conditional", default=None,
              help="Give the predictor the dataset's class labels (class_labels=).")
@click.option("--label-dropout", type=float, default=None,
              help="With --class-conditional: replace a label by 'no class' with this probability (e.g. 0.1), "
                   "so one network learns p(x|y) and p(x) for classifier-free guidance.")
@click.option("--workers", "num_workers", type=int, default=None,
              help="DataLoader worker processes (default: 0 for in-memory datasets, else up to 4).")
@click.option("--ema", "ema_decay", type=float, default=None, help="EMA decay of the weights (e.g. 0.999); 0: off.")
@click.option("--warmup", "warmup_steps", type=int, default=None, help="Learning-rate warm-up steps.")
@click.option("--lr-decay", type=click.Choice(["constant", "cosine", "linear"]), default=None,
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
    from .training import resumed_config, train

    names, overrides, changes = _run_request(opts)
    resume_dir, progress = opts["resume_dir"], not opts["no_progress"]
    if resume_dir is not None:
        if opts["preset"] is not None or opts["config_file"] is not None or opts["out_dir"] is not None \
                or opts["overwrite"]:
            raise DdpmkitError("--resume continues a run as it was configured; drop --preset/--config/--out/--overwrite")
        if opts["data_root"] is not None:
            overrides.setdefault("dataset", {})["data_root"] = opts["data_root"]
        config = resumed_config(resume_dir, names, overrides, changes)
        t0 = time.perf_counter()
        train(config, resume_dir, device=opts["device"], progress=progress, console=err_console, resume=True)
        click.echo(f"Resumed and finished in {time.perf_counter() - t0:.0f} s. Run directory: {resume_dir}")
        return
    from .config import load_config_file, resolve_run_config

    if opts["config_file"] is not None and opts["preset"] is not None:
        raise DdpmkitError("--config and --preset both give the starting configuration; choose one")
    base = load_config_file(opts["config_file"]) if opts["config_file"] else None
    config = resolve_run_config(opts["preset"], names, overrides, changes, opts["data_root"], base=base)
    run_dir = Path(opts["out_dir"]) if opts["out_dir"] else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    train(config, run_dir, device=opts["device"], progress=progress, console=err_console, overwrite=opts["overwrite"])
    click.echo(f"Trained in {time.perf_counter() - t0:.0f} s. Run directory: {run_dir}")
    click.echo(f"  checkpoint: {run_dir / 'model.safetensors'}")
    click.echo(f"  samples:    {run_dir / 'samples.png'}")


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-n", "--num", "n", type=int, default=64, show_default=True, help="Number of images.")
@click.option("--format", "fmt", type=click.Choice(["grid", "png", "npz"]), default="grid", show_default=True,
              help="grid: one PNG grid; png: one PNG per image in a folder (class in the name for conditional "
                   "models); npz: guided-diffusion's .npz (arr_0 uint8 N×H×W×C, arr_1 the class labels).")
@click.option("--out", "out", type=click.Path(), default=None,
              help="Where to write: the grid (default samples.png), the folder (default samples/) or the .npz "
                   "(default samples.npz).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--sampler", default=None, help="Sampler by name (default: the run's, ddpm).")
@click.option("--steps", type=int, default=None, help="Sampler steps (ddim and the solvers: up to T).")
@click.option("--set", "sets", multiple=True, metavar="sampler.OPTION=VALUE", help="Sampler option, e.g. sampler.eta=0.5.")
@click.option("--class", "classes", multiple=True, metavar="CLASS[,CLASS...]",
              help="Classes to draw (index or name; repeatable; class-conditional models; default: every class, "
                   "in equal blocks).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance weight W (0: unconditional, 1: conditional (default), > 1: guided).")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
@fast_options
def sample(checkpoint, n, fmt, out, seed, batch_size, sampler, steps, sets, classes, guidance, device, no_progress,
           fast):
    """Draw images from a CHECKPOINT (a run directory, its model.safetensors or a checkpoints/step-*
    training-state file) with Algorithm 2."""
    from .pipeline import load_checkpoint, save_grid, save_image_files, save_npz
    from .progress import sample_with_progress

    if n < 1:
        raise DdpmkitError(f"-n must be >= 1, got {n}")
    if batch_size < 1:
        raise DdpmkitError(f"--batch-size must be >= 1, got {batch_size}")
    options = _parse_sets(sets, ("sampler",), "sample").get("sampler", {})
    if steps is not None:
        options["steps"] = steps
    pipe = load_checkpoint(checkpoint, device=device)
    if options and "steps" in options and sampler in (None, "ddpm") and pipe.config.sampler.name == "ddpm":
        if int(options["steps"]) != pipe.diffusion.num_timesteps:
            raise DdpmkitError(f"the ddpm sampler always takes T = {pipe.diffusion.num_timesteps} steps; "
                               f"use --sampler dpm-solver++ (or ddim) --steps {options['steps']}")
        options.pop("steps")
    out = out or {"grid": "samples.png", "png": "samples", "npz": "samples.npz"}[fmt]
    is_file, is_dir = Path(out).is_file(), Path(out).is_dir()
    if is_file if fmt == "png" else is_dir:
        raise DdpmkitError(f"--out '{out}' is a {'file' if is_file else 'folder'}; --format {fmt} writes "
                           + ("a folder of PNGs" if fmt == "png" else "a file"))
    labels = pipe.class_labels(n, _class_list(classes))
    images = sample_with_progress(pipe, n, err_console, not no_progress, seed=seed, batch_size=batch_size,
                                  sampler=sampler, sampler_options=options or None, fast=_fast_path(pipe, fast),
                                  class_labels=labels, guidance=guidance)
    if fmt == "png":
        save_image_files(images, out, labels, pipe.classes)
    elif fmt == "npz":
        save_npz(images, out, labels)
    else:
        save_grid(images, out)
    click.echo(f"Wrote {n} samples to {out}" + (" (one PNG each)" if fmt == "png" else ""))


def _metric_list(names: tuple[str, ...]) -> list[str]:
    """``--metric fid,kid --metric digit-score`` → ``["fid", "kid", "digit-score"]`` (in order, once each)."""
    return list(dict.fromkeys(m.strip() for item in names for m in item.split(",") if m.strip()))


def sampling_options(f):
    """The options of every command that samples from a checkpoint before measuring."""
    options = [
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=int, default=256, show_default=True, help="Sampling batch size."),
        click.option("--sampler", default=None, help="Sampler (default: the run's)."),
        click.option("--steps", type=int, default=None, help="Sampler steps (ddim and the solvers)."),
        click.option("--set", "sets", multiple=True, metavar="metric.OPTION=VALUE",
                     help="Metric or sampler option, e.g. metric.splits=10, metric.weights=inception.safetensors."),
        click.option("--device", default="auto", show_default=True),
        click.option("--no-progress", is_flag=True),
    ]
    for opt in reversed(options):
        f = opt(f)
    return fast_options(f)


@cli.command()
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


@cli.command()
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

    from .assembly import build_many
    from .checkpoint import write_json
    from .evaluation import MetricContext, evaluate_images, load_images
    from .metrics import quantize
    from .pipeline import load_checkpoint, resolve_device
    from .progress import make_progress, sample_with_progress

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
            images = sample_with_progress(pipe, n, err_console, not no_progress, seed=seed, batch_size=batch_size,
                                          sampler=sampler, sampler_options=sampler_opts or None,
                                          fast=_fast_path(pipe, fast), class_labels=labels, guidance=guidance)
            # scored as the 8-bit images `ddpmkit sample` saves: `evaluate --images` on them gives the same values
            images = quantize(images)
    per_metric: dict[str, dict[str, float]] = {}
    with make_progress(err_console, not no_progress) as bar:
        context = MetricContext(pipeline=pipe, seed=seed, labels=labels)
        for name, metric in metrics.items():
            per_metric[name] = evaluate_images(images, {name: metric}, bar=bar, context=context)
    spaces = {name: m.feature_space for name, m in metrics.items() if getattr(m, "feature_space", None)}
    data = {name: m.data for name, m in metrics.items() if isinstance(getattr(m, "data", None), str)}
    figures = []
    if figures_dir:
        for metric in metrics.values():
            if callable(getattr(metric, "figures", None)):
                figures += [str(p) for p in metric.figures(figures_dir)]
    table = Table(title=f"{images.shape[0]} images", title_justify="left")
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


def _class_list(classes: tuple[str, ...]) -> list[str] | None:
    """``--class 3 --class 7,cat`` → ``["3", "7", "cat"]`` (None when not given)."""
    return [c.strip() for item in classes for c in item.split(",") if c.strip()] or None


def _fast_path(pipe, flags):
    """The checkpoint's fast-path settings with the flags given on the command line."""
    from .accel import FastPath

    return FastPath.from_run(pipe.config, **flags)


@cli.command("export")
@click.argument("run_dir", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["diffusers"]), default="diffusers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
def export_cmd(run_dir, out, fmt, device):
    """Export a run (or checkpoint) to OUT: a diffusers DDPMPipeline folder (from_pretrained loads it)."""
    from .export import diffusers_call, export_diffusers
    from .pipeline import load_checkpoint

    pipe = load_checkpoint(run_dir, device=device)
    export_diffusers(pipe, out)
    click.echo(f"Wrote a diffusers DDPMPipeline to {out}")
    click.echo(f"Sample it as ddpmkit does (all T = {pipe.diffusion.num_timesteps} steps): "
               + diffusers_call(pipe).replace("OUT", repr(str(out))))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="The HTML file (default RUN_DIR/report.html for one run, report.html for several).")
def report(run_dirs, out):
    """Write one self-contained HTML page (images embedded, opens from disk) showing RUN_DIRS: configuration,
    loss and metric curves, the grid of every epoch, the forward process, the analysis; several runs side by side.
    A sweep's study directory (runs/STUDY) shows its trials, its plots and its best trials."""
    from .report import write_report

    if out is None:
        out = Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html")
    path = write_report(list(run_dirs), out)
    click.echo(f"Wrote {path}")


@cli.command()
@click.option("--space", "space_file", type=click.Path(dir_okay=False), default=None,
              help="Search space (TOML): lr = {log_uniform = [1e-4, 1e-2]}, schedule = [\"linear\", \"cosine\"], "
                   "\"schedule.timesteps\" = {int = [100, 1000]}, fixed values, preset = \"laptop\".")
@click.option("--metric", default=None, help="The metric each trial is scored by (a metric plugin), e.g. digit-score.")
@click.option("--objective", default=None, help="Which of the metric's results (default: its first, e.g. digit_is).")
@click.option("--direction", type=click.Choice(["maximize", "minimize"]), default=None,
              help="Whether the objective is better high or low (default: as the metric says).")
@click.option("--trials", type=int, default=20, show_default=True, help="Trials in the study, all workers together.")
@click.option("--study", default=None, help="Study name (default: the space file's name); trials go to RUNS/STUDY/trial-NNNN.")
@click.option("--storage", default=None,
              help="Optuna storage URL shared by the workers (default sqlite:///RUNS/STUDY/optuna.db), e.g. "
                   "postgresql+psycopg://user@host:5432/db.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("--pruner", type=click.Choice(["median", "halving", "none"]), default="median", show_default=True,
              help="Stop poor trials early on their --eval-every results.")
@click.option("--prune-after", type=int, default=3, show_default=True,
              help="Completed trials before the median pruner compares a trial with them.")
@click.option("--eval-every", type=int, default=None, help="Score every N epochs (reported to the pruner).")
@click.option("--eval-samples", type=int, default=None, help="Images sampled per evaluation.")
@click.option("--set", "sets", multiple=True, metavar="KIND.OPTION=VALUE", help="A component option for every trial.")
@click.option("--logger", "logger_names", multiple=True,
              help="Loggers of every trial (jsonl always); with mlflow each trial is a run nested under the study's.")
@click.option("--seed", type=int, default=None, help="Seed of Optuna's TPE sampler (give each worker its own).")
@click.option("--device", default="auto", show_default=True)
@click.option("--nproc-per-trial", type=int, default=1, show_default=True,
              help="Processes per trial: > 1 runs each trial under torchrun (e.g. one per GPU).")
@click.option("--heartbeat", type=int, default=30, show_default=True,
              help="Seconds between heartbeats; a running trial silent for twice that is failed and queued again.")
@click.option("--show", is_flag=True, help="Print the study's best trials and write its plots; run nothing.")
@click.option("--top", type=int, default=10, show_default=True, help="Trials --show lists.")
def sweep(space_file, metric, objective, direction, trials, study, storage, runs_dir, pruner, prune_after, eval_every,
          eval_samples, sets, logger_names, seed, device, nproc_per_trial, heartbeat, show, top):
    """Search hyperparameters with Optuna: each trial is a run directory; start the same command on several
    machines (one --storage) to share the study. --show prints the results."""
    from . import sweep as sw

    runs = Path(runs_dir)
    if show:
        if study is None and space_file is None:
            raise DdpmkitError("--show needs --study NAME (or the --space file it was named after)")
        _show_study(sw, study or Path(space_file).stem, storage, runs, metric, top)
        return
    if space_file is None or metric is None:
        raise DdpmkitError("ddpmkit sweep needs --space SPACE.toml and --metric NAME (or --show --study NAME)")
    for flag, value in (("--trials", trials), ("--nproc-per-trial", nproc_per_trial), ("--heartbeat", heartbeat)):
        if value < 1:
            raise DdpmkitError(f"{flag} must be >= 1, got {value}")
    if prune_after < 0:
        raise DdpmkitError(f"--prune-after must be >= 0, got {prune_after}")
    sw._import_optuna()
    objective, direction = sw.objective_of(metric, objective, direction)
    opts = sw.SweepOptions(space=None, metric=metric, objective=objective, direction=direction, trials=trials,
                           study=study or Path(space_file).stem, storage=storage, runs_dir=runs, pruner=pruner,
                           prune_after=prune_after, seed=seed, eval_every=eval_every, eval_samples=eval_samples,
                           overrides=_parse_sets(sets, KINDS, "sweep"), loggers=tuple(logger_names), device=device,
                           nproc_per_trial=nproc_per_trial, heartbeat=heartbeat,
                           # the ddpmkit command runs nothing with torch before its trials: it can fork them itself
                           start_method="fork" if _COMMAND else "forkserver")
    changes, overrides = sw._trial_user_options(opts, 0, None)
    opts.space = sw.load_space(space_file, changes, overrides)
    worker = sw.Worker(opts, console=err_console)
    from .config import preset_config

    if pruner != "none" and not (eval_every or dict((p.name, p.values[0]) for p in opts.space.params
                                                     if p.kind == "fixed").get("eval_every")
                                 or preset_config(opts.space.preset).eval_every):
        warnings.warn("no --eval-every: trials report only their final score, so the pruner never stops one",
                      stacklevel=1)
    click.echo(f"study {opts.study}: {opts.metric}:{objective} ({direction}), {trials} trials, storage "
               f"{sw.masked(worker.storage_url)}", err=True)
    t0 = time.perf_counter()
    ran = worker.run()
    click.echo(f"This worker ran {ran} trials in {time.perf_counter() - t0:.0f} s.")
    _show_study(sw, opts.study, worker.storage_url, runs, None, top, storage_obj=worker.storage)


def _show_study(sw, name, storage_url, runs: Path, metric, top, storage_obj=None):
    """The study's best trials as a table; sweep.json, history.png and importance.png in RUNS/STUDY/."""
    url = storage_url or sw.default_storage(runs, name)
    if storage_url is None and not (runs / name / "optuna.db").exists():
        raise DdpmkitError(f"no study '{name}' under {runs}/ (no {runs / name / 'optuna.db'}); give --storage URL "
                           "if it lives elsewhere")
    storage = storage_obj or sw.open_storage(url, heartbeat=None)
    study = sw.load_study(name, storage)
    info = sw.summary(study)
    if metric is not None and info.get("metric") not in (None, metric):
        raise DdpmkitError(f"study '{name}' scores {info['metric']}:{info.get('objective')}, not {metric}")
    done = [t for t in info["trials"] if t["state"] == "complete"]
    if not done:
        states = ", ".join(f"{t['number']}: {t['state']}" for t in info["trials"]) or "none"
        raise DdpmkitError(f"study '{name}' has no completed trial with a value of {info.get('objective', 'its metric')} "
                           f"yet (trials: {states})")
    out_dir = runs / name
    out_dir.mkdir(parents=True, exist_ok=True)
    from .checkpoint import write_json

    write_json(out_dir / "sweep.json", info)
    plots = sw.write_plots(study, out_dir)
    reverse = info["direction"] == "maximize"
    params = sorted({k for t in done for k in t["params"]})
    table = Table(title=plain(f"study {name}: best of {len(done)} completed ({info.get('metric')}:"
                              f"{info.get('objective')}, {info['direction']})"), title_justify="left")
    for col in ("trial", info.get("objective", "value"), *params, "run directory"):
        table.add_column(plain(col), justify="right" if col not in ("run directory",) else "left")
    for t in sorted(done, key=lambda t: t["value"], reverse=reverse)[:top]:
        table.add_row(str(t["number"]), f"{t['value']:.6g}", *[plain(_cell(t["params"].get(k))) for k in params],
                      plain(t["run_dir"] or ""))
    Console(width=max(120, Console().width)).print(table)
    counts = {}
    for t in info["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    click.echo("trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for p in [out_dir / "sweep.json", *plots]:
        click.echo(f"Wrote {p}")


def _defaults(comp) -> str:
    """``option=default, ...`` of a component (its config built from no options)."""
    from .config import config_to_dict

    try:
        return ", ".join(f"{k}={_cell(v)}" for k, v in config_to_dict(comp.build_config({})).items())
    except DdpmkitError as exc:
        return f"(cannot build its defaults: {exc})"


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--options", "with_options", is_flag=True,
              help="Also list each component's options with their defaults (what --set KIND.OPTION=VALUE takes).")
def plugins_cmd(as_json, with_options):
    """List installed plugins (distribution, version, status) and every component with its description."""
    from .plugins import get_manager

    mgr = get_manager()
    registry = mgr.registry
    rows = []
    for name, info in sorted(mgr.plugins.items()):
        comps = {k: sorted(n for kind, n in info.components if kind == k) for k in KINDS}
        failed = "; ".join(filter(None, [info.error, *info.problems])) or None
        rows.append({"name": name, "module": info.module, "version": info.version, "source": info.source,
                     "distribution": info.dist, "error": failed, "components": {k: v for k, v in comps.items() if v}})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="ddpmkit plugins")
    for col in ("plugin", "distribution", "version", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(plain(r["name"]), plain(r["distribution"] or r["source"]), plain(r["version"] or "-"),
                      plain(f"failed: {r['error']}", "red") if r["error"] else "ok")
    console = Console()
    console.print(table)
    comps = Table(title="components")
    for col in ("kind", "name", "plugin", "description", *(["options"] if with_options else [])):
        comps.add_column(col)
    for kind in KINDS:
        for cname, comp in sorted(registry[kind].items()):
            cells = [kind, plain(cname), plain(comp.plugin), plain(comp.description)]
            if with_options:
                cells.append(plain(_defaults(comp)))
            comps.add_row(*cells)
    console.print(comps)
    for kind in KINDS:
        click.echo(f"{KIND_BY_NAME[kind].plural}: {', '.join(sorted(registry[kind])) or '(none)'}")


_COMMAND = False  # True in the `ddpmkit` process itself, False where a program or a test calls the CLI


def main():
    global _COMMAND
    _COMMAND = True
    cli(prog_name="ddpmkit")


if __name__ == "__main__":
    main()
