"""The engine's bookkeeping records: a request, its sequences (one per sample), the events a
step reports and the finished completions. Plain data; the engine (engine.py) drives them."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.inference.sampling import Row, SamplingParams
from lmforge.inference.text import TextStream


@dataclass
class Event:
    """One step's news for one sequence: a new token (None when it finished without one)."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int | None
    text: str = ""
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" when this is the last event


@dataclass
class Sequence:
    request: Request
    index: int
    row: Row
    slot: int | None = None
    length: int = 0  # tokens in the cache
    last: int | None = None  # sampled, not yet in the cache
    text: TextStream | None = None
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prefix: list = field(default_factory=list)  # pinned prefix-cache blocks it was started from
    rounds: int = 0  # speculative rounds, drafted and accepted tokens
    drafted: int = 0
    accepted: int = 0


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


@dataclass
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


def completion(s: Sequence) -> Completion:
    want = s.request.params.logprobs is not None
    return Completion(list(s.row.output_ids), s.text.text if s.text is not None else None, s.finish_reason,
                      s.logprobs if want else None, s.top_logprobs if want else None)
