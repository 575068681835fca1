"""Multiple-choice tasks: file formats (CSV/JSONL/Parquet), harness prompts, few-shot, and the
accuracies against a brute-force per-token scoring of every choice."""

import csv
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.errors import DataError
from lmforge.eval.tasks import encode_pair, evaluate_mc, fewshot_prompt, load_mc

from .helpers import brute_logprob, byte_tokenizer, tiny_model

MMLU = [["What is 2+2?", "3", "4", "5", "22", "B"], ["Pick the vowel.", "b", "c", "e", "z", "C"],
        ["Largest?", "1", "10", "100", "1000", "D"], ["Smallest?", "0", "1", "2", "3", "A"],
        ["Colour of sky?", "red", "blue", "green", "black", "B"]]


def _mmlu_files(tmp_path):
    headerless = tmp_path / "abstract_algebra_test.csv"
    with open(headerless, "w", newline="") as f:
        csv.writer(f).writerows(MMLU)
    headed = tmp_path / "mmlu.csv"
    with open(headed, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "A", "B", "C", "D", "answer", "subject"])
        w.writerows([r + ["high_school_math"] for r in MMLU])
    return headerless, headed


def test_mmlu_formats(tmp_path):
    headerless, headed = _mmlu_files(tmp_path)
    a, b = load_mc(headerless, "mmlu"), load_mc(headed, "mmlu")
    assert [i.gold for i in a] == [1, 2, 3, 0, 1] == [i.gold for i in b]
    assert a[0].context == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert a[0].choices == [" A", " B", " C", " D"]
    p = fewshot_prompt(b[0], b[1:3], "mmlu")
    assert p.startswith("The following are multiple choice questions (with answers) about high school math.\n\n"
                        "Pick the vowel.\nA. b\nB. c\nC. e\nD. z\nAnswer: C\n\nLargest?")
    assert p.endswith(b[0].context)


def test_hellaswag_and_arc_formats(tmp_path):
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps({"activity_label": "Baking cookies", "ctx_a": "A woman puts dough on a tray.",
                              "ctx_b": "she", "endings": ["bakes it. [title] Done.", "eats the tray.",
                                                          "sings  loudly.", "leaves."], "label": "0"}) + "\n")
    (item,) = load_mc(hs, "hellaswag")
    assert item.context == "Baking cookies: A woman puts dough on a tray. She"
    assert item.choices == [" bakes it.. Done.", " eats the tray.", " sings loudly.",
                            " leaves."] and item.gold == 0
    arc = tmp_path / "arc.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"question": "Which is a gas?", "choices": {"text": ["rock", "steam", "ice"], "label": ["1", "2", "3"]},
         "answerKey": "2"}]), arc)
    (item,) = load_mc(arc, "arc")
    assert item.context == "Question: Which is a gas?\nAnswer:" and item.choices == [" rock", " steam", " ice"]
    assert item.gold == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}))
    with pytest.raises(DataError, match="answerKey 'B'"):
        load_mc(bad, "arc")


def test_encode_pair_moves_trailing_space():
    tok = byte_tokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "B")
    assert ctx == [256] + list(b"Answer:") and cont == list(b" B")


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_accuracies_equal_brute_force(tmp_path, num_fewshot):
    model, tok = tiny_model(context=40), byte_tokenizer()
    items = load_mc(_mmlu_files(tmp_path)[1], "mmlu")
    # choices of different lengths make the four normalisations disagree
    for k, it in enumerate(items):
        it.choices = [" A", " Bb", " Cccc", " D" + "d" * k]
    res = evaluate_mc(model, tok, items, fmt="mmlu", num_fewshot=num_fewshot, seed=7, batch_size=3)
    res_cache = evaluate_mc(model, tok, items, fmt="mmlu", num_fewshot=num_fewshot, seed=7, strategy="cache")
    correct = dict(acc=0, acc_norm=0, acc_token=0, acc_byte=0)

    rng = random.Random(7)
    for it, d, dp in zip(items, res["items"], res_cache["items"]):
        shots = rng.sample([s for s in items if s is not it], num_fewshot) if num_fewshot else []
        prompt = fewshot_prompt(it, shots, "mmlu")
        ll, ntok = [], []
        for c in it.choices:
            ci, xi = encode_pair(tok, prompt, c)
            row = (ci + xi)[-41:]
            ll.append(sum(brute_logprob(model, row, len(row) - len(xi))))
            ntok.append(len(xi))
        assert d["loglikelihoods"] == pytest.approx(ll, rel=1e-9)
        assert dp["loglikelihoods"] == pytest.approx(ll, rel=1e-9)
        texts = [c[1:] for c in it.choices]  # without the delimiter, as lm-eval-harness counts
        for name, v in (("acc", ll), ("acc_norm", [x / len(c) for x, c in zip(ll, texts)]),
                        ("acc_token", [x / n for x, n in zip(ll, ntok)]),
                        ("acc_byte", [x / len(c.encode()) for x, c in zip(ll, texts)])):
            correct[name] += max(range(4), key=v.__getitem__) == it.gold
    for name, c in correct.items():
        assert res[name] == pytest.approx(c / len(items)) == res_cache[name]
