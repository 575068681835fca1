"""Multiple-choice scoring throughput: shared-prefix batching vs full-row batching vs one request
per forward, on MMLU-shaped and HellaSwag-shaped synthetic questions.

Same model (random weights, seeded), same token ids, same process:
  auto           lmforge default: single-token choices (MMLU letters) read from one batched
                 context forward, --batch contexts per forward; longer choices as `padded`
  cache          as auto, but longer choices: the context once into a KV cache, broadcast to one
                 row per choice, all choices of a question in one forward
  padded         every (context + choice) as its own row, right-padded, --batch rows per forward
                 (the strategy of lm-eval-harness's HF backend, reimplemented here; HFLM itself
                 needs accelerate + a HF tokenizer and is not what is timed)
  per_request    one forward per (context, choice), batch 1 (the naive loop)
Questions/s, the ratio to `padded`, the projected time for MMLU's 14,042 test questions, and the
largest log-likelihood difference to `padded` (all variants must agree). Variants run in
interleaved rounds (--repeats) and the best time of each is kept.

  python benchmarks/eval_scoring.py                         # CPU, tiny shape
  python benchmarks/eval_scoring.py --shape gpt2s --questions 2000 --device cuda   # 124M on a GPU

Prints a table and writes JSON (--out, default runs/bench/eval_scoring_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
from common import timed

from lmforge.eval.loglik import score_continuations
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer

SHAPES = {
    "tiny": dict(vocab_size=4096, context_length=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
    "gpt2s": dict(vocab_size=50304, context_length=1024, d_model=768, n_layers=12, n_heads=12),
}
# (context tokens low/high, choice tokens low/high); MMLU 0-shot prompts are ~60-400 tokens.
TASKS = {"mmlu": ((60, 400), (1, 1)), "hellaswag": ((40, 110), (10, 40))}
MMLU_QUESTIONS = 14042


def make_requests(task: str, n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    (clo, chi), (lo, hi) = TASKS[task]
    reqs = []
    for _ in range(n):
        ctx = torch.randint(0, vocab, (int(torch.randint(clo, chi + 1, (1,), generator=g)),), generator=g).tolist()
        for _ in range(4):
            m = int(torch.randint(lo, hi + 1, (1,), generator=g))
            reqs.append((ctx, torch.randint(0, vocab, (m,), generator=g).tolist()))
    return reqs




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all variants (interleaved); best time kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--skip", nargs="*", default=[], help="variants to skip (per_request is slow)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPES[args.shape])).to(device=device, dtype=dtype).eval()
    variants = {"auto": dict(strategy="auto", batch_size=args.batch),
                "cache": dict(strategy="cache", batch_size=args.batch),
                "padded": dict(strategy="padded", batch_size=args.batch),
                "per_request": dict(strategy="padded", batch_size=1)}
    rows = []
    for task in args.tasks:
        reqs = make_requests(task, args.questions, SHAPES[args.shape]["vocab_size"], seed=1)
        for kw in variants.values():  # warm-up
            score_continuations(model, reqs[:8], **kw)
        results = {}
        for _ in range(args.repeats):  # interleaved rounds: a burst of load on a shared machine hits all variants
            for name, kw in variants.items():
                if name in args.skip:
                    continue
                seconds, scores = timed(lambda kw=kw, reqs=reqs: score_continuations(model, reqs, **kw), device)
                if name not in results or seconds < results[name][0]:
                    results[name] = (seconds, [s.logprob for s in scores])
        ref_s, ref = results.get("padded", next(iter(results.values())))
        for name, (seconds, lps) in results.items():
            qps = args.questions / seconds
            rows.append({"task": task, "variant": name, "questions_per_s": qps, "vs_padded": ref_s / seconds,
                         "mmlu_minutes": MMLU_QUESTIONS / qps / 60,
                         "max_abs_diff": max(abs(a - b) for a, b in zip(lps, ref))})
    print(f"shape {args.shape}, {args.questions} questions x 4 choices, device {device}, dtype {dtype}")
    print(f"{'task':<10} {'variant':<14} {'q/s':>9} {'x padded':>9} {'14k q (min)':>12} {'max |dLL|':>10}")
    for r in rows:
        print(f"{r['task']:<10} {r['variant']:<14} {r['questions_per_s']:>9.1f} {r['vs_padded']:>9.2f} "
              f"{r['mmlu_minutes']:>12.2f} {r['max_abs_diff']:>10.2e}")
    out = args.out or f"runs/bench/eval_scoring_{device.type}.json"
    write_json(out, {"date": datetime.datetime.now(datetime.UTC).isoformat(), "host": platform.node(),
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                     "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
