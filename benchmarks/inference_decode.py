"""Decode throughput: the lmforge engine vs the naive training sampler vs Hugging Face `generate`.

One Llama-shape model with random weights (seeded), exported through lmforge.interop so HF runs the
very same weights. Greedy decoding of `--new` tokens after a `--prompt`-token prompt, timed in the
same process, same threads:
  naive        lmforge.train.generate.generate: re-runs the whole context per token (batch 1)
  hf           transformers `generate` (default dynamic cache)
  hf_static    transformers `generate` with cache_implementation="static" (no compile on CPU)
  engine       lmforge.inference.Engine (preallocated cache, batched decode)
  engine_int8  the engine on the int8 weight-only quantized model
  engine_compiled  (CUDA only) the engine with its decode step compiled into a CUDA graph
Tokens/s counts generated tokens over all rows; each variant's best of --repeats rounds, the
variants interleaved in rotating order within each round. Greedy outputs are compared with HF's (the fraction
of rows whose tokens are identical is printed; float round-off can flip near-ties).

  python benchmarks/inference_decode.py                      # CPU, tiny shape, batch 1 and 8
  python benchmarks/inference_decode.py --shape gpt2s --batch 1 64   # GPU-sized (lent GPU)

Prints a table and writes JSON (--out, default runs/bench/inference_decode_<device>.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch
from common import timed

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.quantize import quantize_model
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer
from lmforge.train.generate import generate as naive_generate

SHAPES = {
    "tiny": dict(vocab_size=4096, context_length=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2),
    "gpt2s": dict(vocab_size=32000, context_length=2048, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12),
    "1b": dict(vocab_size=32000, context_length=2048, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
               d_ff=5632),
}






def run_batch(B, prompts, model, qmodel, hf, args, device) -> list[dict]:
    """Time every variant at batch B; one row per variant."""
    cfg = model.cfg
    variants = {}
    if B == 1 and "naive" not in args.skip:
        variants["naive"] = lambda: [naive_generate(model, prompts[0].tolist(), args.new,
                                                    context_length=cfg.context_length, temperature=0)]
    hf_in = prompts.to(device)

    def hf_gen(**kw):
        with torch.no_grad():
            out = hf.generate(hf_in, attention_mask=torch.ones_like(hf_in), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, pad_token_id=0, **kw)
        return out[:, args.prompt:].tolist()

    if "hf" not in args.skip:
        variants["hf"] = hf_gen
    if "hf_static" not in args.skip:
        variants["hf_static"] = lambda: hf_gen(cache_implementation="static")
    max_len = args.prompt + args.new
    sp = SamplingParams(max_tokens=args.new, temperature=0)
    engines = [("engine", model, False), ("engine_int8", qmodel, False)]
    if device.type == "cuda":  # the decode step captured as a CUDA graph (torch.compile reduce-overhead)
        engines.append(("engine_compiled", model, True))
    for name, m, compiled in engines:
        if name not in args.skip and m is not None:
            engine = Engine(m, max_batch=B, max_len=max_len, eos_ids=[], compile=compiled)
            variants[name] = lambda engine=engine: [c[0].token_ids for c in engine.generate(prompts.tolist(), sp)]
    outs, best = {}, {}
    for fn in variants.values():
        fn()  # warm-up
    names = list(variants)
    for r in range(args.repeats):  # interleaved, rotating order: the shared machine's load drifts
        for name in names[r % len(names):] + names[:r % len(names)]:
            secs, outs[name] = timed(variants[name], device)
            best[name] = min(best.get(name, float("inf")), secs)
    rows = [{"batch": B, "variant": n, "seconds": best[n], "tokens_per_s": B * args.new / best[n]} for n in names]
    speed = {r["variant"]: r["tokens_per_s"] for r in rows}
    ref = outs.get("hf")
    for r in rows:
        r["same_as_hf"] = sum(a == b for a, b in zip(outs[r["variant"]], ref)) / len(ref) if ref else None
        r["vs_hf"] = speed[r["variant"]] / speed["hf"] if "hf" in speed else None
        r["vs_naive"] = speed[r["variant"]] / speed["naive"] if "naive" in speed else None
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4, help="timed rounds (best kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--skip", nargs="*", default=[], help="variants to skip")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[args.shape], attention_backend="sdpa", tie_embeddings=False)
    model = Transformer(cfg).to(device, dtype).eval()

    import transformers

    from lmforge.interop.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).to(device).eval()

    qmodel = quantize_model(copy.deepcopy(model), "int8") if "engine_int8" not in args.skip else None
    g = torch.Generator().manual_seed(1)
    rows = []
    for B in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=g)
        rows += run_batch(B, prompts, model, qmodel, hf, args, device)

    print(f"{'batch':>5} {'variant':<12} {'tok/s':>10} {'x hf':>7} {'x naive':>8} {'same as hf':>10}")
    for r in rows:
        f = lambda v, spec: format(v, spec) if v is not None else "-"
        print(f"{r['batch']:>5} {r['variant']:<12} {r['tokens_per_s']:>10.1f} {f(r['vs_hf'], '>7.2f')} "
              f"{f(r['vs_naive'], '>8.2f')} {f(r['same_as_hf'], '>10.2f')}")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or f"runs/bench/inference_decode_{device.type}.json")
    write_json(out, {"device": dev_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "shape": args.shape, "prompt": args.prompt,
                     "new": args.new, "command": " ".join(sys.argv),
                     "date": datetime.date.today().isoformat(), "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
