"""lm-evaluation-harness bridge: a custom multiple-choice task (local JSONL, offline) run by
`lm_eval.simple_evaluate` on an lmforge model gives the same log-likelihoods and accuracies as our
own scorer; rolling log-likelihood equals brute force over the harness's own windows; generation
equals the engine's."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from lmforge.eval.harness import LMForgeLM  # noqa: E402
from lmforge.eval.tasks import evaluate_mc, load_mc  # noqa: E402
from lmforge.inference import Engine, SamplingParams  # noqa: E402

from .helpers import brute_logprob, byte_tokenizer, tiny_model  # noqa: E402

ROWS = [{"question": "Sky colour?\nAnswer:", "choices": ["blue", "red", "green tea"], "gold": 0},
        {"question": "2+2?\nAnswer:", "choices": ["4", "five", "22"], "gold": 1},
        {"question": "Cats say?\nAnswer:", "choices": ["moo", "meow", "woof woof"], "gold": 1},
        {"question": "Opposite of up?\nAnswer:", "choices": ["down", "left", "sideways"], "gold": 2}]


def test_simple_evaluate_equals_our_scorer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: lmforge_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    from lm_eval.tasks import TaskManager

    model, tok = tiny_model(context=64), byte_tokenizer()
    out = lm_eval.simple_evaluate(model=LMForgeLM(model, tok, batch_size=5), tasks=["lmforge_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True,
                                  bootstrap_iters=0)
    res = out["results"]["lmforge_tiny_mc"]
    ours = evaluate_mc(model, tok, load_mc(data, "mc"), batch_size=5)  # same batches: bit-identical
    assert res["acc,none"] == ours["acc"] and res["acc_norm,none"] == ours["acc_norm"]
    samples = sorted(out["samples"]["lmforge_tiny_mc"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    assert theirs == [d["loglikelihoods"] for d in ours["items"]]  # identical numbers


def test_rolling_equals_harness_windows():
    model, tok = tiny_model(context=10), byte_tokenizer()
    lm = LMForgeLM(model, tok, batch_size=4)
    texts = ["short", "a much longer document that needs several windows of ten tokens"]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for text, value in zip(texts, got):
        ids = list(text.encode())
        want = 0.0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, 256, 10, 1)):
            row = ctx + cont
            want += sum(brute_logprob(model, row, len(row) - len(cont)))
        assert value == pytest.approx(want, rel=1e-9)


def test_generate_until_equals_engine():
    tok = byte_tokenizer()
    model = tiny_model(context=48, dtype=torch.float32)
    lm = LMForgeLM(model, tok, max_batch=2)
    reqs = [Instance("generate_until", {}, ("Hello", {"until": ["e"], "max_gen_toks": 7}), 0),
            Instance("generate_until", {}, ("Q: x\nA:", {"until": "\n", "max_gen_toks": 5, "do_sample": False}), 1)]
    got = lm.generate_until(reqs)
    eng = Engine(model, tokenizer=tok, max_batch=2)
    for text, stop, n, g in zip(["Hello", "Q: x\nA:"], [["e"], ["\n"]], [7, 5], got):
        ref = eng.generate([[256] + list(text.encode())], SamplingParams(max_tokens=n, temperature=0, stop=stop))
        assert g == ref[0][0].text
