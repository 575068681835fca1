"""Pipeline outputs: JSONL documents, token shards, and the exclusion files of dropped documents.

Every output is named per task (`rank_00003.jsonl.gz`), written to a temporary sibling and renamed
into place when the task finishes, before the executor writes the task's completion marker. A
rerun of a task therefore overwrites its outputs, and a killed task never leaves a file that looks
complete.

JSONL records are `{"id", "text", "source", **meta}`, which `sources.read_jsonl_file` reads back
(id and text as such, the rest as metadata). The `tokenize` step accepts any tokenizer object with
`encode(str) -> list[int]`, `vocab_size`, a document token (`bos_id` or `eot_id`) and a `hash`;
`"bytes"` names the built-in byte tokenizer (256 byte ids + one document token), anything else is
loaded with `lmforge.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Literal

from lmforge.data.pipeline import PipelineStep, register
from lmforge.data.shards import ShardWriter
from lmforge.data.sources import Document
from lmforge.errors import DataError, MissingDependencyError


class JsonlSink:
    """Append documents to `path` via `path.tmp`; `commit()` renames into place."""

    def __init__(self, path: str | os.PathLike, compression: str = "none"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        raw = open(self.tmp, "wb")
        if compression == "gz":
            self.f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
            self._raw = raw
        elif compression == "zst":
            import zstandard

            self.f = zstandard.ZstdCompressor().stream_writer(raw)
            self._raw = raw
        else:
            self.f, self._raw = raw, None
        self.count = 0

    def write(self, doc: Document) -> None:
        record = {"id": doc.id, "text": doc.text, "source": doc.source, **doc.meta}
        self.f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.count += 1

    def commit(self) -> None:
        self.f.close()
        if self._raw is not None and not self._raw.closed:
            self._raw.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


_SUFFIX = {"none": ".jsonl", "gz": ".jsonl.gz", "zst": ".jsonl.zst"}


@register("write_jsonl")
class WriteJsonl(PipelineStep):
    """Write every document that reaches this step to `<output_dir>/<dir>/rank_NNNNN.jsonl[.gz|.zst]`."""

    @dataclasses.dataclass
    class Config:
        dir: str = "documents"
        compression: Literal["none", "gz", "zst"] = "gz"

    sink: JsonlSink | None = None

    def run(self, docs, rank: int = 0, world: int = 1):
        self.sink = JsonlSink(self.output_root / self.cfg.dir / f"rank_{rank:05d}{_SUFFIX[self.cfg.compression]}",
                              self.cfg.compression)
        for doc in super().run(docs, rank, world):
            self.sink.write(doc)
            yield doc

    def close(self) -> None:
        if self.sink is not None:
            self.sink.commit()
            self.sink = None

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None


class ByteTokenizer:
    """Bytes as tokens (ids 0-255) plus one document token (256): needs no training or files."""

    vocab_size = 257
    eot_id = bos_id = 256
    hash = "lmforge-bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer_spec(spec: str) -> Any:
    if spec == "bytes":
        return ByteTokenizer()
    try:
        from lmforge.tokenizer import load_tokenizer
    except ImportError:
        raise MissingDependencyError("lmforge.tokenizer", f"loading tokenizer '{spec}'") from None
    return load_tokenizer(spec)


def _doc_token(tok: Any) -> int:
    for name in ("bos_id", "eot_id"):
        value = getattr(tok, name, None)
        if isinstance(value, int):
            return value
    raise DataError(f"tokenizer {type(tok).__name__} has neither a 'bos_id' nor an 'eot_id'")


@register("tokenize")
class Tokenize(PipelineStep):
    """Encode documents into token shards `<output_dir>/<dir>/rank_NNNNN[_K]` (doc token first)."""

    @dataclasses.dataclass
    class Config:
        tokenizer: str = "bytes"
        dir: str = "tokens"
        max_tokens_per_shard: int = 100_000_000

    def __init__(self, cfg=None, label=None, tokenizer: Any = None):
        super().__init__(cfg, label)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer_spec(self.cfg.tokenizer)
        self.doc_token = _doc_token(self.tokenizer)
        self.vocab_size = getattr(self.tokenizer, "vocab_size", None)
        if not isinstance(self.vocab_size, int):
            raise DataError(f"tokenizer {type(self.tokenizer).__name__} has no integer 'vocab_size'")
        self.writer: ShardWriter | None = None
        self.pending: list[ShardWriter] = []

    def _open(self, rank: int, part: int) -> ShardWriter:
        name = f"rank_{rank:05d}" if part == 0 else f"rank_{rank:05d}_{part}"
        return ShardWriter(self.output_root / self.cfg.dir / name, self.vocab_size,
                           tokenizer_hash=str(getattr(self.tokenizer, "hash", "")), bos_id=self.doc_token)

    def run(self, docs, rank: int = 0, world: int = 1):
        part = 0
        self.writer = self._open(rank, part)
        for doc in super().run(docs, rank, world):
            ids = [self.doc_token] + list(self.tokenizer.encode(doc.text))
            if self.writer.count and self.writer.count + len(ids) > self.cfg.max_tokens_per_shard:
                self.pending.append(self.writer)
                part += 1
                self.writer = self._open(rank, part)
            self.writer.write(ids, documents=1)
            self.stat("tokens", len(ids))
            yield doc

    def close(self) -> None:
        # Shards are finalised only when the whole task succeeded.
        for w in self.pending + ([self.writer] if self.writer else []):
            w.close()
        self.pending, self.writer = [], None

    def abort(self) -> None:
        for w in self.pending + ([self.writer] if self.writer else []):
            w.abort()
        self.pending, self.writer = [], None
