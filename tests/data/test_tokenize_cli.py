"""The tokenize step writes shards that decode back to the documents; the CLI runs the shipped
example pipeline offline and finds exactly the duplicates planted in it."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

import lmforge.data
from lmforge.cli import main
from lmforge.data.shards import list_shards, open_shard
from lmforge.data.sources import Document
from lmforge.data.writers import ByteTokenizer, Tokenize

DOCS = ["first document, ünïcode", "second\nline", "third one here"]


def split_docs(tokens, doc_id):
    starts = np.flatnonzero(np.asarray(tokens) == doc_id)
    return [tokens[s + 1:e] for s, e in zip(starts, list(starts[1:]) + [len(tokens)])]


def test_byte_tokenizer_shards_decode_to_documents(tmp_path):
    step = Tokenize(Tokenize.Config(max_tokens_per_shard=40))
    step.output_root = tmp_path
    step.start(3)
    list(step.run(iter(Document(t, str(i)) for i, t in enumerate(DOCS)), rank=3))
    step.close()
    shards = list_shards(tmp_path / "tokens")
    assert [s.name for s in shards] == ["rank_00003", "rank_00003_1"]  # split at the token budget
    texts = []
    for s in shards:
        tokens, header = open_shard(s)
        assert header["bos_id"] == 256 and header["tokenizer_hash"] == ByteTokenizer.hash
        assert header["count"] <= 40 or header["documents"] == 1
        texts += [ByteTokenizer().decode(t) for t in split_docs(tokens, 256)]
    assert texts == DOCS
    assert step.stats.counters["tokens"] == sum(len(t.encode()) + 1 for t in DOCS)


def test_lmforge_tokenizer_by_path(tmp_path):
    from lmforge.tokenizer import save_tokenizer, train_bpe

    tok = train_bpe(DOCS * 20, vocab_size=300, workers=1)
    save_tokenizer(tok, tmp_path / "tok")
    step = Tokenize(Tokenize.Config(tokenizer=str(tmp_path / "tok")))
    step.output_root = tmp_path
    list(step.run(iter(Document(t, str(i)) for i, t in enumerate(DOCS))))
    step.close()
    tokens, header = open_shard(tmp_path / "tokens" / "rank_00000")
    assert header["tokenizer_hash"] == tok.hash and header["bos_id"] == tok.eot_id
    assert [tok.decode(t.tolist()) for t in split_docs(tokens, tok.eot_id)] == DOCS


def test_cli_runs_example_pipeline(tmp_path, capsys):
    out = tmp_path / "example"
    example = Path(lmforge.data.__file__).parent / "example_pipeline.toml"
    assert main(["data", "run", str(example), "--set", f"output_dir={out}",
                 "--set", "workers=1"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["step", "docs", "in"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["extract"]["docs_in"] == 66  # 60 modules + 6 mirror pages
    assert stats["exact_dedup"]["dropped"] == {"duplicate": 4}
    assert stats["minhash_dedup"]["dropped"] == {"near_duplicate": 2}
    dropped = {}
    for label in ("exact_dedup", "minhash_dedup"):
        for p in (out / "excluded" / label).glob("*.jsonl.gz"):
            with gzip.open(p, "rt") as f:
                for line in f:
                    rec = json.loads(line)
                    dropped[rec["url"].rsplit("/", 1)[1]] = label
    assert dropped == {"heapq.html": "exact_dedup", "textwrap.html": "exact_dedup",
                       "fnmatch.html": "exact_dedup", "shlex.html": "exact_dedup",
                       "bisect.html": "minhash_dedup", "sched.html": "minhash_dedup"}
    n_docs = stats["write_jsonl"]["docs_out"]
    assert n_docs > 0 and sum(open_shard(s)[1]["documents"] for s in list_shards(out / "tokens")) == n_docs
    assert main(["data", "stats", str(out)]) == 0
    assert "minhash_dedup" in capsys.readouterr().out
    assert main(["data", "run", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.slow  # renders the 66 pages twice (two fresh interpreters)
def test_example_input_is_deterministic(tmp_path):
    from lmforge.data.example import make_example_input

    for a, b in zip(make_example_input(tmp_path / "a"), make_example_input(tmp_path / "b")):
        assert a.read_bytes() == b.read_bytes(), a.name
