"""FlashAttention-2 (lmforge Triton) vs torch SDPA on a GPU: correctness first, then TFLOP/s.

Checks outputs and gradients of `flash_attention` against the fp32 spec on random inputs
(causal/non-causal, GQA/MQA, window, doc_ids, softcap, decode S > T, ragged T, D in {64, 96, 128}),
then times causal forward and forward+backward against SDPA's flash and cuDNN backends in the same
run (median of do_bench), and prints a table with the ratio to the best SDPA backend.

    python benchmarks/kernels_attention.py --out runs/bench   # writes kernels_attention.json
"""

# ruff: noqa: B023  (the lambdas are timed inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_cases(device):
    from lmforge.kernels.flash_attention import attention_reference, flash_attention

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
    rows = []
    for name, dtype, B, Hq, Hkv, T, S, D, opts in cases:
        q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(B, Hq, T, D, device=device, dtype=dtype)
        out = flash_attention(q, k, v, impl="triton", **opts)
        grads = torch.autograd.grad(out, (q, k, v), do)
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
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


def time_shapes(device, shapes):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.kernels.flash_attention import flash_attention

    rows = []
    for B, H, T, D in shapes:
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        flops_fwd = 4 * B * H * T * T * D / 2  # causal: half the score matrix
        impls = {"triton": lambda: flash_attention(q, k, v, causal=True, impl="triton")}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            impls[name] = run
        res = {}
        for name, f in impls.items():
            try:
                f()
                fwd = bench(lambda: f())
                fb = bench(lambda: torch.autograd.grad(f(), (q, k, v), do))
                res[name] = (flops_fwd / fwd / 1e9, 3.5 * flops_fwd / fb / 1e9, fwd, fb)
            except Exception as e:  # a backend may not support a shape on this build
                print(f"  {name} failed at {(B, H, T, D)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        best = max((n for n in res if n != "triton"), key=lambda n: res[n][1], default=None)
        row = {"B": B, "H": H, "T": T, "D": D, **{f"{n}_fwd_tflops": round(r[0], 1) for n, r in res.items()},
               **{f"{n}_fwdbwd_tflops": round(r[1], 1) for n, r in res.items()},
               **{f"{n}_fwdbwd_ms": round(r[3], 4) for n, r in res.items()}}
        if best and "triton" in res:
            row["best_sdpa"] = best
            row["ratio_fwdbwd_vs_best_sdpa"] = round(res["triton"][1] / res[best][1], 3)
            row["ratio_fwd_vs_best_sdpa"] = round(res["triton"][0] / max(r[0] for n, r in res.items() if n != "triton"), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--skip-check", action="store_true")
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
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    timings = time_shapes(device, shapes)
    from lmforge.kernels import flash_attention_triton as fa

    tuned = {n: t.best_configs() for n, t in (("fwd", fa.FWD), ("dkdv", fa.DKDV), ("dq", fa.DQ))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_attention.json"), "w") as f:
        json.dump({"info": info, "checks": checks, "timings": timings, "tuned": tuned}, f, indent=1)
    print(f"\n{'B':>3} {'H':>3} {'T':>6} {'D':>4} | {'triton fwd+bwd':>14} {'best sdpa':>10} {'ratio':>6} | "
          f"{'triton fwd':>10} {'ratio':>6}  (TFLOP/s, causal bf16)")
    for r in timings:
        best = r.get("best_sdpa", "")
        print(f"{r['B']:>3} {r['H']:>3} {r['T']:>6} {r['D']:>4} | {r.get('triton_fwdbwd_tflops', 0):>14} "
              f"{r.get(best + '_fwdbwd_tflops', 0):>10} {r.get('ratio_fwdbwd_vs_best_sdpa', 0):>6} | "
              f"{r.get('triton_fwd_tflops', 0):>10} {r.get('ratio_fwd_vs_best_sdpa', 0):>6}  [{best}]")
    return 0 if all(c["ok"] for c in checks) else 2


if __name__ == "__main__":
    sys.exit(main())
