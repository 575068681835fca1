"""Data-parallel weak scaling: own bucketed DDP vs torch DDP vs the naive baseline, ZeRO-1 memory,
FSDP2 for a ~1B model, and how much all-reduce time hides behind backward. One command, one table.

Run on a 2-GPU machine (`nvidia-h100-x2`):
    python benchmarks/distributed_ddp.py --fsdp --out bench_ddp.json
It starts torchrun itself: a 1-process baseline, then 2-process runs of each variant, all in the same
invocation, with the same model, batch and step count (each launch in its own processes, with a
time limit; a failed launch is reported and the others still run). Per variant it reports tokens/s
per GPU, scaling efficiency = (tokens/s on N GPUs) / (N x tokens/s on 1 GPU), peak memory,
optimizer-state bytes per GPU (ZeRO-1 should halve it on 2 ranks), host syncs in one step (CUDA
sync-debug mode: a data-parallel variant should add none to the single-GPU count), and, from a
torch.profiler trace of 3 steps, the share of NCCL kernel time overlapped by compute kernels and
the NCCL time per step that is not (exposed).

Variants (GPT-2 small shape, vocab 50304, batch 32 x 1024 per GPU, bf16 autocast, own AdamW):
  single      1 GPU, no communication (the baseline)
  torch_ddp   torch.nn.parallel.DistributedDataParallel (bucket 25 MB, set_to_none zero_grad)
  ddp         lmforge BucketedDDP, zero_grad() zeroes the buckets (autograd accumulates into them)
  ddp_copy    lmforge BucketedDDP, optimizer zero_grad(set_to_none=True) as the Trainer does (each
              gradient is copied into its bucket once)
  naive       lmforge NaiveDDP (one blocking all-reduce per parameter after backward)
  zero1       lmforge ZeRO-1 around AdamW (+ bucketed DDP)
  zero2       (not in the default list) ZeRO-2: gradients reduced to their owner only
and, with --fsdp, the llama-1b preset at seq 1024 with activation checkpointing: 1 GPU (fp32
params, bf16 autocast) vs FSDP2 on 2 (bf16 params, fp32 master weights and reduction).
`--compile` compiles each transformer block separately (`block.compile()`) in every GPT-2 variant,
so gradient hooks still fire block by block during backward (a whole-model graph would hand all
gradients over at the end); the llama-1b rows stay eager.

`--smoke` runs tiny shapes on CPU with gloo to check the script (numbers meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ["torch_ddp", "ddp", "ddp_copy", "naive", "zero1"]


def build(preset: str, smoke: bool, device: torch.device):
    from lmforge.model import ModelConfig, Transformer, get_preset

    if smoke:
        cfg = ModelConfig(vocab_size=211, context_length=64, d_model=48, n_layers=2, n_heads=3, d_ff=96)
    else:
        cfg = get_preset(preset)
        if preset == "gpt2-small":  # GPT-2's vocab padded to a multiple of 64, as nanoGPT does
            cfg = dataclasses.replace(cfg, vocab_size=50304)
    torch.manual_seed(0)
    return Transformer(cfg).to(device), cfg


def overlap_share(prof, steps: int) -> dict:
    """Share of communication kernel time (NCCL) during which a compute kernel also runs."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    comm = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    comp = sorted((e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower())
    merged: list[list[float]] = []
    for s, e in comp:  # union of compute intervals
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    total = sum(e - s for s, e in comm)
    hidden = 0.0
    for s, e in comm:
        for ms, me in merged:
            hidden += max(0.0, min(e, me) - max(s, ms))
    return {"comm_us": total, "hidden_us": hidden, "overlap": hidden / total if total else None,
            "exposed_comm_ms": (total - hidden) / 1000 / steps}


def count_host_syncs(step) -> int | None:
    """Host<->device synchronizations during one call of step() (CUDA sync-debug mode), or None
    when they cannot be counted. One deliberate sync calibrates that warnings are seen at all."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.ones(1, device="cuda").item()  # the calibration sync
        finally:
            torch.cuda.set_sync_debug_mode("default")
    n = sum("synchroniz" in str(w.message) for w in caught)
    return n - 1 if n >= 1 else None


def worker(args) -> None:
    """One process of a torchrun job: train `args.steps` steps of `args.variant`; rank 0 writes JSON."""
    import torch.distributed as dist

    from lmforge.distributed import apply_ddp, apply_zero, init_distributed
    from lmforge.train.optim import build_optimizer
    from lmforge.train.trainer import apply_activation_checkpointing

    env = init_distributed(device="cpu" if args.smoke else "cuda")
    device = env.device
    model, cfg = build(args.preset, args.smoke, device)
    variant = args.variant
    if args.activation_checkpointing and variant != "fsdp":  # fsdp: apply_fsdp does it before sharding
        apply_activation_checkpointing(model)
    if args.compile:
        for block in model.blocks:
            block.compile()
    reducer, step_model = None, model
    opt = build_optimizer(model, "adamw", lr=1e-4, vocab_size=cfg.vocab_size)
    zero_grad = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    if variant == "fsdp":
        from lmforge.distributed.fsdp import apply_fsdp

        apply_fsdp(model, param_dtype=None if args.smoke else "bf16",
                   activation_checkpointing=args.activation_checkpointing)
        opt = build_optimizer(model, "adamw", lr=1e-4, vocab_size=cfg.vocab_size)
    elif variant == "torch_ddp":
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if args.smoke else [device])
    elif variant in ("ddp", "ddp_copy", "naive"):
        reducer = apply_ddp(model, bucket_mb=args.bucket_mb, naive=variant == "naive")
        if variant == "ddp":
            zero_grad = reducer.zero_grad
    elif variant in ("zero1", "zero2"):
        reducer, opt = apply_zero(model, opt, stage=int(variant[-1]), bucket_mb=args.bucket_mb)
        zero_grad = reducer.zero_grad
    elif variant != "single":
        raise SystemExit(f"unknown variant {variant!r}")
    g = torch.Generator(device="cpu").manual_seed(env.rank)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = (contextlib.nullcontext() if args.smoke
                else torch.autocast("cuda", dtype=torch.bfloat16))

    def step():
        zero_grad()
        with autocast:
            loss = step_model(inputs, targets).loss
        loss.backward()
        if reducer is not None:
            reducer.finish()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if env.world_size > 1:
            dist.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    host_syncs = count_host_syncs(step) if device.type == "cuda" else None
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    result = {"variant": variant, "world_size": env.world_size, "preset": args.preset,
              "tokens_per_s_per_gpu": args.batch * args.seq * args.steps / seconds,
              "step_ms": 1000 * seconds / args.steps,
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
              "optimizer_state_gb": _state_bytes(opt) / 1e9, "host_syncs_per_step": host_syncs}
    if args.profile and device.type == "cuda" and env.world_size > 1:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync()
        result.update(overlap_share(prof, 3))
    if env.is_main:
        Path(args.result).write_text(json.dumps(result))
    if env.world_size > 1:
        dist.destroy_process_group()


def _state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                t = v.to_local() if hasattr(v, "to_local") else v
                total += t.numel() * t.element_size()
    return total


def launch(args, variant: str, nproc: int, preset: str, batch: int, steps: int, ac: bool = False) -> dict:
    """One torchrun job; its result row, or a row with "error" (a failure never stops the others)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--variant", variant, "--preset", preset, "--batch", str(batch),
               "--seq", str(args.seq), "--steps", str(steps), "--warmup", str(args.warmup),
               "--bucket-mb", str(args.bucket_mb), "--result", str(result)]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--compile"] if args.compile and preset == args.preset else []
        cmd += ["--profile"] if args.profile else ["--no-profile"]
        cmd += ["--activation-checkpointing"] if ac else []
        root = str(Path(__file__).resolve().parent.parent)  # lmforge importable without an install
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        if args.smoke:
            env["OMP_NUM_THREADS"] = "1"
        row = {"variant": variant, "world_size": nproc, "preset": preset}
        try:
            subprocess.run(cmd, check=True, env=env, timeout=args.launch_timeout)
            return json.loads(result.read_text())
        except subprocess.CalledProcessError as e:
            return {**row, "error": f"exit status {e.returncode} (its output is above)"}
        except subprocess.TimeoutExpired:
            return {**row, "error": f"timed out after {args.launch_timeout:.0f} s (--launch-timeout)"}
        except (OSError, ValueError) as e:  # no or unreadable result file
            return {**row, "error": f"{type(e).__name__}: {e}"[:200]}


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'preset':<11} {'variant':<10} {'GPUs':>4} {'tok/s/GPU':>11} {'scaling':>8} {'step ms':>8} "
          f"{'peak GB':>8} {'opt GB':>7} {'syncs':>5} {'overlap':>8} {'exposed':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<11} {r['variant']:<10} {r['world_size']:>4} FAILED: {r['error']}")
            continue
        ov, ex, hs = r.get("overlap"), r.get("exposed_comm_ms"), r.get("host_syncs_per_step")
        print(f"{r['preset']:<11} {r['variant']:<10} {r['world_size']:>4} {r['tokens_per_s_per_gpu']:>11.0f} "
              f"{r['efficiency']:>8.1%} {r['step_ms']:>8.1f} {r['peak_mem_gb'] or 0:>8.2f} "
              f"{r['optimizer_state_gb']:>7.3f} {'' if hs is None else hs:>5} "
              f"{'' if ov is None else f'{ov:.1%}':>8} {'' if ex is None else f'{ex:.2f}ms':>8}")


def summary(rows: list[dict]) -> list[str]:
    """The comparisons the issue asks for, in words."""
    ok = {(r["preset"], r["variant"]): r for r in rows if "error" not in r}
    lines = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        torch_ddp = ok.get((preset, "torch_ddp"))
        for v in ("ddp", "ddp_copy", "zero1", "zero2"):
            r = ok.get((preset, v))
            if r and torch_ddp:
                lines.append(f"{preset} {v}: {r['tokens_per_s_per_gpu'] / torch_ddp['tokens_per_s_per_gpu']:.3f}x "
                             f"torch DDP tokens/s, scaling {r['efficiency']:.1%} (torch DDP {torch_ddp['efficiency']:.1%})")
        plain = ok.get((preset, "ddp")) or ok.get((preset, "ddp_copy"))
        z1 = ok.get((preset, "zero1"))
        if plain and z1:
            lines.append(f"{preset} optimizer state per GPU: {plain['optimizer_state_gb']:.3f} GB without ZeRO-1, "
                         f"{z1['optimizer_state_gb']:.3f} GB with ({z1['optimizer_state_gb'] / plain['optimizer_state_gb']:.1%})")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="single")
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--compile", action="store_true", help="compile each block (GPT-2 rows)")
    p.add_argument("--profile", action="store_true", default=True)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated 2-GPU variants to run")
    p.add_argument("--fsdp", action="store_true", help="also the llama-1b preset: 1 GPU vs FSDP2")
    p.add_argument("--fsdp-batch", type=int, default=8)
    p.add_argument("--fsdp-steps", type=int, default=10)
    p.add_argument("--fsdp-only", action="store_true", help="only the llama-1b rows (implies --fsdp)")
    p.add_argument("--launch-timeout", type=float, default=240, help="seconds per torchrun launch")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU/gloo: checks the script only")
    p.add_argument("--out", default="bench_distributed_ddp.json")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup, args.profile = 4, 32, 3, 1, False
        args.fsdp_batch, args.fsdp_steps = 4, 2
    device = ("cpu (smoke)" if args.smoke else f"{torch.cuda.get_device_name(0)} x{args.nproc}, torch {torch.__version__}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
    header = f"device: {device}; batch {args.batch} x {args.seq} per GPU, {args.steps} timed steps"
    rows: list[dict] = []

    def add(row: dict, base: dict | None) -> None:
        if "error" not in row:
            ok = base is not None and "error" not in base
            row["efficiency"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if ok else float("nan")
        rows.append(row)
        print_table([row], f"-- {row['preset']} {row['variant']}")  # partial results survive a time-out
        Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2))

    if not args.fsdp_only:
        base = launch(args, "single", 1, args.preset, args.batch, args.steps)
        add(base, base)
        for v in [v for v in args.variants.split(",") if v]:
            add(launch(args, v, args.nproc, args.preset, args.batch, args.steps), base)
    if args.fsdp or args.fsdp_only:
        preset = "llama-1b"
        base1b = launch(args, "single", 1, preset, args.fsdp_batch, args.fsdp_steps, ac=True)
        add(base1b, base1b)
        add(launch(args, "fsdp", args.nproc, preset, args.fsdp_batch, args.fsdp_steps, ac=True), base1b)
    print()
    print_table(rows, header)
    for line in summary(rows):
        print(line)


if __name__ == "__main__":
    main()
