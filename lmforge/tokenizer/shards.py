"""Corpus -> token shard, encoded in parallel worker processes.

Documents are encoded in batches by a pool of processes (at most two batches per worker in flight,
so memory stays bounded), and written in corpus order to a `lmforge.data.shards.ShardWriter`, each
document preceded by the tokenizer's `<|endoftext|>` id. Text is encoded as ordinary text (a special
token string inside a document is not turned into its id).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.data.shards import ShardWriter, dtype_for_vocab
from lmforge.errors import TokenizerError

_WORKER: dict = {}


def _init(tok) -> None:
    _WORKER["tok"] = tok


def _encode_docs(docs: list[str]) -> tuple[np.ndarray, int]:
    tok = _WORKER["tok"]
    eot = tok.eot_id
    dtype = dtype_for_vocab(tok.vocab_size)
    parts, n_bytes = [], 0
    for text in docs:
        parts.append(np.array([eot], dtype=dtype))
        parts.append(np.asarray(tok.encode_ordinary(text), dtype=dtype))
        n_bytes += len(text.encode("utf-8", "replace"))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), n_bytes


def _batches(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_corpus_to_shard(tok, texts: Iterable[str], path: str | Path, workers: int = 1,
                           batch_chars: int = 1 << 20, desc: str = "encode", progress: bool = True,
                           meta: dict | None = None) -> dict:
    """Encode `texts` into the shard `path` (path.bin + path.json); returns counts and timing."""
    if tok.eot_id is None:
        raise TokenizerError("encoding a corpus needs a document token: train the tokenizer with "
                             "--special '<|endoftext|>'")
    from tqdm import tqdm

    start = time.perf_counter()
    n_bytes = n_docs = 0
    bar = tqdm(desc=desc, unit="B", unit_scale=True, disable=not progress)
    with ShardWriter(path, tok.vocab_size, tokenizer_hash=tok.hash, bos_id=tok.eot_id,
                     meta=meta) as writer:

        def take(result, docs_in_batch):
            nonlocal n_bytes, n_docs
            ids, nb = result
            writer.write(ids, documents=docs_in_batch)
            n_bytes += nb
            n_docs += docs_in_batch
            bar.update(nb)

        if workers <= 1:
            _init(tok)
            for batch in _batches(texts, batch_chars):
                take(_encode_docs(batch), len(batch))
        else:
            # Encode the first batch here before starting the pool: forked workers then start with
            # this process' warm word cache instead of an empty one.
            batches = _batches(texts, batch_chars)
            first = next(batches, None)
            if first is not None:
                _init(tok)
                take(_encode_docs(first), len(first))
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(workers, initializer=_init, initargs=(tok,)) as pool:
                pending: deque = deque()
                for batch in batches:
                    pending.append((pool.apply_async(_encode_docs, (batch,)), len(batch)))
                    if len(pending) >= 2 * workers:
                        r, n = pending.popleft()
                        take(r.get(), n)
                while pending:
                    r, n = pending.popleft()
                    take(r.get(), n)
        count = writer.count
    bar.close()
    seconds = time.perf_counter() - start
    return {"path": str(writer.bin_path), "documents": n_docs, "tokens": count, "bytes": n_bytes,
            "mb": n_bytes / 1e6, "seconds": seconds}
