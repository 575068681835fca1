"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this
module is importable as `common`).

`timed` measures one call in wall seconds (synchronising CUDA around it); `median_ms` warms up and
returns the median over repeated calls, using CUDA events on a GPU and, on a CPU, the wall clock or
the process CPU clock (steadier than wall time on a shared, loaded machine when one thread runs).
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    """(wall seconds, result) of one call of fn()."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median_ms(fn, device: torch.device, *, iters: int, warmup: int, cpu_clock: str = "wall") -> float:
    """Median milliseconds of fn() over `iters` calls after `warmup` calls."""
    clock = time.process_time if cpu_clock == "process" else time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e3)
    return statistics.median(times)
