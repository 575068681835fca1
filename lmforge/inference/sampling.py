"""Sampling for the inference engine: per-request parameters applied to a batch of logits at once.

`SamplingParams` is one request's settings (OpenAI/vLLM names). `sample(logits, rows)` turns next-
token logits [B, V] into tokens for B rows that may each have different settings, in this order:
1. penalties: repetition (CTRL/HF rule over prompt + output: positive logits divided, negative
   multiplied by the penalty), then presence and frequency (OpenAI rule over output tokens:
   logit -= presence·[count > 0] + frequency·count);
2. temperature 0 means greedy (argmax of the penalised logits); otherwise logits / temperature;
3. filters: top-k, top-p (smallest most-likely set with mass >= top_p; the top token always stays),
   min-p (drop tokens with probability < min_p · p_max);
4. a draw by the exponential race argmax(p / E), E ~ Exp(1): an exact sample from p with no host
   sync. A request with a `seed` draws its noise from its own generator, so its tokens do not
   depend on which other requests share the batch.
Log-probs (chosen token and top-n) are of the model's distribution (log_softmax of the raw logits),
as vLLM reports them by default.

`probs(logits, params)` gives the processed distribution of step 3 (speculative decoding needs it).
The naive training-time sampler (train/generate.py) is the reference for temperature/top-k/top-p;
tests check that this module keeps the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.errors import ConfigError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); not in the output
    stop_ids: list[int] = field(default_factory=list)  # stop token ids; not in the output
    n: int = 1  # samples sharing one prefill
    logprobs: int | None = None  # None: no log-probs; k >= 0: chosen token's plus the top k

    def __post_init__(self) -> None:
        checks = [("max_tokens", self.max_tokens >= 1, ">= 1"), ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_k", self.top_k is None or self.top_k >= 1, ">= 1"),
                  ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", self.min_p is None or 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
                  ("n", self.n >= 1, ">= 1"), ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20,
                                                "in [0, 20]")]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"sampling parameter {name} = {getattr(self, name)!r} must be {want}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class Row:
    """One sequence's sampling state: its params, its generator (if seeded) and token counts."""

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)

    @classmethod
    def make(cls, params: SamplingParams, prompt_ids: list[int], device, seed_offset: int = 0) -> Row:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device).manual_seed(params.seed + seed_offset)
        return cls(params, gen, list(prompt_ids))


def apply_penalties(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Repetition, presence and frequency penalties, row by row (only rows that ask for them)."""
    if not any(r.params.penalised for r in rows):
        return logits
    logits = logits.clone()
    for b, r in enumerate(rows):
        p = r.params
        if not p.penalised:
            continue
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long,
                                device=logits.device)
            if len(seen):
                x = logits[b, seen]
                logits[b, seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_ids:
            ids = torch.tensor(r.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
            logits[b] -= p.presence_penalty * (counts > 0).to(logits.dtype) + p.frequency_penalty * counts
    return logits


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None,
                  min_p: float | None) -> torch.Tensor:
    """Set logits outside top-k, outside the top-p nucleus and below min-p·p_max to -inf ([.., V])."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0:
        probs = torch.softmax(logits.float(), dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a draw samples from: [.., V] float32 (one-hot at the argmax when greedy)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
    return torch.softmax(logits, dim=-1)


def draw(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """An exact sample from each row of p [.., V] by the exponential race (no host sync)."""
    noise = torch.empty_like(p).exponential_(generator=generator)
    return (p / noise).argmax(dim=-1)


@dataclass
class Sampled:
    tokens: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None = None  # [B] chosen token's log-prob
    top_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]


def sample(logits: torch.Tensor, rows: list[Row]) -> Sampled:
    """Next tokens for a batch: logits [B, V] (float), rows[b] the settings of row b."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sampling rows")
    logits = logits.float()
    x = apply_penalties(logits, rows)
    tokens = x.argmax(dim=-1)
    sampled = [b for b, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        same = all(rows[b].params == rows[sampled[0]].params for b in sampled)
        if same and all(rows[b].generator is None for b in sampled):  # one batched draw
            idx = torch.tensor(sampled, device=logits.device)
            tokens[idx] = draw(probs(x[idx], rows[sampled[0]].params))
        else:
            for b in sampled:
                tokens[b] = draw(probs(x[b], rows[b].params), rows[b].generator)
    out = Sampled(tokens)
    want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits, dim=-1)
        out.logprobs = lp.gather(-1, tokens[:, None]).squeeze(-1)
        k = max(want)
        if k:
            out.top_logprobs, out.top_ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
    return out


def fast_key(params: SamplingParams) -> tuple | None:
    """The settings the engine's captured decode step samples with, or None for a row that needs
    the general `sample` (penalties and log-probs read host-side state; a seed needs its own
    generator). Rows decode on the fast step together only when their keys are equal."""
    if params.penalised or params.logprobs is not None or params.seed is not None:
        return None
    if params.greedy:
        return ("greedy",)
    return ("sample", params.temperature, params.top_k, params.top_p, params.min_p)


def sample_fast(logits: torch.Tensor, key: tuple) -> torch.Tensor:
    """Tokens [B] for logits [B, V] that share one `fast_key`: the same tokens as `sample` gives
    for greedy rows, the same distribution for sampled ones; no host sync, so it can be captured."""
    logits = logits.float()
    if key[0] == "greedy":
        return logits.argmax(dim=-1)
    _, temperature, top_k, top_p, min_p = key
    return draw(torch.softmax(filter_logits(logits / temperature, top_k, top_p, min_p), dim=-1))
