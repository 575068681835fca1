"""BPE training speed: lmforge `train_bpe` vs rustbpe vs Hugging Face `tokenizers`, same corpus.

Every trainer gets the same in-memory list of documents (the embedded corpus' train split, or the
first --mb megabytes of it), the same pretokenization pattern and vocab size, and all cores. Times
are wall-clock from texts to merges (the best of --rounds). Prints a table with the ratio
lmforge / rustbpe (goal: <= 1.0) and writes JSON.

    python benchmarks/tokenizer_train.py --out runs/bench   # writes tokenizer_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def load_texts(mb: float | None) -> list[str]:
    from lmforge.data.sources import Corpus

    texts, size = [], 0
    for t in Corpus("embedded", split="train").texts():
        texts.append(t)
        size += len(t.encode("utf-8"))
        if mb and size >= mb * 1e6:
            break
    return texts


def time_best(fn, rounds: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run_lmforge(texts, vocab, pattern):
    from lmforge.tokenizer import train_bpe

    return train_bpe(texts, vocab, pattern=pattern, special_tokens=["<|endoftext|>"])


def run_rustbpe(texts, vocab, pattern):
    import rustbpe

    tok = rustbpe.Tokenizer()
    # rustbpe has no special tokens; leave room for ours so both make the same number of merges
    tok.train_from_iterator(iter(texts), vocab - 1, pattern=pattern)
    return tok


def run_hf(texts, vocab, pattern):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def compare_paths(texts, vocab, pattern) -> dict:
    """lmforge's C fast paths vs its pure-Python paths (same input, same merges asserted)."""
    from lmforge.tokenizer import pretokenize as P
    from lmforge.tokenizer import train as T

    sample = texts[: max(1, len(texts) // 8)]
    out = {"sample_mchars": sum(map(len, sample)) / 1e6}
    start = time.perf_counter()
    fast = P.count_words(sample, pattern, ["<|endoftext|>"])
    out["count_c_s"] = time.perf_counter() - start
    start = time.perf_counter()
    slow = P.count_words_python(sample, pattern, ["<|endoftext|>"])
    out["count_python_s"] = time.perf_counter() - start
    assert fast == slow
    counts = P.count_corpus(texts, pattern, ["<|endoftext|>"], workers=os.cpu_count() or 1)
    n = vocab - 257
    start = time.perf_counter()
    merges_c = T.train_merges(counts, n)
    out["merge_c_s"] = time.perf_counter() - start
    start = time.perf_counter()
    merges_py = T.train_merges_incremental(counts, n)
    out["merge_python_s"] = time.perf_counter() - start
    assert merges_c == merges_py
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--mb", type=float, default=None, help="use only the first MB of the corpus")
    p.add_argument("--vocab", type=int, nargs="+", default=[10_000, 32_000])
    p.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt4",
                   help="pretokenization pattern for every trainer (rustbpe's default is gpt4)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--compare-paths", action="store_true",
                   help="also time lmforge's C paths against its pure-Python paths (first vocab size)")
    args = p.parse_args()

    from lmforge.tokenizer import _native
    from lmforge.tokenizer.pretokenize import PATTERNS

    pattern = PATTERNS[args.pattern]
    texts = load_texts(args.mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(), "corpus_mb": round(mb, 2), "documents": len(texts),
            "pattern": args.pattern, "c_extension": _native.module() is not None}
    print(json.dumps(info))
    rows = []
    for vocab in args.vocab:
        row = {"vocab": vocab}
        row["lmforge_s"], tok = time_best(lambda v=vocab: run_lmforge(texts, v, pattern), args.rounds)
        row["rustbpe_s"], rtok = time_best(lambda v=vocab: run_rustbpe(texts, v, pattern), args.rounds)
        assert tok.vocab_size == vocab and rtok.vocab_size == vocab - 1
        if not args.skip_hf:
            row["hf_s"], _ = time_best(lambda v=vocab: run_hf(texts, v, pattern), args.rounds)
            row["hf_over_lmforge"] = row["hf_s"] / row["lmforge_s"]
        row["lmforge_over_rustbpe"] = row["lmforge_s"] / row["rustbpe_s"]
        # sanity: same corpus compression (bytes/token on a sample) as rustbpe
        sample = "".join(texts[:50])
        row["bytes_per_token_lmforge"] = len(sample.encode()) / len(tok.encode_ordinary(sample))
        row["bytes_per_token_rustbpe"] = len(sample.encode()) / len(rtok.encode(sample))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{mb:.1f} MB, pattern {args.pattern}, {os.cpu_count()} cores")
    print(f"{'vocab':>7} {'lmforge s':>10} {'rustbpe s':>10} {'HF s':>8} {'lmforge/rustbpe':>16} {'HF/lmforge':>11}")
    for r in rows:
        hf = f"{r['hf_s']:8.2f}" if "hf_s" in r else f"{'-':>8}"
        hr = f"{r['hf_over_lmforge']:11.2f}" if "hf_s" in r else f"{'-':>11}"
        print(f"{r['vocab']:>7} {r['lmforge_s']:10.2f} {r['rustbpe_s']:10.2f} {hf} {r['lmforge_over_rustbpe']:16.2f} {hr}")
    paths = None
    if args.compare_paths:
        paths = compare_paths(texts, args.vocab[0], pattern)
        print(f"\nword counting, 1 process, {paths['sample_mchars']:.1f}M chars: C {paths['count_c_s']:.2f}s, "
              f"regex {paths['count_python_s']:.2f}s ({paths['count_python_s'] / paths['count_c_s']:.1f}x); "
              f"merge loop to {args.vocab[0]}: C {paths['merge_c_s']:.2f}s, Python {paths['merge_python_s']:.2f}s "
              f"({paths['merge_python_s'] / paths['merge_c_s']:.1f}x); identical results")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer_train.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "paths": paths}, f, indent=1)


if __name__ == "__main__":
    main()
