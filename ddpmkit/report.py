"""``ddpmkit report RUN [RUN ...]``: one self-contained HTML page to look at runs.

Everything is embedded (PNG figures as ``data:`` URIs, no script, no network), so the file opens
from disk, can be mailed, and renders the same anywhere. For each run: its final metrics
(``eval.json``) and analysis (``analysis/analysis.json``), the loss curve and every metric over
training (``metrics.jsonl``, drawn with matplotlib), the grids of every epoch as a strip (the seed
report's Fig. 3), the final grid, the forward-process strip, the nearest-neighbour figures of
``ddpmkit analyze``, and the resolved configuration. With several runs, a comparison first: a table
of the options that differ and the final metrics, and the curves overlaid.

Numbers in tables carry ``data-run``/``data-key``/``data-value`` attributes, so a test (or a
script) reads them back exactly.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import attrs

from ddpmkit.errors import DdpmkitError


@attrs.define
class RunData:
    """What a run directory holds, as the report reads it."""

    path: Path
    name: str
    config: dict[str, Any]
    steps: list[dict] = attrs.field(factory=list)      # per logged step: step, loss, lr, ...
    evals: list[dict] = attrs.field(factory=list)      # per evaluation: step, eval {...}
    final: dict[str, float] = attrs.field(factory=dict)  # eval.json results
    analysis: dict[str, Any] = attrs.field(factory=dict)  # analysis/analysis.json

    @property
    def last_loss(self) -> float | None:
        losses = [r["loss"] for r in self.steps if "loss" in r]
        return losses[-1] if losses else None


def read_run(path: str | Path, name: str | None = None) -> RunData:
    """A run directory's config, logs and results (``DdpmkitError`` when it is not a run)."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise DdpmkitError(f"'{p}' is not a run directory (no config.json)")
    try:
        config = json.loads(cfg.read_text())
    except ValueError as exc:
        raise DdpmkitError(f"'{cfg}' is not valid JSON: {exc}") from None
    run = RunData(p, name or p.name, config)
    log = p / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            if "eval" in rec:
                run.evals.append(rec)
            elif "loss" in rec:
                run.steps.append(rec)
    for file, attr in ((p / "eval.json", "final"), (p / "analysis" / "analysis.json", "analysis")):
        if file.is_file():
            data = json.loads(file.read_text())
            setattr(run, attr, data.get("results", {}) if attr == "final" else data)
    return run


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_figure(runs: list[RunData]) -> str | None:
    """The training loss against the step, one line per run."""
    runs = [r for r in runs if r.steps]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for r in runs:
        ax.plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], label=r.name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def metrics_figure(runs: list[RunData]) -> str | None:
    """Every evaluated metric against the step (one panel per metric), one line per run."""
    keys = list(dict.fromkeys(k for r in runs for e in r.evals for k in e["eval"]))
    keys = [k for k in keys if not k.startswith("digit_is_class_")][:8]
    if not keys:
        return None
    plt = _plt()
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for r in runs:
            pts = [(e["step"], e["eval"][key]) for e in r.evals if key in e["eval"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=r.name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.strip { display: flex; flex-wrap: wrap; gap: .6em; align-items: flex-end; }
.strip figure { margin: 0; text-align: center; font-size: .8em; }
img.grid { image-rendering: pixelated; width: 160px; }
img.plot { max-width: 100%; }
figure { margin: .5em 0; } figcaption { color: #555; font-size: .85em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .8em; }
"""


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else html.escape(str(v))


def _num_cell(run: int, key: str, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (f'<td class="num" data-run="{run}" data-key="{html.escape(key)}" '
                f'data-value="{value!r}">{_fmt(float(value))}</td>')
    return f"<td>{_fmt(value)}</td>"


def _img(src: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{src}" alt="{html.escape(alt)}">'


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists as comma-separated values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        out[prefix[:-1]] = ",".join(str(x) for x in d)
    else:
        out[prefix[:-1]] = d
    return out


def _options(run: RunData) -> dict[str, Any]:
    return _flat(run.config.get("run", {}))


def _run_section(i: int, run: RunData) -> str:
    p = run.path
    parts = [f'<section class="run" id="run-{i}"><h2>{html.escape(run.name)}</h2>',
             f"<p><code>{html.escape(str(p.resolve()))}</code></p>"]
    summary = {"steps": run.steps[-1]["step"] if run.steps else 0, "final loss": run.last_loss}
    parts.append("<table class='summary'>" + "".join(
        f"<tr><th>{k}</th>{_num_cell(i, k, v) if v is not None else '<td>-</td>'}</tr>" for k, v in summary.items())
        + "</table>")
    if run.final:
        parts.append("<h3>Final metrics (eval.json)</h3><table class='results'><tr><th>metric</th><th>value</th></tr>"
                     + "".join(f"<tr><td>{html.escape(k)}</td>{_num_cell(i, k, v)}</tr>" for k, v in run.final.items())
                     + "</table>")
    curves = [x for x in (loss_figure([run]), metrics_figure([run])) if x]
    if curves:
        parts.append("<h3>Training</h3>" + "".join(_img(c, "training curve") for c in curves))
    epochs = sorted((p / "samples").glob("epoch-*.png"))
    if epochs:
        parts.append("<h3>Samples after each epoch</h3><div class='strip'>" + "".join(
            f"<figure>{_img(_file_uri(e), e.stem, 'grid')}<figcaption>epoch {int(e.stem.split('-')[1])}"
            f"</figcaption></figure>" for e in epochs) + "</div>")
    for file, title in (("samples.png", "Final samples"), ("forward.png", "The forward process q(x_t | x_0)")):
        if (p / file).is_file():
            parts.append(f"<h3>{title}</h3><figure>{_img(_file_uri(p / file), title)}</figure>")
    if run.analysis:
        res = run.analysis.get("results", {})
        spaces = run.analysis.get("feature_spaces", {})
        parts.append(f"<h3>Memorisation and coverage (ddpmkit analyze, {run.analysis.get('count', '?')} samples)</h3>")
        parts.append("<table class='analysis'><tr><th>result</th><th>value</th></tr>" + "".join(
            f"<tr><td>{html.escape(k)}</td>{_num_cell(i, 'analysis.' + k, v)}</tr>" for k, v in res.items()
            if not k.startswith("digit_is_class_")) + "</table>")
        if spaces:
            parts.append("<p>Feature spaces: " + "; ".join(f"{html.escape(k)}: {html.escape(v)}"
                                                           for k, v in spaces.items()) + "</p>")
        for name in ("nearest.png", "distances.png"):
            f = p / "analysis" / name
            if f.is_file():
                parts.append(f"<figure>{_img(_file_uri(f), name)}</figure>")
    parts.append("<details><summary>Resolved configuration (config.json)</summary><pre>"
                 + html.escape(json.dumps(run.config, indent=2)) + "</pre></details></section>")
    return "\n".join(parts)


def _comparison(runs: list[RunData]) -> str:
    opts = [_options(r) for r in runs]
    keys = sorted(set().union(*opts))
    differ = [k for k in keys if len({json.dumps(o.get(k), sort_keys=True) for o in opts}) > 1]
    metrics = list(dict.fromkeys(k for r in runs for k in r.final))
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(r.name)}</th>" for r in runs) + "</tr>"
    rows = [f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_fmt(o.get(k, '-'))}</td>" for o in opts) + "</tr>"
            for k in differ]
    rows.append("<tr><td>final loss</td>" + "".join(
        _num_cell(i, "final loss", r.last_loss) if r.last_loss is not None else "<td>-</td>"
        for i, r in enumerate(runs)) + "</tr>")
    rows += [f"<tr><td>{html.escape(m)}</td>" + "".join(
        _num_cell(i, m, r.final[m]) if m in r.final else "<td>-</td>" for i, r in enumerate(runs)) + "</tr>"
        for m in metrics]
    out = ["<section id='comparison'><h2>Comparison</h2><p>Options that differ, and the final results.</p>",
           "<table class='comparison'>" + head + "".join(rows) + "</table>"]
    out += [_img(c, "overlaid curves") for c in (loss_figure(runs), metrics_figure(runs)) if c]
    return "\n".join(out) + "</section>"


def read_study(path: Path) -> dict:
    """A sweep's study directory (``RUNS/STUDY``): its ``sweep.json`` (written by ``ddpmkit sweep``)."""
    file = path / "sweep.json"
    if not file.is_file():
        raise DdpmkitError(f"'{path}' is a sweep's study directory without sweep.json yet; write it with "
                           f"`ddpmkit sweep --show --study {path.name} --runs-dir {path.parent}`")
    return json.loads(file.read_text())


def _study_section(k: int, path: Path, info: dict) -> str:
    """The study: its trials (state, value, parameters), the best one, Optuna's history and importance plots."""
    trials = info.get("trials", [])
    params = sorted({p for t in trials for p in t.get("params", {})})
    objective = info.get("objective", "value")
    best = (info.get("best") or {}).get("number")
    head = "<tr><th>trial</th><th>state</th><th>" + html.escape(objective) + "</th>" + "".join(
        f"<th>{html.escape(p)}</th>" for p in params) + "</tr>"
    rows = []
    for t in trials:
        value = _num_cell(k, f"study.{t['number']}.value", t["value"]) if t.get("value") is not None else "<td>-</td>"
        mark = " (best)" if t["number"] == best else ""
        rows.append(f"<tr><td>{t['number']}{mark}</td><td>{html.escape(t['state'])}</td>{value}" + "".join(
            f"<td>{_fmt(t.get('params', {}).get(p, '-'))}</td>" for p in params) + "</tr>")
    parts = [f"<section class='study' id='study-{k}'><h2>Sweep: study {html.escape(info.get('study', path.name))}</h2>",
             f"<p>{html.escape(str(info.get('metric')))}:{html.escape(objective)} ({html.escape(info.get('direction', ''))}),"
             f" {len(trials)} trials. <code>{html.escape(str(path.resolve()))}</code></p>",
             "<table class='study-trials'>" + head + "".join(rows) + "</table>"]
    for name, title in (("history.png", "Optimisation history"), ("importance.png", "Parameter importances")):
        if (path / name).is_file():
            parts.append(f"<h3>{title}</h3><figure>{_img(_file_uri(path / name), title)}</figure>")
    return "\n".join(parts) + "</section>"


def _expand(run_dirs: list[str | Path], top: int = 6) -> tuple[list[Path], list[tuple[Path, dict]]]:
    """Run directories, with each study directory replaced by its best completed trials (at most ``top``)."""
    runs, studies = [], []
    for d in map(Path, run_dirs):
        if not (d / "config.json").is_file() and ((d / "sweep.json").is_file() or (d / "study.json").is_file()):
            info = read_study(d)
            studies.append((d, info))
            done = [t for t in info.get("trials", []) if t["state"] == "complete" and t.get("run_dir")]
            done.sort(key=lambda t: t["value"], reverse=info.get("direction") == "maximize")
            runs += [Path(t["run_dir"]) for t in done[:top] if (Path(t["run_dir"]) / "config.json").is_file()]
        else:
            runs.append(d)
    return runs, studies


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out``; returns its path. A sweep's study directory
    (``RUNS/STUDY``) stands for its trials table, its plots and its best completed trials."""
    if not run_dirs:
        raise DdpmkitError("report: give at least one run directory")
    run_dirs, studies = _expand(run_dirs)
    if not run_dirs:
        raise DdpmkitError("report: the study has no completed trial to show yet")
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):  # two runs called 'run' in different folders
        names = [str(Path(d)) for d in run_dirs]
    runs = [read_run(d, n) for d, n in zip(run_dirs, names)]
    body = ["<h1>ddpmkit report</h1>", f"<p>{len(runs)} run{'s' if len(runs) > 1 else ''}: "
            + ", ".join(f"<a href='#run-{i}'>{html.escape(r.name)}</a>" for i, r in enumerate(runs)) + "</p>"]
    body += [_study_section(k, path, info) for k, (path, info) in enumerate(studies)]
    if len(runs) > 1:
        body.append(_comparison(runs))
    body += [_run_section(i, r) for i, r in enumerate(runs)]
    page = ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>ddpmkit report: "
            + html.escape(", ".join(r.name for r in runs)) + f"</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    from ddpmkit.sdk.files import atomic_write

    path = Path(out)
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path
