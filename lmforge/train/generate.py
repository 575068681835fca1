"""Simple sampling from a language model: temperature, top-k, top-p (nucleus), stop tokens.

This is the readable path used for samples during training and `lmforge generate`: each new token
re-runs the model on the (cropped) context, with no KV cache. The inference package builds the fast
engine; this one is the spec its sampling must agree with.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (last dim = vocabulary).

    top-p keeps the smallest set of most likely tokens whose probability sums to >= top_p (the most
    likely token is always kept)."""
    if top_k is not None:
        if top_k < 1:
            raise ConfigError(f"top_k = {top_k} must be >= 1")
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(f"top_p = {top_p} must be in (0, 1]")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` [B, V]; temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ConfigError(f"temperature = {temperature} must be >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], max_new_tokens: int, *, context_length: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: tuple[int, ...] | list[int] = (), seed: int | None = None) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens`; stops after emitting a stop id
    (which is not returned). Returns only the new tokens."""
    device = next(model.parameters()).device
    if not prompt:
        raise ConfigError("generate: the prompt is empty (pass at least the BOS token)")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    stop = set(stop_ids)
    try:
        for _ in range(max_new_tokens):
            context = ids[:, -context_length:]
            logits = model(context).logits[:, -1, :]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            token = int(nxt.item())
            if token in stop:
                break
            out.append(token)
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    finally:
        model.train(was_training)
    return out
