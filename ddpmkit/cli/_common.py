"""What the commands share: option groups (the fast path, sampling), --set parsing, table cells, the stderr console."""

from __future__ import annotations

import functools

import click
from rich.console import Console
from rich.text import Text

from ddpmkit.errors import DdpmkitError
from ddpmkit.run.config import PRECISIONS
from ddpmkit.run.progress import cell
from ddpmkit.sdk.kinds import KINDS

err_console = Console(stderr=True)


def plain(value, style: str = "") -> Text:
    """A table cell or title printed as written: text from plugins and users (descriptions, class names,
    paths, option values) may hold brackets that rich would otherwise read as markup."""
    return Text(str(value), style=style)


FAST_FLAGS = ("precision", "channels_last", "tf32", "compile", "cuda_graphs")


def fast_options(f):
    """The fast-path flags (ddpmkit.run.accel.FastPath), collected into one ``fast`` dict (None: not given)."""
    options = [
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
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


def _class_list(classes: tuple[str, ...]) -> list[str] | None:
    """``--class 3 --class 7,cat`` → ``["3", "7", "cat"]`` (None when not given)."""
    return [c.strip() for item in classes for c in item.split(",") if c.strip()] or None


def _fast_path(pipe, flags):
    """The checkpoint's fast-path settings with the flags given on the command line."""
    from ddpmkit.run.accel import FastPath

    return FastPath.from_run(pipe.config, **flags)


_cell = cell


COMMAND = False  # True in the `ddpmkit` process itself, False where a program or a test calls the CLI
