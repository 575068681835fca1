"""Shared helpers for the training tests: tiny shards with documents, a tiny real Transformer."""

import numpy as np
import pytest
import torch

from lmforge.data.shards import ShardWriter

BOS = 0
VOCAB = 53


def write_docs(path, docs, vocab=VOCAB):
    with ShardWriter(path, vocab_size=vocab, tokenizer_hash="test", bos_id=BOS) as w:
        for d in docs:
            w.write([BOS, *d], documents=1)
    return path


def random_docs(n, seed=0, lo=3, hi=40, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    write_docs(d / "train_000", random_docs(60, seed=1))
    write_docs(d / "train_001", random_docs(40, seed=2))
    return d


def tiny_model(seed=0, **kw):
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, context_length=24, d_model=24, n_layers=2, n_heads=3,
                                n_kv_heads=1, d_ff=40), **kw})
    return Transformer(cfg), cfg
