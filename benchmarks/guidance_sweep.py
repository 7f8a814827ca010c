"""Classifier-free guidance sweep: guidance weight W against conditional accuracy and digit-score IS.

    python benchmarks/guidance_sweep.py runs/cond --weights 0,1,2,3,5 -n 500 --steps 50 \
        --plot docs/images/guidance-sweep.png --grid docs/images/tiny-cond-samples.png

For each W it draws n samples in equal blocks of every class (DDIM with --steps network calls by
default; --sampler ddpm for Algorithm 2), scores them with ``digit-score`` given the classes asked
for, and prints one row: W, conditional accuracy, digit IS, mean confidence, seconds. The plot shows
the diversity–fidelity trade-off; the grid is 10 images of each class (rows) at the best W.
"""

from __future__ import annotations

import argparse
import time

import torch

import ddpmkit
from ddpmkit.sdk.evaluation import MetricContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--weights", default="0,1,2,3,5")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--grid", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    pipe = ddpmkit.load_checkpoint(args.run, device="cpu")
    if pipe.num_classes is None:
        raise SystemExit(f"{args.run} is not a class-conditional run")
    metric = ddpmkit.build("metric", "digit-score", device="cpu")
    options = {"steps": args.steps} if args.sampler != "ddpm" else {}
    labels = pipe.class_labels(args.n)
    rows = []
    print(f"{'W':>5} {'cond. accuracy':>15} {'digit IS':>9} {'confidence':>11} {'seconds':>8}")
    for w in [float(v) for v in args.weights.split(",")]:
        t0 = time.perf_counter()
        images = pipe.sample(args.n, seed=args.seed, sampler=args.sampler, sampler_options=options,
                             class_labels=labels, guidance=w)
        seconds = time.perf_counter() - t0
        scores = metric(images, context=MetricContext(labels=labels))
        rows.append({"guidance": w, "seconds": seconds, **scores})
        print(f"{w:5.1f} {scores['digit_conditional_accuracy']:15.3f} {scores['digit_is']:9.3f} "
              f"{scores['digit_confidence']:11.3f} {seconds:8.1f}", flush=True)
    best = max(rows, key=lambda r: (r["digit_conditional_accuracy"], r["digit_is"]))
    print(f"best W = {best['guidance']}: conditional accuracy {best['digit_conditional_accuracy']:.3f}, "
          f"digit IS {best['digit_is']:.3f} ({args.n} samples, {args.sampler} {options or ''})")
    if args.json:
        ddpmkit.sdk.files.write_json(args.json, {"run": args.run, "n": args.n, "sampler": args.sampler,
                                                  "options": options, "rows": rows, "best": best["guidance"]})
    if args.plot:
        plot(rows, args.plot, args.n)
    if args.grid:
        per_class = torch.arange(100) // 10
        images = pipe.sample(100, seed=args.seed, sampler=args.sampler, sampler_options=options,
                             class_labels=per_class, guidance=best["guidance"])
        ddpmkit.save_grid(images, args.grid, nrow=10)


def plot(rows: list[dict], path: str, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["guidance"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(w, [r["digit_conditional_accuracy"] for r in rows], "o-", label="conditional accuracy")
    ax.set_xlabel("guidance weight W"), ax.set_ylabel("conditional accuracy"), ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(w, [r["digit_is"] for r in rows], "s--", color="tab:orange", label="digit-score IS")
    ax2.set_ylabel("digit-score IS")
    fig.legend(loc="lower right"), ax.grid(alpha=0.3), ax.set_title(f"classifier-free guidance, {n} samples")
    fig.tight_layout()
    ddpmkit.sdk.files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
