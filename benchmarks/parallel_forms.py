"""Model parallelism on 2 GPUs: tensor, pipeline, context (ring) and expert parallelism against data
parallelism on the same model, in one command and one table.

Written for `nvidia-h100-x2`:
    python benchmarks/parallel_forms.py --out bench_parallel.json
It starts ONE torchrun with 2 processes (process start-up and NCCL set-up once) and runs every
variant in turn, freeing memory between them; single-GPU variants run on rank 0 while rank 1 waits.
Same model, batch and step count for every variant of a form; per variant: tokens/s per GPU, step
time, peak memory per GPU (the larger of the two), the ratio to the form's baseline, plus:
  single / dp   one GPU, and torch DistributedDataParallel (the strongest data-parallel baseline),
                batch B per GPU (global 2B): the baseline of tp and pp
  tp            apply_tp (heads, MLP, vocabulary, sequence parallel) over 2 GPUs, batch B per TP
                group (TP splits the model, not the batch)
  tp_layer      one wide MLP layer (d → 4d → d, column- then row-parallel) forward+backward, 1 GPU vs
                TP on 2: the TP speed-up
  pp_*          PipelineStage + run_pipeline: GPipe, 1F1B and interleaved 1F1B (2 chunks per GPU),
                global batch 2B in m micro-batches: measured bubble (1 − busy/wall, CUDA events) of
                each stage next to (p − 1)/(v·m + p − 1) and to `simulate` with the measured per-stage
                forward/backward times (what the schedule gives unequal stages with free
                communication); `pp_1f1b_before` runs the run_pipeline of --pipeline-before (the code
                before a change) in the same run; `*_balanced` use a layer split chosen from
                pp_1f1b's measured per-stage costs (the last stage also runs the head and the loss)
  cp_*          causal attention forward+backward at a context whose score matrices do not fit one
                80 GB GPU: `cp_sdpa` (1 GPU, PyTorch's SDPA, O(T) memory: the speed reference; its
                backend in the row), `cp_sdpa_flash` (SDPA held to FlashAttention-2), `cp_before` (the
                ring of --ring-before, same run), `cp` (the ring, FlashAttention-2 blocks on a
                GPU), `cp_cudnn` (the ring, cuDNN blocks: its default on Hopper), `cp_torch` (PyTorch's own
                experimental context_parallel, its default all-gather rotation; form `cp_torch`, run it
                last), `cp_gqa*` (8 query
                heads, 2 kv heads: SDPA with enable_gqa vs the ring passing the 2 kv heads, flash and
                cuDNN blocks).
                The ring rows also report the largest error of out/dQ/dK/dV (full sequence, random
                dout) against fp32 SDPA on one device, next to the same error of bf16 SDPA (`err_*`
                and `sdpa_err_*`). `--profile`: the ring rows add a per-step breakdown from the
                profiler (device ms per kernel kind on a GPU; host ms per ring label: on CPU that is
                where the time goes). `--forms cp_ref`: the fp32 block-math rows (1 GPU: out of
                memory; ring over 2 GPUs)
  ep_*          one MoE layer: every GPU holding every expert (DDP) vs expert parallel (all-to-all);
                `a2a_share` is the share of the EP step spent in the all-to-alls (device syncs
                around them, so that time is their own)
`--forms` picks a subset (in this order: cp last, as it fills most of a GPU). Results are saved after
every variant, so a failure late in the run still reports the earlier rows.
`--smoke` runs tiny shapes on CPU with gloo (checks the script; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

FORMS = ["dp", "tp", "tp_layer", "pp", "ep", "cp"]  # cp last: it fills most of the memory
VARIANTS = {  # form -> [(variant, GPUs)]
    "dp": [("single", 1), ("dp", 2)],
    "tp": [("tp", 2)],
    "tp_layer": [("tp_layer_1gpu", 1), ("tp_layer", 2)],
    "pp": [("pp_gpipe", 2), ("pp_1f1b", 2), ("pp_interleaved", 2), ("pp_1f1b_before", 2),
           ("pp_1f1b_balanced", 2), ("pp_interleaved_balanced", 2)],
    "cp": [("cp_sdpa", 1), ("cp_sdpa_flash", 1), ("cp_before", 2), ("cp", 2), ("cp_cudnn", 2),
           ("cp_gqa_sdpa", 1), ("cp_gqa", 2), ("cp_gqa_cudnn", 2)],
    "cp_torch": [("cp_torch", 2)],  # an experimental API: its own form, run it last
    "cp_ref": [("cp_reference", 1), ("cp_ring_reference", 2)],
    "ep": [("ep_dp", 2), ("ep", 2)],
}
BASELINE = {"tp": "dp", "dp": "single", "tp_layer": "tp_layer_1gpu", "ep": "ep_dp", "cp_gqa": "cp_gqa_sdpa",
            "cp_gqa_cudnn": "cp_gqa_sdpa",
            **{v: "dp" for v, _ in VARIANTS["pp"]},
            **{v: "cp_sdpa" for v, _ in VARIANTS["cp"] + VARIANTS["cp_ref"] + VARIANTS["cp_torch"]
               if v not in ("cp_sdpa", "cp_gqa_sdpa") and not v.startswith("cp_gqa")}}
BEFORE: dict = {}  # "ring" / "pipeline" -> a module of the code before a change (--ring-before / --pipeline-before)
PP_COSTS: dict = {}  # per-stage forward/backward ms per micro-batch measured by pp_1f1b, for the balanced split


def _cfg(args):
    from lmforge.model import ModelConfig

    if args.smoke:
        return ModelConfig(vocab_size=211, context_length=args.seq, d_model=192, n_layers=4, n_heads=6,
                           d_ff=512, attention_backend="sdpa")
    # ~1.8B parameters: fp32 weights + AdamW state + grads ≈ 29 GB on one GPU
    return ModelConfig(vocab_size=50304, context_length=args.seq, d_model=4096, n_layers=8, n_heads=32,
                       n_kv_heads=8, attention_backend="sdpa")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, args, device, after_warmup=None) -> float:
    """Mean seconds per call of `step` after warm-up."""
    for _ in range(args.warmup):
        step()
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / args.steps


def _batch(args, rows, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _cfg(args).vocab_size, (rows, args.seq + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _model(cfg, device):
    from lmforge.model import Transformer

    torch.manual_seed(0)
    with torch.device(device):  # built and initialised on the GPU (fast), then split
        return Transformer(cfg)


def _adamw(params, device):
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")


def _cp_errors(q, k, v, kernel, device, rank, world, ring_fn) -> dict:
    """Largest |error| of the ring's out, dQ, dK, dV (whole sequence, random dout) against fp32 SDPA,
    and of SDPA in the inputs' dtype against the same reference (the error to expect from the dtype)."""
    from lmforge.distributed.ring_attention import unshard_sequence

    gqa = q.shape[1] != k.shape[1]
    g = torch.Generator(device=device).manual_seed(100 + rank)
    dout = torch.randn(q.shape, device=device, dtype=q.dtype, generator=g)
    for t in (q, k, v):
        t.grad = None
    ring_fn(q, k, v, causal=True, kernel=kernel).backward(dout)

    def whole(x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
        return unshard_sequence(parts, 2)

    full = [whole(t) for t in (q, k, v)]
    dout_full = whole(dout)
    ring = {"dq": whole(q.grad), "dk": whole(k.grad), "dv": whole(v.grad)}
    with torch.no_grad():
        ring["out"] = whole(ring_fn(q, k, v, causal=True, kernel=kernel))

    def grads(xs, dout):  # out and input gradients of SDPA (causal) on the whole sequence
        xs = [t.detach().clone().requires_grad_() for t in xs]
        rep = xs[0].shape[1] // xs[1].shape[1]  # GQA: kv heads repeated inside autograd (dK/dV summed
        kv = [t.repeat_interleave(rep, 1) if gqa else t for t in xs[1:]]  # back); fp32 SDPA has no native GQA
        o = torch.nn.functional.scaled_dot_product_attention(xs[0], *kv, is_causal=True)
        o.backward(dout)
        return {"out": o.detach(), "dq": xs[0].grad, "dk": xs[1].grad, "dv": xs[2].grad}

    want = grads([t.float() for t in full], dout_full.float())
    same_dtype = grads(full, dout_full)
    errs = {}
    for prefix, got in (("err", ring), ("sdpa_err", same_dtype)):
        for key in ("out", "dq", "dk", "dv"):
            errs[f"{prefix}_{key}"] = (got[key].float() - want[key]).abs().max().item()
    return errs


def _stage_stats(results, n_micro, world, device) -> list[list[float]]:
    """[bubble, forward ms, backward ms per micro-batch (all its chunks)] of every stage, averaged
    over the timed steps, gathered from every rank."""
    def per_micro(kind):
        return 1e3 * sum(b - a for r in results for k, _, _, a, b in r.timeline if k == kind) / len(results) / n_micro

    mine = torch.tensor([sum(r.bubble for r in results) / len(results), per_micro("F"), per_micro("B")],
                        dtype=torch.float64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [p.tolist() for p in parts]


def _balanced_split(n_layers: int, p: int, v: int, f_ms: list[float], b_ms: list[float], even: list[int]) -> list[int]:
    """Layers per virtual stage that minimise the slowest rank's cost, from a measured run with the
    `even` split: a layer costs stage 0's time per layer (its embedding is cheap), and the last stage's
    excess over its layers is the head + loss, which stays with the last virtual stage."""
    per_layer = (f_ms[0] + b_ms[0]) / sum(even[0::p])
    head = max(0.0, (f_ms[-1] + b_ms[-1]) - per_layer * sum(even[p - 1::p]))

    def compositions(n, k):
        if k == 1:
            yield [n]
            return
        for first in range(1, n - k + 2):
            for rest in compositions(n - first, k - 1):
                yield [first] + rest

    def cost(split):
        ranks = [per_layer * sum(split[r::p]) for r in range(p)]
        ranks[-1] += head
        return max(ranks), max(split[:-1] + [split[-1] + head / per_layer])

    return min(compositions(n_layers, p * v), key=cost)


def _pp_variant(name, args, device, rank, world, cfg) -> dict:
    from lmforge.distributed.pipeline import (
        PipelineStage,
        bubble_formula,
        run_pipeline,
        simulate,
        split_layers,
    )

    schedule = "interleaved" if "interleaved" in name else name.split("_")[1]
    virtual = 2 if schedule == "interleaved" else 1
    split = None
    if name.endswith("_balanced"):
        if "f_ms" not in PP_COSTS:
            return {"error": "needs pp_1f1b first (its measured stage costs)"}
        even = [len(r) for r in split_layers(cfg.n_layers, world * virtual)]
        split = _balanced_split(cfg.n_layers, world, virtual, PP_COSTS["f_ms"], PP_COSTS["b_ms"], even)
    runner = run_pipeline
    if name.endswith("_before"):
        if "pipeline" not in BEFORE:
            return {"error": "no --pipeline-before given"}
        runner = BEFORE["pipeline"].run_pipeline
    stage = PipelineStage(_model(cfg, device), rank, world, virtual=virtual, split=split)
    opt = _adamw(stage.parameters(), device)
    rows = world * args.batch  # the data-parallel baseline's global batch
    x, y = _batch(args, rows, device)
    results = []

    def step():
        with _autocast(device):
            results.append(runner(stage, x, y, args.micro, schedule))
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = _timed(step, args, device)
    timed = results[args.warmup:]
    stats = _stage_stats(timed, args.micro, world, device)
    f_ms, b_ms = [st[1] for st in stats], [st[2] for st in stats]
    if name == "pp_1f1b":
        PP_COSTS.update(f_ms=f_ms, b_ms=b_ms)
    sim = simulate(schedule, world, args.micro, f_ms, b_ms, virtual)
    row = {"tokens_per_s_per_gpu": rows * args.seq / s / world, "step_ms": 1e3 * s,
           "bubble": stats[0][0], "bubble_stages": [round(st[0], 4) for st in stats],
           "bubble_formula": bubble_formula(world, args.micro, virtual),
           "bubble_sim": [round(b, 4) for b in sim], "stage_f_ms": [round(t, 2) for t in f_ms],
           "stage_b_ms": [round(t, 2) for t in b_ms]}
    if split is not None:
        row["split"] = split
    return row


def _cp_variant(name, args, device, rank, world) -> dict:
    from lmforge.distributed.ring_attention import block_forward, resolve_kernel, ring_attention, sdpa_backend

    T, H, D = args.cp_seq, 8, 128
    hkv = 2 if name.startswith("cp_gqa") else H
    t_local = T // world
    g = torch.Generator(device=device).manual_seed(rank)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, H, t_local, D, device=device, dtype=dt, generator=g).requires_grad_()
    k, v = (torch.randn(1, hkv, t_local, D, device=device, dtype=dt, generator=g).requires_grad_() for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ring_fn, kernel = ring_attention, "reference" if name == "cp_ring_reference" else "auto"
    if name.endswith("_cudnn"):  # what "auto" picks on Hopper (AUTO_CUDNN)
        kernel = "cudnn_cuda" if device.type == "cuda" else "flash_cpu"  # (smoke: checks the script only)
    elif name in ("cp", "cp_gqa") and device.type == "cuda":
        kernel = "flash_cuda"
    if name == "cp_before":
        if "ring" not in BEFORE:
            return {"error": "no --ring-before given"}
        ring_fn = BEFORE["ring"].ring_attention
    ring = name in ("cp", "cp_cudnn", "cp_before", "cp_gqa", "cp_gqa_cudnn", "cp_ring_reference")
    row = {"context": T}
    if name == "cp_torch":
        return _cp_torch(args, device, world, T, H, D, dt)
    if name in ("cp_sdpa", "cp_sdpa_flash", "cp_gqa_sdpa"):
        row["backend"] = "flash" if name == "cp_sdpa_flash" else sdpa_backend(q, k, v, True)
    native_gqa = row.get("backend") in ("flash", "cudnn")  # else SDPA would repeat kv heads itself (or OOM)

    def step():
        if ring:
            out = ring_fn(q, k, v, causal=True, kernel=kernel)
        elif name == "cp_reference":  # the ring's block math on the whole sequence, one GPU
            out = block_forward(q, k, v, D ** -0.5, True)[0]
        elif name == "cp_sdpa_flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = sdpa(q, k, v, is_causal=True)
        elif hkv != H and not native_gqa:
            out = sdpa(q, k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1), is_causal=True)
        else:
            out = sdpa(q, k, v, is_causal=True, enable_gqa=hkv != H)
        out.float().sum().backward()

    s = _timed(step, args, device)
    row.update({"tokens_per_s_per_gpu": T / s / world, "step_ms": 1e3 * s})
    if device.type == "cuda":  # before the error check below, which holds the whole sequence in fp32
        row["timed_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if ring:
        row["kernel"] = resolve_kernel(q, k, v, True, kernel) if name != "cp_before" else "before"
        row.update(_cp_errors(q, k, v, kernel, device, rank, world, ring_fn))
        if args.profile:
            row["breakdown"] = _profile(step, device)
    return row


def _cp_torch(args, device, world, T, H, D, dt) -> dict:
    """PyTorch's own ring (torch.distributed.tensor.experimental.context_parallel, its default
    options: head-tail load balancing, all-gather rotation, the SDPA backend torch picks)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as e:
        return {"error": f"no torch context_parallel: {e}"}
    g = torch.Generator(device=device).manual_seed(0)  # the same full sequence on every rank
    full = [torch.randn(1, H, T, D, device=device, dtype=dt, generator=g) for _ in range(3)]
    mesh = init_device_mesh(device.type, (world,))
    try:
        with context_parallel(mesh, buffers=full, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(full)):
            q, k, v = (t.detach().requires_grad_() for t in full)  # this rank's shard now

            def step():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.float().sum().backward()

            s = _timed(step, args, device)
    except Exception as e:  # noqa: BLE001 (an experimental API: report, keep the other rows)
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"tokens_per_s_per_gpu": T / s / world, "step_ms": 1e3 * s, "context": T, "kernel": "torch_cp"}


def _profile(step, device, steps: int = 3) -> dict:
    """Per step: device ms by kernel kind (GPU) and host ms of each ring label (on CPU the ops run
    there, so these are the costs; on a GPU they are launch time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts):  # the first session in a process starts the profiler (~0.5 s)
        step()
        _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    out = {"profiled_step_ms": 1e3 * (time.perf_counter() - t0) / steps}
    kinds = {"attention_kernels": 0.0, "nccl_kernels": 0.0, "copy_fill": 0.0, "other_kernels": 0.0}
    for e in prof.key_averages():
        if e.key.startswith("ring."):
            out[f"host:{e.key}"] = round(e.cpu_time_total / 1e3 / steps, 3)
            continue
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0)
        if device.type != "cuda" or not dev or e.device_type.name != "CUDA":
            continue
        n = e.key.lower()
        kind = ("nccl_kernels" if "nccl" in n else
                "attention_kernels" if any(w in n for w in ("flash", "fmha", "cudnn", "sdpa", "attention")) else
                "copy_fill" if any(w in n for w in ("copy", "memcpy", "memset", "fill")) else "other_kernels")
        kinds[kind] += dev / 1e3 / steps
    if device.type == "cuda":
        out.update({k: round(v, 3) for k, v in kinds.items()})
        busy = kinds["attention_kernels"] + kinds["copy_fill"] + kinds["other_kernels"]
        out["compute_stream_idle_ms"] = round(out["profiled_step_ms"] - busy, 3)
    return out


def run_variant(name, args, device, rank, world) -> dict:
    cfg = _cfg(args)
    tokens = args.batch * args.seq
    if name in ("single", "dp"):
        model = _model(cfg, device)
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        opt = _adamw(model.parameters(), device)
        x, y = _batch(args, args.batch, device, seed=rank)

        def step():
            with _autocast(device):
                loss = model(x, y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        s = _timed(step, args, device)
        return {"tokens_per_s_per_gpu": tokens / s, "step_ms": 1e3 * s}
    if name == "tp":
        from lmforge.distributed.tensor_parallel import apply_tp, sync_tp_grads

        model = apply_tp(_model(cfg, device), sequence_parallel=True)
        opt = _adamw(model.parameters(), device)
        x, y = _batch(args, args.batch, device)  # the same batch on both TP ranks

        def step():
            with _autocast(device):
                loss = model(x, y).loss
            loss.backward()
            sync_tp_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)

        s = _timed(step, args, device)
        return {"tokens_per_s_per_gpu": tokens / s / world, "step_ms": 1e3 * s}
    if name.startswith("tp_layer"):  # one wide MLP (column- then row-parallel) on a long token batch
        from lmforge.distributed.tensor_parallel import RowParallelLinear, _CopyIn, _shard_rows
        from lmforge.model.layers import MLP

        d, f = cfg.d_model, 4 * cfg.d_model
        with torch.device(device):
            mlp = MLP(d, f)
        for lin in (mlp.gate, mlp.up, mlp.down):
            lin.reset_parameters(0.02)
        if world > 1:
            rows = torch.arange(rank * f // world, (rank + 1) * f // world)
            _shard_rows(mlp.gate, rows)
            _shard_rows(mlp.up, rows)
            mlp.down = RowParallelLinear(mlp.down, None, sequence_parallel=False)
        x = torch.randn(tokens, d, device=device, requires_grad=True)

        def step():
            with _autocast(device):
                h = _CopyIn.apply(x, None) if world > 1 else x
                mlp(h).float().square().mean().backward()

        s = _timed(step, args, device)
        return {"tokens_per_s_per_gpu": tokens / s / world, "step_ms": 1e3 * s}
    if name.startswith("pp"):
        return _pp_variant(name, args, device, rank, world, cfg)
    if name.startswith("cp"):
        return _cp_variant(name, args, device, rank, world)
    if name.startswith("ep"):
        from lmforge.distributed.expert_parallel import ExpertParallelMoE
        from lmforge.model.moe import MoE, MoEConfig

        mcfg = MoEConfig(n_experts=args.experts, top_k=2, d_expert=cfg.d_model // 2)
        torch.manual_seed(0)
        with torch.device(device):
            moe = MoE(cfg.d_model, mcfg)
            moe.reset_parameters(0.02)
        inner = None
        if name == "ep":
            moe = inner = ExpertParallelMoE.from_moe(moe)
            plain = moe._a2a

            def synced(*a):  # so the all-to-all's time is its own, not the queued kernels before it
                _sync(device)
                out = plain(*a)
                _sync(device)
                return out

            moe._a2a = synced
        elif world > 1:
            moe = torch.nn.parallel.DistributedDataParallel(moe)
        x = torch.randn(args.batch, args.seq, cfg.d_model, device=device, requires_grad=True)

        def step():
            with _autocast(device):
                y, aux, _ = moe(x)
            (y.float().square().mean() + sum(aux.values())).backward()

        s = _timed(step, args, device, after_warmup=lambda: setattr(inner, "comm_s", 0.0) if inner else None)
        row = {"tokens_per_s_per_gpu": tokens / s, "step_ms": 1e3 * s}
        if inner is not None:
            row["a2a_share"] = inner.comm_s / (args.steps * s)
        return row
    raise SystemExit(f"unknown variant {name}")


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device) -> float | None:
    """The larger peak of the two GPUs (every rank must call it)."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


def worker(args) -> None:
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    device = torch.device("cpu")
    if not args.smoke and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    for key, path in (("ring", args.ring_before), ("pipeline", args.pipeline_before)):
        if path:  # the module as it was before a change, for a before/after in the same run
            import importlib.util

            spec = importlib.util.spec_from_file_location(f"before_{key}", path)
            BEFORE[key] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look there)
            spec.loader.exec_module(BEFORE[key])
    rows = []
    for form in args.forms.split(","):
        for name, gpus in VARIANTS[form]:
            _free(device)
            dist.barrier()
            t0 = time.perf_counter()
            row = {"form": name, "gpus": gpus}
            if gpus == world or rank == 0:
                try:
                    row.update(run_variant(name, args, device, rank, gpus))
                except torch.cuda.OutOfMemoryError:
                    if gpus > 1:
                        raise  # the other rank would wait in a collective forever
                    row["error"] = "out of memory"
                except (RuntimeError, ValueError, TypeError) as e:  # e.g. a kernel this torch lacks: the
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"  # same on every rank, so go on
            dist.barrier()
            row["peak_mem_gb"] = _peak_gb(device)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            if rank == 0:  # after every variant: a later failure keeps the rows so far
                print(f"[{name}] {row}", flush=True)
                Path(args.result).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _table(rows: list[dict]) -> list[str]:
    by_name = {r["form"]: r for r in rows}
    out = [f"{'variant':<18} {'GPUs':>4} {'tok/s/GPU':>11} {'step ms':>9} {'peak GB':>8} {'vs baseline':>20}  extra"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['form']:<18} {r['gpus']:>4}  {r['error']}")
            continue
        base = by_name.get(BASELINE.get(r["form"], ""), {})
        vs = ""
        if "tokens_per_s_per_gpu" in base:
            key = "step_ms" if r["form"] == "tp_layer" else "tokens_per_s_per_gpu"  # speed-up of the layer
            ratio = base[key] / r[key] if key == "step_ms" else r[key] / base[key]
            vs = f"{ratio:.2f}x {BASELINE[r['form']]}"
        extra = {k: v if isinstance(v, (str, list)) else float(f"{v:.3g}") if "err_" in k else round(v, 4)
                 for k, v in r.items() if k in ("bubble", "bubble_formula", "a2a_share", "context", "kernel", "backend",
                                                "bubble_stages", "bubble_sim", "stage_f_ms", "stage_b_ms", "split")
                 or "err_" in k}
        peak = r.get("timed_peak_gb", r.get("peak_mem_gb"))  # cp rows: this rank's peak while timed
        peak = f"{peak:.2f}" if peak is not None else "-"
        out.append(f"{r['form']:<18} {r['gpus']:>4} {r['tokens_per_s_per_gpu']:>11.0f} {r['step_ms']:>9.1f} "
                   f"{peak:>8} {vs:>20}  {extra or ''}")
    out.append("vs baseline: ratio of tokens/s per GPU (tp_layer: step-time speed-up of the layer on 2 GPUs)")
    for r in rows:
        if "breakdown" in r:
            out.append(f"{r['form']} per step: {r['breakdown']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--batch", type=int, default=4, help="sequences per data-parallel rank")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=8, help="pipeline micro-batches (a multiple of 2)")
    p.add_argument("--cp-seq", type=int, default=None,
                   help="ring attention context (whole sequence; default 36864, 512 with --smoke); 36864: the "
                        "fp32 score matrix of 8 heads is 43 GB (the masked copy, exp and backward need several) on "
                        "one GPU, 11 GB per block on each of 2")
    p.add_argument("--profile", action="store_true", help="ring rows: a per-step breakdown from the profiler")
    p.add_argument("--ring-before", default=None, help="a ring_attention.py from before a change (cp_before row)")
    p.add_argument("--pipeline-before", default=None, help="a pipeline.py from before a change (pp_1f1b_before)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU/gloo")
    p.add_argument("--out", default="bench_parallel.json")
    args = p.parse_args()
    unknown = [f for f in args.forms.split(",") if f not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown forms {unknown}: choose from {FORMS}")
    if args.smoke:
        args.seq, args.steps, args.warmup, args.experts = 64, 3, 1, 4
    args.cp_seq = args.cp_seq or (512 if args.smoke else 36864)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               "--worker", "--result", str(result), "--forms", args.forms]
        for key in ("batch", "seq", "steps", "warmup", "micro", "cp_seq", "experts"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        cmd += ["--smoke"] * args.smoke + ["--profile"] * args.profile
        for key in ("ring_before", "pipeline_before"):
            if getattr(args, key):
                cmd += [f"--{key.replace('_', '-')}", str(Path(getattr(args, key)).resolve())]
        # expandable segments: less fragmentation between variants of very different shapes
        env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}
        if args.smoke:
            env["OMP_NUM_THREADS"] = "1"
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env)
        rows = json.loads(result.read_text()) if result.exists() else []
        if proc.returncode:
            print(f"torchrun failed with exit {proc.returncode} (see its log above); {len(rows)} variants done")
            if not rows:
                raise SystemExit(1)
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    lines = [f"device: {device}; batch {args.batch} x {args.seq} per data-parallel GPU, {args.steps} timed steps, "
             f"pipeline m = {args.micro}, context-parallel T = {args.cp_seq}; total {time.perf_counter() - t0:.0f} s"]
    lines += _table(rows)
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps({"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                                          "torchrun_exit": proc.returncode, "rows": rows, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
