"""Sampling: filters agree with the training sampler (train/generate.py), penalties against hand
computations, min-p, the exponential-race draw follows p (chi-square), seeded rows are independent
of their batch; streaming text never splits a UTF-8 character and honours stop strings."""

import pytest
import torch

from lmforge.inference.sampling import (
    Row,
    SamplingParams,
    apply_penalties,
    draw,
    filter_logits,
    probs,
    sample,
)
from lmforge.inference.text import TextStream
from lmforge.tokenizer import Tokenizer
from lmforge.train.generate import filter_logits as train_filter


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.7), (9, 0.5), (1, None), (None, 1.0)])
def test_filters_match_training_sampler(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 37) * 2
    ours = filter_logits(logits, top_k, top_p, None)
    ref = train_filter(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))


def test_min_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    out = filter_logits(logits, None, None, 0.2)  # keep p >= 0.2 * 0.5 = 0.1
    assert torch.isinf(out).tolist() == [[False, False, False, True]]


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    rows = [Row(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                prompt_ids=[0, 1], output_ids=[3, 3, 1])]
    out = apply_penalties(logits, rows)[0]
    # repetition over prompt+output {0, 1, 3}: 2/2, -1*2, 3/2; then presence/frequency over output
    # counts {3: 2, 1: 1}
    expect = [1.0, -2.0 - 0.5 - 0.25, 0.5, 1.5 - 0.5 - 0.5, -2.0]
    assert out.tolist() == pytest.approx(expect)


def test_draw_follows_distribution():
    p = torch.tensor([0.05, 0.4, 0.25, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(draw(p.expand(n, 5).contiguous(), g), minlength=5).double()
    assert counts[4] == 0
    expected = p.double()[:4] * n
    chi2 = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001


def test_greedy_and_temperature_probs():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert probs(logits, SamplingParams(temperature=0)).tolist() == [[0.0, 1.0, 0.0]]
    p = probs(logits, SamplingParams(temperature=2.0))
    assert p.tolist()[0] == pytest.approx(torch.softmax(logits / 2, -1).tolist()[0])


def test_seeded_rows_independent_of_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    sp = SamplingParams(temperature=1.0, seed=11)
    together = sample(logits, [Row.make(sp, [], "cpu"), Row.make(SamplingParams(temperature=0.7), [], "cpu"),
                               Row.make(SamplingParams(temperature=0), [], "cpu")]).tokens
    alone = sample(logits[:1], [Row.make(sp, [], "cpu")]).tokens
    assert together[0] == alone[0]
    assert together[2] == logits[2].argmax()


def _byte_tokenizer():
    return Tokenizer.from_merges([], special_tokens=["<|endoftext|>"])


def test_stream_never_splits_utf8():
    tok = _byte_tokenizer()
    text = "héllo → 世界 🙂!"
    pieces = []
    stream = TextStream(tok)
    for i in tok.encode(text):  # one byte per token: multi-byte characters arrive in parts
        piece, stopped = stream.push(i)
        assert not stopped
        pieces.append(piece)
        piece.encode("utf-8")  # a lone surrogate or split character would not round-trip
        assert "\ufffd" not in piece
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert "" in pieces  # some pushes held back a partial character


def test_stream_stop_strings():
    tok = _byte_tokenizer()
    stream = TextStream(tok, stop=["END", "xyz"])
    out = []
    for i in tok.encode("abc EN more ENDING"):
        piece, stopped = stream.push(i)
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "abc EN more " and stream.text == "abc EN more "
    stream = TextStream(tok, stop=["END"])
    for i in tok.encode("abEN"):
        stream.push(i)
    assert stream.text == "ab" and stream.finish() == "EN"  # held prefix released at the end
