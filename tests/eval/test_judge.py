"""LM-as-a-judge: verdict parsing, position-swap bookkeeping with scripted judges, the bootstrap
CI, and the whole flow against a live local uvicorn server running a tiny model."""

import socket
import threading
import time

import numpy as np
import pytest
import torch

from lmforge.eval.judge import ChatJudge, PairItem, bootstrap_ci, pairwise_compare, parse_verdict
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.chat import apply_chat_template

from .helpers import byte_tokenizer, tiny_model


@pytest.mark.parametrize("text,want", [("Explanation... [[A]]", "A"), ("[[C]] both fine", "tie"),
                                       ("B is better", "B"), ("**A**", "A"), ("Tie.", "tie"),
                                       ("Assistant A rambles", None), ("", None)])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


ITEMS = [PairItem(f"q{i}", "x" * (i % 5 + 1), "y" * 3) for i in range(10)]


def test_position_bias_cancels():
    res = pairwise_compare(ITEMS, lambda q, a, b: "[[A]]")  # always the first shown
    assert res["win_rate"] == 0.5 and res["ties"] == 10 and res["first_position_rate"] == 1.0
    assert res["consistency"] == 0.0 and res["ci_low"] == res["ci_high"] == 0.5


def test_length_preferring_judge():
    def judge(q, a, b):  # longer answer wins, equal length: tie; nothing to do with position
        return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"

    res = pairwise_compare(ITEMS, judge)
    lengths = [i % 5 + 1 for i in range(10)]
    wins, losses = sum(n > 3 for n in lengths), sum(n < 3 for n in lengths)
    assert (res["wins"], res["losses"], res["ties"]) == (wins, losses, 10 - wins - losses)
    assert res["win_rate"] == pytest.approx((wins + 0.5 * (10 - wins - losses)) / 10)
    assert res["consistency"] == 1.0 and res["ci_low"] <= res["win_rate"] <= res["ci_high"]
    # one item with a garbled reply in one order becomes a tie and is counted as invalid
    flaky = pairwise_compare(ITEMS[4:5], lambda q, a, b: judge(q, a, b) if a.startswith("x") else "hmm")
    assert flaky["invalid_verdicts"] == 1 and flaky["ties"] == 1


def test_bootstrap_ci_matches_normal_approximation():
    scores = np.random.default_rng(3).choice([0.0, 0.5, 1.0], size=400, p=[0.3, 0.2, 0.5])
    lo, hi = bootstrap_ci(scores, 0.95, resamples=4000)
    half = 1.96 * scores.std() / np.sqrt(len(scores))
    assert lo == pytest.approx(scores.mean() - half, abs=0.01) and hi == pytest.approx(scores.mean() + half, abs=0.01)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_flow_against_live_server():
    uvicorn = pytest.importorskip("uvicorn")
    from lmforge.inference.server import create_app

    tok = byte_tokenizer()
    engine = Engine(tiny_model(context=160, dtype=torch.float32, seed=4), tokenizer=tok, max_batch=2)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tok, model_name="judge"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        judge = ChatJudge(f"http://127.0.0.1:{port}/v1", "judge", max_tokens=6,
                          template="Q {question}\nA {answer_a}\nB {answer_b}\nBetter:")
        items = [PairItem("2+2?", "4", "five"), PairItem("sky?", "blue", "green")]
        res = pairwise_compare(items, judge)
    finally:
        server.should_exit = True
        t.join(timeout=5)
    # the replies are exactly the model's greedy chat replies to the swapped prompts
    ref_engine = Engine(tiny_model(context=160, dtype=torch.float32, seed=4), tokenizer=tok, max_batch=2)
    for it, d in zip(items, res["items"]):
        for (a, b), reply in zip([(it.answer_a, it.answer_b), (it.answer_b, it.answer_a)], d["replies"]):
            cp = apply_chat_template([{"role": "user", "content": judge.prompt(it.question, a, b)}], tok)
            ref = ref_engine.generate([cp.ids], SamplingParams(max_tokens=6, temperature=0, stop=cp.stop,
                                                               stop_ids=cp.stop_ids))[0][0]
            assert reply == ref.text
        assert d["verdicts"] == [parse_verdict(r) for r in d["replies"]]
    assert res["n"] == 2 and 0 <= res["win_rate"] <= 1
