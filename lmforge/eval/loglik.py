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
  - "cache": like "auto", but questions with longer choices share their context: several
    questions' contexts are packed as right-padded rows into one forward that fills a KV cache,
    the cache is fanned out to one row per choice, and all those choices run in one batched
    forward against it (per-row positions; padded context slots and padded choice tokens are
    masked out). Each context is computed once instead of once per choice, `batch_size` choice
    rows per pair of forwards; benchmarks/eval_scoring.py measures when that pays.
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
    # longest first, so that each forward's contexts have similar lengths (little padding)
    single = sorted((ctx for ctx, idx in groups.items() if all(len(fitted[i][1]) == 1 for i in idx)),
                    key=lambda c: (-len(c), c))
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
    # Whole questions (one with more than batch_size choices in chunks), longest contexts first so
    # that a batch's contexts have similar lengths (little padding in the prefill).
    jobs = sorted(((list(ctx), idx[s:s + batch_size]) for ctx, idx in groups.items()
                   for s in range(0, len(idx), batch_size)), key=lambda j: (-len(j[0]), j[0]))
    for batch in _pack(jobs, batch_size):
        scores = _score_shared_prefix(model, [(ctx, [fitted[i][1] for i in idx]) for ctx, idx in batch])
        for i, sc in zip((i for _, idx in batch for i in idx), scores):
            out[i] = sc
    return out  # type: ignore[return-value]


def _pack(jobs: list[tuple[list[int], list[int]]], rows: int):
    """Consecutive (context, request indices) jobs grouped so that each group has at most `rows`
    indices in all (a job is never split; each has at most `rows`)."""
    batch, n = [], 0
    for job in jobs:
        if batch and n + len(job[1]) > rows:
            yield batch
            batch, n = [], 0
        batch.append(job)
        n += len(job[1])
    if batch:
        yield batch


def _pad(rows: list[list[int]], width: int, fill: int, device: torch.device) -> torch.Tensor:
    """Right-padded [len(rows), width] long tensor, built on the CPU and moved in one copy."""
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for r, x in enumerate(rows):
        out[r, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out.to(device)


def _row_scores(logits: torch.Tensor, targets: torch.Tensor) -> list[Score]:
    """One Score per row from logits [B, T, V] and targets [B, T] (-100 where not scored), with a
    single device-to-host transfer for the whole batch."""
    lp, hit = _gather_logprobs(logits, targets)
    scored = targets >= 0
    sums = torch.where(scored, lp, torch.zeros_like(lp)).sum(-1)
    greedy = (hit | ~scored).all(-1)
    return [Score(float(a), int(n), bool(g))
            for a, n, g in zip(sums.tolist(), scored.sum(-1).tolist(), greedy.tolist())]


def _last_logprobs(model, contexts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """Next-token log-probs after each context, many contexts per forward (right-padded; each row's
    own last position is read): (log-probs [n, V] on the CPU, argmax ids)."""
    dev = _device(model)
    lengths = torch.tensor([len(c) for c in contexts], device=dev)
    inp = _pad(contexts, max(len(c) for c in contexts), 0, dev)
    logits = model(inp).logits[torch.arange(len(contexts), device=dev), lengths - 1]
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logp.cpu(), logits.argmax(-1).tolist()


class _PrefixLayer:
    """One layer's cache for `_score_shared_prefix` (the model's cache contract: `update`,
    `length`). The first update (the packed contexts) is plain causal attention. After `fan_out`,
    it holds one row per choice and `key_positions` [rows, cached + new] for the next call: each
    cached or new key's position, -1 for padding, so attention masks keys by position per row."""

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.key_positions: torch.Tensor | None = None

    @property
    def keys_at_positions(self) -> bool:
        return self.key_positions is not None

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.tensors is None:
            self.tensors = new
        else:
            self.tensors = tuple(torch.cat((old, t), dim=-2) for old, t in zip(self.tensors, new))
        return self.tensors

    @property
    def length(self) -> int:
        return 0 if self.tensors is None else self.tensors[0].shape[-2]


class _PrefixCache:
    def __init__(self, n_layers: int) -> None:
        self.layers = [_PrefixLayer() for _ in range(n_layers)]

    def layer(self, i: int) -> _PrefixLayer:
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def fan_out(self, rows: torch.Tensor, key_positions: torch.Tensor) -> None:
        """Row r becomes a copy of cached row rows[r]; key_positions covers cached + next keys."""
        for layer in self.layers:
            layer.tensors = tuple(t.index_select(0, rows) for t in layer.tensors)
            layer.key_positions = key_positions


def _score_shared_prefix(model, questions: list[tuple[list[int], list[list[int]]]]) -> list[Score]:
    """Several (context, continuations) questions in two forwards: the contexts packed as
    right-padded rows into a KV cache, then every continuation of every question as one row
    against its own context's cached keys. Scores in the order of the questions' continuations."""
    dev = _device(model)
    ctx_lens = [len(c) for c, _ in questions]
    S = max(ctx_lens)
    cache = _PrefixCache(model.cfg.n_layers)
    # Right padding is harmless in the prefill: causal attention never lets a real token see a
    # later pad; the pad slots are masked out below.
    logits = model(_pad([c for c, _ in questions], S, 0, dev), kv_cache=cache).logits
    owner = [q for q, (_, conts) in enumerate(questions) for _ in conts]
    conts = [x for _, xs in questions for x in xs]
    rows = torch.tensor(owner, device=dev)
    lens = torch.tensor([ctx_lens[q] for q in owner], device=dev)
    first = logits[torch.arange(len(questions), device=dev), torch.tensor(ctx_lens, device=dev) - 1]
    first = first.index_select(0, rows).unsqueeze(1)  # [R, 1, V]: predicts each first choice token
    targets = _pad(conts, max(len(x) for x in conts), -100, dev)
    T = targets.shape[1] - 1  # choice tokens fed as input (all but the last)
    if T == 0:
        return _row_scores(first, targets)
    # Choice token t of row r sits at position len(context) + t. Inputs that predict nothing (the
    # padding, and a shorter choice's last token) get position 0 as a query and -1 as a key, so no
    # scored token attends to them and no position runs past the context length.
    real = targets[:, 1:] >= 0
    pos = torch.where(real, lens[:, None] + torch.arange(T, device=dev), 0)
    cached = torch.arange(S, device=dev).expand(len(conts), S)
    key_pos = torch.cat((torch.where(cached < lens[:, None], cached, -1), torch.where(real, pos, -1)), 1)
    cache.fan_out(rows, key_pos)
    rest = model(targets[:, :-1].clamp_min(0), positions=pos, kv_cache=cache).logits
    return _row_scores(torch.cat((first, rest), dim=1), targets)


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
        inp = _pad([(c + x)[:-1] for c, x in chunk], max(len(c) + len(x) for c, x in chunk) - 1, 0, dev)
        # target of input position p is token p + 1: the continuation starts at len(c) - 1
        tgt = _pad([[-100] * (len(c) - 1) + x for c, x in chunk], inp.shape[1], -100, dev)
        for i, sc in zip(idx, _row_scores(model(inp).logits, tgt)):
            out[i] = sc
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
