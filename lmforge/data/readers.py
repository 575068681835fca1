"""Pipeline inputs: WARC/WET web archives, raw HTML files, and the corpus formats of `sources.py`.

Every document keeps an id and metadata: for web archives the URL, WARC record id, record type,
byte offset of the record in the file, and the HTTP charset; for HTML files the path. HTML stays
HTML here (decoded to str with encoding detection); the `extract` step turns it into text.

Hugging Face datasets stream through `datasets` when it is installed: an input
`hf:NAME[@SPLIT][?config=C&data_files=GLOB]` (e.g. `hf:HuggingFaceFW/fineweb@train?config=sample-10BT`,
or `hf:parquet@train?data_files=/data/*.parquet` for local files). Hub datasets need the network.

WARC is read with fastwarc (fast, C++) or, when only warcio is installed, with warcio. `write_warc`
writes gzipped WARC/1.0 response records by hand: it is how the example input and the test fixtures
are made, so no download is ever needed.
"""

from __future__ import annotations

import gzip
import io
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.data.sources import Corpus, Document
from lmforge.errors import DataError, MissingDependencyError

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc.gz")
HTML_SUFFIXES = (".html", ".htm", ".html.gz")


def decode_html(raw: bytes, http_charset: str | None = None) -> str:
    """Bytes of an HTML page to str: HTTP charset if valid, else resiliparse's detector, else UTF-8.

    Undecodable bytes become U+FFFD rather than failing: web pages lie about their encoding.
    """
    for enc in ([http_charset] if http_charset else []):
        try:
            return raw.decode(enc)
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    except ImportError:
        return raw.decode("utf-8", errors="replace")
    return bytes_to_str(raw, detect_encoding(raw))


def _kind(path: str) -> str:
    name = path.lower()
    if name.endswith(WARC_SUFFIXES):
        return "warc"
    if name.endswith(HTML_SUFFIXES):
        return "html"
    return "corpus"


def _http_split(raw: bytes) -> tuple[str, str | None, bytes]:
    """(content type, charset or None, body) of an HTTP response as stored in a WARC record."""
    head, _, body = raw.partition(b"\r\n\r\n")
    ctype = ""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            ctype = value.strip().decode("latin-1").lower()
    charset = ctype.split("charset=")[-1].strip(" ;\"'") if "charset=" in ctype else None
    return ctype, charset, body


def read_warc(path: str, stats: dict | None = None) -> Iterator[Document]:
    """Documents from HTML `response` records and WET `conversion` records of a (gzipped) WARC."""
    stats = {} if stats is None else stats
    try:
        from fastwarc.warc import ArchiveIterator, WarcRecordType
    except ImportError:
        yield from _read_warc_warcio(path, stats)
        return
    with open(path, "rb") as f:
        try:
            records = iter(ArchiveIterator(f, parse_http=False))
            while True:
                try:
                    rec = next(records)
                except StopIteration:
                    break
                if rec.record_type not in (WarcRecordType.response, WarcRecordType.conversion):
                    continue
                raw = rec.reader.read()
                if len(raw) < rec.content_length:
                    raise DataError(f"{path}: WARC record at byte {rec.stream_pos} is truncated "
                                    f"({len(raw)} of {rec.content_length} bytes)")
                url = rec.headers.get("WARC-Target-URI", "")
                if rec.record_type == WarcRecordType.response:
                    ctype, charset, body = _http_split(raw)
                    if ctype and "html" not in ctype:
                        stats["non_html"] = stats.get("non_html", 0) + 1
                        continue
                    rtype, text, content = "response", decode_html(body, charset), "text/html"
                else:
                    rtype, text, content = "conversion", raw.decode("utf-8", errors="replace"), "text/plain"
                yield Document(text, rec.record_id or f"{path}@{rec.stream_pos}", source=path,
                               meta={"url": url, "record_type": rtype, "offset": rec.stream_pos,
                                     "content_type": content, "date": rec.headers.get("WARC-Date", "")})
        except OSError as e:  # fastwarc reports malformed archives as OSError
            raise DataError(f"{path}: not a readable WARC file: {e}") from None


def _read_warc_warcio(path: str, stats: dict) -> Iterator[Document]:
    try:
        from warcio.archiveiterator import ArchiveIterator
    except ImportError:
        raise MissingDependencyError("fastwarc", "reading WARC files", extra="data") from None
    with open(path, "rb") as f:
        it = ArchiveIterator(f)
        for rec in it:
            if rec.rec_type not in ("response", "conversion"):
                continue
            url = rec.rec_headers.get_header("WARC-Target-URI") or ""
            body = rec.content_stream().read()
            if rec.rec_type == "response":
                ctype = (rec.http_headers.get_header("Content-Type") or "").lower() if rec.http_headers else ""
                if ctype and "html" not in ctype:
                    stats["non_html"] = stats.get("non_html", 0) + 1
                    continue
                charset = ctype.split("charset=")[-1].strip(" ;\"'") if "charset=" in ctype else None
                text, content = decode_html(body, charset), "text/html"
            else:
                text, content = body.decode("utf-8", errors="replace"), "text/plain"
            yield Document(text, rec.rec_headers.get_header("WARC-Record-ID") or f"{path}@{it.offset}",
                           source=path, meta={"url": url, "record_type": rec.rec_type, "offset": it.offset,
                                              "content_type": content,
                                              "date": rec.rec_headers.get_header("WARC-Date") or ""})


def read_html_file(path: str) -> Iterator[Document]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    yield Document(decode_html(raw), path, source=path, meta={"path": path, "content_type": "text/html"})


def read_hf(spec: str, text_field: str = "text") -> Iterator[Document]:
    """Stream a Hugging Face dataset named by `hf:NAME[@SPLIT][?config=C&data_files=GLOB]`."""
    from urllib.parse import parse_qs

    from lmforge.errors import require

    datasets = require("datasets", "streaming Hugging Face datasets", package="datasets")
    body, _, query = spec.removeprefix("hf:").partition("?")
    name, _, split = body.partition("@")
    opts = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(opts) - {"config", "data_files"}
    if not name or unknown:
        raise DataError(f"input '{spec}': expected hf:NAME[@SPLIT][?config=C&data_files=GLOB]"
                        + (f" (unknown option(s) {sorted(unknown)})" if unknown else ""))
    try:
        ds = datasets.load_dataset(name, opts.get("config"), split=split or "train", streaming=True,
                                   data_files=opts.get("data_files"))
    except Exception as e:  # datasets raises many types (network, missing config, bad files)
        raise DataError(f"input '{spec}': cannot open the dataset: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"input '{spec}' row {i}: no string field '{text_field}' "
                            f"(fields: {', '.join(row)})")
        meta = {k: v for k, v in row.items() if k not in (text_field, "id") and isinstance(v, str | int | float | bool)}
        yield Document(text, str(row.get("id", f"{name}:{i}")), source=spec, meta=meta)


def read_input(path: str, text_field: str = "text", separator: str = "<|endoftext|>",
               errors: str = "strict", stats: dict | None = None) -> Iterator[Document]:
    """Documents of one input file of any supported format (chosen by its suffix)."""
    if path.startswith("hf:"):
        yield from read_hf(path, text_field)
        return
    kind = _kind(path)
    if kind == "warc":
        yield from read_warc(path, stats)
    elif kind == "html":
        yield from read_html_file(path)
    else:
        corpus = Corpus([path], text_field=text_field, separator=separator, errors=errors)
        yield from corpus.documents_of(corpus.files[0])
        if stats is not None:
            for k, v in corpus.stats.items():
                stats[k] = stats.get(k, 0) + v


def expand_inputs(spec: list[str]) -> list[str]:
    """Files, directories (every supported file below), globs or 'embedded', in a stable order."""
    import glob as globlib

    out: list[str] = []
    for entry in spec:
        p = Path(entry)
        if entry == "embedded" or entry.startswith("hf:"):
            out.append(entry)
        elif p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"input directory {p} is empty")
            out.extend(found)
        elif p.is_file():
            out.append(str(p))
        elif any(c in entry for c in "*?["):
            found = sorted(f for f in globlib.glob(entry, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"input glob '{entry}' matches no files")
            out.extend(found)
        else:
            raise DataError(f"input not found: {entry}")
    return out


def read_inputs(paths: list[str], text_field: str = "text") -> Iterator[Document]:
    for path in paths:
        if path == "embedded":
            yield from Corpus("embedded")
        else:
            yield from read_input(path, text_field)


def _warc_record(url: str, payload: bytes, content_type: str, date: str, warc_type: str) -> bytes:
    if warc_type == "response":
        block = (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode() + b"\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        block_type = "application/http; msgtype=response"
    else:  # a WET conversion record: the extracted text itself
        block, block_type = payload, "text/plain"
    rid = uuid.uuid5(uuid.NAMESPACE_URL, f"{warc_type}:{url}")
    head = (f"WARC/1.0\r\nWARC-Type: {warc_type}\r\nWARC-Record-ID: <urn:uuid:{rid}>\r\n"
            f"WARC-Date: {date}\r\nWARC-Target-URI: {url}\r\n"
            f"Content-Type: {block_type}\r\nContent-Length: {len(block)}\r\n\r\n")
    return head.encode() + block + b"\r\n\r\n"


def write_warc(path: str | os.PathLike, pages: Iterable[tuple[str, bytes]],
               content_type: str = "text/html; charset=utf-8", date: str = "2026-01-01T00:00:00Z",
               warc_type: str = "response") -> int:
    """Write (url, body) pairs as a WARC/1.0 file of `response` records (or WET `conversion`
    records of plain text), one gzip member each (the Common Crawl layout) when the name ends in
    .gz. Atomic; returns the number of records."""
    from lmforge.io import atomic_file

    compress = str(path).endswith(".gz")
    n = 0
    with atomic_file(path, "wb") as f:
        for url, body in pages:
            rec = _warc_record(url, body, content_type, date, warc_type)
            if compress:
                buf = io.BytesIO()
                with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
                    gz.write(rec)
                rec = buf.getvalue()
            f.write(rec)
            n += 1
    return n
