"""Fused RMSNorm, SwiGLU and linear+cross-entropy vs torch (eager and torch.compile) on a GPU.

Checks each Triton path against its torch reference, then times forward+backward (median of
do_bench) and, for the loss, measures the peak memory the loss adds on top of its inputs.
Sub-millisecond ops (RMSNorm, SwiGLU) timed through autograd are bound by host overhead (Python,
autograd, launches) and vary between runs and hosts; the RMSNorm rows therefore also time the
backward kernel alone under several launch shapes. (Timing them from a CUDA graph failed: the
capture breaks on autograd's stream checks.)

    python benchmarks/kernels_ops.py --out runs/bench   # writes kernels_ops.json
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


def bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def grads_of(f, inputs, dy):
    out = f(*inputs)
    return (out, *torch.autograd.grad(out, inputs, dy))


def rms_rows(device):
    from lmforge.kernels.rms_norm import rms_norm, rms_norm_reference

    rows = []
    compiled = torch.compile(rms_norm_reference)
    for n_rows, width in ((16384, 2048), (16384, 4096)):
        x = torch.randn(n_rows, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(width, device=device)).to(torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        impls = {"triton": lambda x, w: rms_norm(x, w, 1e-6, impl="triton"),
                 "eager": lambda x, w: rms_norm_reference(x, w, 1e-6), "compiled": lambda x, w: compiled(x, w, 1e-6)}
        ref = grads_of(lambda x, w: rms_norm_reference(x.float(), w.float(), 1e-6), (x, w), dy.float())
        got = grads_of(impls["triton"], (x, w), dy)
        row = {"op": "rms_norm", "shape": [n_rows, width], "errors": [f"{rel(a, b):.1e}" for a, b in zip(got, ref)]}
        for name, f in impls.items():
            row[f"{name}_fwd_ms"] = bench(lambda f=f: f(x, w))
            row[f"{name}_fwdbwd_ms"] = bench(lambda f=f: torch.autograd.grad(f(x, w), (x, w), dy))
        # the backward kernel alone under other launch shapes (row tile size, programs per SM)
        from lmforge.kernels import rms_norm_triton as kt

        x2 = x.detach()
        _, rstd = kt.forward(x2, w.detach(), 1e-6)
        saved = kt.ROW_ELEMENTS, kt.PROGRAMS_PER_SM
        for elems, per_sm in ((2048, 8), (8192, 4), (2048, 4), (2048, 16)):
            kt.ROW_ELEMENTS, kt.PROGRAMS_PER_SM = elems, per_sm
            ms = bench(lambda: kt.backward(dy, x2, w.detach(), rstd, True))
            row[f"bwd_kernel_ms_tile{elems}_per_sm{per_sm}"] = ms
            row.setdefault("bwd_kernel_GBps", {})[f"{elems}/{per_sm}"] = round(3 * x.numel() * 2 / ms / 1e6)
        kt.ROW_ELEMENTS, kt.PROGRAMS_PER_SM = saved
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def swiglu_rows(device):
    from lmforge.kernels.swiglu import swiglu, swiglu_reference

    eager = lambda a, b: F.silu(a) * b
    compiled = torch.compile(eager)
    rows = []
    for n_rows, width in ((16384, 5632),):
        a, b = (torch.randn(n_rows, width, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        dy = torch.randn_like(a)
        ref = grads_of(lambda a, b: swiglu_reference(a.float(), b.float()), (a, b), dy.float())
        got = grads_of(lambda a, b: swiglu(a, b, impl="triton"), (a, b), dy)
        row = {"op": "swiglu", "shape": [n_rows, width], "errors": [f"{rel(x, y):.1e}" for x, y in zip(got, ref)]}
        for name, f in (("triton", lambda a, b: swiglu(a, b, impl="triton")), ("eager", eager), ("compiled", compiled)):
            row[f"{name}_fwdbwd_ms"] = bench(lambda f=f: torch.autograd.grad(f(a, b), (a, b), dy))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def ce_rows(device, n_tokens, hidden):
    from lmforge.kernels import linear_cross_entropy as lce
    from lmforge.kernels import linear_cross_entropy_triton as lce_kt
    from lmforge.kernels.linear_cross_entropy import linear_cross_entropy

    def variant(module, **consts):
        """The fused loss with other module constants (padding, chunk, kernel pass; restored after)."""
        def run():
            saved = {k: getattr(module, k) for k in consts}
            for k, val in consts.items():
                setattr(module, k, val)
            try:
                return linear_cross_entropy(h, w, t, impl="triton").loss_sum
            finally:
                for k, val in saved.items():
                    setattr(module, k, val)
        return run

    def torch_loss(h, w, t):
        return F.cross_entropy((h @ w.T).float(), t, ignore_index=-100, reduction="sum")

    compiled = torch.compile(torch_loss)
    rows = []
    for vocab in (50257, 128256):
        h = torch.randn(n_tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, vocab, (n_tokens,), device=device)
        t[::17] = -100
        impls = {"fused_triton": lambda: linear_cross_entropy(h, w, t, impl="triton").loss_sum,
                 "eager": lambda: torch_loss(h, w, t), "compiled": lambda: compiled(h, w, t),
                 "fused_chunk2^27": variant(lce, CHUNK_BUDGET=1 << 27),
                 "fused_one_program_per_row": variant(lce_kt, VOCAB_SPLIT=0)}
        if vocab % lce.VOCAB_ALIGN:
            impls["fused_unpadded"] = variant(lce, VOCAB_ALIGN=1)

        hf, wf = (x.detach().float().requires_grad_() for x in (h, w))
        ref_loss = torch_loss(hf, wf, t)
        ref = (ref_loss, *torch.autograd.grad(ref_loss, (hf, wf)))
        del hf, wf
        row = {"op": "linear_cross_entropy", "tokens": n_tokens, "hidden": hidden, "vocab": vocab}
        for name, f in impls.items():
            loss = f()
            got = (loss, *torch.autograd.grad(loss, (h, w)))
            row[f"{name}_errors"] = [f"{rel(a, b):.1e}" for a, b in zip(got, ref)]
            del loss, got
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.autograd.grad(f(), (h, w))
            torch.cuda.synchronize()
            row[f"{name}_peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20)
            row[f"{name}_fwdbwd_ms"] = bench(lambda f=f: torch.autograd.grad(f(), (h, w)))
        del ref
        # the CE kernel alone on one chunk of 4096 rows (in place; repeated calls move the same bytes)
        logits = torch.randn(4096, vocab, device=device, dtype=torch.bfloat16)
        tc = t[:4096]
        default_split = lce_kt.VOCAB_SPLIT
        for split in (0, 4096, 8192, 16384):
            lce_kt.VOCAB_SPLIT = split
            ms = bench(lambda: lce_kt.ce_chunk(logits, tc, -100, None, 0.0))
            row[f"ce_kernel_ms_split{split}"] = ms
            row[f"ce_kernel_GBps_split{split}"] = round(3 * logits.numel() * 2 / ms / 1e6)
        lce_kt.VOCAB_SPLIT = default_split
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    device = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(info), flush=True)
    rows = rms_rows(device) + swiglu_rows(device) + ce_rows(device, args.tokens, args.hidden)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_ops.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print("\nop                   shape            triton ms  eager ms  compiled ms  eager/triton  compiled/triton")
    for r in rows:
        shape = r.get("shape") or [r["tokens"], r["hidden"], r["vocab"]]
        tri = r.get("triton_fwdbwd_ms") or r["fused_triton_fwdbwd_ms"]
        print(f"{r['op']:20s} {str(shape):16s} {tri:9.3f} {r['eager_fwdbwd_ms']:9.3f} {r['compiled_fwdbwd_ms']:12.3f} "
              f"{r['eager_fwdbwd_ms'] / tri:12.2f} {r['compiled_fwdbwd_ms'] / tri:15.2f}")
        if r["op"] == "rms_norm":
            print(f"{'':20s} backward kernel alone: {r['bwd_kernel_ms_tile2048_per_sm8']:.3f} ms "
                  f"({r['bwd_kernel_GBps']['2048/8']} GB/s); forward: triton {r['triton_fwd_ms']:.3f}, "
                  f"compiled {r['compiled_fwd_ms']:.3f} ms")
        if r["op"] == "linear_cross_entropy":
            print(f"{'':20s} peak extra MiB: fused {r['fused_triton_peak_extra_MiB']}, eager {r['eager_peak_extra_MiB']}"
                  f", compiled {r['compiled_peak_extra_MiB']} -> eager/fused "
                  f"{r['eager_peak_extra_MiB'] / max(1, r['fused_triton_peak_extra_MiB']):.1f}x")
            print(f"{'':20s} CE kernel alone, 4096 rows: " + ", ".join(
                f"split {sp}: {r[f'ce_kernel_ms_split{sp}']:.3f} ms ({r[f'ce_kernel_GBps_split{sp}']} GB/s)"
                for sp in (0, 4096, 8192, 16384)))
            for name in ("fused_chunk2^27", "fused_unpadded", "fused_vocab_split8192"):
                if f"{name}_fwdbwd_ms" in r:
                    print(f"{'':20s} {name}: {r[f'{name}_fwdbwd_ms']:.3f} ms, peak extra {r[f'{name}_peak_extra_MiB']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
