"""WARC/HTML readers (fastwarc and warcio agree, encodings detected) and HTML → text extraction."""

import gzip
import json

import pytest

from lmforge.data.extract import Extract, html_to_text
from lmforge.data.readers import _read_warc_warcio, read_input, read_warc, write_warc
from lmforge.data.sources import Document
from lmforge.errors import DataError

PAGE = """<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head>
<body><nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<article><h1>Water boils</h1><p>Water boils at one hundred degrees Celsius at sea level, which
is a fact that every student of chemistry learns early in their studies.</p>
<p>At higher altitude the air pressure is lower, so it boils at a lower temperature.</p></article>
<footer>Copyright 2026</footer></body></html>"""


def test_warc_round_trip_fastwarc_and_warcio_agree(tmp_path):
    pytest.importorskip("fastwarc")
    pytest.importorskip("warcio")
    latin = "<html><body><p>Café crème à la française</p></body></html>".encode("latin-1")
    pages = [("https://a.example/x", PAGE.encode()), ("https://b.example/y", latin)]
    path = tmp_path / "crawl.warc.gz"
    assert write_warc(path, pages, content_type="text/html") == 2
    fast = list(read_warc(str(path)))
    slow = list(_read_warc_warcio(str(path), {}))
    assert [(d.id, d.text, d.meta) for d in fast] == [(d.id, d.text, d.meta) for d in slow]
    assert [d.meta["url"] for d in fast] == ["https://a.example/x", "https://b.example/y"]
    assert fast[0].meta["offset"] == 0 and fast[1].meta["offset"] > 0
    assert fast[0].text == PAGE
    assert "Café crème à la française" in fast[1].text  # detected, not declared


def test_warc_http_charset_and_non_html_skipped(tmp_path):
    path = tmp_path / "c.warc"
    write_warc(path, [("u", "<p>naïve</p>".encode("cp1252"))], content_type="text/html; charset=windows-1252")
    write_warc(tmp_path / "d.warc", [("u", b"\x89PNG...")], content_type="image/png")
    assert [d.text for d in read_input(str(path))] == ["<p>naïve</p>"]
    stats = {}
    assert list(read_warc(str(tmp_path / "d.warc"), stats)) == [] and stats == {"non_html": 1}


def test_corrupt_warc_names_file(tmp_path):
    bad = tmp_path / "bad.warc.gz"
    bad.write_bytes(gzip.compress(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 99999\r\n\r\nshort"))
    with pytest.raises(DataError, match=r"bad.warc.gz: WARC record at byte 0 is truncated \(5 of 99999"):
        list(read_warc(str(bad)))
    (tmp_path / "not.warc").write_bytes(b"this is not a web archive")
    with pytest.raises(DataError, match="not.warc: not a readable WARC file"):
        list(read_warc(str(tmp_path / "not.warc")))


def test_html_file_and_jsonl_inputs(tmp_path):
    (tmp_path / "p.html").write_bytes(PAGE.encode())
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hi", "id": "7", "url": "u"}) + "\n")
    [h] = read_input(str(tmp_path / "p.html"))
    assert h.meta["content_type"] == "text/html" and h.id.endswith("p.html")
    [j] = read_input(str(tmp_path / "d.jsonl"))
    assert (j.text, j.id, j.meta) == ("hi", "7", {"url": "u"})


@pytest.mark.parametrize("engine", ["resiliparse", "trafilatura"])
def test_extraction_keeps_content_drops_boilerplate(engine):
    pytest.importorskip(engine)
    text = html_to_text(PAGE, engine)
    assert "Water boils at one hundred degrees Celsius" in text
    assert "lower temperature." in text
    for junk in ("var x", "color: red", "About"):
        assert junk not in text


def test_extract_step_only_touches_html():
    pytest.importorskip("resiliparse")
    step = Extract()
    docs = [Document(PAGE, "a", meta={"content_type": "text/html"}), Document("<b>plain</b>", "b"),
            Document("<html><body><script>1</script></body></html>", "c", meta={"content_type": "text/html"})]
    out = list(step.run(iter(docs)))
    assert [d.id for d in out] == ["a", "b"]
    assert out[1].text == "<b>plain</b>" and out[0].meta["content_type"] == "text/plain"
    assert step.stats.dropped == {"empty": 1}


def test_wet_conversion_records(tmp_path):
    path = tmp_path / "x.warc.wet.gz"
    write_warc(path, [("https://c.example/", b"Plain extracted text.\nSecond line.")], warc_type="conversion")
    for reader in (read_warc, lambda p: _read_warc_warcio(p, {})):
        [doc] = reader(str(path))
        assert doc.text == "Plain extracted text.\nSecond line."
        assert doc.meta["record_type"] == "conversion" and doc.meta["content_type"] == "text/plain"
        assert doc.meta["url"] == "https://c.example/"


def test_hf_datasets_streaming_on_local_parquet(tmp_path):
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first", "second"], "url": ["u1", "u2"]}), tmp_path / "p.parquet")
    docs = list(read_input(f"hf:parquet@train?data_files={tmp_path}/p.parquet"))
    assert [(d.text, d.meta) for d in docs] == [("first", {"url": "u1"}), ("second", {"url": "u2"})]
    assert docs[1].id == "parquet:1"
    with pytest.raises(DataError, match="unknown option"):
        list(read_input("hf:parquet?revision=x"))
