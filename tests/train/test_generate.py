"""Sampling filters against hand-computed sets, determinism, and stop tokens."""

import math

import torch
from torch import nn

from lmforge.train.generate import filter_logits, generate, sample_next


def test_top_k_and_top_p_by_hand():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda x: torch.isfinite(x)[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, False, True, False]
    # nucleus 0.75: 0.5 (<0.75) then 0.3 reaches 0.8 -> keep {0, 2}
    assert kept(filter_logits(logits, top_p=0.75)) == [True, False, True, False]
    # nucleus 0.8 exactly reached by {0, 2}
    assert kept(filter_logits(logits, top_p=0.8)) == [True, False, True, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, False, True, True]
    assert kept(filter_logits(logits, top_p=0.1)) == [True, False, False, False]
    assert sample_next(logits, temperature=0).item() == 0


def test_sampling_distribution():
    """With top-k 2 the sampled frequencies follow the renormalised probabilities 0.5/0.8, 0.3/0.8."""
    logits = torch.tensor([[0.5, 0.05, 0.3, 0.15]]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    s = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    freq0 = (s == 0).float().mean().item()
    assert set(s.tolist()) == {0, 2}
    assert abs(freq0 - 0.625) < 4 * math.sqrt(0.625 * 0.375 / 4000)


class _Counter(nn.Module):
    """Always predicts (last token + 1) mod V with certainty."""

    def __init__(self, v=7):
        super().__init__()
        self.v = v
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        logits = torch.full((*ids.shape, self.v), -1e4)
        logits.scatter_(-1, ((ids + 1) % self.v).unsqueeze(-1), 0.0)
        return type("O", (), {"logits": logits})()


def test_generate_stops_and_crops():
    m = _Counter()
    assert generate(m, [2], 10, context_length=3, temperature=0, stop_ids=[6]) == [3, 4, 5]
    assert generate(m, [2], 3, context_length=2, temperature=1.0, seed=1) == [3, 4, 5]
