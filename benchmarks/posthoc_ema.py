"""Quality against post-hoc EMA length (docs/benchmarks.md): plots what ``ddpmkit ema RUN --sigma-rel ...
--metric digit-judges,kid,precision-recall`` wrote into each RUN/ema.json, one line per run.

    ddpmkit run --preset laptop-vp --posthoc-ema --out vp
    ddpmkit ema vp --sigma-rel 0.02,0.04,0.06,0.08,0.10,0.15,0.20 -n 500 --metric digit-judges,kid,precision-recall \\
        --set metric.mnist_root=../shared/data/mnist --set metric.dataset=image-folder --set metric.data_root=real1000
    python benchmarks/posthoc_ema.py vp [flow ...] --out docs/posthoc-ema.png

It also prints the table (markdown), one row per run and length.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories with an ema.json (or LABEL=RUN)")
    ap.add_argument("--out", default="posthoc-ema.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("cnn_is_ratio", "digit-cnn IS / real"), ("resnet_is_ratio", "ResNet IS / real"), ("kid", "KID (digit-cnn features)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.8))
    print("| run | σ_rel | digit-cnn IS ratio | ResNet IS ratio | digit-cnn conf. ratio | ResNet conf. ratio | KID | recall |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for item in args.runs:
        label, _, run = item.rpartition("=")
        label = label or Path(run).name
        rows = sorted(json.loads((Path(run) / "ema.json").read_text())["lengths"], key=lambda r: r["sigma_rel"])
        for r in rows:
            res = r["results"]
            print(f"| {label} | {r['sigma_rel']:.3f} | {res['cnn_is_ratio']:.3f} | {res['resnet_is_ratio']:.3f} | "
                  f"{res['cnn_confidence_ratio']:.3f} | {res['resnet_confidence_ratio']:.3f} | {res['kid']:,.0f} | "
                  f"{res.get('recall', float('nan')):.3f} |")
        for ax, (key, _title) in zip(axes, keys):
            ax.plot([r["sigma_rel"] for r in rows], [r["results"][key] for r in rows], marker="o", label=label)
    for ax, (key, title) in zip(axes, keys):
        ax.set_xlabel("post-hoc EMA length σ_rel")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key.endswith("ratio"):
            ax.axhline(0.9, color="grey", ls=":", lw=1)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
