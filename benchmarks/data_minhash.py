"""MinHash-LSH near-duplicate detection: lmforge vs datasketch (and datatrove's MinHash stages).

Same input for all: N real documents (standard library source files, in sorted path order) plus a
near-duplicate copy of every 10th one (one line appended). Same shingles (word 5-grams of the
normalised text), same number of hashes (112) and bands (14 × 8 rows).

- lmforge sig+LSH: shingle hashing, batched signatures, banding into candidate pairs.
- lmforge full: the above plus true-Jaccard verification and union-find (what the pipeline runs).
- datasketch: `MinHash.generator` over the same shingle strings (xxh32 as its hash function, the
  fastest it accepts) and `MinHashLSH(params=(14, 8))` insert + query for candidate pairs.
- datatrove (if installed): its four MinHash stages (signature, buckets, cluster, filter) run by
  its local executor on the same documents as JSONL, 1 task (14 for buckets), 1 worker; its own
  word tokenizer (spaCy) and sha1 32-bit shingle hashes. Includes its JSONL reading and writing.

Times are CPU seconds of the benchmark process (datatrove with 1 worker runs in it too): on a
shared machine wall time mostly measures the neighbours. Each lmforge/datasketch timing is the best
of --repeat runs.

Prints a table (documents/s and ratio to lmforge full) and writes JSON
(--out, default runs/bench/data_minhash.json). Recall = fraction of the planted pairs found.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from lmforge.data.dedup import normalize
from lmforge.data.minhash import lsh_candidates, near_duplicates, permutations, shingle_hashes, signatures
from lmforge.data.sources import Corpus
from lmforge.io import write_json

NGRAM, HASHES, BANDS = 5, 112, 14


def make_docs(n: int) -> tuple[list[str], set[tuple[int, int]]]:
    docs = []
    for doc in Corpus("embedded"):
        docs.append(doc.text)
        if len(docs) == n:
            break
    planted = set()
    for i in range(0, len(docs), 10):
        planted.add((i, len(docs)))
        docs.append(docs[i] + "\n# a near-duplicate copy with one extra line\n")
    return docs, planted


def clock() -> float:
    # CPU seconds of this process: on a shared machine, wall time mostly measures the neighbours.
    return time.process_time()


def run_lmforge(docs):
    t0 = clock()
    a, b = permutations(HASHES, 1)
    sigs = signatures([shingle_hashes(d, NGRAM) for d in docs], a, b)
    pairs = lsh_candidates(sigs, BANDS)
    t1 = clock()
    drop, _ = near_duplicates([shingle_hashes(d, NGRAM) for d in docs], HASHES, BANDS, 0.7)
    t2 = clock()
    return t1 - t0, t2 - t1, pairs, drop


def run_datasketch(docs):
    import xxhash
    from datasketch import MinHash, MinHashLSH

    t0 = clock()

    def shingles(text):
        w = normalize(text).split()
        n = min(NGRAM, len(w))
        return [" ".join(w[i:i + n]).encode() for i in range(len(w) - n + 1)] if w else []

    lsh = MinHashLSH(num_perm=HASHES, params=(BANDS, HASHES // BANDS))
    mhs = list(MinHash.generator([shingles(d) for d in docs], num_perm=HASHES, hashfunc=xxhash.xxh32_intdigest))
    for i, m in enumerate(mhs):
        lsh.insert(i, m)
    pairs = set()
    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            if j != i:
                pairs.add((min(i, j), max(i, j)))
    return clock() - t0, pairs


def run_datatrove(docs):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.utils.hashing import HashConfig

    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=HASHES // BANDS,
                        # datatrove 0.10's xxhash wrapper fails with xxhash 4.x ("Strings must be
                        # encoded"), so its sha1 hash is the one that runs here.
                        hash_config=HashConfig(precision=32, hash_fc="sha1"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        with open(tmp / "in" / "docs.jsonl", "w") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": str(i), "text": d}) + "\n")
        t0 = clock()
        stages = [
            [JsonlReader(str(tmp / "in")), MinhashDedupSignature(str(tmp / "sigs"), config=cfg)],
            [MinhashDedupBuckets(str(tmp / "sigs"), str(tmp / "buckets"), config=cfg)],
            [MinhashDedupCluster(str(tmp / "buckets"), str(tmp / "remove"), config=cfg)],
            [JsonlReader(str(tmp / "in")), MinhashDedupFilter(str(tmp / "remove"))],
        ]
        for i, steps in enumerate(stages):
            tasks = BANDS if i == 1 else 1
            LocalPipelineExecutor(steps, tasks=tasks, workers=1, logging_dir=str(tmp / f"logs{i}"),
                                  skip_completed=False).run()
        return clock() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000, help="original documents (10%% more are near copies)")
    ap.add_argument("--no-datatrove", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/data_minhash.json")
    args = ap.parse_args()

    docs, planted = make_docs(args.docs)
    normalize("warm-up")  # builds the punctuation table once, outside every timing
    mb = sum(len(d.encode()) for d in docs) / 1e6
    runs = [run_lmforge(docs) for _ in range(args.repeat)]
    sig_s, full_s = min(r[0] for r in runs), min(r[1] for r in runs)
    _, _, ours_pairs, drop = runs[0]
    rows = [("lmforge full (sig+LSH+verify+union-find)", full_s, len(planted & ours_pairs) / len(planted)),
            ("lmforge sig+LSH", sig_s, len(planted & ours_pairs) / len(planted))]
    ds = [run_datasketch(docs) for _ in range(args.repeat)]
    ds_s, ds_pairs = min(r[0] for r in ds), ds[0][1]
    rows.append(("datasketch sig+LSH", ds_s, len(planted & ds_pairs) / len(planted)))
    if not args.no_datatrove:
        try:
            rows.append(("datatrove 4 MinHash stages", run_datatrove(docs), float("nan")))
        except Exception as e:  # report why, don't hide it
            print(f"datatrove not run: {type(e).__name__}: {e}", file=sys.stderr)

    print(f"{len(docs)} documents, {mb:.1f} MB, {HASHES} hashes in {BANDS} bands, {NGRAM}-gram shingles; "
          f"lmforge dropped {len(drop)} (planted {len(planted)})")
    print(f"{'method':44s} {'CPU s':>8s} {'docs/s':>9s} {'MB/s':>6s} {'recall':>6s} {'vs datasketch':>13s}")
    result = []
    for name, s, recall in rows:
        print(f"{name:44s} {s:8.2f} {len(docs) / s:9.0f} {mb / s:6.2f} {recall:6.2f} {ds_s / s:12.2f}x")
        result.append({"method": name, "seconds": s, "docs_per_s": len(docs) / s, "mb_per_s": mb / s,
                       "recall": recall, "speedup_vs_datasketch": ds_s / s})
    write_json(Path(args.out), {"device": platform.processor() or platform.machine(), "command": " ".join(sys.argv),
                                "date": time.strftime("%Y-%m-%d"), "docs": len(docs), "mb": mb, "rows": result})


if __name__ == "__main__":
    main()
