"""Exact speculative decoding (Leviathan et al. 2023; Chen et al. 2023), batched, inside the engine.

Each round a drafter proposes k tokens d_1..d_k with distributions q_1..q_k for every running
row; the target model scores [pending, d_1..d_k] of all rows in ONE forward, giving p_0..p_k.
Token d_i is accepted with probability min(1, p_{i-1}(d_i) / q_i(d_i)); at a row's first rejection
a token is drawn from norm(max(0, p_{i-1} - q_i)) and that row's round ends; if all its drafts are
accepted a bonus token is drawn from p_k. Every emitted token then has exactly the target's
(processed) distribution. Greedy decoding is the case of one-hot p and q, so its output is
token-identical to plain greedy decoding. Rows accept different numbers of tokens; each row's KV
cache is rolled back on its own (key slot = position, so rolling back is forgetting positions).

`verify` is the readable one-row rule; `verify_batch` does all rows at once on the device (a
test checks that they agree given the same random numbers). `Engine(model, drafter=..., spec_k=k)`
runs the rounds (`speculative_round`, called by engine.py); `speculative_generate` is one prompt
through such an engine, with acceptance statistics.

Drafters (batched over the engine's rows):
- `DraftModel(model)`: any smaller lmforge model with the same vocabulary, with its own cache of
  the engine's shape; it remembers how many tokens of each row's sequence its cache holds;
- `NGramDrafter(n)`: prompt lookup: find the latest earlier occurrence of the last n tokens and
  propose what followed it (q is one-hot, so acceptance is p(d) and the residual is p without d).

Rows with repetition/presence/frequency penalties get no drafts (their p changes with every
token) and advance one token per round, sampled exactly as in plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.inference.cache import StaticKVCache
from lmforge.inference.sampling import Row, SamplingParams, apply_penalties, probs
from lmforge.model.transformer import pack_projections


# -- the accept/reject rule -------------------------------------------------------------------------
def verify(draft: list[int], q: torch.Tensor | None, p: torch.Tensor, u: torch.Tensor,
           noise: torch.Tensor) -> tuple[list[int], int]:
    """One row (the reference): drafts, q [k, V] (None: one-hot at the drafts), p [k+1, V],
    uniforms u [k] and exponential noise [V] for the final draw (a draw from r is argmax(r / noise)).

    Returns (emitted tokens: the accepted drafts then one resampled or bonus token, n_accepted)."""
    out = []
    for i, d in enumerate(draft):
        qd = torch.ones(()) if q is None else q[i, d]
        if u[i] * qd < p[i, d]:  # u < p/q, without dividing by zero
            out.append(d)
            continue
        qi = torch.nn.functional.one_hot(torch.tensor(d), p.shape[-1]).to(p) if q is None else q[i]
        residual = (p[i] - qi).clamp_min(0)
        total = residual.sum()
        # total = 0 only when p == q, where rejection has probability 0; guard float round-off
        out.append(int((residual / total if total > 0 else p[i]).div(noise).argmax()))
        return out, i
    out.append(int(p[len(draft)].div(noise).argmax()))
    return out, len(draft)


def verify_batch(drafts: torch.Tensor, n_draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor,
                 u: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows at once: drafts [B, K] (row b uses its first n_draft[b]), q [B, K, V] or None,
    p [B, K+1, V], u [B, K], noise [B, V]. Returns (tokens [B, K+1], n_accepted [B]): row b emits
    tokens[b, :n_accepted[b] + 1]."""
    B, K = drafts.shape
    rows = torch.arange(B, device=p.device)
    pd = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    qd = torch.ones_like(pd) if q is None else q.gather(-1, drafts[..., None]).squeeze(-1)
    ok = (u * qd < pd) & (torch.arange(K, device=p.device) < n_draft[:, None])
    n_acc = ok.long().cumprod(-1).sum(-1)  # leading accepts
    p_n = p[rows, n_acc]
    at = n_acc.clamp(max=K - 1)
    q_n = (torch.nn.functional.one_hot(drafts[rows, at], p.shape[-1]).to(p) if q is None else q[rows, at])
    residual = (p_n - q_n).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p_n)
    dist = torch.where((n_acc < n_draft)[:, None], residual, p_n)
    extra = (dist / noise).argmax(-1)
    tokens = torch.cat((drafts, drafts[:, :1]), dim=1).scatter(1, n_acc[:, None], extra[:, None])
    return tokens, n_acc


# -- per-row processed distributions and random numbers --------------------------------------------
def row_probs(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Processed distributions [B, T, V] float32 of logits [B, T, V], each row with its own
    params; penalties (rows that have them draft nothing) are applied at position 0 only."""
    logits = logits.float()
    if any(r.params.penalised for r in rows):
        logits = logits.clone()
        logits[:, 0] = apply_penalties(logits[:, 0], rows)
    out = torch.empty_like(logits)
    groups: list[tuple[SamplingParams, list[int]]] = []
    for b, r in enumerate(rows):  # rows with equal settings are processed together
        g = next((g for g in groups if g[0] == r.params), None)
        if g is None:
            groups.append((r.params, [b]))
        else:
            g[1].append(b)
    for params, idx in groups:
        i = torch.tensor(idx, device=logits.device)
        out[i] = probs(logits[i], params)
    return out


def row_random(rows: list[Row], shape: tuple[int, ...], device, kind: str) -> torch.Tensor:
    """[B, *shape] uniforms ("uniform") or Exp(1) noise ("exponential"); a seeded row draws from its
    own generator (its tokens do not depend on its batch neighbours), the others from the global one."""
    out = torch.empty(len(rows), *shape, device=device)
    fill = (lambda t, g: t.uniform_(generator=g)) if kind == "uniform" else (lambda t, g: t.exponential_(generator=g))
    fill(out, None)
    for b, r in enumerate(rows):
        if r.generator is not None:
            fill(out[b], r.generator)
    return out


def row_draw(p: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """A sample from each row of p [B, V] (exponential race, per-row generators)."""
    return (p / row_random(rows, p.shape[1:], p.device, "exponential")).argmax(-1)


# -- drafters ----------------------------------------------------------------------------------------
class DraftModel:
    """Drafts by sampling from a small model (same vocabulary as the target), all rows at once."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def start(self, target: nn.Module, max_batch: int, max_len: int) -> None:
        if self.model.cfg.vocab_size != target.cfg.vocab_size:
            raise ConfigError(f"draft model vocab_size {self.model.cfg.vocab_size} differs from the target's "
                              f"{target.cfg.vocab_size} (they must share a tokenizer)")
        self.device = next(target.parameters()).device
        self.model.to(self.device)
        pack_projections(self.model)  # after the move, which would end the packing
        self.cache = StaticKVCache.for_model(self.model, max_batch, max_len, device=self.device)
        self.held: dict[int, tuple[object, int]] = {}  # slot -> (sequence, tokens of it in the cache)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: slice) -> torch.Tensor:
        view = self.cache.view(rows, int(pos.max()) + 1, pos)
        return self.model(ids, positions=pos, kv_cache=view).logits

    def propose(self, seqs: list, k: int) -> tuple[torch.Tensor, list[int] | None, torch.Tensor]:
        """k drafts for each sequence: (drafts [B, k], None (all k usable), q [B, k, V])."""
        tokens = [s.row.prompt_ids + s.row.output_ids for s in seqs]  # last one: pending, not in the target cache
        rows = [s.row for s in seqs]
        held = [self.held[s.slot][1] if self.held.get(s.slot, (None,))[0] is s else 0 for s in seqs]
        nb = max(s.slot for s in seqs) + 1
        for b, s in enumerate(seqs):  # a new row: prefill all but its last token alone
            if len(tokens[b]) - held[b] > 2:
                new = tokens[b][held[b]:-1]
                pos = torch.arange(held[b], len(tokens[b]) - 1, device=self.device)[None]
                self._forward(torch.tensor([new], device=self.device), pos, slice(s.slot, s.slot + 1))
                held[b] = len(tokens[b]) - 1
        # every row is now one or two tokens behind: one right-padded forward over rows 0..nb
        C = max(len(t) - h for t, h in zip(tokens, held))
        ids = torch.zeros(nb, C, dtype=torch.long)
        pos = torch.arange(C).repeat(nb, 1)  # idle rows: junk at positions 0.., never read
        for s, t, h in zip(seqs, tokens, held):
            ids[s.slot, :len(t) - h] = torch.tensor(t[h:])
            pos[s.slot] = torch.arange(h, h + C)  # padding lands beyond the row's tokens
        logits = self._forward(ids.to(self.device), pos.to(self.device), slice(0, nb))
        last = logits[[s.slot for s in seqs], [len(t) - h - 1 for t, h in zip(tokens, held)]].float()
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        start = torch.tensor([len(t) for t in tokens], device=self.device)
        drafts, qs = [], []
        for i in range(k):
            q = row_probs(last[:, None], rows)[:, 0]
            drafts.append(row_draw(q, rows))
            qs.append(q)
            if i == k - 1:
                break
            ids = torch.zeros(nb, 1, dtype=torch.long, device=self.device)
            pos = torch.zeros(nb, 1, dtype=torch.long, device=self.device)
            ids[slots, 0], pos[slots, 0] = drafts[-1], start + i
            last = self._forward(ids, pos, slice(0, nb))[slots, 0]
        for s, t in zip(seqs, tokens):
            self.held[s.slot] = (s, len(t) + k - 1)
        return torch.stack(drafts, 1), None, torch.stack(qs, 1)

    def rollback(self, s, length: int) -> None:
        """Sequence `s` keeps `length` tokens (the target's cache length after verification)."""
        if self.held.get(s.slot, (None,))[0] is s:
            self.held[s.slot] = (s, min(self.held[s.slot][1], length))


class NGramDrafter:
    """Prompt-lookup drafting: continue the latest earlier match of the last n tokens (n_max..n_min)."""

    def __init__(self, n_max: int = 3, n_min: int = 1):
        if not 1 <= n_min <= n_max:
            raise ConfigError(f"NGramDrafter needs 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_max, self.n_min = n_max, n_min

    def start(self, target: nn.Module, max_batch: int, max_len: int) -> None:
        self.device = next(target.parameters()).device

    def lookup(self, ids: list[int], k: int) -> list[int]:
        for n in range(min(self.n_max, len(ids) - 1), self.n_min - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    return ids[start + n:start + n + k]
        return []

    def propose(self, seqs: list, k: int) -> tuple[torch.Tensor, list[int], None]:
        found = [self.lookup(s.row.prompt_ids + s.row.output_ids, k) for s in seqs]
        drafts = torch.zeros(len(seqs), k, dtype=torch.long)
        for b, f in enumerate(found):
            drafts[b, :len(f)] = torch.tensor(f, dtype=torch.long)
        return drafts.to(self.device), [len(f) for f in found], None

    def rollback(self, s, length: int) -> None:
        pass


# -- one prompt, with statistics -------------------------------------------------------------------
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


def speculative_generate(target: nn.Module, prompt: list[int], params: SamplingParams, drafter, *, k: int = 4,
                         max_len: int | None = None, eos_ids: list[int] = ()) -> SpecResult:
    """Generate one completion of `prompt` with target + drafter (DraftModel or NGramDrafter)."""
    from lmforge.inference.engine import Engine  # the engine imports this module

    if params.n != 1:
        raise ConfigError("speculative_generate takes n = 1 (use an Engine for n > 1)")
    engine = Engine(target, max_batch=1, max_len=max_len, eos_ids=list(eos_ids), drafter=drafter, spec_k=k)
    rid = engine.add_request(prompt, params)
    seq = engine.requests[rid].sequences[0]
    while seq.finish_reason is None:
        engine.step()
    return SpecResult(list(seq.row.output_ids), seq.finish_reason, seq.rounds, seq.drafted, seq.accepted)


def speculative_round(engine, running: list) -> list:
    """One round of speculative decoding for every running Sequence of `engine` (an Engine):
    drafts, one target forward over all rows, verification, then the accepted tokens as events."""
    # k drafts fit every row's cache (so do the unused drafts, which act as padding)
    k = min(engine.spec_k, min(engine.max_len - s.length - 1 for s in running))
    drafts, found, q = engine.drafter.propose(running, k)
    n_draft = []  # drafts each row may use: none with penalties, none past max_tokens
    for b, s in enumerate(running):
        p = s.request.params
        n_draft.append(0 if p.penalised else
                       min(k, p.max_tokens - len(s.row.output_ids) - 1, k if found is None else found[b]))
    nb = max(s.slot for s in running) + 1
    slots = torch.tensor([s.slot for s in running], device=engine.device)
    tokens = torch.zeros(nb, k + 1, dtype=torch.long, device=engine.device)
    tokens[slots] = torch.cat((torch.tensor([[s.last] for s in running], device=engine.device), drafts), 1)
    pos = torch.arange(k + 1, device=engine.device).repeat(nb, 1)  # idle rows: junk in free rows
    pos[slots] += torch.tensor([s.length for s in running], device=engine.device)[:, None]
    if engine._graph_ok() and k == engine.spec_k:  # one more fixed shape [max_batch, spec_k + 1]
        logits = engine._forward_graph(tokens, pos)[slots].float()
    else:
        logits = engine._forward_rows(tokens, pos, max(s.length for s in running) + k + 1)[slots].float()
    rows = [s.row for s in running]
    V = logits.shape[-1]
    out, n_acc = verify_batch(drafts, torch.tensor(n_draft, device=engine.device), q, row_probs(logits, rows),
                              row_random(rows, (k,), engine.device, "uniform"),
                              row_random(rows, (V,), engine.device, "exponential"))
    want_lp = any(s.request.params.logprobs is not None for s in running)
    lp = torch.log_softmax(logits, -1) if want_lp else None
    out_l, n_acc_l = out.tolist(), n_acc.tolist()  # the one host sync of the step
    lps, tops = _round_logprobs(lp, out, running)
    events = []
    for b, s in enumerate(running):
        s.rounds, s.drafted, s.accepted = s.rounds + 1, s.drafted + n_draft[b], s.accepted + n_acc_l[b]
        for key, n in (("rounds", 1), ("drafted", n_draft[b]), ("accepted", n_acc_l[b])):
            engine.spec_stats[key] += n
        start = s.length
        for j in range(n_acc_l[b] + 1):  # the accepted drafts are in the cache; the last token is pending
            s.length = start + 1 + j
            top = None if tops is None else dict(zip(tops[0][b][j], tops[1][b][j]))
            events.append(engine._emit(s, out_l[b][j], lps[b][j] if lps else None, top))
            if s.finish_reason is not None:
                break
        if s.finish_reason is None:
            engine.drafter.rollback(s, s.length)
    return events

def _round_logprobs(lp, out, running):
    if lp is None:
        return None, None
    lps = lp.gather(-1, out[..., None]).squeeze(-1).tolist()
    k = max(s.request.params.logprobs or 0 for s in running)
    if not k:
        return lps, None
    vals, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
    return lps, (ids.tolist(), vals.tolist())
