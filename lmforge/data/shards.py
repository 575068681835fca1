"""Token shards: flat binary token ids plus a small JSON header, memory-mapped for reading.

A shard `NAME` is two files: `NAME.bin` (little-endian uint16 or uint32 token ids, back to back)
and `NAME.json` (the header):

    {"format": "lmforge.tokens", "version": 1, "dtype": "uint16", "count": 123456,
     "tokenizer_hash": "...", "bos_id": 50256, "documents": 42, "source": "..."}

Documents are concatenated, each one preceded by the tokenizer's document token (`bos_id`, for
GPT-2 style tokenizers `<|endoftext|>`), so a loader can find document starts by scanning for it.
`ShardWriter` streams tokens to `NAME.bin.tmp` and renames both files into place on `close()`, so an
interrupted write never leaves a shard that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError
from lmforge.io import write_json

FORMAT = "lmforge.tokens"
VERSION = 1


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(NAME.bin, NAME.json) for a shard named by either file or by its stem."""
    p = Path(path)
    if p.suffix in (".bin", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".json")


class ShardWriter:
    """Append token arrays to a new shard; `close()` (or the context manager) finalises it."""

    def __init__(self, path: str | os.PathLike, vocab_size: int, tokenizer_hash: str = "",
                 bos_id: int | None = None, meta: dict[str, Any] | None = None):
        self.bin_path, self.json_path = shard_paths(path)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = vocab_size
        self.header = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                       "vocab_size": vocab_size, "tokenizer_hash": tokenizer_hash, "bos_id": bos_id,
                       **(meta or {})}
        self._tmp = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self.count = 0
        self.documents = 0

    def write(self, ids, documents: int = 0) -> None:
        """Append token ids (any int sequence or array); `documents` counts documents they hold."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"token id out of range [0, {self.vocab_size}) for shard {self.bin_path}")
        arr.astype(self.dtype.newbyteorder("<"), copy=False).tofile(self._f)
        self.count += int(arr.size)
        self.documents += documents

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.bin_path)
        write_json(self.json_path, {**self.header, "count": self.count, "documents": self.documents})

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    bin_path, json_path = shard_paths(path)
    try:
        header = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"shard header not found: {json_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"shard header {json_path} is not valid JSON: {e}") from None
    if header.get("format") != FORMAT:
        raise DataError(f"{json_path}: not an lmforge token shard (format={header.get('format')!r})")
    if header.get("version") != VERSION:
        raise DataError(f"{json_path}: shard version {header.get('version')} is not supported "
                        f"(expected {VERSION})")
    if header.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{json_path}: dtype must be uint16 or uint32, got {header.get('dtype')!r}")
    if not bin_path.exists():
        raise DataError(f"shard data not found: {bin_path}")
    expected = header["count"] * np.dtype(header["dtype"]).itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(f"{bin_path}: size {actual} bytes does not match header "
                        f"({header['count']} tokens of {header['dtype']} = {expected} bytes)")
    return header


def open_shard(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Memory-map a shard's tokens (read-only) and return them with its header."""
    header = read_header(path)
    bin_path, _ = shard_paths(path)
    if header["count"] == 0:
        return np.zeros(0, dtype=header["dtype"]), header
    tokens = np.memmap(bin_path, dtype=np.dtype(header["dtype"]).newbyteorder("<"), mode="r")
    return tokens, header


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """All shards (by stem) in a directory, sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"shard directory not found: {d}")
    return sorted(p.with_suffix("") for p in d.glob("*.json") if p.with_suffix(".bin").exists())
