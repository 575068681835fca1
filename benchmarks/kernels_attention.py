"""FlashAttention-2 (lmforge Triton) vs torch SDPA on a GPU: correctness first, then TFLOP/s.

Checks outputs and gradients of `flash_attention` against the fp32 spec on random inputs
(causal/non-causal, GQA/MQA, window, doc_ids, softcap, decode S > T, ragged T, D in {64, 96, 128}),
then times causal forward and forward+backward against SDPA's flash and cuDNN backends in the same
run (median of do_bench), and prints a table with the ratio to the best SDPA backend.

    python benchmarks/kernels_attention.py --out runs/bench   # writes kernels_attention.json
    python benchmarks/kernels_attention.py --sweep --skip-check   # also writes kernels_attention_sweep.json

    python benchmarks/kernels_attention.py --skip-check --gluon-sweep "192,64,3,3,0;128,128,2,2,1"
    python benchmarks/kernels_attention.py --forward-only   # no fwd+bwd timing

Variants: "triton" (the Triton kernels, Gluon forward off), "gluon" (the Gluon Hopper forward of
`flash_attention_gluon` for D 64 and 128 + the Triton backward), "triton_ptr" (pointer kernels).
`--gluon-sweep` times the Gluon forward under each given config (BLOCK_M, BLOCK_N, stages,
consumers, ping-pong) next to the autotuned Triton descriptor forward and SDPA, forward only.
`--sweep` times each Triton kernel (forward, dK/dV, dQ, and dK/dV with atomic dQ) under every
config of a wide candidate list per shape, prints the winner per kernel and shape, then times the
winning combination fwd+bwd (deterministic and atomic dQ) next to SDPA. Compilation of all
candidates runs first in parallel worker processes (filling Triton's on-disk cache).
"""

# ruff: noqa: B023  (the lambdas are timed inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_cases(device):
    from lmforge.kernels import flash_attention_triton as fa
    from lmforge.kernels.flash_attention import attention_reference, flash_attention
    from lmforge.kernels.flash_attention_triton import CONCURRENT_DQ

    docs = torch.tensor([[0] * 300 + [1] * 500 + [2] * 223, [0] * 1023], device=device)
    cases = [  # (name, dtype, B, Hq, Hkv, T, S, D, opts)
        ("causal bf16 D64", torch.bfloat16, 2, 4, 4, 1000, 1000, 64, {}),
        ("causal bf16 D128 GQA", torch.bfloat16, 2, 8, 2, 777, 777, 128, {}),
        ("noncausal fp16 D96 MQA", torch.float16, 1, 6, 1, 500, 613, 96, {"causal": False}),
        ("causal fp32 D64", torch.float32, 1, 2, 2, 333, 333, 64, {}),
        ("window 128 bf16", torch.bfloat16, 2, 4, 2, 1000, 1000, 64, {"window": 128}),
        ("doc_ids bf16", torch.bfloat16, 2, 4, 4, 1023, 1023, 128, {"doc_ids": docs}),
        ("softcap 30 bf16", torch.bfloat16, 1, 4, 4, 700, 700, 128, {"softcap": 30.0}),
        ("decode S>T bf16", torch.bfloat16, 2, 8, 2, 17, 900, 128, {}),
    ]
    # the atomic-dQ backward (deterministic=False) on a few of the same cases; the pointer kernels
    # (tensor descriptors off: what runs when strides do not suit them) on a few others
    cases += [(n + " atomic-dQ", dt, *rest[:-1], dict(rest[-1], deterministic=False))
              for n, dt, *rest in cases if n in ("causal bf16 D128 GQA", "doc_ids bf16", "softcap 30 bf16")]
    cases += [(n + " ptr", dt, *rest[:-1], dict(rest[-1], pointer=True))
              for n, dt, *rest in cases if n in ("causal bf16 D64", "causal bf16 D128 GQA", "window 128 bf16",
                                                 "doc_ids bf16 atomic-dQ")]
    rows = []
    print(f"checks (dQ on a second stream: {CONCURRENT_DQ}; kernels with tensor descriptors unless 'ptr')",
          flush=True)
    for name, dtype, B, Hq, Hkv, T, S, D, opts in cases:
        q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(B, Hq, T, D, device=device, dtype=dtype)
        with pointer_kernels(fa) if opts.pop("pointer", False) else contextlib.nullcontext():
            out = flash_attention(q, k, v, impl="triton", **opts)
            grads = torch.autograd.grad(out, (q, k, v), do)
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        opts.pop("deterministic", None)
        ref = attention_reference(qf, kf, vf, **opts)
        rgrads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
        errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, rgrads)]
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2.5e-2}[dtype]
        ok = all(e < tol for e in errs) and all(torch.isfinite(t).all() for t in (out, *grads))
        rows.append({"case": name, "errors (o,dq,dk,dv)": [f"{e:.1e}" for e in errs], "tol": tol, "ok": bool(ok)})
        print(f"{name:26s} {'ok ' if ok else 'BAD'} " + " ".join(f"{e:.1e}" for e in errs), flush=True)
    return rows


def bench(fn, reps=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


@contextlib.contextmanager
def pointer_kernels(fa):
    """The Triton path with its pointer kernels (tensor descriptors and the Gluon forward off)."""
    fa.USE_TMA = fa.USE_TMA_BWD = False
    with gluon_forward(fa, False):
        try:
            yield
        finally:
            fa.USE_TMA = fa.USE_TMA_BWD = True


@contextlib.contextmanager
def gluon_forward(fa, on):
    """The Gluon forward (flash_attention_gluon) on for head dims 64/128, or off (Triton kernels)."""
    previous = fa.GLUON_HEAD_DIMS
    fa.GLUON_HEAD_DIMS = {64, 128} if on else set()
    try:
        yield
    finally:
        fa.GLUON_HEAD_DIMS = previous


def time_shapes(device, shapes, forward_only=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.kernels import flash_attention_triton as fa
    from lmforge.kernels.flash_attention import flash_attention

    rows = []
    for B, H, T, D in shapes:
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        flops_fwd = 4 * B * H * T * T * D / 2  # causal: half the score matrix
        impls = {"triton": lambda: flash_attention(q, k, v, causal=True, impl="triton")}

        impls["triton_ptr"] = impls["triton"]  # run inside pointer_kernels() below
        impls["gluon"] = impls["triton"]  # run with the Gluon forward on; "triton" runs with it off
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            impls[name] = run
        res, grads = {}, {}
        for name, f in impls.items():
            try:
                with pointer_kernels(fa) if name == "triton_ptr" else gluon_forward(fa, name == "gluon"):
                    grads[name] = torch.autograd.grad(f(), (q, k, v), do)
                    fwd = bench(lambda: f())
                    fb = float("nan") if forward_only else bench(lambda: torch.autograd.grad(f(), (q, k, v), do))
                res[name] = (flops_fwd / fwd / 1e9, 3.5 * flops_fwd / fb / 1e9, fwd, fb)
            except Exception as e:  # a backend may not support a shape on this build
                print(f"  {name} failed at {(B, H, T, D)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        best = max((n for n in res if n.startswith("sdpa")), key=lambda n: res[n][0 if forward_only else 1],
                   default=None)
        row = {"B": B, "H": H, "T": T, "D": D, **{f"{n}_fwd_tflops": round(r[0], 1) for n, r in res.items()},
               **{f"{n}_fwdbwd_tflops": round(r[1], 1) for n, r in res.items()},
               **{f"{n}_fwdbwd_ms": round(r[3], 4) for n, r in res.items()}}
        for name in ("triton", "gluon"):  # the tuned configs compute the same gradients
            if name in grads and "sdpa_flash" in grads:
                row[f"{name}_grad_rel_err_vs_flash"] = [f"{rel(a, b):.1e}" for a, b in zip(grads[name], grads["sdpa_flash"])]
        del grads
        if best and "triton" in res:
            row["best_sdpa"] = best
            row["ratio_fwdbwd_vs_best_sdpa"] = round(res["triton"][1] / res[best][1], 3)
            row["ratio_fwd_vs_best_sdpa"] = round(res["triton"][0] / max(r[0] for n, r in res.items() if n.startswith("sdpa")), 3)
            for ref in ("sdpa_flash", "sdpa_cudnn"):
                if ref in res:
                    row[f"ratio_fwdbwd_vs_{ref}"] = round(res["triton"][1] / res[ref][1], 3)
                    row[f"ratio_fwd_vs_{ref}"] = round(res["triton"][0] / res[ref][0], 3)
                    if "gluon" in res:
                        row[f"gluon_ratio_fwdbwd_vs_{ref}"] = round(res["gluon"][1] / res[ref][1], 3)
                        row[f"gluon_ratio_fwd_vs_{ref}"] = round(res["gluon"][0] / res[ref][0], 3)
            if "gluon" in res:
                row["gluon_ratio_fwd_vs_triton"] = round(res["gluon"][0] / res["triton"][0], 3)
                row["gluon_ratio_fwdbwd_vs_triton"] = round(res["gluon"][1] / res["triton"][1], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _cfg(m, n, warps, stages):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


SWEEP = {  # kernel -> candidate configs (BLOCK_M = query tile, BLOCK_N = key tile)
    # pointer kernels (flash_attention_triton); the wider lists of the first sweep are cut to its winners
    "fwd": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 32, 4, 4), _cfg(128, 64, 4, 3),
            _cfg(64, 64, 4, 3)],
    "dkdv": [_cfg(64, 128, 8, 3), _cfg(32, 64, 4, 4), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 5)],
    "dq": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 4)],
    "dkdv_atomic": [_cfg(64, 128, 8, 3), _cfg(32, 64, 4, 4)],
    # tensor-descriptor kernels (flash_attention_tma)
    "fwd_tma": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 64, 8, 2), _cfg(128, 128, 8, 3),
                _cfg(128, 32, 4, 4), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)],
    "dkdv_tma": [_cfg(64, 128, 8, 2), _cfg(64, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(64, 64, 8, 2),
                 _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 4), _cfg(32, 64, 8, 4)],
    "dq_tma": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3),
               _cfg(128, 32, 4, 3)],
    "dkdv_atomic_tma": [_cfg(64, 128, 8, 2), _cfg(64, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 4)],
}


def _sweep_call(kernel, cfg, q, k, v, do, fwd_out=None):
    """One timed call of `kernel` forced to `cfg` (the other backward kernel runs its default)."""
    from lmforge.kernels import flash_attention_tma as tma
    from lmforge.kernels import flash_attention_triton as fa

    opts = dict(causal=True, window=None, softcap=None, scale=None, doc_ids=None)
    out, lse = fwd_out
    tunable = {"fwd": fa.FWD, "fwd_tma": tma.FWD_TMA, "dq": fa.DQ, "dkdv_tma": tma.DKDV_TMA,
               "dkdv_atomic_tma": tma.DKDV_TMA, "dq_tma": tma.DQ_TMA}.get(kernel, fa.DKDV)
    use_tma = kernel.endswith("_tma")  # pointer kernels run with tensor descriptors off

    def call():
        fa.USE_TMA = fa.USE_TMA_BWD = use_tma
        try:
            with tunable.force(cfg):
                if kernel.startswith("fwd"):
                    return fa.forward(q, k, v, **opts)
                return fa.backward(q, k, v, out, lse, do, deterministic="atomic" not in kernel, **opts)
        finally:
            fa.USE_TMA = fa.USE_TMA_BWD = True
    return call


def _compile_worker(jobs):
    """Compile (by running once on a small input of the same specialisation) each (kernel, cfg, H, D).

    Triton specialises integer arguments on divisibility by 16, so the head count H (an argument)
    must match the timed shapes' for the cached binary to be the one they use.
    """
    import torch

    from lmforge.kernels import flash_attention_triton as fa

    done = 0
    for kernel, cfg, H, D in jobs:
        q, k, v, do = (torch.randn(1, H, 256, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        fwd_out = fa.forward(q, k, v, causal=True, window=None, softcap=None, scale=None, doc_ids=None)
        try:
            _sweep_call(kernel, cfg, q, k, v, do, fwd_out)()
            done += 1
        except Exception as e:  # out of shared memory etc.: the timing pass reports it
            print(f"  compile {kernel} {cfg} D={D}: {type(e).__name__}: {str(e)[:100]}", flush=True)
    torch.cuda.synchronize()
    return done


def precompile(heads_dims, workers, candidates):
    """Compile every candidate config of each kernel for each (H, D) in parallel processes."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = [(kern, cfg, H, D) for H, D in heads_dims for kern, cfgs in candidates.items() for cfg in cfgs]
    chunks = [jobs[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        n = sum(ex.map(_compile_worker, chunks))
    print(f"precompiled {n}/{len(jobs)} kernels in {time.perf_counter() - t0:.0f} s ({workers} workers)", flush=True)


def sweep_shapes(device, shapes, deadline):
    """Per shape: ms of every candidate config of each kernel, the winners, and the winners' fwd+bwd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.kernels import flash_attention_tma as tma
    from lmforge.kernels import flash_attention_triton as fa
    from lmforge.kernels.flash_attention import flash_attention

    results = []
    for B, H, T, D in shapes:
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        flops_fwd = 4 * B * H * T * T * D / 2
        fwd_out = fa.forward(q, k, v, causal=True, window=None, softcap=None, scale=None, doc_ids=None)
        res = {"shape": [B, H, T, D], "ms": {}, "best": {}}
        fa.CONCURRENT_DQ = False  # time each backward kernel on its own
        for kernel, cfgs in SWEEP.items():
            times = []
            for cfg in cfgs:
                if time.perf_counter() > deadline:
                    break
                try:
                    times.append((bench(_sweep_call(kernel, cfg, q, k, v, do, fwd_out)), cfg))
                except Exception as e:
                    print(f"  {kernel} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            res["ms"][kernel] = [[round(t, 4), c] for t, c in times]
            if times:
                t, c = min(times, key=lambda x: x[0])
                res["best"][kernel] = c
                print(f"{str((B, H, T, D)):22s} {kernel:12s} best {t:8.3f} ms  {c}   (worst "
                      f"{max(x[0] for x in times):.3f}, {len(times)} configs)", flush=True)
        for t in (q, k, v):
            t.requires_grad_()
        best = res["best"]
        fa.CONCURRENT_DQ = True  # fwd+bwd as shipped: dQ on a second stream
        combos = {}
        # the winners per kernel, fwd+bwd: descriptor kernels, pointer kernels, pointer with atomic dQ
        for name, kernels, det in (("triton_tma", ("fwd_tma", "dkdv_tma", "dq_tma"), True),
                                   ("triton_tma_atomic", ("fwd_tma", "dkdv_atomic_tma"), False),
                                   ("triton_ptr", ("fwd", "dkdv", "dq"), True),
                                   ("triton_atomic", ("fwd", "dkdv_atomic"), False)):
            if not all(kern in best for kern in kernels):  # e.g. a forward-only sweep
                continue
            def run(kernels=kernels, det=det):
                fa.USE_TMA = fa.USE_TMA_BWD = kernels[0] == "fwd_tma"
                tunables = (fa.FWD, fa.DKDV, fa.DQ) if kernels[0] == "fwd" else (tma.FWD_TMA, tma.DKDV_TMA, tma.DQ_TMA)
                try:
                    with tunables[0].force(best[kernels[0]]), tunables[1].force(best[kernels[1]]), \
                            tunables[2].force(best.get(kernels[-1]) if det else None):
                        out = flash_attention(q, k, v, causal=True, deterministic=det, impl="triton")
                        return torch.autograd.grad(out, (q, k, v), do)
                finally:
                    fa.USE_TMA = fa.USE_TMA_BWD = True
            combos[name] = run
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), do)
            def fwd_only(backend=backend):
                with sdpa_kernel(backend), torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            combos[name] = run
            try:
                res[f"{name}_fwd_tflops"] = round(flops_fwd / bench(fwd_only) / 1e9, 1)
            except Exception as e:
                print(f"  {name} fwd failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
        for kern in ("fwd", "fwd_tma"):
            if kern in best:
                res[f"triton_{kern}_tflops"] = round(flops_fwd / min(t for t, _ in res["ms"][kern]) / 1e9, 1)
        grads = {}
        for name, f in combos.items():
            try:
                grads[name] = f()
                res[f"{name}_fwdbwd_tflops"] = round(3.5 * flops_fwd / bench(f) / 1e9, 1)
            except Exception as e:
                print(f"  {name} failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
        if "sdpa_flash" in grads:  # the winning configs must still compute the right gradients
            for name in ("triton_tma", "triton_tma_atomic", "triton_ptr", "triton_atomic"):
                if name in grads:
                    res[f"{name}_grad_rel_err_vs_flash"] = [f"{rel(a, b):.1e}" for a, b in zip(grads[name], grads["sdpa_flash"])]
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "ms"}), flush=True)
    return results


def gluon_sweep(device, shapes, configs):
    """Forward only, per shape: the Gluon kernel under each (BLOCK_M, BLOCK_N, stages, warps) config next
    to the Triton descriptor forward (autotuned) and SDPA cuDNN/flash, with each config's error vs Triton."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.kernels import flash_attention_gluon as gluon
    from lmforge.kernels import flash_attention_tma as tma

    rows = []
    for B, H, T, D in shapes:
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * T * T * D / 2
        opts = dict(causal=True, window=None, softcap=None, scale=None, doc_ids=None)
        ref_out, ref_lse = tma.forward(q, k, v, **opts)
        row = {"shape": [B, H, T, D], "triton_tma_fwd_tflops": round(flops / bench(lambda: tma.forward(q, k, v, **opts)) / 1e9, 1)}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            row[f"{name}_fwd_tflops"] = round(flops / bench(run) / 1e9, 1)
        for cfg in configs:
            try:
                out, lse = gluon.forward(q, k, v, causal=True, scale=D ** -0.5, config=cfg)
                err = (rel(out, ref_out), (lse - ref_lse).abs().max().item())
                t = bench(lambda: gluon.forward(q, k, v, causal=True, scale=D ** -0.5, config=cfg))
                row[f"gluon{list(cfg)}"] = {"tflops": round(flops / t / 1e9, 1), "rel_err_o": f"{err[0]:.1e}",
                                             "max_err_lse": f"{err[1]:.1e}"}
            except Exception as e:  # e.g. out of shared memory
                row[f"gluon{list(cfg)}"] = f"{type(e).__name__}: {str(e)[:150]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--sweep", action="store_true", help="time a wide config space per kernel (see module doc)")
    p.add_argument("--sweep-shapes", default="4,16,4096,128;8,16,2048,128;1,16,16384,128;16,32,1024,64")
    p.add_argument("--workers", type=int, default=12, help="processes compiling the sweep's kernels")
    p.add_argument("--kernels", default=",".join(SWEEP), help="which kernels --sweep times (comma-separated)")
    p.add_argument("--check-only", action="store_true", help="run the GPU correctness checks and stop")
    p.add_argument("--gluon-sweep", default="", help="time the Gluon forward under these configs "
                   "(BLOCK_M,BLOCK_N,stages,warps;...) at --shapes, next to Triton and SDPA, and stop")
    p.add_argument("--forward-only", action="store_true", help="time the forward only (no fwd+bwd)")
    p.add_argument("--precompile-only", action="store_true",
                   help="compile the kernels (the sweep's, or the autotuner's candidates) and stop")
    p.add_argument("--budget-s", type=float, default=150, help="stop sweeping configs after this long")
    p.add_argument("--shapes", default="8,16,2048,128;4,16,4096,128;2,16,8192,128;1,16,16384,128;16,32,1024,64;8,32,2048,64")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    device = torch.device("cuda")
    import triton

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "tune": os.environ.get("LMFORGE_KERNEL_TUNE", "1")}
    print(json.dumps(info), flush=True)
    os.environ["LMFORGE_KERNEL_TUNE"] = "0"  # checks: one config each, so no autotuning per option set
    checks = [] if args.skip_check else check_cases(device)
    os.environ["LMFORGE_KERNEL_TUNE"] = info["tune"]
    if args.check_only:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_attention_checks.json"), "w") as f:
            json.dump({"info": info, "checks": checks}, f, indent=1)
        return 0 if all(c["ok"] for c in checks) else 2
    if args.gluon_sweep:
        cfgs = [tuple(int(x) for x in c.split(",")) for c in args.gluon_sweep.split(";") if c]
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
        rows = gluon_sweep(device, shapes, cfgs)
        print(f"\n{'B x H x T x D':16s} {'triton':>6} {'cudnn':>6} {'flash':>6} | " + " ".join(f"{str(c):>18}" for c in cfgs)
              + "  (forward TFLOP/s, causal bf16; Gluon configs: BLOCK_M, BLOCK_N, stages, consumers, ping-pong)")
        for r in rows:
            cells = [r[f"gluon{list(c)}"] for c in cfgs]
            print(f"{'x'.join(map(str, r['shape'])):16s} {r['triton_tma_fwd_tflops']:>6} {r['sdpa_cudnn_fwd_tflops']:>6} "
                  f"{r['sdpa_flash_fwd_tflops']:>6} | " + " ".join(f"{c['tflops'] if isinstance(c, dict) else 'error':>18}"
                                                             for c in cells))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_attention_gluon_sweep.json"), "w") as f:
            json.dump({"info": info, "checks": checks, "gluon_sweep": rows}, f, indent=1)
        return 0
    if args.sweep:
        os.environ["LMFORGE_KERNEL_TUNE"] = "0"  # kernels not being swept run their default config
        t0 = time.perf_counter()
        sweep_shapes_ = [tuple(int(x) for x in s.split(",")) for s in args.sweep_shapes.split(";") if s]
        for kern in set(SWEEP) - set(args.kernels.split(",")):
            del SWEEP[kern]
        if args.workers > 1:
            precompile(sorted({(s[1], s[3]) for s in sweep_shapes_}), args.workers, SWEEP)
        if args.precompile_only:
            return 0
        swept = sweep_shapes(device, sweep_shapes_, t0 + args.budget_s)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_attention_sweep.json"), "w") as f:
            json.dump({"info": info, "sweep": swept}, f, indent=1)
        print(f"\n{'shape':22s} {'tma':>6} {'tma-at':>6} {'ptr':>6} {'atomic':>6} {'flash':>6} {'cudnn':>6} | {'fwd tma':>7} "
              f"{'fwd ptr':>7} {'flash':>6} {'cudnn':>6}  (TFLOP/s, causal bf16; fwd+bwd | fwd; winners per kernel)")
        for r in swept:
            g = lambda k: r.get(k, 0)
            print(f"{str(tuple(r['shape'])):22s} {g('triton_tma_fwdbwd_tflops'):>6} "
                  f"{g('triton_tma_atomic_fwdbwd_tflops'):>6} {g('triton_ptr_fwdbwd_tflops'):>6} "
                  f"{g('triton_atomic_fwdbwd_tflops'):>6} {g('sdpa_flash_fwdbwd_tflops'):>6} "
                  f"{g('sdpa_cudnn_fwdbwd_tflops'):>6} | {g('triton_fwd_tma_tflops'):>7} {g('triton_fwd_tflops'):>7} "
                  f"{g('sdpa_flash_fwd_tflops'):>6} {g('sdpa_cudnn_fwd_tflops'):>6}")
            for kern, c in r["best"].items():
                print(f"    {kern:12s} {c}")
        return 0
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    from lmforge.kernels import flash_attention_tma as tma
    from lmforge.kernels import flash_attention_triton as fa

    if args.workers > 1 and info["tune"] != "0":  # the autotuner then finds its candidates compiled
        tunables = {"fwd": fa.FWD.configs, "dkdv": fa.DKDV.configs, "dq": fa.DQ.configs,
                    "fwd_tma": tma.FWD_TMA.configs, "dkdv_tma": tma.DKDV_TMA.configs, "dq_tma": tma.DQ_TMA.configs}
        precompile(sorted({(s[1], s[3]) for s in shapes}), args.workers, tunables)
    if args.precompile_only:  # a later run (--workers 1) finds them in Triton's on-disk cache
        return 0
    timings = time_shapes(device, shapes, forward_only=args.forward_only)

    tuned = {n: t.best_configs() for n, t in (("fwd", fa.FWD), ("dkdv", fa.DKDV), ("dq", fa.DQ),
                                               ("fwd_tma", tma.FWD_TMA), ("dkdv_tma", tma.DKDV_TMA),
                                               ("dq_tma", tma.DQ_TMA))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_attention.json"), "w") as f:
        json.dump({"info": info, "checks": checks, "timings": timings, "tuned": tuned}, f, indent=1)
    print(f"\n{'B':>3} {'H':>3} {'T':>6} {'D':>4} | {'fwd+bwd: triton':>15} {'ptr-fwd':>7} {'flash':>6} {'cudnn':>6} "
          f"{'/flash':>6} {'/cudnn':>6} | {'fwd: triton':>11} {'ptr':>6} {'flash':>6} {'cudnn':>6} {'/flash':>6} "
          f"{'/cudnn':>6}  (TFLOP/s, causal bf16)")
    for r in timings:
        g = lambda k: r.get(k, 0)
        print(f"{r['B']:>3} {r['H']:>3} {r['T']:>6} {r['D']:>4} | {g('triton_fwdbwd_tflops'):>15} "
              f"{g('triton_ptr_fwdbwd_tflops'):>7} {g('sdpa_flash_fwdbwd_tflops'):>6} {g('sdpa_cudnn_fwdbwd_tflops'):>6} "
              f"{g('ratio_fwdbwd_vs_sdpa_flash'):>6} {g('ratio_fwdbwd_vs_sdpa_cudnn'):>6} | {g('triton_fwd_tflops'):>11} "
              f"{g('triton_ptr_fwd_tflops'):>6} {g('sdpa_flash_fwd_tflops'):>6} {g('sdpa_cudnn_fwd_tflops'):>6} "
              f"{g('ratio_fwd_vs_sdpa_flash'):>6} {g('ratio_fwd_vs_sdpa_cudnn'):>6}")
    if any("gluon_fwd_tflops" in r for r in timings):
        print(f"\n{'B':>3} {'H':>3} {'T':>6} {'D':>4} | {'fwd: gluon':>10} {'triton':>6} {'flash':>6} {'cudnn':>6} "
              f"{'/triton':>7} {'/cudnn':>6} | {'fwd+bwd: gluon':>14} {'triton':>6} {'cudnn':>6} {'/triton':>7} "
              f"{'/cudnn':>6}  (TFLOP/s, causal bf16; gluon = Gluon forward + Triton backward)")
        for r in timings:
            g = lambda k: r.get(k, 0)
            print(f"{r['B']:>3} {r['H']:>3} {r['T']:>6} {r['D']:>4} | {g('gluon_fwd_tflops'):>10} "
                  f"{g('triton_fwd_tflops'):>6} {g('sdpa_flash_fwd_tflops'):>6} {g('sdpa_cudnn_fwd_tflops'):>6} "
                  f"{g('gluon_ratio_fwd_vs_triton'):>7} {g('gluon_ratio_fwd_vs_sdpa_cudnn'):>6} | "
                  f"{g('gluon_fwdbwd_tflops'):>14} {g('triton_fwdbwd_tflops'):>6} {g('sdpa_cudnn_fwdbwd_tflops'):>6} "
                  f"{g('gluon_ratio_fwdbwd_vs_triton'):>7} {g('gluon_ratio_fwdbwd_vs_sdpa_cudnn'):>6}")
    return 0 if all(c["ok"] for c in checks) else 2


if __name__ == "__main__":
    sys.exit(main())
