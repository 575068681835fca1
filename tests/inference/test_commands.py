"""CLI: `lmforge chat` and the loader behind `lmforge serve` on a run directory, a model directory
and a Hugging Face export; the streamed terminal reply equals the engine's; clear errors."""

import argparse
import io
import json

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.chat import apply_chat_template
from lmforge.inference.commands import cmd_chat, load_for_inference, register
from lmforge.model.checkpoint import save_model
from lmforge.tokenizer import Tokenizer, save_tokenizer

from .helpers import tiny_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    model = tiny_model("gqa", vocab=257, dtype=torch.float32)
    ck = d / "checkpoints" / "step_000003"
    save_model(ck, model, model.cfg)
    (ck / "trainer.json").write_text(json.dumps({"step": 3}))
    save_tokenizer(Tokenizer.from_merges([], special_tokens=["<|endoftext|>"]), d / "tokenizer")
    return d, model


def _args(path, **kw):
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["chat", str(path), "--device", "cpu", "--temperature", "0", "--max-tokens", "6"])
    vars(args).update(kw)
    return args


def test_chat_streams_the_engine_reply(run_dir):
    d, model = run_dir
    out = io.StringIO()
    assert cmd_chat(_args(d), stdin=io.StringIO("hello there\n\n"), stdout=out) == 0
    tok = Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])
    prompt = apply_chat_template([{"role": "user", "content": "hello there"}], tok)
    ref = Engine(model, tokenizer=tok, max_batch=1).generate(
        [prompt.ids], SamplingParams(max_tokens=6, temperature=0, stop=prompt.stop))[0][0]
    assert out.getvalue() == f"chatting with {d.name} (empty line or Ctrl-D quits)\n> {ref.text}\n> "


def test_loader_run_model_and_hf_dirs(run_dir, tmp_path):
    d, model = run_dir
    ids = torch.tensor([[5, 9, 200, 3]])
    ref = model(ids).logits
    m1, tok1, _ = load_for_inference(d)
    m2, _, _ = load_for_inference(d / "checkpoints" / "step_000003")  # finds ../../tokenizer
    assert torch.equal(m1(ids).logits, ref) and torch.equal(m2(ids).logits, ref)
    assert tok1.eot_id == 256
    from lmforge.interop.hf import export_hf

    export_hf(model, tmp_path / "hf")
    with pytest.raises(ConfigError, match="--tokenizer"):
        load_for_inference(tmp_path / "hf")
    m3, _, name = load_for_inference(tmp_path / "hf", tokenizer=d / "tokenizer")
    assert torch.allclose(m3(ids).logits, ref, atol=1e-5) and name == "hf"
    with pytest.raises(ConfigError, match="not a run, model or HF export"):
        load_for_inference(tmp_path)


def test_speculative_flags(run_dir):
    """--ngram N and --draft DIR build the drafter; the chat reply is the plain one (greedy)."""
    from lmforge.inference.commands import drafter_from_args
    from lmforge.inference.speculative import DraftModel, NGramDrafter

    d, model = run_dir
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["serve", str(d), "--ngram", "2", "--spec-k", "3"])
    ng = drafter_from_args(a, "cpu", None)
    assert isinstance(ng, NGramDrafter) and ng.n_max == 2 and a.spec_k == 3
    dm = drafter_from_args(p.parse_args(["serve", str(d), "--draft", str(d)]), "cpu", None)
    ids = torch.tensor([[5, 9, 200]])
    assert isinstance(dm, DraftModel) and torch.equal(dm.model(ids).logits, model(ids).logits)
    assert drafter_from_args(p.parse_args(["serve", str(d)]), "cpu", None) is None
    with pytest.raises(SystemExit):  # one drafter at a time
        p.parse_args(["serve", str(d), "--ngram", "2", "--draft", str(d)])
    plain, spec = io.StringIO(), io.StringIO()
    cmd_chat(_args(d), stdin=io.StringIO("hello hello hello\n\n"), stdout=plain)
    cmd_chat(_args(d, draft=str(d), spec_k=2), stdin=io.StringIO("hello hello hello\n\n"), stdout=spec)
    assert spec.getvalue() == plain.getvalue()


def test_prefix_cache_flag_in_chat(run_dir):
    """Two chat turns with --prefix-cache: the second turn reuses the first; replies unchanged."""
    d, _ = run_dir
    turns = "a\nb\n\n"  # short: both turns fit the 48-token context
    plain, cached = io.StringIO(), io.StringIO()
    cmd_chat(_args(d, max_tokens=2), stdin=io.StringIO(turns), stdout=plain)
    args = _args(d, max_tokens=2, prefix_cache=8, block_size=4)
    from lmforge.inference import commands

    engines = []
    real = commands._engine
    commands._engine = lambda a: engines.append(real(a)) or engines[-1]
    try:
        cmd_chat(args, stdin=io.StringIO(turns), stdout=cached)
    finally:
        commands._engine = real
    assert cached.getvalue() == plain.getvalue()
    assert "no longer fits" not in plain.getvalue() and plain.getvalue().count("> ") == 3
    assert engines[0][0].prefix.hit_tokens >= 16
