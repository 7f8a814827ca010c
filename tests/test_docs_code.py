"""The Python in README.md and docs/*.md runs: every ```python block is executed, so the library
examples cannot rot.

Each block runs in a fresh temporary working directory (which is on ``sys.path``), in-process, in a
namespace of its own. What a reader sees is never edited for the test; instead:

* **Training is shortened by the test.** ``ddpmkit.train`` is wrapped so a run trains at most 2 steps
  of batch ≤ 16 on ≤ 64 images with T ≤ 20 and draws ≤ 4 images for its grid; ``Pipeline.sample``
  runs samplers that take ``steps`` at ≤ 2 steps and draws ≤ 8 images (bf16 autocast is ~13× slower
  on a CPU without bf16 instructions). The calls, their arguments and the objects they
  return are the documented ones.
* **An HTML comment before a block** (invisible on the rendered page) says what the block needs:
  ``<!-- doc-test: file PATH -->`` — the block is a file of that path (written into the directory and
  imported, not run as a script); ``<!-- doc-test: needs PATH -->`` — that file block is written
  first and registered in-process as a plugin; ``<!-- doc-test: pytest -->`` — the block is a test
  module, run by pytest in a subprocess, whose tests must pass; ``<!-- doc-test: setup NAME -->`` — a
  setup below runs first (``export``: an unconditional run exported to ``out/`` with diffusers,
  ``export-cond``: the same for a class-conditional run, ``T`` = its timesteps; ``torch`` and ``DDPMPipeline`` imported, as a reader has them from the
  blocks before).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpmkit
from ddpmkit.run.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- doc-test: (?P<directive>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks():
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            found.append(pytest.param(path, m.group("directive") or "", m.group("code"),
                                      id=f"{path.relative_to(ROOT)}:{line}"))
    return found


def file_blocks() -> dict[str, str]:
    files = {}
    for param in blocks():
        _, directive, code = param.values
        if directive.startswith("file "):
            files[directive.split(None, 1)[1]] = code
    return files


def shortened(monkeypatch):
    """ddpmkit.train and Pipeline.sample cut to a few steps (see the module docstring)."""
    train, sample = ddpmkit.train, Pipeline.sample

    def short_train(config, *args, **kwargs):
        config.max_steps = min(config.max_steps or 2, 2)
        config.batch_size, config.num_samples = min(config.batch_size, 16), min(config.num_samples, 4)
        config.dataset.options["limit"] = min(config.dataset.options.get("limit") or 64, 64)
        config.schedule.options["timesteps"] = min(config.schedule.options.get("timesteps", 20), 20)
        kwargs.setdefault("progress", False)
        kwargs.setdefault("device", "cpu")
        return train(config, *args, **kwargs)

    def short_sample(self, n, *args, sampler_options=None, **kwargs):
        name = kwargs.get("sampler") or self.config.sampler.name
        options = dict(sampler_options or {})
        if name != "ddpm":
            options["steps"] = min(int(options.get("steps", self.config.sampler.options.get("steps", 2))), 2)
        if kwargs.get("class_labels") is None:  # (a label per image fixes the count)
            n = min(n, 8)
        return sample(self, n, *args, sampler_options=options, **kwargs)

    monkeypatch.setattr(ddpmkit, "train", short_train)
    monkeypatch.setattr(Pipeline, "sample", short_sample)


def export_run(conditional: bool) -> dict:
    from ddpmkit.export import export_diffusers

    config = ddpmkit.preset_config("tiny-cond" if conditional else "tiny")
    pipe = ddpmkit.train(config, "export-run", sample_grid=False)
    export_diffusers(pipe, "out")
    from diffusers import DDPMPipeline

    return {"torch": torch, "DDPMPipeline": DDPMPipeline, "T": pipe.diffusion.num_timesteps}


SETUPS = {"export": lambda: export_run(False), "export-cond": lambda: export_run(True)}


@pytest.mark.parametrize("path,directive,code", blocks())
def test_python_block_runs(path, directive, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    shortened(monkeypatch)
    kind, _, arg = directive.partition(" ")
    namespace: dict = {"__name__": "__doc_block__"}
    if kind == "needs":
        target = tmp_path / arg
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(file_blocks()[arg])
        for parent in target.relative_to(tmp_path).parents:
            if str(parent) != ".":
                (tmp_path / parent / "__init__.py").touch()
        module = arg[:-3].replace("/", ".")
        sys.modules.pop(module, None)
        sys.modules.pop(module.split(".")[0], None)  # the package, imported from another block's directory
        ddpmkit.register_plugin(importlib.import_module(module), name=Path(arg).stem)
    elif kind == "setup":
        namespace.update(SETUPS[arg]())
    if kind == "file":
        target = tmp_path / arg
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)
        module = arg[:-3].replace("/", ".")
        sys.modules.pop(module, None)
        sys.modules.pop(module.split(".")[0], None)
        importlib.import_module(module)
        return
    if kind == "pytest":
        for name, text in file_blocks().items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        (tmp_path / "test_doc_block.py").write_text(code)
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                            "test_doc_block.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert " passed" in r.stdout
        return
    assert kind in ("", "needs", "setup"), f"unknown doc-test directive {directive!r}"
    exec(compile(code, f"{path.name}:block", "exec"), namespace)


def test_every_directive_is_known():
    for param in blocks():
        _, directive, _ = param.values
        kind = directive.split(" ", 1)[0]
        assert kind in ("", "file", "needs", "pytest", "setup"), directive
        if kind == "setup":
            assert directive.split(" ", 1)[1] in SETUPS, directive
