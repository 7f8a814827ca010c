"""The shape of the code: layers as folders, imports that point one way (down), no import cycles,
built-in plugins that use only what a third-party plugin may, short functions, one table of kinds.

Layers, lowest first (a module may import its own layer and the ones below, never one above):

    0  ddpmkit._version, ddpmkit.errors, ddpmkit.diffusion      the base: the math and the errors
    1  ddpmkit.sdk.*                                            what plugin authors import
    2  ddpmkit.run.*                                            the run machinery
    3  ddpmkit.sweep.*, ddpmkit.report, ddpmkit.export          applications on top of a run
    4  ddpmkit.cli.*                                            the command line
    5  ddpmkit (the package's public names), ddpmkit.__main__

Every import counts: at module level and inside functions.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import ddpmkit

CORE = Path(ddpmkit.__file__).parent
PLUGINS = CORE.parent / "plugins"

# What a built-in plugin may import of ddpmkit: the package's public names, the sdk, the base, and
# the old top-level paths of sdk modules (the same module objects).
PLUGIN_ALLOWED = ("ddpmkit", "ddpmkit.sdk", "ddpmkit.errors", "ddpmkit.diffusion", "ddpmkit.data",
                  "ddpmkit.metrics", "ddpmkit.validators", "ddpmkit.testing", "ddpmkit.contract")


def dotted(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules(root: Path = CORE, package: str = "ddpmkit") -> dict[str, tuple[Path, ast.Module]]:
    return {dotted(p, root, package): (p, ast.parse(p.read_text())) for p in sorted(root.rglob("*.py"))}


def imported(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` (at ``path``) imports, anywhere in the file; ``from P
    import X`` counts as importing P.X when that is a module, else P."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = package.split(".")[:len(package.split(".")) - (n.level - 1)]
                base = ".".join(anchor + ([n.module] if n.module else []))
            for a in n.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def graph(root: Path = CORE, package: str = "ddpmkit") -> dict[str, set[str]]:
    mods = modules(root, package)
    return {name: imported(name, path, tree, set(mods)) for name, (path, tree) in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first = last) or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer(module: str) -> int:
    if module in ("ddpmkit", "ddpmkit.__main__"):
        return 5
    top = module.split(".")[1]
    return {"_version": 0, "errors": 0, "diffusion": 0, "sdk": 1, "run": 2, "sweep": 3, "report": 3,
            "export": 3, "cli": 4}[top]


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_ddpmkit_modules():
    cycle = find_cycle(graph())
    assert cycle is None, " → ".join(cycle)


def test_every_module_has_a_layer_and_imports_point_down():
    edges = graph()
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in edges.items() for b in targets if layer(b) > layer(a)]
    assert not upward, upward


def test_the_layers_are_folders():
    """The sdk, the run machinery, the sweep and the CLI are packages; the top holds only the base,
    the two small applications and the package's public names."""
    top = sorted(p.name for p in CORE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_version.py", "diffusion.py", "errors.py", "export.py",
                   "report.py"], top
    for folder in ("sdk", "run", "sweep", "cli"):
        assert (CORE / folder / "__init__.py").is_file(), folder


def test_built_in_plugins_import_only_what_a_third_party_plugin_may():
    core = set(modules())
    wrong = []
    for name, (path, tree) in modules(PLUGINS, "ddpmkit_plugins").items():
        for m in imported(name, path, tree, core | {"ddpmkit"}):
            if m != "ddpmkit" and not any(m == a or m.startswith(a + ".") for a in PLUGIN_ALLOWED[1:]):
                wrong.append(f"{name} imports {m}")
    assert not wrong, wrong


def test_built_in_plugins_are_one_per_file_in_a_folder_per_kind():
    folders = sorted(p.name for p in PLUGINS.iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert folders == ["datasets", "distillers", "loggers", "losses", "metrics", "predictors", "processes", "samplers",
                       "schedules",
                       "timestep_samplers"], folders
    assert sorted(p.name for p in PLUGINS.glob("*.py")) == ["__init__.py"]


def test_no_function_in_the_core_is_longer_than_80_lines():
    long = [f"{name}.{n.name} ({n.end_lineno - n.lineno + 1} lines)" for name, (_, tree) in modules().items()
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_sampling_and_evaluating_never_go_through_training_or_the_cli():
    edges = graph()
    for name in ("ddpmkit.run.assembly", "ddpmkit.run.pipeline", "ddpmkit.sdk.evaluation", "ddpmkit.export"):
        assert not {m for m in edges[name] if m.startswith(("ddpmkit.run.trainer", "ddpmkit.cli"))}, name
    assert not [a for a, targets in edges.items() if not a.startswith(("ddpmkit.cli", "ddpmkit.__main__"))
                and any(t.startswith("ddpmkit.cli") for t in targets)]


def test_the_kinds_are_written_once():
    """Only kinds.py spells the list of kinds out; everything else reads it."""
    for name, (_, tree) in modules().items():
        if name == "ddpmkit.sdk.kinds":
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Tuple) and len(n.elts) >= 5 and all(isinstance(e, ast.Constant) for e in n.elts):
                values = {e.value for e in n.elts}
                assert not {"schedule", "predictor", "loss", "dataset"} <= values, f"{name} lists the kinds"
