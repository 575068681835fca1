"""Exact speculative decoding (Leviathan et al. 2023; Chen et al. 2023) for one sequence.

Each round a drafter proposes k tokens d_1..d_k with distributions q_1..q_k; the target model scores
[pending, d_1..d_k] in ONE forward, giving p_0..p_k. Token d_i is accepted with probability
min(1, p_{i-1}(d_i) / q_i(d_i)); at the first rejection a token is drawn from
norm(max(0, p_{i-1} - q_i)) and the round ends; if all k are accepted a bonus token is drawn from
p_k. Every emitted token then has exactly the target's (processed) distribution. Greedy decoding
is the special case of one-hot p and q, so its output is token-identical to plain greedy decoding.

Drafters:
- `DraftModel(model)`: any smaller lmforge model with the same vocabulary, with its own cache;
- `NGramDrafter`: prompt lookup: find the latest earlier occurrence of the last n tokens and
  propose what followed it (q is one-hot, so acceptance is p(d) and the residual is p without d).
Both caches are preallocated with key slot = position, so rolling back after a rejection is just
forgetting the rejected positions.

Penalties (repetition/presence/frequency) change p with the sequence, so they are not supported
here (a clear error). Batched speculative decoding is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.inference.cache import StaticKVCache
from lmforge.inference.sampling import SamplingParams, draw, probs


class _Cached:
    """A model with a one-row preallocated cache and the number of tokens it holds."""

    def __init__(self, model: nn.Module, max_len: int):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.cache = StaticKVCache.for_model(model, 1, max_len)
        self.length = 0

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Append tokens at positions length.. ; returns their logits [T, V] (float32)."""
        T = len(ids)
        pos = torch.arange(self.length, self.length + T, device=self.device)[None]
        view = self.cache.view(slice(0, 1), self.length + T, pos)
        logits = self.model(torch.tensor([ids], device=self.device), positions=pos, kv_cache=view).logits
        self.length += T
        return logits[0].float()


class DraftModel:
    """Drafts by sampling from a small model (same vocabulary as the target)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def start(self, max_len: int) -> None:
        self.state = _Cached(self.model, max_len)

    def propose(self, ids: list[int], k: int, params: SamplingParams, gen) -> tuple[list[int], torch.Tensor]:
        st = self.state
        new = ids[st.length:]  # tokens it has not seen (at least the pending one)
        tokens, qs = [], []
        for _ in range(k):
            q = probs(st.feed(new)[-1], params)
            d = int(draw(q, gen))
            tokens.append(d)
            qs.append(q)
            new = [d]
        return tokens, torch.stack(qs)

    def rollback(self, length: int) -> None:
        self.state.length = min(self.state.length, length)


class NGramDrafter:
    """Prompt-lookup drafting: continue the latest earlier match of the last n tokens (n_max..n_min)."""

    def __init__(self, n_max: int = 3, n_min: int = 1):
        if not 1 <= n_min <= n_max:
            raise ConfigError(f"NGramDrafter needs 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_max, self.n_min = n_max, n_min

    def start(self, max_len: int) -> None:
        pass

    def propose(self, ids: list[int], k: int, params: SamplingParams, gen) -> tuple[list[int], None]:
        for n in range(min(self.n_max, len(ids) - 1), self.n_min - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    return ids[start + n:start + n + k], None
        return [], None

    def rollback(self, length: int) -> None:
        pass


def verify(draft: list[int], q: torch.Tensor | None, p: torch.Tensor, gen) -> tuple[list[int], int]:
    """Accept/reject drafts: p [k+1, V] target, q [k, V] draft (None: one-hot at the drafts).

    Returns (emitted tokens: the accepted drafts then one resampled or bonus token, n_accepted)."""
    out = []
    for i, d in enumerate(draft):
        qd = 1.0 if q is None else float(q[i, d])
        pd = float(p[i, d])
        if float(torch.rand((), generator=gen)) * qd < pd:  # u < p/q, without dividing by zero
            out.append(d)
            continue
        qi = torch.nn.functional.one_hot(torch.tensor(d), p.shape[-1]).float() if q is None else q[i]
        residual = (p[i] - qi).clamp_min(0)
        total = residual.sum()
        # total = 0 only when p == q, where rejection has probability 0; guard float round-off
        out.append(int(draw(residual / total if total > 0 else p[i], gen)))
        return out, i
    out.append(int(draw(p[len(draft)], gen)))
    return out, len(draft)


@dataclass
class SpecResult:
    token_ids: list[int]
    finish_reason: str
    rounds: int
    drafted: int
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_generate(target: nn.Module, prompt: list[int], params: SamplingParams, drafter, *, k: int = 4,
                         max_len: int | None = None, eos_ids: list[int] = ()) -> SpecResult:
    """Generate one completion of `prompt` with target + drafter (DraftModel or NGramDrafter)."""
    if params.penalised:
        raise ConfigError("speculative decoding does not support repetition/presence/frequency penalties")
    if params.n != 1 or params.stop:
        raise ConfigError("speculative decoding takes n = 1 and stop token ids (not stop strings)")
    if not 1 <= k < 16:
        raise ConfigError(f"speculative k = {k} must be in [1, 16) (the cache's ring slack is 16)")
    if not prompt:
        raise ConfigError("the prompt is empty (pass at least one token, e.g. BOS)")
    max_len = max_len or target.cfg.context_length
    if len(prompt) >= max_len:
        raise ConfigError(f"prompt of {len(prompt)} tokens does not fit the context ({max_len} tokens)")
    gen = torch.Generator(device="cpu")
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    tgt = _Cached(target, max_len)
    drafter.start(max_len)
    if len(prompt) > 1:
        tgt.feed(prompt[:-1])
    ids, out = list(prompt), []
    stop = set(eos_ids) | set(params.stop_ids)
    rounds = drafted = accepted = 0
    while True:
        room = min(k, max_len - len(ids), params.max_tokens - len(out) - 1)
        draft, q = drafter.propose(ids, room, params, gen) if room > 0 else ([], None)
        draft = draft[:max(room, 0)]
        q = q[:len(draft)].cpu() if q is not None else None
        p = probs(tgt.feed([ids[-1]] + draft), params).cpu()  # [len(draft) + 1, V]
        new, n_acc = verify(draft, q, p, gen)
        rounds, drafted, accepted = rounds + 1, drafted + len(draft), accepted + n_acc
        tgt.length = len(ids) + n_acc  # roll back: the pending token and the accepted drafts stay
        drafter.rollback(len(ids) + n_acc)
        for t in new:
            if t in stop:
                return SpecResult(out, "stop", rounds, drafted, accepted)
            out.append(t)
            ids.append(t)
            if len(out) >= params.max_tokens or len(ids) >= max_len:
                return SpecResult(out, "length", rounds, drafted, accepted)
