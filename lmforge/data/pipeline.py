"""Pipeline steps: the unit of data processing, with per-step statistics and drop reasons.

A step maps a stream of `Document`s to a stream of `Document`s (`run(docs, rank, world)`), the
datatrove contract. Three kinds:

- `PipelineStep`: transforms documents (extraction, PII masking, tokenization, writing).
- `Filter`: `filter(doc)` returns True to keep, or `(False, reason)` to drop. The base counts
  documents and bytes in/out and drops per reason, and hands dropped documents to an exclusion
  writer when the executor gives it one.
- `GlobalStep`: needs to see every document of every task before deciding (exact dedup, line dedup,
  MinHash). The executor runs it in three phases: `observe` (per task, records hashes/signatures
  keyed by the document's position in its task), `plan` (once, writes per-task drop lists), then
  `run` (per task, drops what the plan says). See `executor.py`.

Steps register under a name (`@register("gopher_quality")`) with a config dataclass, so a pipeline
TOML names them and their arguments are type-checked by `lmforge.config`. This module does not
execute pipelines or read inputs (`executor.py`, `readers.py`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.config import from_dict
from lmforge.data.sources import Document
from lmforge.errors import ConfigError

STEPS: dict[str, type[PipelineStep]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a step available to pipeline TOML files under `name`."""

    def deco(cls: type) -> type:
        cls.step_name = name
        STEPS[name] = cls
        return cls

    return deco


@dataclasses.dataclass
class StepStats:
    """Counts for one step on one task; `merge` adds another task's counts."""

    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    counters: dict[str, int] = dataclasses.field(default_factory=dict)

    def merge(self, other: StepStats) -> StepStats:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        for src, dst in ((other.dropped, self.dropped), (other.counters, self.counters)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        return cls(**d)


def nbytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8"))


class PipelineStep:
    """Base step. Subclasses set `Config` (a dataclass) and implement `process` or `run`."""

    step_name = "step"

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Any = None, label: str | None = None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.label = label or self.step_name
        self.stats = StepStats()
        self.exclusion: Callable[[Document, str], None] | None = None
        self.workdir: Path | None = None  # set by the executor for steps that keep state on disk
        self.output_root = Path(".")  # the pipeline's output directory, set by the executor

    def start(self, rank: int) -> None:
        """Called before each task; steps with per-task state (a Bloom filter) reset it here."""

    def stat(self, key: str, n: int = 1) -> None:
        self.stats.counters[key] = self.stats.counters.get(key, 0) + n

    def process(self, doc: Document) -> Document | None:
        """One document in, the (possibly changed) document out, or None to drop silently."""
        return doc

    def run(self, docs: Iterator[Document], rank: int = 0, world: int = 1) -> Iterator[Document]:
        for doc in docs:
            t0 = time.perf_counter()
            self.stats.docs_in += 1
            self.stats.bytes_in += nbytes(doc)
            out = self.process(doc)
            if out is not None:
                self.stats.docs_out += 1
                self.stats.bytes_out += nbytes(out)
            self.stats.seconds += time.perf_counter() - t0
            if out is not None:
                yield out

    def close(self) -> None:
        """Called once after the stream is exhausted (writers finalise files here)."""

    def abort(self) -> None:
        """Called instead of `close` when the task failed (writers delete temporary files)."""


class Filter(PipelineStep):
    """A step that keeps or drops whole documents, counting a reason for every drop."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        raise NotImplementedError

    def drop(self, doc: Document, reason: str) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        if self.exclusion is not None:
            doc.meta["filter_reason"] = f"{self.label}:{reason}"
            self.exclusion(doc, self.label)

    def process(self, doc: Document) -> Document | None:
        verdict = self.filter(doc)
        if verdict is True or (isinstance(verdict, tuple) and verdict[0]):
            return doc
        self.drop(doc, verdict[1] if isinstance(verdict, tuple) else self.label)
        return None


class GlobalStep(Filter):
    """A filter that must see all tasks' documents first; the executor calls the three phases.

    Documents are identified by (task, position in the task's stream at this step); the executor
    makes that stream identical in both passes by materialising it to disk between them.
    """

    def observe(self, docs: Iterator[Document], rank: int, world: int) -> Iterator[Document]:
        raise NotImplementedError

    def plan(self, world: int) -> dict[str, int]:
        """Decide, across all tasks, which positions to drop; returns counters for the stats."""
        raise NotImplementedError

    def drops_for(self, rank: int) -> dict[int, str]:
        """position -> reason for the documents of task `rank` that the plan drops."""
        raise NotImplementedError

    def run(self, docs: Iterator[Document], rank: int = 0, world: int = 1) -> Iterator[Document]:
        drops = self.drops_for(rank)
        for pos, doc in enumerate(docs):
            t0 = time.perf_counter()
            self.stats.docs_in += 1
            self.stats.bytes_in += nbytes(doc)
            reason = drops.get(pos)
            if reason is None:
                self.stats.docs_out += 1
                self.stats.bytes_out += nbytes(doc)
            else:
                self.drop(doc, reason)
            self.stats.seconds += time.perf_counter() - t0
            if reason is None:
                yield doc


@dataclasses.dataclass
class StepSpec:
    """One `[[steps]]` table of a pipeline TOML: the registered step name and its arguments."""

    name: str
    args: dict = dataclasses.field(default_factory=dict)
    label: str | None = None


def build_step(spec: StepSpec, source: str = "pipeline", index: int = 0) -> PipelineStep:
    """Instantiate a registered step, type-checking its arguments against its Config."""
    import lmforge.data.steps  # noqa: F401  (registers the built-in steps)

    cls = STEPS.get(spec.name)
    if cls is None:
        raise ConfigError(f"{source}: steps[{index}]: unknown step '{spec.name}' "
                          f"(known: {', '.join(sorted(STEPS))})")
    cfg = from_dict(cls.Config, spec.args, source, prefix=f"steps[{index}].args.")
    return cls(cfg, label=spec.label or spec.name)


def format_stats(stats: dict[str, StepStats]) -> str:
    """A plain-text table of per-step statistics (what `lmforge data stats` prints)."""
    rows = [("step", "docs in", "docs out", "MB in", "MB out", "s", "drop reasons / counters")]
    for label, s in stats.items():
        extra = ", ".join(f"{k}={v}" for k, v in sorted({**s.dropped, **s.counters}.items()))
        rows.append((label, str(s.docs_in), str(s.docs_out), f"{s.bytes_in / 1e6:.2f}",
                     f"{s.bytes_out / 1e6:.2f}", f"{s.seconds:.2f}", extra))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:])] + [r[-1]]
        lines.append("  ".join(cells))
    return "\n".join(lines)
