"""Prefix caching: prefill time of requests that share a long prompt prefix, with and without it.

Requests = one shared prefix of --prefix tokens (a system prompt / few-shot block) + a distinct
suffix of --suffix tokens, each generating one token (so the time is the prefill: time to first
token). Two engines on the same model, same process, timed alternately:
  no_cache   Engine(model): every request prefills its whole prompt
  cache      Engine(model, prefix_blocks=..., block_size=--block): the first request stores the
             prefix's blocks; later ones copy them into their row and prefill only the rest
Each request's time is the best of --repeats; the table gives the median over the later requests
and, separately, the first request of the first round (the cache's only cold one, single shot), tokens fed to the model,
and the ratio. The first tokens of both engines must be identical (checked; exit code 1 if not).

  python benchmarks/inference_prefix.py --threads 1
  python benchmarks/inference_prefix.py --shape llama124m --prefix 1024 --suffix 32 --compile  # lent GPU

On a GPU an eager prefill of a small model is bound by kernel launches, not by tokens (measured on
an H100, llama124m: 17.6 ms for 1,056 tokens and 18.5 ms for 32), so the saving shows only with
--compile (prefill compiled by inductor with dynamic shapes, as `lmforge serve --compile` runs it).

Prints a table and writes JSON (--out, default runs/bench/inference_prefix_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from pathlib import Path

import torch
from common import INFERENCE_SHAPES, inference_device, timed

from lmforge.inference import Engine, SamplingParams
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer

SHAPES = {
    "small": dict(vocab_size=4096, context_length=1024, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2),
    "llama124m": INFERENCE_SHAPES["llama124m"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--prefix", type=int, default=448, help="shared prefix tokens")
    ap.add_argument("--suffix", type=int, default=24, help="distinct tokens per request")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--block", type=int, default=16, help="prefix-cache block size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compiled prefill (CUDA only; Engine(compile=True))")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = inference_device(args.threads)
    model = Transformer(ModelConfig(**SHAPES[args.shape], attention_backend="sdpa")).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    V = model.cfg.vocab_size
    prefix = torch.randint(0, V, (args.prefix,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, V, (args.suffix,), generator=g).tolist() for _ in range(args.requests)]
    max_len = args.prefix + args.suffix + 2
    blocks = -(-max_len // args.block) * 2
    sp = SamplingParams(max_tokens=1, temperature=0)
    on = args.compile and device.type == "cuda"
    engines = {"no_cache": Engine(model, max_batch=1, max_len=max_len, eos_ids=[], compile=on),
               "cache": Engine(model, max_batch=1, max_len=max_len, eos_ids=[], prefix_blocks=blocks,
                               block_size=args.block, compile=on)}
    fed = {name: [] for name in engines}
    for name, e in engines.items():  # count the tokens each engine feeds the model
        forward = e._forward_prefill  # outside the compiled region, so counted in both modes
        e._forward_prefill = lambda ids, *a, forward=forward, name=name: fed[name].append(ids.numel()) or forward(ids, *a)
    warm = [0] + torch.randint(0, V, (args.prefix + args.suffix - 1,), generator=g).tolist()
    for e in engines.values():  # warm-up on an unrelated prompt (allocator, kernels)
        e.generate([warm], sp)
        e.generate([warm[:-1] + [1]], sp)
    for f in fed.values():
        f.clear()
    secs = {name: [float("inf")] * len(prompts) for name in engines}
    first = {name: [None] * len(prompts) for name in engines}
    cold_first = {}
    for r in range(args.repeats):
        for i, p in enumerate(prompts):
            for name in (list(engines) if (r + i) % 2 == 0 else list(reversed(engines))):
                t, out = timed(lambda e=engines[name], p=p: e.generate([p], sp), device)
                secs[name][i] = min(secs[name][i], t)
                if r == 0 and i == 0:  # the cache is still cold for this one
                    cold_first[name] = t
                first[name][i] = out[0][0].token_ids
    identical = first["no_cache"] == first["cache"]
    fed_first = {name: fed[name][0] for name in engines}  # the first request of the first round
    fed_later = {name: statistics.median(fed[name][1:len(prompts)]) for name in engines}
    rows = [{"engine": name, "first_request_s": cold_first[name], "later_request_s": statistics.median(secs[name][1:]),
             "tokens_fed_first": fed_first[name], "tokens_fed_later": fed_later[name]} for name in engines]
    speedup = rows[0]["later_request_s"] / rows[1]["later_request_s"]
    print(f"prefix {args.prefix} + suffix {args.suffix} tokens, {args.requests} requests, block {args.block}, "
          f"{device.type}, compiled {on}")
    print(f"{'engine':<9} {'first req':>10} {'later req (median)':>19} {'tokens fed first/later':>23}")
    for r in rows:
        print(f"{r['engine']:<9} {r['first_request_s'] * 1e3:>8.1f}ms {r['later_request_s'] * 1e3:>17.1f}ms "
              f"{r['tokens_fed_first']:>11} / {r['tokens_fed_later']:<9}")
    print(f"prefill time saved on later requests: x{speedup:.2f} faster; first tokens identical: {identical}")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or f"runs/bench/inference_prefix_{device.type}.json")
    write_json(out, {"device": dev_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "compiled": on, "args": vars(args), "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                     "results": rows, "speedup_later": speedup, "identical": identical})
    print(f"wrote {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
