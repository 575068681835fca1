"""Encoding speed: corpus -> token shard with all cores vs tiktoken single-thread, same text.

Rows (MB/s of UTF-8 input, each from this one run):
- tiktoken, one thread: `Encoding.encode_ordinary` per document, built offline from our ranks;
- lmforge shard writer, all cores, tiktoken backend (the CLI default when tiktoken is installed);
- lmforge shard writer, all cores, reference backend;
- lmforge reference encoder, one process, cold word cache: with the C extension's word split and
  cache loop (BPE of new words stays Python), and pure Python (`regex` split, what runs without the
  extension).
The shards written by both backends are checked to hold identical ids.

    python benchmarks/tokenizer_encode.py --out runs/bench   # writes tokenizer_encode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--mb", type=float, default=10.0, help="MB of text to encode")
    p.add_argument("--vocab", type=int, default=8192)
    args = p.parse_args()

    import numpy as np

    from lmforge.data.shards import open_shard
    from lmforge.data.sources import Corpus
    from lmforge.tokenizer import Tokenizer, train_bpe
    from lmforge.tokenizer.shards import encode_corpus_to_shard

    train_texts = Corpus("embedded", split="train").texts()
    tok = train_bpe(train_texts, args.vocab)
    # encode the validation split first (text the tokenizer did not see), then train text up to --mb
    texts, size = [], 0
    for t in list(Corpus("embedded", split="val").texts()) + list(Corpus("embedded", split="train").texts()):
        texts.append(t)
        size += len(t.encode("utf-8"))
        if size >= args.mb * 1e6:
            break
    mb = size / 1e6
    cpus = os.cpu_count() or 1
    info = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": cpus,
            "load_avg": os.getloadavg(), "mb": round(mb, 2), "documents": len(texts), "vocab": args.vocab}
    print(json.dumps(info))
    rows = {}

    enc = tok.to_tiktoken()
    start = time.perf_counter()
    n_tik = sum(len(enc.encode_ordinary(t)) for t in texts)
    rows["tiktoken_1thread"] = mb / (time.perf_counter() - start)

    shards = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("tiktoken", "reference"):
            t = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern, backend=backend)
            res = encode_corpus_to_shard(t, texts, Path(tmp) / backend, workers=cpus, progress=False)
            rows[f"shard_writer_{cpus}proc_{backend}"] = mb / res["seconds"]
            shards[backend] = np.array(open_shard(Path(tmp) / backend)[0])
    assert np.array_equal(shards["tiktoken"], shards["reference"]), "backends disagree"
    assert len(shards["reference"]) == n_tik + len(texts)

    for name, native in (("reference_1proc_c_word_loop", True), ("reference_1proc_pure_python", False)):
        t = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern)  # cold cache
        if not native:  # what runs without the C extension: regex split, Python loop
            t._split, t._fast_encode = t._pat.findall, None
        start = time.perf_counter()
        for text in texts:
            t.encode_ordinary(text)
        rows[name] = mb / (time.perf_counter() - start)

    base = rows["tiktoken_1thread"]
    print(f"\n{mb:.1f} MB, vocab {args.vocab}, {cpus} cores (load avg {info['load_avg'][0]:.1f})")
    print(f"{'encoder':<36} {'MB/s':>8} {'vs tiktoken 1 thread':>21}")
    for k, v in rows.items():
        print(f"{k:<36} {v:8.2f} {v / base:21.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer_encode.json"), "w") as f:
        json.dump({"info": info, "mb_per_s": rows, "ratio_vs_tiktoken_1thread": {k: v / base for k, v in rows.items()}},
                  f, indent=1)


if __name__ == "__main__":
    main()
