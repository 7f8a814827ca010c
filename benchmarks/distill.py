"""Teacher against students (docs/distillation.md): the teacher run and each student from
``ddpmkit distill``, sampled at several numbers of network calls in one session and scored the same
way as the process comparison (benchmarks/processes.py): KID and precision/recall in the digit
classifier's feature space against held-out real test digits, digit-score IS beside them.

    python benchmarks/distill.py --teacher RUN --students reflow=STUDENT [progressive=STUDENT2 ...] \\
        --real REAL_DIR [-n 1000] [--calls 1,2,4] [--teacher-runs euler:4,euler:8,heun:8,heun:31] \\
        [--seeds 0] [--out distill.json]
    python benchmarks/distill.py --plot distill.json --out docs/distillation.png

A student is drawn with its own sampler (Euler) at each of --calls (a progressive student's
``stages/calls-K.safetensors`` where it has one: the stage distilled to K calls); the teacher with each SAMPLER:STEPS
of --teacher-runs (heun takes 2·steps − 1 calls). It prints the two ratios the distillation issue asks
for: the student's KID at 4 calls over the teacher's best KID at ≥ 50 calls, and the student's KID at
1 call over the teacher's best at ≤ 4 calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from processes import evaluate, finish_axes  # noqa: E402  (the same sampling, scoring and plot axes)


def plot(table: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(table).read_text())
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r["who"] if r["who"] != "teacher" else f"teacher · {r['sampler']}", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for label, rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: r["calls"])
        style = "--" if label.startswith("teacher") else "-"
        for ax, key in zip(axes, ("kid", "recall")):
            ax.plot([r["calls"] for r in rs], [r[key] for r in rs], style, marker="o", ms=5, label=label)
    finish_axes(fig, axes, f"{rows[0]['n']:,} samples against held-out MNIST test digits")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    if "--plot" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--plot", required=True)
        ap.add_argument("--out", default="distillation.png")
        args = ap.parse_args()
        return plot(args.plot, args.out)
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--students", nargs="*", default=[], help="NAME=STUDENT_DIR ...")
    ap.add_argument("--real", required=True)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--seeds", default="0", help="sampling seeds; each draws -n images, scored as one pool")
    ap.add_argument("--calls", default="1,2,4")
    ap.add_argument("--teacher-runs", default="euler:4,heun:2,euler:8,euler:64,heun:31")
    ap.add_argument("--out", default="distill.json")
    args = ap.parse_args()
    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    plan = [("teacher", args.teacher, s, int(k), 2 * int(k) - 1 if s == "heun" else int(k))
            for s, k in (item.split(":") for item in args.teacher_runs.split(","))]
    for name, path in (item.split("=", 1) for item in args.students):
        for k in map(int, args.calls.split(",")):
            stage = Path(path) / "stages" / f"calls-{k}.safetensors"  # progressive: the stage that ends in k calls
            plan.append((name, str(stage) if stage.exists() else path, "euler", k, k))
    rows = []
    print("| model | sampler | calls | KID | precision | recall | digit IS | seconds |")
    seeds = tuple(map(int, args.seeds.split(",")))
    for who, path, sampler, steps, calls in plan:
        (work / who).mkdir(exist_ok=True)
        res = evaluate(path, sampler, steps, args.n, args.real, work / who, seeds)
        rows.append({"who": who, "sampler": sampler, "steps": steps, "calls": calls, "n": args.n * len(seeds),
                     "seeds": list(seeds), **res})
        print(f"| {who} | {sampler} | {calls} | {res['kid']:.1f} | {res['precision']:.3f} | {res['recall']:.3f} | "
              f"{res['digit_is']:.2f} | {res['seconds']:.0f} |", flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    teacher = [r for r in rows if r["who"] == "teacher"]
    best_many = min((r["kid"] for r in teacher if r["calls"] >= 50), default=None)
    best_few = min((r["kid"] for r in teacher if r["calls"] <= 4), default=None)
    for who in dict.fromkeys(r["who"] for r in rows if r["who"] != "teacher"):
        mine = {r["calls"]: r["kid"] for r in rows if r["who"] == who}
        if best_many and 4 in mine:
            print(f"{who}: KID at 4 calls / teacher's best at >= 50 calls = {mine[4]:.1f} / {best_many:.1f} = "
                  f"{mine[4] / best_many:.2f} (goal <= 1.25)")
        if best_few and 1 in mine:
            print(f"{who}: KID at 1 call / teacher's best at <= 4 calls = {mine[1]:.1f} / {best_few:.1f} = "
                  f"{mine[1] / best_few:.2f} (goal < 1)")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
