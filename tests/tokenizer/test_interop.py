"""Persistence and interop: own format, GPT-2 files vs tiktoken, HF tokenizers, tiktoken ranks, CLI."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import TokenizerError
from lmforge.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from lmforge.tokenizer.formats import (
    HF_FILE,
    OWN_FILE,
    TIKTOKEN_FILE,
    from_hf_dict,
    read_tiktoken_ranks,
    to_hf_dict,
)
from tests.tokenizer.conftest import MULTILINGUAL


@pytest.fixture(scope="module")
def gpt2_tiktoken(gpt2_files, tmp_path_factory):
    """tiktoken's GPT-2 encoding built offline from the same GPT-2 files (tiktoken's own loader)."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab, merges = gpt2_files
    text = merges.read_text(encoding="utf-8")
    if not text.startswith("#version"):
        # tiktoken's loader drops the first line (the "#version" header of the original file);
        # this copy has no header, so give it one.
        merges = tmp_path_factory.mktemp("gpt2") / "vocab.bpe"
        merges.write_text("#version: 0.2\n" + text, encoding="utf-8")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab))
    from lmforge.tokenizer.pretokenize import GPT2_PATTERN

    return tiktoken.Encoding("gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def test_gpt2_reference_equals_tiktoken(gpt2, gpt2_tiktoken, prose, code):
    assert gpt2.vocab_size == 50257 and gpt2.special_tokens == {"<|endoftext|>": 50256}
    for text in (prose[:60_000], code[:40_000], MULTILINGUAL, "<|endoftext|>x<|endoftext|>"):
        ref = gpt2.encode(text, allowed_special="all")
        assert ref == gpt2_tiktoken.encode(text, allowed_special="all")
        assert gpt2.decode(ref) == text


def test_gpt2_known_ids(gpt2):
    # Widely published GPT-2 ids: "Hello world" -> [15496, 995]; "<|endoftext|>" -> 50256.
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_gpt2_tiktoken_backend_equals_reference(gpt2, prose):
    fast = Tokenizer(gpt2.vocab, gpt2.merges, gpt2.special_tokens, gpt2.pattern, backend="tiktoken")
    assert fast.encode(prose[:100_000]) == gpt2.encode(prose[:100_000])


def test_own_format_round_trip(small_tokenizer, tmp_path, code):
    out = save_tokenizer(small_tokenizer, tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == sorted([OWN_FILE, HF_FILE, TIKTOKEN_FILE])
    back = load_tokenizer(out)
    assert back.hash == small_tokenizer.hash
    assert back.vocab == small_tokenizer.vocab and back.merges == small_tokenizer.merges
    assert back.special_tokens == small_tokenizer.special_tokens and back.pattern == small_tokenizer.pattern
    assert back.encode(code) == small_tokenizer.encode(code)
    d = json.loads((out / OWN_FILE).read_text())
    assert d["format"] == "lmforge.tokenizer" and d["version"] == 1 and d["hash"] == small_tokenizer.hash
    assert d["vocab"][:2] == ["00", "01"] and d["pattern_name"] == "gpt2"


def test_hash_is_stable_and_content_sensitive(small_tokenizer):
    same = Tokenizer(small_tokenizer.vocab, small_tokenizer.merges, small_tokenizer.special_tokens,
                     small_tokenizer.pattern)
    assert same.hash == small_tokenizer.hash and len(same.hash) == 16
    other = Tokenizer.from_merges([m[:2] for m in small_tokenizer.merges[:-1]], ["<|endoftext|>", "<|pad|>"])
    assert other.hash != small_tokenizer.hash


def test_corrupt_and_missing_files(small_tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    out = save_tokenizer(small_tokenizer, tmp_path / "tok")
    path = out / OWN_FILE
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(out)
    d = json.loads(text)
    d["vocab"][300] = "6162"  # edited token bytes: the merge no longer adds up, caught on load
    path.write_text(json.dumps(d))
    with pytest.raises(TokenizerError, match="merge"):
        load_tokenizer(out)
    d = json.loads(text)
    d["special_tokens"]["<|pad|>"] = d["special_tokens"]["<|endoftext|>"]
    d["hash"] = "0" * 16
    path.write_text(json.dumps(d))
    with pytest.raises(TokenizerError):
        load_tokenizer(out)
    d = json.loads(text)
    d["merges"] = d["merges"][:-1] + [[d["merges"][-1][1], d["merges"][-1][0], d["merges"][-1][2]]]
    path.write_text(json.dumps(d))
    with pytest.raises(TokenizerError):
        load_tokenizer(out)
    d = json.loads(text)
    d["version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(TokenizerError, match="version 99"):
        load_tokenizer(out)


def test_hf_export_gives_identical_ids(small_tokenizer, code, prose):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_str(json.dumps(to_hf_dict(small_tokenizer)))
    for text in (code[:20000], prose[:20000], MULTILINGUAL, "a<|endoftext|>b <|pad|>"):
        assert hf.encode(text).ids == small_tokenizer.encode(text, allowed_special="all")
        assert hf.decode(small_tokenizer.encode(text, allowed_special="all"), skip_special_tokens=False) == text


def test_hf_export_of_gpt2_and_import(gpt2, prose):
    tokenizers = pytest.importorskip("tokenizers")
    d = to_hf_dict(gpt2)
    hf = tokenizers.Tokenizer.from_str(json.dumps(d))
    text = prose[:30000] + MULTILINGUAL
    assert hf.encode(text).ids == gpt2.encode(text)
    back = from_hf_dict(json.loads(json.dumps(d)))
    assert back.hash == gpt2.hash


def test_hf_import_of_classic_gpt2_tokenizer_json(gpt2_files, gpt2, prose):
    # The classic HF GPT-2 layout: ByteLevel pretokenizer (use_regex) and "a b" string merges.
    vocab_path, merges_path = gpt2_files
    vocab = json.loads(vocab_path.read_text())
    merges = [ln for ln in merges_path.read_text().splitlines() if ln and not ln.startswith("#version")]
    d = {"added_tokens": [{"id": 50256, "content": "<|endoftext|>", "special": True}],
         "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
         "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    tok = from_hf_dict(d)
    assert tok.hash == gpt2.hash
    with pytest.raises(TokenizerError, match="not supported"):
        from_hf_dict({"model": {"type": "WordPiece"}})


def test_tiktoken_ranks_file(small_tokenizer, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    out = save_tokenizer(small_tokenizer, tmp_path / "tok")
    ranks = read_tiktoken_ranks(out / TIKTOKEN_FILE)
    assert ranks == small_tokenizer.mergeable_ranks()
    enc = tiktoken.Encoding("x", pat_str=small_tokenizer.pattern, mergeable_ranks=ranks,
                            special_tokens=small_tokenizer.special_tokens)
    assert enc.encode(MULTILINGUAL) == small_tokenizer.encode(MULTILINGUAL)


def test_cli_train_encode_info(tmp_path, code, capsys):
    import numpy as np

    from lmforge.cli import main
    from lmforge.data.shards import open_shard

    corpus = tmp_path / "corpus.txt"
    docs = [code[i:i + 1500] for i in range(0, len(code), 1500)]
    assert len(docs) > 20 and all(d.strip() for d in docs)
    corpus.write_text("<|endoftext|>".join(docs))
    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", "--out", str(tok_dir), "--vocab-size", "500", "--corpus", str(corpus),
                 "--split", "all", "--workers", "1"]) == 0
    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == 500 and tok.special_tokens == {"<|endoftext|>": 499}
    shard_dir = tmp_path / "shards"
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--out", str(shard_dir),
                 "--corpus", str(corpus), "--workers", "2"]) == 0
    ids = []
    for split in ("train", "val"):
        arr, header = open_shard(shard_dir / split)
        assert header["tokenizer_hash"] == tok.hash and header["dtype"] == "uint16"
        assert header["bos_id"] == 499
        ids.append(np.asarray(arr))
    both = np.concatenate(ids)
    assert (both == 499).sum() == len(docs)
    # every document, decoded, is back (order within each split is corpus order)
    decoded = tok.decode(ids[0][1:].tolist()).split("<|endoftext|>") + \
        (tok.decode(ids[1][1:].tolist()).split("<|endoftext|>") if len(ids[1]) else [])
    assert sorted(decoded) == sorted(docs)
    assert main(["tokenizer", "info", "--tokenizer", str(tok_dir), "--corpus", str(corpus), "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert "vocab size: 500" in out and "bytes/token" in out
    assert main(["tokenizer", "train", "--out", str(tmp_path / "bad"), "--vocab-size", "100",
                 "--corpus", str(corpus)]) == 2
    assert "vocab_size must be at least" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "missing"), "--out", str(shard_dir),
                 "--corpus", str(corpus)]) == 2


def test_hf_export_gpt4_pattern(code):
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenizer import train_bpe

    tok = train_bpe([code], 420, pattern="gpt4", workers=1)
    hf = tokenizers.Tokenizer.from_str(json.dumps(to_hf_dict(tok)))
    for text in (code[:20000], MULTILINGUAL, "DON'T  you'LL 1234567 x\r\n\r\n  ok!!\n\n"):
        assert hf.encode(text).ids == tok.encode(text)


def test_load_gpt2_directory(gpt2_files, gpt2):
    assert load_tokenizer(gpt2_files[0].parent).hash == gpt2.hash


def test_cli_undecodable_corpus(tmp_path, capsys):
    from lmforge.cli import main

    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"good text here<|endoftext|>bad \xff\xfe bytes<|endoftext|>more good text")
    args = ["tokenizer", "train", "--out", str(tmp_path / "tok"), "--vocab-size", "270", "--corpus", str(corpus),
            "--split", "all", "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(corpus) in err and "byte offset 31" in err  # 14 + 13 bytes of separator + 4
    assert main(args + ["--skip-bad"]) == 0
    assert "skipped 1 undecodable document" in capsys.readouterr().out
