"""Log-likelihood scoring with a model: the one primitive under every likelihood-based metric.

- `score_continuations(model, requests, strategy=...)`: for each (context_ids, continuation_ids)
  pair, the sum of log p(continuation token | everything before it), the number of tokens, and
  whether greedy decoding would have produced the continuation (lm-eval-harness's `is_greedy`).
  Strategies (all give the same numbers; tests check them against brute force):
  - "padded": every request as one full right-padded row, `batch_size` rows per forward (the
    plain reference, and the harness's HF-backend strategy);
  - "auto" (default): requests that share a context and whose continuations are all one token
    (MMLU's " A".." D") are scored from one forward of the context, `batch_size` contexts per
    forward; the rest go "padded";
  - "cache": like "auto", but a question with longer choices runs its context once into a KV cache,
    broadcasts it to one row per choice and scores all choices in one batched forward. It computes
    each context once instead of once per choice, but it is two small forwards per question;
    benchmarks/eval_scoring.py measures when that pays (on a loaded 2-core CPU it did not).
- `rolling_logprobs(model, token_lists)`: per-token log-probs of whole documents longer than the
  context, by sliding windows (each token is scored once, with at least `context - stride` tokens
  of context once the document is long enough).

Inputs are token ids; text, templates and metrics live in the task modules. Everything runs under
`torch.no_grad()` in the model's dtype, with the log-softmax taken in at least float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.model.cache import KVCache


@dataclass
class Score:
    logprob: float  # sum over continuation tokens (natural log)
    n_tokens: int
    is_greedy: bool


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], targets [B, T] (any value where unused) -> (log p(target) [B, T], argmax==target)."""
    # at least float32 (bf16 logits lose too much), float64 kept for the exactness tests
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    safe = targets.clamp_min(0)
    return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), logits.argmax(-1) == safe


def _fit(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Left-truncate the context so that context + continuation (minus the last token) fits."""
    if not continuation:
        raise ConfigError("a continuation must have at least one token")
    if len(continuation) > max_len:
        raise ConfigError(f"continuation of {len(continuation)} tokens does not fit the model's context "
                          f"({max_len} tokens)")
    if not context:
        raise ConfigError("a context must have at least one token (e.g. the end-of-text token)")
    keep = max_len + 1 - len(continuation)
    return context[-keep:], continuation


STRATEGIES = ("auto", "cache", "padded")


@torch.no_grad()
def score_continuations(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 32,
                        strategy: str = "auto") -> list[Score]:
    """Score each (context, continuation) pair; see the module docstring. Order is preserved."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown scoring strategy {strategy!r} (expected one of {STRATEGIES})")
    max_len = model.cfg.context_length
    fitted = [_fit(list(c), list(x), max_len) for c, x in requests]
    if strategy == "padded":
        return _score_padded(model, fitted, batch_size)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(tuple(ctx), []).append(i)
    out: list[Score | None] = [None] * len(fitted)
    single = [ctx for ctx, idx in groups.items() if all(len(fitted[i][1]) == 1 for i in idx)]
    for start in range(0, len(single), batch_size):
        chunk = single[start:start + batch_size]
        for ctx, lp, best in zip(chunk, *_last_logprobs(model, [list(c) for c in chunk])):
            for i in groups.pop(ctx):
                tok = fitted[i][1][0]
                out[i] = Score(float(lp[tok]), 1, tok == best)
    if strategy == "auto":
        rest = [i for idx in groups.values() for i in idx]
        for i, sc in zip(rest, _score_padded(model, [fitted[i] for i in rest], batch_size)):
            out[i] = sc
        return out  # type: ignore[return-value]
    for ctx, idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            for i, s in zip(chunk, _score_group(model, list(ctx), [fitted[i][1] for i in chunk])):
                out[i] = s
    return out  # type: ignore[return-value]


def _last_logprobs(model, contexts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """Next-token log-probs after each context, many contexts per forward (right-padded; each row's
    own last position is read): (log-probs [n, V] on the CPU, argmax ids)."""
    dev = _device(model)
    lengths = torch.tensor([len(c) for c in contexts], device=dev)
    inp = torch.zeros(len(contexts), int(lengths.max()), dtype=torch.long, device=dev)
    for r, c in enumerate(contexts):
        inp[r, :len(c)] = torch.tensor(c, device=dev)
    logits = model(inp).logits[torch.arange(len(contexts), device=dev), lengths - 1]
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logp.cpu(), logits.argmax(-1).tolist()


def _score_group(model, context: list[int], continuations: list[list[int]]) -> list[Score]:
    """One context, several continuations: prefill the context once, then all choices in one batch."""
    dev = _device(model)
    n, L = len(continuations), max(len(c) for c in continuations)
    cache = KVCache(model.cfg.n_layers)
    first = model(torch.tensor([context], device=dev), kv_cache=cache).logits[:, -1:]  # [1, 1, V]
    # Broadcast the cached context to one row per continuation (expand is a view; the next
    # update's cat makes the real copy).
    for layer in cache.layers:
        layer.tensors = tuple(t.expand(n, *t.shape[1:]) for t in layer.tensors)
    pad = torch.zeros(n, L, dtype=torch.long, device=dev)
    for r, c in enumerate(continuations):
        pad[r, :len(c)] = torch.tensor(c, device=dev)
    logits = first.expand(n, 1, -1)
    if L > 1:
        # Right padding is harmless: causal attention never lets a real token see a later pad.
        rest = model(pad[:, :-1], kv_cache=cache).logits
        logits = torch.cat([logits, rest], dim=1)
    lp, hit = _gather_logprobs(logits, pad)
    return [_summarise(lp[r], hit[r], len(c)) for r, c in enumerate(continuations)]


def _summarise(lp: torch.Tensor, hit: torch.Tensor, n: int) -> Score:
    return Score(float(lp[:n].sum()), n, bool(hit[:n].all()))


def _score_padded(model, fitted: list[tuple[list[int], list[int]]], batch_size: int) -> list[Score]:
    """Every request as one row [context + continuation][:-1], right-padded, batch_size per forward
    (rows sorted by length; results in the input order)."""
    dev = _device(model)
    out: list[Score | None] = [None] * len(fitted)
    # Longest first, so each batch holds rows of similar length (little padding), as the harness
    # does; ties by content, so the same requests in any order form the same batches (and give
    # bit-identical numbers).
    order = sorted(range(len(fitted)), key=lambda i: (-(len(fitted[i][0]) + len(fitted[i][1])),
                                                      fitted[i][0] + fitted[i][1], len(fitted[i][0])))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        chunk = [fitted[i] for i in idx]
        rows = [c + x for c, x in chunk]
        T = max(len(r) for r in rows) - 1
        inp = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
        tgt = torch.full((len(rows), T), -100, dtype=torch.long, device=dev)
        for r, ((c, x), row) in enumerate(zip(chunk, rows)):
            inp[r, :len(row) - 1] = torch.tensor(row[:-1], device=dev)
            tgt[r, len(c) - 1:len(row) - 1] = torch.tensor(x, device=dev)
        lp, hit = _gather_logprobs(model(inp).logits, tgt)
        for r, (i, (c, x)) in enumerate(zip(idx, chunk)):
            sl = slice(len(c) - 1, len(c) - 1 + len(x))
            out[i] = Score(float(lp[r, sl].sum()), len(x), bool(hit[r, sl].all()))
    return out  # type: ignore[return-value]


def rolling_windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence s[0..n_tokens) whose targets are s[1..n_tokens): a list of
    (begin, end, first_scored) meaning input s[begin:end-1] predicts s[begin+1:end], of which the
    targets at positions >= first_scored are counted. Every target is counted exactly once."""
    if not 1 <= stride <= max_len:
        raise ConfigError(f"stride must be in [1, context_length = {max_len}], got {stride}")
    windows, scored = [], 1  # position 0 (the BOS/EOT token) is never a target
    end = 0
    while scored < n_tokens:
        end = min(n_tokens, end + stride if windows else max_len + 1)
        begin = max(0, end - max_len - 1)
        windows.append((begin, end, scored))
        scored = end
    return windows


@torch.no_grad()
def rolling_logprobs(model, token_lists: list[list[int]], *, stride: int | None = None,
                     batch_size: int = 8) -> list[torch.Tensor]:
    """For each sequence s (s[0] is the BOS/EOT token that starts a document), log p(s[t] | s[<t])
    for t >= 1 as a float64 tensor of length len(s) - 1, scored with sliding windows of the model's
    context length advancing by `stride` tokens (default: half the context)."""
    max_len = model.cfg.context_length
    stride = stride or max(1, max_len // 2)
    dev = _device(model)
    jobs = []  # (seq index, begin, end, first_scored)
    for i, s in enumerate(token_lists):
        jobs += [(i, b, e, f) for b, e, f in rolling_windows(len(s), max_len, stride)]
    out = [torch.zeros(max(len(s) - 1, 0), dtype=torch.float64) for s in token_lists]
    # Similar lengths together keep padding small.
    jobs.sort(key=lambda j: j[2] - j[1])
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        T = max(e - b - 1 for _, b, e, _ in chunk)
        inp = torch.zeros(len(chunk), T, dtype=torch.long, device=dev)
        tgt = torch.zeros(len(chunk), T, dtype=torch.long, device=dev)
        for r, (i, b, e, _) in enumerate(chunk):
            s = torch.tensor(token_lists[i][b:e], device=dev)
            inp[r, :e - b - 1], tgt[r, :e - b - 1] = s[:-1], s[1:]
        lp = _gather_logprobs(model(inp).logits, tgt)[0].double().cpu()
        for r, (i, b, e, f) in enumerate(chunk):
            # row position p predicts s[b + 1 + p]; keep targets at >= f
            out[i][f - 1:e - 1] = lp[r, f - b - 1:e - b - 1]
    return out
