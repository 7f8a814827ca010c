"""Docs that cannot drift: every command and every option of the CLI, and every kind, is documented."""

import re
from pathlib import Path

import click

import ddpmkit
from ddpmkit.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def docs_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def test_every_command_and_option_is_documented():
    text, missing = docs_text(), []
    for name, command in cli.commands.items():
        if f"ddpmkit {name}" not in text:
            missing.append(f"command `ddpmkit {name}`")
        for param in command.params:
            if isinstance(param, click.Option):
                longs = [o for o in param.opts + param.secondary_opts if o.startswith("--")]
                if longs and not any(o in text for o in longs) and "--help" not in longs:
                    missing.append(f"ddpmkit {name} {longs[0]}")
    assert not missing, f"undocumented in README.md/docs: {missing}"


def test_readme_has_a_table_of_every_commands_options():
    """The README's table of each command's options names every option (the table, not just prose)."""
    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, command in cli.commands.items():
        heading = re.search(rf"^`ddpmkit {name}[^`]*` options", readme, re.MULTILINE)
        assert heading, f"the README has no table of `ddpmkit {name}` options"
        start = readme.index("| option |", heading.end())
        table = readme[start: readme.index("\n\n", start)]
        missing += [f"{name} {o}" for p in command.params if isinstance(p, click.Option)
                    for o in [next(o for o in p.opts if o.startswith("--"))] if o not in table and o != "--help"]
    assert not missing, f"missing from the README's option tables: {missing}"


def test_every_kind_is_documented():
    text = (ROOT / "docs" / "plugins.md").read_text()
    for kind in ddpmkit.KIND_TABLE:
        assert f"`{kind.hook}`" in text and f"| {kind.name} |" in text, kind.name
