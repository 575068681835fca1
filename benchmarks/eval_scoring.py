"""Multiple-choice scoring throughput: shared-prefix batching vs full-row batching vs one request
per forward, on MMLU-shaped and HellaSwag-shaped synthetic questions.

Same model (random weights, seeded), same token ids, same process:
  auto           lmforge default: single-token choices (MMLU letters) read from one batched
                 context forward, --batch contexts per forward; longer choices as `padded`
  cache          as auto, but longer choices share their context: several questions' contexts in
                 one forward into a KV cache, then all their choices (--batch rows) in one forward
  padded         every (context + choice) as its own row, right-padded, --batch rows per forward
                 (the strategy of lm-eval-harness's HF backend, reimplemented here; HFLM itself
                 needs accelerate + a HF tokenizer and is not what is timed)
  cache_1q       `cache` called one question at a time (no batching across questions)
  per_request    one forward per (context, choice), batch 1 (the naive loop)
The two one-question-at-a-time variants are timed on the first --slow-questions questions only
(their rate per question does not depend on how many there are). Several --batch values time the
batched variants at each. Printed: questions/s, the ratio to `padded` (at the first batch size),
the projected minutes for MMLU's 14,042 test questions at that rate, and the largest
log-likelihood difference to `padded` on the same questions (all variants must agree). Variants
run in interleaved rounds (--repeats) and the best time of each is kept.

  python benchmarks/eval_scoring.py                         # CPU, tiny shape
  python benchmarks/eval_scoring.py --shape gpt2s --questions 2000 --device cuda   # 124M on a GPU

Prints a table and writes JSON (--out, default runs/bench/eval_scoring_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

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
CHOICES = 4


def make_requests(task: str, n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    (clo, chi), (lo, hi) = TASKS[task]
    reqs = []
    for _ in range(n):
        ctx = torch.randint(0, vocab, (int(torch.randint(clo, chi + 1, (1,), generator=g)),), generator=g).tolist()
        for _ in range(CHOICES):
            m = int(torch.randint(lo, hi + 1, (1,), generator=g))
            reqs.append((ctx, torch.randint(0, vocab, (m,), generator=g).tolist()))
    return reqs


def one_question_at_a_time(model, reqs, **kw):
    out = []
    for q in range(0, len(reqs), CHOICES):
        out += score_continuations(model, reqs[q:q + CHOICES], **kw)
    return out


def variants(batches: list[int]) -> dict[str, tuple[object, dict, bool]]:
    """name -> (function, keyword arguments, timed on the --slow-questions subset)."""
    out = {}
    for b in batches:
        suffix = "" if len(batches) == 1 else f"/{b}"
        for strategy in ("auto", "cache", "padded"):
            out[strategy + suffix] = (score_continuations, dict(strategy=strategy, batch_size=b), False)
    out["cache_1q"] = (one_question_at_a_time, dict(strategy="cache", batch_size=batches[0]), True)
    out["per_request"] = (score_continuations, dict(strategy="padded", batch_size=1), True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--slow-questions", type=int, default=100,
                    help="questions for the one-question-at-a-time variants (cache_1q, per_request)")
    ap.add_argument("--batch", type=int, nargs="+", default=[32], help="choice rows per forward (several: each)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all variants (interleaved); best time kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--skip", nargs="*", default=[], help="variants to skip")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPES[args.shape])).to(device=device, dtype=dtype).eval()
    todo = {k: v for k, v in variants(args.batch).items() if k not in args.skip}
    ref_name = "padded" if len(args.batch) == 1 else f"padded/{args.batch[0]}"
    n_slow = min(args.slow_questions, args.questions)
    rows = []
    for task in args.tasks:
        reqs = make_requests(task, args.questions, SHAPES[args.shape]["vocab_size"], seed=1)
        for fn, kw, _ in todo.values():  # warm-up (CUDA context, kernels, allocator)
            fn(model, reqs[:8 * CHOICES], **kw)
        results = {}
        for _ in range(args.repeats):  # interleaved rounds: a burst of load on a shared machine hits all variants
            for name, (fn, kw, slow) in todo.items():
                part = reqs[:n_slow * CHOICES] if slow else reqs
                seconds, scores = timed(lambda fn=fn, kw=kw, part=part: fn(model, part, **kw), device)
                if name not in results or seconds < results[name][0]:
                    results[name] = (seconds, [s.logprob for s in scores], len(part) // CHOICES)
        ref_s, ref, ref_q = results.get(ref_name, next(iter(results.values())))
        for name, (seconds, lps, n_q) in results.items():
            qps = n_q / seconds
            rows.append({"task": task, "variant": name, "questions": n_q, "seconds": seconds,
                         "questions_per_s": qps, "vs_padded": qps / (ref_q / ref_s),
                         "mmlu_minutes": MMLU_QUESTIONS / qps / 60,
                         "max_abs_diff": max(abs(a - b) for a, b in zip(lps, ref))})
    wall = time.perf_counter() - t_start
    print(f"shape {args.shape}, {args.questions} questions x {CHOICES} choices ({n_slow} for cache_1q and "
          f"per_request), device {device}, dtype {dtype}, best of {args.repeats}")
    print(f"{'task':<10} {'variant':<14} {'q/s':>9} {'x padded':>9} {'14,042 q (min)':>15} {'max |dLL|':>10}")
    for r in rows:
        print(f"{r['task']:<10} {r['variant']:<14} {r['questions_per_s']:>9.1f} {r['vs_padded']:>9.2f} "
              f"{r['mmlu_minutes']:>15.2f} {r['max_abs_diff']:>10.2e}")
    print(f"script wall time {wall:.0f} s")
    out = args.out or f"runs/bench/eval_scoring_{device.type}.json"
    write_json(out, {"date": datetime.datetime.now(datetime.UTC).isoformat(), "host": platform.node(),
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                     "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "wall_seconds": wall, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
