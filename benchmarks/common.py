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

# Model shapes of the inference benchmarks (Llama layout: RMSNorm, RoPE, SwiGLU; random weights).
INFERENCE_SHAPES = {
    "tiny": dict(vocab_size=4096, context_length=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2),
    "llama124m": dict(vocab_size=32000, context_length=2048, d_model=768, n_layers=12, n_heads=12),
    # the TinyLlama 1.1B shape: 22 layers, GQA 32/4
    "llama1b": dict(vocab_size=32000, context_length=2048, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                    d_ff=5632),
}


def inference_device(threads: int | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of the inference benchmarks: CUDA in bf16 when present, else CPU in fp32 with
    `threads` intra-op threads; seeds torch with 0 so every script builds the same weights."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


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
