"""Inception Score on N 32×32 images: ddpmkit's metric vs torchmetrics' InceptionScore, same network.

Both get the same InceptionV3 (timm's architecture and the same weights: a local file, else
random weights, which cost the same to run) and the same images; they run alternately, so the
ratio holds on a noisy machine. torchmetrics runs the network as a user hands it over
(``feature=``, NCHW); ddpmkit runs it its own way (inference mode, channels-last).
Goal: ddpmkit ≤ 1.0× torchmetrics' time.

    python benchmarks/inception_score_speed.py [-n 2000] [--rounds 2] [--weights FILE]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from rounds import alternate  # benchmarks/rounds.py

import ddpmkit
from ddpmkit.sdk.metrics import SeedInception


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", default=None, help="timm inception_v3 weights file (default: random weights)")
    args = p.parse_args()
    from torchmetrics.image.inception import InceptionScore

    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.n, 3, 32, 32, generator=g) * 2 - 1
    options = {"weights": args.weights} if args.weights else {"pretrained": False}
    ours = ddpmkit.build("metric", "inception-score", {**options, "batch_size": args.batch_size}, device="cpu")
    plain = SeedInception(args.weights, pretrained=False, channels_last=False)
    plain.net.load_state_dict(ours.backbone.net.state_dict())  # the same weights
    plain.eval()

    class Logits(torch.nn.Module):  # the same network, as a torchmetrics user passes it
        def forward(self, x):
            return plain(x)[1]

    def run_ours():
        return ours(images)["inception_score"]

    def run_torchmetrics():
        tm = InceptionScore(feature=Logits(), splits=10)
        with torch.inference_mode():
            for i in range(0, args.n, args.batch_size):
                tm.update(images[i:i + args.batch_size])
            return tm.compute()[0].item()

    times = alternate({"ddpmkit": run_ours, "torchmetrics": run_torchmetrics}, args.rounds)
    mo, mt = statistics.median(times["ddpmkit"]), statistics.median(times["torchmetrics"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} images 32×32 → 299×299, "
          f"batch {args.batch_size}")
    print(f"median: ddpmkit {mo:.1f} s, torchmetrics {mt:.1f} s, ratio ddpmkit/torchmetrics = {mo / mt:.3f}")


if __name__ == "__main__":
    main()
