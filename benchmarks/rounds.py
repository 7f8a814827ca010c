"""Alternating rounds, the measuring pattern every benchmark here uses: each round runs every row
once, back to back, so that a noisy machine slows all rows alike; the rows' results are then
compared by their medians (or minima). Also: a row's peak memory (CUDA or the CPU)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``); 0 where there is none."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def with_peak(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[Any, float]:
    """``(fn(), MiB)``: on CUDA the peak of ``max_memory_allocated`` during ``fn``; elsewhere how far
    the process's peak resident memory rose above its size before ``fn``.

    The CPU peak is reset to the current size first (Linux ``clear_refs``), so that rows run one
    after another in one process each get their own peak.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        return out, torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status_kib("VmRSS")
    out = fn()
    return out, (status_kib("VmHWM") - before) / 1024


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
