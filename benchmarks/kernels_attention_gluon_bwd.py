"""The Gluon FlashAttention backward (Hopper) vs the Triton backward vs SDPA, in one run.

Per shape (causal bf16), after one forward (the shipped forward: Gluon at D 128):
- backward only, through `flash_attention_triton.backward` (delta preprocessing included):
  Triton (dK/dV kernel + dQ kernel on a side stream; and with atomic dQ), Gluon dK/dV + Triton dQ
  (deterministic), Gluon dK/dV with atomic dQ; each one's dQ/dK/dV error against the Triton
  deterministic backward;
- the Gluon kernel alone under each `--configs` entry (BLOCK_M, stages, consumers, dQ split, dQ by
  TMA reduce-add or by atomics, dS^T shared between the consumers), with and without dQ;
- forward+backward through `flash_attention` (autograd) with the Triton backward, each Gluon
  backward, and SDPA's cuDNN and flash backends;
- the Gluon forward timed directly and through `flash_attention` (the open 8192 gap).
Prints a table (TFLOP/s; fwd+bwd counts 3.5x the forward FLOPs, the backward alone 2.5x) and
writes kernels_attention_gluon_bwd.json.

    python benchmarks/kernels_attention_gluon_bwd.py --out runs/bench
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_attention import bench, rel  # noqa: E402


@contextlib.contextmanager
def switches(fa, det=(), atomic=()):
    """Which head dims run the Gluon backward (deterministic / atomic dQ) inside the block."""
    prev = fa.GLUON_BWD_HEAD_DIMS, fa.GLUON_BWD_ATOMIC_HEAD_DIMS
    fa.GLUON_BWD_HEAD_DIMS, fa.GLUON_BWD_ATOMIC_HEAD_DIMS = set(det), set(atomic)
    try:
        yield
    finally:
        fa.GLUON_BWD_HEAD_DIMS, fa.GLUON_BWD_ATOMIC_HEAD_DIMS = prev


def one_shape(B, H, T, D, configs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.kernels import flash_attention_gluon as gfwd
    from lmforge.kernels import flash_attention_gluon_bwd as gbwd
    from lmforge.kernels import flash_attention_triton as fa
    from lmforge.kernels.flash_attention import flash_attention

    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    fl = 4 * B * H * T * T * D / 2  # causal forward FLOPs
    opts = dict(causal=True, window=None, softcap=None, scale=None, doc_ids=None)
    out, lse = fa.forward(q, k, v, **opts)
    row = {"shape": [B, H, T, D]}
    variants = {"triton": ({}, True), "triton_atomic": ({}, False), "gluon": (dict(det={D}), True),
                "gluon_atomic": (dict(atomic={D}), False)}
    ref = None
    for name, (sw, det) in variants.items():
        try:
            with switches(fa, **sw):
                call = lambda: fa.backward(q, k, v, out, lse, do, deterministic=det, **opts)
                grads = call()
                if ref is None:
                    ref = grads
                row[f"bwd_{name}_tflops"] = round(2.5 * fl / bench(call) / 1e9, 1)
                row[f"bwd_{name}_rel_err"] = [f"{rel(a, b):.1e}" for a, b in zip(grads, ref)]
        except Exception as e:  # noqa: BLE001  (report and go on)
            row[f"bwd_{name}_tflops"] = f"{type(e).__name__}: {str(e)[:200]}"
    delta = (out.float() * do.float()).sum(-1)
    for cfg in configs:
        for atomic in (False, True):
            key = f"kernel{list(cfg)}{'_atomic' if atomic else ''}"
            try:
                call = lambda: gbwd.dkdv(q, k, v, do, lse, delta, causal=True, scale=D ** -0.5, atomic_dq=atomic,
                                         config=cfg)
                call()
                row[key + "_ms"] = round(bench(call), 4)
            except Exception as e:  # noqa: BLE001
                row[key + "_ms"] = f"{type(e).__name__}: {str(e)[:200]}"
    for t in (q, k, v):
        t.requires_grad_()
    fb = {"triton": ({}, True), "gluon": (dict(det={D}), True), "gluon_atomic": (dict(atomic={D}), False)}
    for name, (sw, det) in fb.items():
        with switches(fa, **sw):
            f = lambda: flash_attention(q, k, v, causal=True, impl="triton", deterministic=det)
            row[f"fwdbwd_{name}_tflops"] = round(3.5 * fl / bench(lambda: torch.autograd.grad(f(), (q, k, v), do)) / 1e9, 1)
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        def f(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        try:
            row[f"fwdbwd_{name}_tflops"] = round(3.5 * fl / bench(lambda: torch.autograd.grad(f(), (q, k, v), do)) / 1e9, 1)
            row[f"fwd_{name}_tflops"] = round(fl / bench(f) / 1e9, 1)
        except Exception as e:  # noqa: BLE001
            row[f"fwdbwd_{name}_tflops"] = f"{type(e).__name__}: {str(e)[:120]}"
    # the forward directly, through flash_attention with and without grad (the open 8192 gap)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    if gfwd.unusable_reason(qd, kd, vd) is None:
        row["fwd_gluon_direct_tflops"] = round(fl / bench(lambda: gfwd.forward(qd, kd, vd, causal=True,
                                                                                scale=D ** -0.5)) / 1e9, 1)
    row["fwd_flash_attention_nograd_tflops"] = round(fl / bench(lambda: flash_attention(qd, kd, vd, causal=True,
                                                                                         impl="triton")) / 1e9, 1)
    row["fwd_flash_attention_grad_tflops"] = round(fl / bench(lambda: flash_attention(q, k, v, causal=True,
                                                                                       impl="triton")) / 1e9, 1)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--shapes", default="8,16,2048,128;4,16,4096,128;2,16,8192,128;1,16,16384,128")
    p.add_argument("--configs", default="64,2,2,2,1,0;64,2,2,2,1,1;64,3,2,2,1,1;64,2,2,2,0,0",
                   help="Gluon kernel configs BLOCK_M,stages,consumers,dq_split,dq_tma,dq_shared;... timed alone")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "tune": os.environ.get("LMFORGE_KERNEL_TUNE", "1")}
    print(json.dumps(info), flush=True)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";") if c]
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for shape in shapes:
        rows.append(one_shape(*shape, configs))
        print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(args.out, "kernels_attention_gluon_bwd.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    g = lambda r, k: r.get(k, 0) if not isinstance(r.get(k), str) else "err"
    print(f"\n{'B x H x T x D':16s} | {'bwd: triton':>11} {'tr-atom':>7} {'gluon':>6} {'gl-atom':>7} | "
          f"{'fwd+bwd: triton':>15} {'gluon':>6} {'gl-atom':>7} {'cudnn':>6} {'flash':>6} | {'fwd: direct':>11} "
          f"{'fa':>6} {'fa+grad':>7}  (TFLOP/s, causal bf16)")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):16s} | {g(r, 'bwd_triton_tflops'):>11} {g(r, 'bwd_triton_atomic_tflops'):>7} "
              f"{g(r, 'bwd_gluon_tflops'):>6} {g(r, 'bwd_gluon_atomic_tflops'):>7} | {g(r, 'fwdbwd_triton_tflops'):>15} "
              f"{g(r, 'fwdbwd_gluon_tflops'):>6} {g(r, 'fwdbwd_gluon_atomic_tflops'):>7} "
              f"{g(r, 'fwdbwd_sdpa_cudnn_tflops'):>6} {g(r, 'fwdbwd_sdpa_flash_tflops'):>6} | "
              f"{g(r, 'fwd_gluon_direct_tflops'):>11} {g(r, 'fwd_flash_attention_nograd_tflops'):>6} "
              f"{g(r, 'fwd_flash_attention_grad_tflops'):>7}")
        print("    kernel alone (ms): " + ", ".join(f"{k[6:]}={v}" for k, v in r.items() if k.startswith("kernel")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
