"""The process comparison of docs/processes.md: runs of ``vp``, ``edm`` and ``flow`` trained with the
same network and budget, sampled at several numbers of network calls, scored against held-out real
digits (KID and precision/recall in the digit classifier's feature space, digit-score IS and
confidence beside them).

    python benchmarks/processes.py --runs vp=RUN_VP edm=RUN_EDM flow=RUN_FLOW --real REAL_DIR \\
        [-n 1000] [--calls 1,2,4,8,16,32] [--out processes.json]
    python benchmarks/processes.py --plot vp.json flow.json edm.json --out docs/processes.png

Each run is an ordinary run directory (``ddpmkit run --process P --sampler S --out RUN``); REAL_DIR
holds real test digits as PNGs (``python benchmarks/real_digits.py ../shared/data/mnist REAL_DIR -n 1000``).
Samples are drawn with ``ddpmkit sample --format npz`` and scored with ``ddpmkit evaluate --images``, so
every figure is what those commands print.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (sampler, steps for a number of network calls), per process; None: not reachable at that count
SAMPLERS = {
    "vp": {"ddim": lambda k: k, "euler-ancestral": lambda k: k, "heun": lambda k: (k + 1) // 2 if k % 2 else None},
    "edm": {"euler": lambda k: k, "heun": lambda k: (k + 1) // 2 if k % 2 and k > 1 else None},
    "flow": {"euler": lambda k: k, "heun": lambda k: (k + 1) // 2 if k % 2 and k > 1 else None},
}


def evaluate(run: str, sampler: str, steps: int, n: int, real: str, work: Path, seeds: tuple[int, ...] = (0,)) -> dict:
    """Sample ``n`` images of ``run`` per seed (``ddpmkit sample``), score them all together (``ddpmkit
    evaluate``: KID, precision/recall, digit-score against the ``real`` folder); ``seconds`` is the sampling time."""
    npz = work / f"{Path(run).name}-{sampler}-{steps}.npz"
    t0, parts = time.perf_counter(), []
    for seed in seeds:
        part = npz if len(seeds) == 1 else npz.with_name(f"{npz.stem}-seed{seed}.npz")
        subprocess.run(["ddpmkit", "sample", run, "-n", str(n), "--format", "npz", "--out", str(part), "--sampler",
                        sampler, *(["--steps", str(steps)] if sampler != "ddpm" else []),  # ddpm takes all T steps
                        "--no-progress", "--seed", str(seed)], check=True, capture_output=True)
        parts.append(part)
    seconds = time.perf_counter() - t0
    if len(seeds) > 1:  # one pool of len(seeds)·n images
        import numpy as np

        loaded = [np.load(p) for p in parts]
        np.savez(npz, *(np.concatenate([z[k] for z in loaded]) for k in loaded[0].files))
    out = work / (npz.stem + ".json")
    subprocess.run(["ddpmkit", "evaluate", "--images", str(npz), "--metric", "kid,precision-recall,digit-score",
                    "--set", "metric.dataset=image-folder", "--set", f"metric.data_root={real}", "--json", str(out),
                    "--no-progress"], check=True, capture_output=True)
    r = json.loads(out.read_text())["results"]
    return {"seconds": seconds, **{k: r[k] for k in ("kid", "precision", "recall", "digit_is", "digit_confidence")}}


def finish_axes(fig, axes, title: str) -> None:
    """The two panels' axes (KID on a log scale, recall) against network calls (log 2), the legend, the title."""
    for ax, key in zip(axes, ("KID (digit-classifier features; lower is better)", "recall (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network calls")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()


def plot(tables: list[str], out: str) -> None:
    """KID and recall against network calls, one line per process and sampler, from the JSON tables this
    script wrote (``--plot vp.json flow.json edm.json --out docs/processes.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for t in tables for r in json.loads(Path(t).read_text())]
    lines: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        lines.setdefault((r["process"], r["sampler"]), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    maps = {"vp": plt.cm.Blues, "flow": plt.cm.Greens, "edm": plt.cm.Oranges}  # a colour family per process
    for process in sorted({p for p, _ in lines}):
        samplers = sorted(s for p, s in lines if p == process)
        for i, sampler in enumerate(samplers):
            rs = sorted(lines[process, sampler], key=lambda r: r["calls"])
            colour = maps.get(process, plt.cm.Greys)(0.45 + 0.5 * i / max(1, len(samplers) - 1))
            style = {"vp": "-", "flow": "--", "edm": ":"}.get(process, "-.")
            marker = {"heun": "s", "euler": "o", "ddim": "^", "euler-ancestral": "D", "ddpm": "*"}.get(sampler, "v")
            for ax, key in zip(axes, ("kid", "recall")):
                ax.plot([r["calls"] for r in rs], [r[key] for r in rs], style, color=colour, marker=marker, ms=5,
                        label=f"{process} · {sampler}")
    finish_axes(fig, axes, "1,000 samples against 1,000 held-out MNIST test digits")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    if "--plot" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--plot", nargs="+", required=True, help="JSON tables written by this script")
        ap.add_argument("--out", default="processes.png")
        args = ap.parse_args()
        return plot(args.plot, args.out)
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="PROCESS=RUN_DIR ...")
    ap.add_argument("--real", required=True)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--calls", default="1,2,4,8,16,32")
    ap.add_argument("--extra", nargs="*", default=[], help="PROCESS:SAMPLER:STEPS rows beyond --calls")
    ap.add_argument("--out", default="processes.json")
    args = ap.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    plan = [(p, s, f(k), k) for p in runs for s, f in SAMPLERS[p].items()
            for k in map(int, filter(None, args.calls.split(","))) if f(k)]
    for item in args.extra:
        p, s, steps = item.split(":")
        calls = 2 * int(steps) - 1 if s in ("heun", "edm-sde") else int(steps)  # (their last step is Euler's)
        plan.append((p, s, int(steps), calls))
    for process, sampler, steps, calls in plan:
        res = evaluate(runs[process], sampler, steps, args.n, args.real, work)
        rows.append({"process": process, "sampler": sampler, "steps": steps, "calls": calls, **res})
        print(f"| {process} | {sampler} | {calls} | {res['kid']:.1f} | {res['precision']:.3f} | {res['recall']:.3f} | "
              f"{res['digit_is']:.2f} | {res['digit_confidence']:.3f} | {res['seconds']:.0f} |", flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
