"""Offline SASS of the decode attention variants (lmforge/kernels/decode_attention.py), no GPU needed.

Compiles `_attention_kernel` for sm_90 with Triton's own ptxas (as the JIT would, pointers and the
head dim, length and cache strides specialised as multiples of 16) and counts, per variant, the
SASS instructions of the whole kernel (the key loop's body appears once), warp shuffles, barriers,
tensor-core MMAs, special-function ops (exp) and global loads with their widths. Fewer dependent
instructions per key block is what a latency-bound decode attention needs; the timings are in
inference_fused_decode.py (GPU). The Triton here may differ from the GPU machine's.

  python benchmarks/inference_fused_decode_sass.py --out runs/bench/fused_decode_sass.json
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmforge.io import write_json
from lmforge.kernels import decode_attention as kd

# (label, IMPL, BLOCK_G, BLOCK_D, BLOCK_S, SPLITS, warps): the 124M (MHA, D 64) and 1.1B (GQA 8) shapes
VARIANTS = [("head, 1 split", 2, 1, 64, 64, 1, 4), ("head, 4 splits", 2, 1, 64, 64, 4, 4),
            ("head, 2 warps", 2, 1, 64, 64, 1, 2), ("dot (any group <= 16)", 1, 16, 64, 64, 1, 4),
            ("dot, 4 splits", 1, 16, 64, 64, 4, 4), ("sum, MHA (group 1)", 0, 1, 64, 64, 1, 2),
            ("sum, GQA 8", 0, 8, 64, 8, 1, 4)]
DIV16 = {"Q", "KC", "VC", "POS", "OUT", "PART", "ML", "CNT", "D", "length", "stride_cb", "stride_ch", "stride_cs"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/fused_decode_sass.json")
    args = ap.parse_args()
    names = kd._attention_kernel.arg_names
    ptrs = {"Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "OUT": "*bf16", "PART": "*fp32", "ML": "*fp32",
            "POS": "*i64", "CNT": "*i32", "scale": "fp32"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in DIV16}
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    rows = []
    for label, im, bg, bd, bs, splits, warps in VARIANTS:
        const = dict(IMPL=im, BLOCK_G=bg, BLOCK_D=bd, BLOCK_S=bs, SPLITS=splits, PRECISION=None)
        sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
        k = triton.compile(ASTSource(fn=kd._attention_kernel, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(k.asm["cubin"])
            sass = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, check=True).stdout
        ins = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
        count = lambda pat, ins=ins: sum(bool(re.search(pat, line)) for line in ins)
        rows.append({"variant": label, "warps": warps, "instructions": len(ins), "shfl": count(r"\bSHFL"),
                     "bar": count(r"\bBAR"), "mma": count(r"\bHMMA"), "mufu": count(r"\bMUFU"),
                     "loads": dict(collections.Counter(re.findall(r"\b(LDG\S*)", sass)))})
    print(f"{'variant':<24} {'warps':>5} {'instr':>6} {'SHFL':>5} {'BAR':>4} {'HMMA':>5} {'MUFU':>5}  global loads")
    for r in rows:
        print(f"{r['variant']:<24} {r['warps']:>5} {r['instructions']:>6} {r['shfl']:>5} {r['bar']:>4} {r['mma']:>5} "
              f"{r['mufu']:>5}  {r['loads']}")
    write_json(Path(args.out), {"triton": triton.__version__, "target": "sm_90", "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
