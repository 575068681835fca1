import gzip
import json

import pytest

from lmforge.data.sources import Corpus, embedded_files, in_val_split
from lmforge.errors import DataError


def test_text_file_split_on_separator_streams_across_chunks(tmp_path, monkeypatch):
    import lmforge.data.sources as sources

    monkeypatch.setattr(sources, "_CHUNK", 7)  # separators straddle chunk boundaries
    docs = ["first doc", "second ünïcode doc", "third"]
    p = tmp_path / "a.txt"
    p.write_text("<|endoftext|>".join(docs))
    assert list(Corpus(str(p)).texts()) == docs


def test_jsonl_gz_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"j{i}", "url": f"u{i}"}) + "\n")
    pq.write_table(pa.table({"text": ["p0", "p1"]}), tmp_path / "b.parquet")
    docs = list(Corpus(str(tmp_path)))
    assert [d.text for d in docs] == ["j0", "j1", "j2", "p0", "p1"]
    assert docs[0].meta == {"url": "u0"}


def test_bad_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good<|endoftext|>ba\xffd")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 19"):
        list(Corpus(str(p)))
    c = Corpus(str(p), errors="skip")
    assert list(c.texts()) == ["good"] and c.stats["skipped"] == 1


def test_jsonl_missing_field_and_missing_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"content": "no text"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 1.*'text'"):
        list(Corpus(str(p)))
    with pytest.raises(DataError, match="not found"):
        Corpus(str(tmp_path / "missing.txt"))


def test_embedded_corpus_is_deterministic_and_split():
    files = embedded_files()
    assert len(files) > 500 and files == embedded_files()
    ids = [f"stdlib/{i}" for i in range(10000)]
    frac = sum(in_val_split(i) for i in ids) / len(ids)
    assert 0.01 < frac < 0.03  # default validation fraction is 2%
    val = Corpus("embedded", split="val")
    val_ids = {d.id for d in val}
    train_ids = {d.id for d in Corpus("embedded", split="train")}
    assert val_ids and not (val_ids & train_ids)
