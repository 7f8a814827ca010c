"""Text that plugins and users supply prints as written: rich reads none of it as markup."""

from __future__ import annotations

import attrs
import torch
from click.testing import CliRunner

import ddpmkit
from ddpmkit.cli import cli

MARKUP = "[mlflow] [bold red]loud[/] [/]"


@attrs.define
class MarkupConfig:
    tag: str = attrs.field(default="[bold red]x[/]")
    resolution: int = 16

    def __attrs_post_init__(self):
        if self.tag.startswith("[/]"):
            raise ValueError(f"tag {self.tag!r} may not start with [/]")


class MarkupData(torch.utils.data.Dataset):
    classes = ["[mlflow]", "[bold red]b[/]"]

    def __init__(self, config):
        self.side = config.resolution

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((1, self.side, self.side), -1.0 + (i % 2)), i % 2


class MarkupPlugin:
    @ddpmkit.hookimpl
    def register_datasets(self, register):
        register("markup-data", MarkupData, MarkupConfig, f"images {MARKUP}")


def invoke(*args):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "400"})


def test_plugins_listing_prints_descriptions_and_defaults_verbatim():
    ddpmkit.register_plugin(MarkupPlugin(), name="[markup]")
    r = invoke("plugins", "--options")
    assert r.exit_code == 0, r.output
    assert f"images {MARKUP}" in r.output
    assert "tag=[bold red]x[/], resolution=16" in r.output
    assert "[markup]" in r.output
    assert "(pip install 'ddpmkit[mlflow]')" in r.output  # the built-in mlflow logger's description


def test_run_summary_and_error_lines_verbatim(tmp_path):
    ddpmkit.register_plugin(MarkupPlugin(), name="[markup]")
    out = tmp_path / "run"
    r = invoke("run", "--dataset", "markup-data", "--max-steps", "1", "--batch-size", "4", "--samples", "2",
               "--no-progress", "--device", "cpu", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "labels (2 classes: [mlflow], [bold red]b[/]): class-conditional" in r.stderr
    r = invoke("sample", str(out), "-n", "2", "--class", "[red]c[/red]", "--no-progress", "--out", str(tmp_path / "s.png"))
    assert r.exit_code == 2
    assert r.stderr.strip() == ("Error: unknown class '[red]c[/red]': give an index in 0..1 or a name; "
                                "classes: [mlflow], [bold red]b[/]")
    r = invoke("run", "--dataset", "markup-data", "--set", "dataset.tag=[/]no", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2
    assert r.stderr.strip() == ("Error: invalid option for dataset 'markup-data': tag '[/]no' may not start with [/]")
