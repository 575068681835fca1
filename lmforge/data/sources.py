"""Corpus sources: read documents from text, JSONL(.gz/.zst), Parquet, directories, globs, or the
embedded default corpus.

A corpus spec is a list of entries; each entry is a file, a directory (all known files below it,
sorted), a glob pattern, or `embedded`: the Python standard library source (`.py` files) of the
running interpreter, which exists on every machine that runs lmforge and needs no download.

Documents stream: nothing reads a whole corpus into memory, and plain-text files are split on
the document separator chunk by chunk, so a corpus larger than RAM is fine. A train/validation
split is chosen by a stable hash of each document's id (for the embedded corpus: its path relative
to the standard library root), so it is the same on every machine and every run.

This module does not clean or filter text; the pipeline does (see `lmforge.data.pipeline`).
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import DataError, require

EMBEDDED = "embedded"
DEFAULT_SEPARATOR = "<|endoftext|>"
DEFAULT_VAL_FRACTION = 0.02
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_CHUNK = 1 << 20


@dataclass
class Document:
    """One document: its text, a stable id, where it came from, and free-form metadata."""

    text: str
    id: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def in_val_split(doc_id: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> bool:
    """Stable assignment of a document id to the validation split (same on every machine)."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2**64


def embedded_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_files() -> list[Path]:
    """The standard library's .py files in a deterministic order (sorted relative paths)."""
    root = embedded_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def expand(spec: str | os.PathLike | list) -> list[str]:
    """Expand a corpus spec into `embedded` markers and concrete file paths, in a stable order."""
    entries = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not entries:
        raise DataError("empty corpus: give at least one file, directory, glob or 'embedded'")
    out: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if entry == EMBEDDED:
            out.append(EMBEDDED)
            continue
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_kind(p))
            if not found:
                raise DataError(f"directory {path} holds no corpus files ({', '.join(KNOWN_SUFFIXES)})")
            out.extend(str(p) for p in found)
        elif path.is_file():
            out.append(str(path))
        elif any(ch in entry for ch in "*?["):
            found = sorted(p for p in globlib.glob(entry, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"glob '{entry}' matches no files")
            out.extend(found)
        else:
            raise DataError(f"corpus file not found: {entry}")
    return out


def _decode(raw: bytes, where: str, offset: int, errors: str, stats: dict) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "skip":
            stats["skipped"] = stats.get("skipped", 0) + 1
            return None
        raise DataError(
            f"{where}: invalid UTF-8 at byte offset {offset + e.start} ({e.reason}); "
            "fix the file or pass --skip-bad to skip undecodable documents"
        ) from None


def _split_stream(f: io.BufferedIOBase, sep: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset, segment) of a binary stream split on `sep`, reading in chunks."""
    buf = b""
    start = 0  # file offset of buf[0]
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        buf += chunk
        pos = 0
        while True:
            i = buf.find(sep, pos)
            if i < 0:
                break
            yield start + pos, buf[pos:i]
            pos = i + len(sep)
        buf = buf[pos:]
        start += pos
    yield start, buf


def read_text_file(path: str, separator: str = DEFAULT_SEPARATOR, errors: str = "strict",
                   stats: dict | None = None) -> Iterator[Document]:
    stats = {} if stats is None else stats
    sep = separator.encode("utf-8")
    with open(path, "rb") as f:
        for i, (offset, raw) in enumerate(_split_stream(f, sep) if sep else [(0, f.read())]):
            text = _decode(raw, path, offset, errors, stats)
            if text is None or not text.strip():
                continue
            yield Document(text, f"{path}:{i}", source=path, meta={"offset": offset})


def _open_maybe_compressed(path: str):
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        zstd = require("zstandard", "reading .zst files", extra="data")
        return io.BufferedReader(zstd.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def read_jsonl_file(path: str, text_field: str = "text", errors: str = "strict",
                    stats: dict | None = None) -> Iterator[Document]:
    stats = {} if stats is None else stats
    with _open_maybe_compressed(path) as raw:
        offset = 0
        for lineno, line in enumerate(raw, 1):
            line_offset, offset = offset, offset + len(line)
            if not line.strip():
                continue
            text_line = _decode(line, f"{path} line {lineno}", line_offset, errors, stats)
            if text_line is None:
                continue
            try:
                record = json.loads(text_line)
            except json.JSONDecodeError as e:
                if errors == "skip":
                    stats["skipped"] = stats.get("skipped", 0) + 1
                    continue
                raise DataError(f"{path} line {lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                if errors == "skip":
                    stats["skipped"] = stats.get("skipped", 0) + 1
                    continue
                raise DataError(f"{path} line {lineno}: expected an object with a string field "
                                f"'{text_field}'")
            text = record.pop(text_field)
            doc_id = str(record.pop("id", f"{path}:{lineno}"))
            yield Document(text, doc_id, source=path, meta=record)


def read_parquet_file(path: str, text_field: str = "text", batch_size: int = 1024,
                      errors: str = "strict", stats: dict | None = None) -> Iterator[Document]:
    stats = {} if stats is None else stats
    pq = require("pyarrow.parquet", "reading Parquet files", extra="data", package="pyarrow")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column '{text_field}' (columns: {', '.join(names)})")
    has_id = "id" in names
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=[text_field] + (["id"] if has_id else [])):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if has_id else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            if not isinstance(text, str):
                if errors == "skip":
                    stats["skipped"] = stats.get("skipped", 0) + 1
                    row += 1
                    continue
                raise DataError(f"{path} row {row}: '{text_field}' is {type(text).__name__}, expected a string")
            yield Document(text, str(doc_id) if doc_id is not None else f"{path}:{row}", source=path)
            row += 1


def read_embedded(errors: str = "skip", stats: dict | None = None) -> Iterator[Document]:
    """The embedded corpus: each standard library .py file is one document.

    A handful of stdlib test files are deliberately not UTF-8; they are skipped (and counted).
    """
    stats = {} if stats is None else stats
    root = embedded_root()
    for path in embedded_files():
        rel = path.relative_to(root).as_posix()
        text = _decode(path.read_bytes(), str(path), 0, errors, stats)
        if text is None or not text.strip():
            continue
        yield Document(text, f"stdlib/{rel}", source=EMBEDDED, meta={"path": rel})


@dataclass
class Corpus:
    """A re-iterable corpus: iterate it for `Document`s, or `.texts()` for strings.

    split: None for all documents, "train" or "val" for the stable hash split.
    errors: "strict" raises on undecodable input; "skip" skips it and counts it in `.stats`.
    """

    spec: list[str] | str = EMBEDDED
    split: Literal["train", "val"] | None = None
    text_field: str = "text"
    separator: str = DEFAULT_SEPARATOR
    errors: Literal["strict", "skip"] = "strict"
    val_fraction: float = DEFAULT_VAL_FRACTION
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.split not in (None, "train", "val"):
            raise DataError(f"split must be 'train', 'val' or None, got {self.split!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        self.files = expand(self.spec)

    def documents_of(self, entry: str) -> Iterator[Document]:
        """All documents of one expanded entry, before the split."""
        if entry == EMBEDDED:
            yield from read_embedded(stats=self.stats)
            return
        kind = _suffix_kind(Path(entry)) or "text"
        if kind == "parquet":
            yield from read_parquet_file(entry, self.text_field, errors=self.errors, stats=self.stats)
        elif kind == "jsonl":
            yield from read_jsonl_file(entry, self.text_field, errors=self.errors, stats=self.stats)
        else:
            yield from read_text_file(entry, self.separator, errors=self.errors, stats=self.stats)

    def __iter__(self) -> Iterator[Document]:
        for entry in self.files:
            for doc in self.documents_of(entry):
                if self.split is None or (in_val_split(doc.id, self.val_fraction) == (self.split == "val")):
                    yield doc

    def texts(self) -> Iterator[str]:
        for doc in self:
            yield doc.text
