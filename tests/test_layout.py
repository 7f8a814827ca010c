"""The shape of the core: short functions, imports that point down, one table of kinds."""

import ast
import functools
from pathlib import Path

import ddpmkit

CORE = Path(ddpmkit.__file__).parent


@functools.lru_cache(maxsize=1)
def modules():
    return {p.stem: ast.parse(p.read_text()) for p in CORE.glob("*.py")}


def test_no_function_in_the_core_is_longer_than_80_lines():
    long = [f"{name}.{n.name} ({n.end_lineno - n.lineno + 1} lines)" for name, tree in modules().items()
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def imports(tree) -> set[str]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level == 1:
            out |= {n.module} if n.module else {a.name for a in n.names}
    return out


def test_imports_point_down():
    """Sampling and evaluating never go through training or the CLI; nothing imports the CLI."""
    mods = modules()
    below_training = ["assembly", "pipeline", "progress", "evaluation", "checkpoint", "state", "contract",
                      "plugins", "config", "kinds", "diffusion", "export", "testing"]
    for name in below_training:
        assert not imports(mods[name]) & {"training", "cli"}, name
    assert not any("cli" in imports(tree) for name, tree in mods.items() if name not in ("cli", "__main__"))


def test_the_kinds_are_written_once():
    """Only kinds.py spells the list of kinds out; everything else reads it."""
    for name, tree in modules().items():
        if name == "kinds":
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Tuple) and len(n.elts) >= 5 and all(isinstance(e, ast.Constant) for e in n.elts):
                values = {e.value for e in n.elts}
                assert not {"schedule", "predictor", "loss", "dataset"} <= values, f"{name}.py lists the kinds"
