"""Forward+backward time of each model attention backend (`lmforge.model.attention.attend`).

Backends: "reference" (explicit masked softmax), "sdpa" (torch SDPA: flash for plain causal,
memory-efficient kernel with a boolean mask for windows / documents; softcap falls back to the
reference), "triton" (lmforge's FlashAttention-2 kernel), and, as the strongest outside
alternative for masked attention, torch's FlexAttention (compiled, block-sparse masks built once).
Cases are the masks the model uses: causal, sliding window, packed documents (doc_ids), softcap.
Outputs are checked against the float32 reference first (relative error), then timed as the
median of repeated runs; the ratio column is time / the fastest backend of that case.

    python benchmarks/model_attention.py              # GPU: Llama-1B attention shapes, bf16
    python benchmarks/model_attention.py --cpu-small --flex-cases ''  # CPU: CI-sized, float32
    --out DIR writes model_attention.json there.
"""

# ruff: noqa: B023  (closures are timed inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import median_ms

from lmforge.model.attention import attend


def make_doc_ids(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randint(1, T, (7,), generator=g).tolist())
        row = torch.zeros(T, dtype=torch.long)
        for c in cuts:
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows).to(device)


def flex_fn(case, doc_ids, B, Hq, T, device):
    """FlexAttention with the same mask, or None if this torch lacks it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    window, cap = case.get("window"), case.get("softcap")

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return keep

    score_mod = None
    if cap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

    block_mask = create_block_mask(mask_mod, B if doc_ids is not None else None, None, T, T, device=device)
    compiled = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-small", action="store_true", help="CI-sized shapes on CPU")
    ap.add_argument("--out", default=None, help="directory for model_attention.json")
    ap.add_argument("--flex-cases", default="doc_ids,window",
                    help="comma-separated case prefixes to run FlexAttention on (compiling it takes time); "
                         "'' for none")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu_small
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:  # Llama-3.2-1B attention: 32 query heads, 8 kv heads, head_dim 64
        B, Hq, Hkv, T, D, dtype, window = 2, 32, 8, 4096, 64, torch.bfloat16, 1024
        warmup, iters = 3, args.iters or 10
    else:
        B, Hq, Hkv, T, D, dtype, window = 2, 6, 2, 384, 32, torch.float32, 96
        warmup, iters = 1, args.iters or 3
    torch.manual_seed(0)
    doc_ids = make_doc_ids(B, T, device)
    cases = {"causal": {}, f"window {window}": {"window": window}, "doc_ids": {"doc_ids": doc_ids},
             "softcap 50": {"softcap": 50.0}}
    flex_cases = [c for c in args.flex_cases.split(",") if c]
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, B={B} Hq={Hq} Hkv={Hkv} T={T} D={D} {dtype}")
    results = []
    for case_name, opts in cases.items():
        q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, requires_grad=True)
        dout = torch.randn(B, Hq, T, D, device=device, dtype=dtype)
        with torch.no_grad():
            ref = attend(q.float(), k.float(), v.float(), backend="reference", **opts)
        backends = ["reference", "sdpa", "triton"]
        if any(case_name.startswith(c) for c in flex_cases):
            backends.append("flex")
        for backend in backends:
            row = {"case": case_name, "backend": backend}
            try:
                if backend == "flex":
                    fn = flex_fn(opts, opts.get("doc_ids"), B, Hq, T, device)
                    if fn is None:
                        raise RuntimeError("torch has no flex_attention")
                    run = lambda: fn(q, k, v)
                else:
                    run = lambda: attend(q, k, v, backend=backend, **opts)
                with torch.no_grad():
                    out = run()
                row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()

                def step():
                    q.grad = k.grad = v.grad = None
                    run().backward(dout)

                row["fwd_ms"] = median_ms(lambda: run(), device, iters=iters, warmup=warmup)
                row["fwd_bwd_ms"] = median_ms(step, device, iters=iters, warmup=warmup)
            except Exception as e:  # a backend that cannot run a case is reported, not hidden
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            results.append(row)
            if gpu:
                torch.cuda.empty_cache()
    for case_name in cases:
        rows = [r for r in results if r["case"] == case_name and "fwd_bwd_ms" in r]
        best = min(r["fwd_bwd_ms"] for r in rows) if rows else None
        for r in rows:
            r["ratio_to_best"] = r["fwd_bwd_ms"] / best
    print(f"\n{'case':<14}{'backend':<11}{'fwd ms':>10}{'fwd+bwd ms':>12}{'x best':>8}{'rel err':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<14}{r['backend']:<11}  {r['error']}")
        else:
            print(f"{r['case']:<14}{r['backend']:<11}{r['fwd_ms']:>10.3f}{r['fwd_bwd_ms']:>12.3f}"
                  f"{r['ratio_to_best']:>8.2f}{r['rel_err']:>10.1e}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_attention.json").write_text(json.dumps({
            "device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "shape": dict(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, dtype=str(dtype)), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
