"""Speculative decoding: greedy output token-identical to plain decoding (draft model and n-gram
drafting, several cache layouts); sampled output follows the target distribution (chi-square on a
5-token vocabulary, over the first two tokens so accepted, rejected and bonus paths all count);
verify() by hand; errors."""


import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.speculative import DraftModel, NGramDrafter, speculative_generate, verify

from .helpers import naive_greedy, prompts, tiny_model


@pytest.mark.parametrize("kind", ["gqa", "mla", "mqa-window"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_identical_with_draft_model(kind, k):
    target = tiny_model(kind, seed=0)
    draft = tiny_model("gqa", seed=5, n_layers=1)
    for p in prompts([1, 6]):
        res = speculative_generate(target, p, SamplingParams(max_tokens=15, temperature=0), DraftModel(draft), k=k)
        assert res.token_ids == naive_greedy(target, p, 15)
        assert res.drafted > 0


def test_greedy_identical_with_self_draft_accepts_all():
    target = tiny_model("gqa")
    p = prompts([4])[0]
    res = speculative_generate(target, p, SamplingParams(max_tokens=12, temperature=0), DraftModel(target), k=3)
    assert res.token_ids == naive_greedy(target, p, 12)
    assert res.acceptance == 1.0 and res.rounds == 3  # 3 rounds x (3 drafts + 1 bonus)


def test_ngram_drafting_greedy_identical_and_accepts_repeats():
    target = tiny_model("gqa")
    p = prompts([9])[0] * 2  # a repeated prompt gives the lookup something to find
    res = speculative_generate(target, p, SamplingParams(max_tokens=20, temperature=0), NGramDrafter(3), k=4)
    assert res.token_ids == naive_greedy(target, p, 20)
    assert NGramDrafter(2).propose([1, 2, 3, 9, 1, 2], 3, None, None) == ([3, 9, 1], None)
    assert NGramDrafter(2).propose([5, 6, 7], 3, None, None) == ([], None)


def test_verify_by_hand():
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # greedy target: 1 then 0
    g = torch.Generator().manual_seed(0)
    assert verify([1], None, p, g) == ([1, 0], 1)  # accepted + bonus
    assert verify([2], None, p, g) == ([1], 0)  # rejected: residual is the target's argmax


@torch.no_grad()
def test_sampled_output_follows_target_distribution():
    V, N = 5, 1000
    target = tiny_model("gqa", vocab=V, seed=0, dtype=torch.float32, n_layers=1, d_model=16, init_std=0.6)
    draft = tiny_model("gqa", vocab=V, seed=3, dtype=torch.float32, n_layers=1, d_model=16, init_std=0.6)
    prompt = [2]
    p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double(), -1)
    exact = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        p2 = torch.softmax(target(torch.tensor([prompt + [a]])).logits[0, -1].double(), -1)
        exact[a] = p1[a] * p2
    counts = torch.zeros(V, V, dtype=torch.float64)
    drafter = DraftModel(draft)
    acc = dra = 0
    for i in range(N):
        r = speculative_generate(target, prompt, SamplingParams(max_tokens=2, temperature=1.0, seed=i), drafter, k=3)
        counts[r.token_ids[0], r.token_ids[1]] += 1
        acc, dra = acc + r.accepted, dra + r.drafted
    assert 0.05 < acc / dra < 0.95  # both paths exercised
    expected = exact * N
    cells = expected >= 5
    chi2 = float(((counts - expected)[cells] ** 2 / expected[cells]).sum())
    dof = int(cells.sum()) - 1
    # chi-square quantile at p = 0.001 via Wilson-Hilferty
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < crit, (chi2, crit)


def test_engine_and_speculative_agree_on_seeded_first_token_distribution_shape():
    # the engine and speculative decoding sample the same processed distribution: with top_k=1 both are greedy
    target = tiny_model("gqa")
    p = prompts([5])[0]
    sp = SamplingParams(max_tokens=6, temperature=0.8, top_k=1, seed=0)
    eng = Engine(target, max_batch=1, max_len=40).generate([p], sp)[0][0].token_ids
    spec = speculative_generate(target, p, sp, NGramDrafter(), k=2).token_ids
    assert eng == spec == naive_greedy(target, p, 6)


def test_errors():
    target = tiny_model("gqa")
    with pytest.raises(ConfigError, match="penalties"):
        speculative_generate(target, [1], SamplingParams(repetition_penalty=1.2), NGramDrafter())
    with pytest.raises(ConfigError, match="k = 0 must be in"):
        speculative_generate(target, [1], SamplingParams(), NGramDrafter(), k=0)
    with pytest.raises(ConfigError, match="n_min"):
        NGramDrafter(1, 2)
