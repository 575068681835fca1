"""Speculative decoding vs plain decoding (batch 1, greedy): speed, acceptance, identical output.

Target: a Llama-shape model with random weights (seeded). Variants, timed in the same run:
  plain          the engine, one token per forward
  ngram          prompt-lookup drafting (NGramDrafter, n <= 3), k drafts per round
  draft_small    a 1-layer model of the same vocabulary as the drafter (random weights, so its
                 acceptance is what an unrelated draft gets: a worst case)
  draft_int8     the target's own int8-quantized copy as the drafter (high acceptance, but on CPU
                 it costs as much as the target: shows the accounting, not a speed-up)
Every speculative variant must produce exactly the plain greedy tokens (checked).
Greedy decoding of random-weight models falls into repeating cycles, which is where prompt
lookup pays; on real text the gain depends on how much the output copies its context.

  python benchmarks/inference_speculative.py --threads 1

Prints a table and writes JSON (--out, default runs/bench/inference_speculative_<device>.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.quantize import quantize_model
from lmforge.inference.speculative import DraftModel, NGramDrafter, speculative_generate
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer

SHAPE = dict(vocab_size=4096, context_length=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
             attention_backend="sdpa")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    target = Transformer(ModelConfig(**SHAPE)).eval()
    small = Transformer(ModelConfig(**dict(SHAPE, d_model=128, n_layers=1, n_heads=4, n_kv_heads=1))).eval()
    int8 = quantize_model(copy.deepcopy(target), "int8")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (24,), generator=g).tolist() for _ in range(args.prompts)]
    sp = SamplingParams(max_tokens=args.new, temperature=0)
    max_len = 24 + args.new + args.k + 2
    engine = Engine(target, max_batch=1, max_len=max_len, eos_ids=[])

    def plain(p):
        return engine.generate([p], sp)[0][0].token_ids, None

    def spec(drafter):
        def run(p):
            r = speculative_generate(target, p, sp, drafter, k=args.k, max_len=max_len)
            return r.token_ids, r
        return run

    variants = {"plain": plain, "ngram": spec(NGramDrafter(3)), "draft_small": spec(DraftModel(small)),
                "draft_int8": spec(DraftModel(int8))}
    reference, rows = None, []
    for name, fn in variants.items():
        fn(prompts[0])  # warm-up
        t0 = time.perf_counter()
        outs = [fn(p) for p in prompts]
        secs = time.perf_counter() - t0
        tokens = [o[0] for o in outs]
        if reference is None:
            reference = tokens
        stats = [o[1] for o in outs if o[1] is not None]
        drafted = sum(s.drafted for s in stats)
        rows.append({"variant": name, "tokens_per_s": sum(map(len, tokens)) / secs,
                     "acceptance": sum(s.accepted for s in stats) / drafted if drafted else None,
                     "tokens_per_round": (sum(map(len, tokens)) / sum(s.rounds for s in stats)) if stats else 1.0,
                     "identical_to_plain": tokens == reference})
    base = rows[0]["tokens_per_s"]
    print(f"{'variant':<12} {'tok/s':>8} {'x plain':>8} {'accept':>7} {'tok/round':>9} {'identical':>9}")
    for r in rows:
        r["vs_plain"] = r["tokens_per_s"] / base
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        print(f"{r['variant']:<12} {r['tokens_per_s']:>8.1f} {r['vs_plain']:>8.2f} {acc:>7} "
              f"{r['tokens_per_round']:>9.2f} {str(r['identical_to_plain']):>9}")
    out = Path(args.out or "runs/bench/inference_speculative_cpu.json")
    write_json(out, {"device": platform.processor() or "cpu", "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "args": vars(args), "command": " ".join(sys.argv),
                     "date": datetime.date.today().isoformat(), "results": rows})
    print(f"wrote {out}")
    return 0 if all(r["identical_to_plain"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
