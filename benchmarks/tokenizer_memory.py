"""Peak memory of BPE training on a streamed corpus 4x larger than a memory budget.

The corpus is generated on the fly (so it never sits in memory or on disk): the embedded corpus'
documents, cycled, each followed by a line of words drawn from a Zipf distribution over 26^6 random
6-letter words, so the number of distinct words keeps growing with the corpus (the case that makes
a word table outgrow memory). Training runs in a child process with one pretokenization worker (all
work in that process); the child reports its peak resident memory (VmHWM) above its resident memory
just before training. Prints budget, corpus size, peak and pruned words; writes JSON.

    python benchmarks/tokenizer_memory.py --out runs/bench   # writes tokenizer_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def corpus(total_bytes: int, seed: int = 0):
    import numpy as np

    from lmforge.data.sources import Corpus

    rng = np.random.default_rng(seed)
    powers = 26 ** np.arange(6, dtype=np.int64)
    size = 0
    while True:
        for doc in Corpus("embedded", split="train").texts():
            n = max(1, len(doc) // 14)  # ~half the text is zipf words (7 chars each with the space)
            idx = rng.zipf(1.2, n) % (26 ** 6)
            letters = ((idx[:, None] // powers) % 26 + 97).astype(np.uint8)
            words = np.concatenate([np.full((n, 1), 32, np.uint8), letters], axis=1).tobytes().decode("ascii")
            text = doc + "\n#" + words + "\n"
            size += len(text)
            yield text
            if size >= total_bytes:
                return


def child(args) -> None:
    from lmforge.tokenizer import _native, train_bpe

    # Fixed costs, paid once whatever the corpus size, come before the baseline: imports (numpy,
    # regex), the C extension's Unicode table, and the first document of the stream.
    _native.module()
    stream = corpus(int(args.budget_mb * args.factor * 2**20))
    first = next(stream)
    budget = int(args.budget_mb * 2**20) if not args.no_budget else None
    base = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    import itertools

    stream = itertools.chain([first], stream)
    stats: dict = {}
    start = time.perf_counter()
    tok = train_bpe(stream, args.vocab, workers=1, memory_budget=budget, stats=stats)
    seconds = time.perf_counter() - start
    peak = proc_status("VmHWM")
    print(json.dumps({"baseline_rss_mb": base / 2**20, "peak_rss_mb": peak / 2**20,
                      "peak_above_baseline_mb": (peak - base) / 2**20, "seconds": seconds,
                      "corpus_mb": stats.get("chars", 0) / 2**20, "unique_words_kept": stats.get("unique_words"),
                      "pruned_words": stats.get("pruned_words", 0), "vocab_size": tok.vocab_size}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--budget-mb", type=float, default=64)
    p.add_argument("--factor", type=float, default=4.0, help="corpus size / budget")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--control", action="store_true", help="also run without a budget, for comparison")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-budget", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    runs = {}
    for name, extra in [("budget", [])] + ([("no_budget", ["--no-budget"])] if args.control else []):
        cmd = [sys.executable, __file__, "--child", "--budget-mb", str(args.budget_mb), "--factor",
               str(args.factor), "--vocab", str(args.vocab)] + extra
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[name] = json.loads(res.stdout.strip().splitlines()[-1])
        print(name, json.dumps(runs[name]), flush=True)
    r = runs["budget"]
    print(f"\nbudget {args.budget_mb:.0f} MB, corpus {r['corpus_mb']:.0f} MB ({r['corpus_mb'] / args.budget_mb:.1f}x), "
          f"peak above baseline {r['peak_above_baseline_mb']:.1f} MB "
          f"({'within' if r['peak_above_baseline_mb'] <= args.budget_mb else 'OVER'} budget), "
          f"pruned {r['pruned_words']} words, {r['seconds']:.1f}s")
    if "no_budget" in runs:
        print(f"without a budget: peak above baseline {runs['no_budget']['peak_above_baseline_mb']:.1f} MB")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer_memory.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "budget_mb": args.budget_mb, "factor": args.factor,
                   "load_avg": os.getloadavg(), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
