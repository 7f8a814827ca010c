"""Alternating rounds, the measuring pattern every benchmark here uses: each round runs every row
once, back to back, so that a noisy machine slows all rows alike; the rows' results are then
compared by their medians (or minima)."""

from __future__ import annotations

import time
from typing import Any, Callable


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``fn()``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(rows: dict[str, Callable[[], Any]], rounds: int, measure: Callable[[Callable[[], Any]], Any] = seconds,
              show: Callable[[Any], str] = lambda v: f"{v:.1f} s", label: str = "round") -> dict[str, list[Any]]:
    """``measure(row)`` for every row, ``rounds`` times in alternation; prints a line per round
    (each value through ``show``) and returns every row's values in order."""
    results: dict[str, list[Any]] = {name: [] for name in rows}
    for r in range(rounds):
        for name, fn in rows.items():
            results[name].append(measure(fn))
        print(f"{label} {r + 1}: " + ", ".join(f"{k} {show(v[-1])}" for k, v in results.items()), flush=True)
    return results
