"""Tiny random models and a byte-level tokenizer for the eval tests."""

from __future__ import annotations

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens + <|endoftext|> (id 256): vocab 257."""
    return Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])


def tiny_model(vocab: int = 257, context: int = 23, seed: int = 0, dtype=torch.float64, **over) -> Transformer:
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, context_length=context, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2,
              attention_backend="sdpa", init_std=0.2)
    kw.update(over)
    return Transformer(ModelConfig(**kw)).to(dtype).eval()


@torch.no_grad()
def brute_logprob(model, ids: list[int], start: int) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= start, one full forward per token over the whole prefix
    (left-truncated to the context): the spec."""
    out = []
    for t in range(start, len(ids)):
        prefix = ids[max(0, t - model.cfg.context_length):t]
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
        out.append(float(torch.log_softmax(logits, -1)[ids[t]]))
    return out
