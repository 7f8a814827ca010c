"""The ``ddpmkit`` command line: the group, its one-line errors and exit codes, and its commands, one
module per command group (run, sample, evaluate/analyze, report, export, ema, distill, sweep, plugins).

Exit codes: 0 done; 1 an unexpected error (one line; ``--debug`` for the traceback); 2 bad input
(a :class:`~ddpmkit.errors.DdpmkitError`: one line saying what was wrong and what would be right);
130 interrupted; a stopped run's own code (:class:`~ddpmkit.errors.Interrupted`).
"""

from __future__ import annotations

import warnings

import click

from ddpmkit.cli import _common
from ddpmkit.cli._common import plain
from ddpmkit.cli.distill import distill_cmd
from ddpmkit.cli.ema import ema_cmd
from ddpmkit.cli.evaluate import analyze, evaluate
from ddpmkit.cli.export import export_cmd
from ddpmkit.cli.plugins import plugins_cmd
from ddpmkit.cli.report import report
from ddpmkit.cli.run import run
from ddpmkit.cli.sample import sample
from ddpmkit.cli.sweep import sweep
from ddpmkit.errors import DdpmkitError, Interrupted


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


for _command in (run, sample, evaluate, analyze, report, export_cmd, ema_cmd, distill_cmd, sweep, plugins_cmd):
    cli.add_command(_command)


def main():
    _common.COMMAND = True
    cli(prog_name="ddpmkit")


if __name__ == "__main__":
    main()


__all__ = ["cli", "main", "plain"]
