"""``ddpmkit plugins``: installed plugins and their components."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from ddpmkit.cli._common import (
    _cell,
    plain,
)
from ddpmkit.errors import DdpmkitError
from ddpmkit.sdk.kinds import KIND_BY_NAME, KINDS


def _defaults(comp) -> str:
    """``option=default, ...`` of a component (its config built from no options)."""
    from ddpmkit.sdk.options import config_to_dict

    try:
        return ", ".join(f"{k}={_cell(v)}" for k, v in config_to_dict(comp.build_config({})).items())
    except DdpmkitError as exc:
        return f"(cannot build its defaults: {exc})"


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--options", "with_options", is_flag=True,
              help="Also list each component's options with their defaults (what --set KIND.OPTION=VALUE takes).")
def plugins_cmd(as_json, with_options):
    """List installed plugins (distribution, version, status) and every component with its description."""
    from ddpmkit.sdk.registry import get_manager

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
