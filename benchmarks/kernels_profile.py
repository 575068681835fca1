"""Profile N training steps of an lmforge model: top kernels by time share, plus a Chrome trace.

Builds `lmforge.model.Transformer` from a model preset, runs a few warm-up steps of AdamW on random
token batches (the data does not change which kernels run), then profiles `--steps` steps under
`torch.profiler` and prints the operators/kernels with the largest self time (device time on GPU,
CPU time otherwise) as a share of the total. Writes `trace.json` (open in chrome://tracing or
Perfetto) and `top_kernels.json` to `--out`.

    python benchmarks/kernels_profile.py --preset gpt2-small --batch 8 --seq 1024 --out runs/profile
    python benchmarks/kernels_profile.py --preset tiny --steps 2 --device cpu   # works anywhere

This is a script, not an `lmforge` command, because it reaches into the model (kernels sit below
the model in the stage order).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch


def profile_training(preset: str, overrides: list[str], *, steps: int, warmup: int, batch: int, seq: int,
                     device: str, out: str, top: int = 25) -> list[dict]:
    from lmforge.model import Transformer, get_preset

    t_start = time.perf_counter()

    def progress(what):  # flushed at once: a run cut off by a time limit still shows where it was
        print(f"[{time.perf_counter() - t_start:6.1f} s] {what}", flush=True)

    cfg = get_preset(preset, overrides)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    progress(f"built {preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) on {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext())
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step():
        with autocast:
            loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        progress(f"warm-up step {i + 1}/{warmup} done (the first compiles/autotunes kernels)")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    progress(f"profiled {steps} steps ({wall / steps * 1e3:.1f} ms/step)")
    os.makedirs(out, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out, "trace.json"))
    progress(f"wrote {os.path.join(out, 'trace.json')}")

    on_gpu = device == "cuda"
    events = prof.key_averages()

    def self_us(e):
        return (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if on_gpu \
            else e.self_cpu_time_total

    def is_row(e):
        if self_us(e) <= 0:
            return False
        # On GPU only the kernels themselves (device-side events): operator and annotation rows
        # also carry the device time of the kernels they launched, which would count it twice.
        return not on_gpu or (e.device_type == torch.autograd.DeviceType.CUDA
                              and not getattr(e, "is_user_annotation", False))

    rows = [(e.key, self_us(e), e.count) for e in events if is_row(e)]
    total = sum(t for _, t, _ in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    table = [{"name": name, "share": t / total, "time_ms_per_step": t / 1e3 / steps, "calls_per_step": c / steps}
             for name, t, c in rows[:top]]
    info = {"preset": preset, "overrides": overrides, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "batch": batch, "seq": seq, "steps": steps, "wall_s_per_step": wall / steps,
            "tokens_per_s": batch * seq * steps / wall, "date": time.strftime("%Y-%m-%d"),
            "timed": "self device time" if on_gpu else "self CPU time"}
    with open(os.path.join(out, "top_kernels.json"), "w") as f:
        json.dump({"info": info, "top": table}, f, indent=1)
    print(json.dumps(info), flush=True)
    print(f"{'share':>7} {'ms/step':>9} {'calls':>6}  kernel / op ({info['timed']})")
    for r in table:
        print(f"{100 * r['share']:6.1f}% {r['time_ms_per_step']:9.3f} {r['calls_per_step']:6.0f}  {r['name'][:90]}")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="model preset name or TOML path")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model config overrides")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="runs/profile")
    args = p.parse_args(argv)
    profile_training(args.preset, args.set, steps=args.steps, warmup=args.warmup, batch=args.batch,
                     seq=args.seq, device=args.device, out=args.out, top=args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
