"""Sample quality against network calls: every sampler at a few step counts, DDPM-1000 as reference.

    python benchmarks/fast_samplers.py runs/laptop -n 500 --calls 5,10,15,20,25,50 \
        --plot docs/images/fast-samplers.png --json fast-samplers.json

On one checkpoint, for each sampler and each number of network calls, draws n samples (the same
seed for every row), scores them with ``digit-score`` and prints: sampler, steps, network calls,
digit IS, mean confidence, IS as a share of DDPM-1000's, seconds per image. All rows run side by
side in one process, so the seconds compare. ``heun`` makes 2·steps − 1 calls: it gets the steps
whose calls come nearest (not above) each target. The plot is IS against calls, one line per sampler.
"""

from __future__ import annotations

import argparse
import time

import ddpmkit

SAMPLERS = ("ddim", "dpm-solver++", "unipc", "heun", "euler-ancestral")


def steps_for(sampler: str, calls: int) -> int:
    return max(1, (calls + 1) // 2) if sampler == "heun" else calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--calls", default="5,10,15,20,25,50")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip DDPM-1000 (then no ratio column)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    pipe = ddpmkit.load_checkpoint(args.run, device="cpu")
    metric = ddpmkit.build("metric", "digit-score", device="cpu")
    rows: list[dict] = []

    def measure(sampler: str, options: dict) -> dict:
        t0 = time.perf_counter()
        images = pipe.sample(args.n, seed=args.seed, sampler=sampler, sampler_options=options)
        seconds = time.perf_counter() - t0
        built, _ = ddpmkit.run.assembly.build_sampler(sampler, options, pipe.diffusion)
        scores = metric(images)
        row = {"sampler": sampler, "steps": options.get("steps", built.num_steps), "calls": built.num_steps,
               "digit_is": scores["digit_is"], "digit_confidence": scores["digit_confidence"],
               "s_per_image": seconds / args.n}
        rows.append(row)
        ref = rows[0]["digit_is"] if not args.no_reference else None
        share = f"{100 * row['digit_is'] / ref:6.1f}%" if ref else "      "
        print(f"{sampler:>16} {row['steps']:6d} {row['calls']:6d} {row['digit_is']:9.3f} "
              f"{row['digit_confidence']:11.3f} {share} {row['s_per_image']:10.4f}", flush=True)
        return row

    print(f"{'sampler':>16} {'steps':>6} {'calls':>6} {'digit IS':>9} {'confidence':>11} {'of ref':>7} {'s/image':>10}")
    if not args.no_reference:
        measure("ddpm", {})
    for sampler in args.samplers.split(","):
        for calls in [int(c) for c in args.calls.split(",")]:
            measure(sampler, {"steps": steps_for(sampler, calls)})
    if args.json:
        ddpmkit.sdk.files.write_json(args.json, {"run": args.run, "n": args.n, "seed": args.seed, "rows": rows})
    if args.plot:
        plot(rows, args.plot, args.n)


def plot(rows: list[dict], path: str, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for name in dict.fromkeys(r["sampler"] for r in rows if r["sampler"] != "ddpm"):
        mine = [r for r in rows if r["sampler"] == name]
        ax.plot([r["calls"] for r in mine], [r["digit_is"] for r in mine], "o-", label=name)
    for r in rows:
        if r["sampler"] == "ddpm":
            ax.axhline(r["digit_is"], color="k", ls="--", lw=1, label=f"ddpm, {r['calls']} calls")
            ax.axhline(0.98 * r["digit_is"], color="k", ls=":", lw=1, label="98 % of ddpm")
    ax.set_xscale("log"), ax.set_xlabel("network calls"), ax.set_ylabel("digit-score IS")
    ax.set_title(f"quality against network calls, {n} samples"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    ddpmkit.sdk.files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
