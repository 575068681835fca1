"""`lmforge eval RUN_DIR --tasks ...`: results JSON equal to the library calls, the printed table,
the report section (replaced, not duplicated, on a second run) and clear errors for bad specs."""

import csv
import json

import pytest
import torch

from lmforge.cli import main
from lmforge.data.sources import Corpus
from lmforge.errors import ConfigError, DataError
from lmforge.eval.generative import evaluate_generative, load_gsm8k
from lmforge.eval.intrinsic import evaluate_corpus
from lmforge.eval.run import parse_task
from lmforge.eval.tasks import evaluate_mc, load_mc
from lmforge.inference import Engine
from lmforge.model.checkpoint import save_model
from lmforge.tokenizer import save_tokenizer

from .helpers import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    model = tiny_model(context=40, dtype=torch.float32)
    ck = d / "checkpoints" / "step_000005"
    save_model(ck, model, model.cfg)
    (ck / "trainer.json").write_text(json.dumps({"step": 5}))
    save_tokenizer(byte_tokenizer(), d / "tokenizer")
    (d / "report.html").write_text("<!doctype html><html><body><h1>run</h1></body></html>")
    with open(d / "mmlu.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Q1?", "a", "b", "c", "d", "A"], ["Q2?", "e", "f", "g", "h", "C"],
                                 ["Q3?", "i", "j", "k", "l", "D"]])
    (d / "gsm.jsonl").write_text("\n".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"})
                                           for i in range(3)))
    (d / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                              ["hello world " * 9, "short one", "über straße"]))
    return d, model


def test_eval_cli(run_dir, capsys):
    d, model = run_dir
    argv = ["eval", str(d), "--device", "cpu", "--tasks", "bpb", f"mmlu:tiny={d / 'mmlu.csv'}",
            f"gsm8k={d / 'gsm.jsonl'}", "--corpus", str(d / "corpus.jsonl"), "--split", "all",
            "--max-tokens", "5", "--stride", "7"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((d / "eval" / "results.json").read_text())
    assert res["checkpoint"].endswith("step_000005") and set(res["tasks"]) == {"bpb", "tiny", "gsm8k"}
    tok = byte_tokenizer()
    bpb = evaluate_corpus(model, tok, Corpus([str(d / "corpus.jsonl")]), stride=7)
    assert res["tasks"]["bpb"]["bits_per_byte"] == pytest.approx(bpb["bits_per_byte"], rel=1e-5)
    assert res["tasks"]["bpb"]["by_group"][str(d / "corpus.jsonl")]["documents"] == 3
    mc = evaluate_mc(model, tok, load_mc(d / "mmlu.csv", "mmlu"), fmt="mmlu")
    assert res["tasks"]["tiny"]["acc"] == mc["acc"] and res["tasks"]["tiny"]["acc_norm"] == mc["acc_norm"]
    items = json.loads((d / "eval" / "tiny.items.json").read_text())
    flat = [x for i in items for x in i["loglikelihoods"]]
    assert flat == pytest.approx([x for i in mc["items"] for x in i["loglikelihoods"]], rel=1e-5)
    gen = evaluate_generative(Engine(model, tokenizer=tok, max_batch=8), tok, load_gsm8k(d / "gsm.jsonl"),
                              max_tokens=5, stop=["Question:", "\n\n"])
    gi = json.loads((d / "eval" / "gsm8k.items.json").read_text())
    assert [x["texts"] for x in gi] == [x["texts"] for x in gen["items"]]
    assert res["tasks"]["gsm8k"]["accuracy"] == gen["accuracy"]
    rows = [line.split() for line in printed.splitlines()]
    assert ["tiny", "acc", f"{mc['acc']:.4f}", "3"] in rows
    assert ["bpb", "bits_per_byte", f"{bpb['bits_per_byte']:.4f}", "3"] in rows
    # a second run replaces the report's section and merges results; the KV-cache strategy scores
    # the same log-likelihoods (" A".." D" are two byte tokens: the shared-prefix path)
    assert main(["eval", str(d), "--device", "cpu", "--tasks", f"mmlu={d / 'mmlu.csv'}", "--strategy", "cache"]) == 0
    cached = json.loads((d / "eval" / "mmlu.items.json").read_text())
    assert [x for i in cached for x in i["loglikelihoods"]] == pytest.approx(flat, rel=1e-5)
    page = (d / "report.html").read_text()
    assert page.count("<h2>Evaluation</h2>") == 1 and page.startswith("<!doctype html><html><body><h1>run</h1>")
    assert "mmlu" in page and "tiny" in page and page.rstrip().endswith("</body></html>")
    assert set(json.loads((d / "eval" / "results.json").read_text())["tasks"]) == {"bpb", "tiny", "gsm8k", "mmlu"}


def test_bad_task_specs():
    with pytest.raises(ConfigError, match="unknown kind 'squad'"):
        parse_task("squad=x.jsonl")
    with pytest.raises(ConfigError, match="mmlu=PATH"):
        parse_task("mmlu")
    assert parse_task("mmlu:alg=a.csv").name == "alg"


def test_judge_task_with_scripted_judge(run_dir):
    from lmforge.eval.judge import answer_with_engine
    from lmforge.eval.run import run_tasks

    d, model = run_dir
    tok = byte_tokenizer()
    rows = [{"question": "hi?", "answer": "x" * 40}, {"question": "yo?", "answer": ""}]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def judge(q, a, b):  # longer answer wins
        return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"

    res = run_tasks(model, tok, [parse_task(f"judge={d / 'pairs.jsonl'}")], judge=judge, max_tokens=6,
                    engine_factory=lambda: Engine(model, tokenizer=tok, max_batch=2), log=lambda *_: None)["judge"]
    ours = answer_with_engine(Engine(model, tokenizer=tok, max_batch=2), tok, ["hi?", "yo?"], max_tokens=6)
    assert [i["answer"] for i in res["items"]] == ours
    want = [1.0 if len(a) > len(r["answer"]) else 0.0 if len(a) < len(r["answer"]) else 0.5 for a, r in zip(ours, rows)]
    assert res["win_rate"] == pytest.approx(sum(want) / 2) and res["consistency"] == 1.0
    with pytest.raises(ConfigError, match="judge endpoint"):
        run_tasks(model, tok, [parse_task(f"judge={d / 'pairs.jsonl'}")], engine_factory=lambda: None)


def test_gen_task_cli(run_dir, capsys):
    from lmforge.eval.generative import load_gen

    d, model = run_dir
    (d / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Pick: A or B?", "answer": "The answer is (B)"}, {"prompt": "Pick one", "answer": "A"}]))
    assert main(["eval", str(d), "--device", "cpu", "--tasks", f"gen={d / 'gen.jsonl'}", "--extractor", "letter",
                 "--max-tokens", "6", "--stop", "\n", "--out", str(d / "gen_out")]) == 0
    capsys.readouterr()
    items = load_gen(d / "gen.jsonl", "letter")
    assert [i.answer for i in items] == ["B", "A"]
    tok = byte_tokenizer()
    ref = evaluate_generative(Engine(model, tokenizer=tok, max_batch=8), tok, items, extractor="letter",
                              max_tokens=6, stop=["\n"])
    got = json.loads((d / "gen_out" / "results.json").read_text())["tasks"]["gen"]
    assert got["accuracy"] == ref["accuracy"]
    assert [x["texts"] for x in json.loads((d / "gen_out" / "gen.items.json").read_text())] == \
        [x["texts"] for x in ref["items"]]
    (d / "bad.jsonl").write_text(json.dumps({"prompt": "p", "answer": "no letter here"}))
    with pytest.raises(DataError, match="no letter answer"):
        load_gen(d / "bad.jsonl", "letter")
