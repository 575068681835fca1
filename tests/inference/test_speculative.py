"""Speculative decoding: greedy output token-identical to plain decoding (draft model and n-gram
drafting, several cache layouts, batches of rows that accept different numbers of tokens, with
continuous batching and chunked prefill); sampled output of a batch follows the target
distribution (chi-square on a 5-token vocabulary over the second and third tokens, so accepted,
rejected and bonus paths all count); the batched accept/reject rule agrees with the one-row
reference; verify() by hand; logprobs and penalties; errors."""


import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.speculative import DraftModel, NGramDrafter, speculative_generate, verify, verify_batch

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
    res = speculative_generate(target, p, SamplingParams(max_tokens=13, temperature=0), DraftModel(target), k=3)
    assert res.token_ids == naive_greedy(target, p, 13)
    # the prefill gives token 1, then 3 rounds x (3 drafts + 1 bonus)
    assert res.acceptance == 1.0 and res.rounds == 3


def test_ngram_drafting_greedy_identical_and_accepts_repeats():
    target = tiny_model("gqa")
    p = prompts([9])[0] * 2  # a repeated prompt gives the lookup something to find
    res = speculative_generate(target, p, SamplingParams(max_tokens=20, temperature=0), NGramDrafter(3), k=4)
    assert res.token_ids == naive_greedy(target, p, 20)
    assert NGramDrafter(2).lookup([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert NGramDrafter(2).lookup([5, 6, 7], 3) == []


@pytest.mark.parametrize("drafter", ["draft", "ngram"])
def test_batched_greedy_identical_per_row(drafter):
    """Seven requests through 3 rows (continuous batching, chunked prefill): every row gets
    its plain greedy tokens although rows accept different numbers of drafts each round."""
    target = tiny_model("mqa-window", seed=0)
    d = DraftModel(tiny_model("gqa", seed=5, n_layers=1)) if drafter == "draft" else NGramDrafter(3)
    ps = prompts([5, 2, 9, 4, 13, 6, 3])
    ps = [p * 2 for p in ps]  # repeats, so prompt lookup finds drafts
    lengths = [3, 9, 5, 12, 2, 7, 4]
    engine = Engine(target, max_batch=3, max_len=44, drafter=d, spec_k=3, prefill_chunk=7)
    outs = engine.generate(ps, [SamplingParams(max_tokens=m, temperature=0) for m in lengths])
    for p, m, out in zip(ps, lengths, outs):
        assert out[0].token_ids == naive_greedy(target, p, m)


def test_rows_accept_different_numbers_and_roll_back():
    """A self-drafting row accepts everything, a row drafted by an unrelated model mostly not; both
    in one batch stay equal to plain decoding (each row's cache rolled back on its own)."""
    target = tiny_model("gqa", seed=0)
    p_a, p_b = prompts([6, 3])
    sp = SamplingParams(max_tokens=14, temperature=0)
    engine = Engine(target, max_batch=2, max_len=40, drafter=DraftModel(tiny_model("gqa", seed=9, n_layers=1)),
                    spec_k=4)
    ra, rb = engine.add_request(p_a, sp), engine.add_request(p_b, sp)
    sa, sb = engine.requests[ra].sequences[0], engine.requests[rb].sequences[0]
    per_round = set()
    while engine.has_work():
        before = (sa.accepted, sb.accepted)
        engine.step()
        if sa.rounds and sb.rounds and sa.finish_reason is None and sb.finish_reason is None:
            per_round.add((sa.accepted - before[0], sb.accepted - before[1]))
    assert sa.row.output_ids == naive_greedy(target, p_a, 14)
    assert sb.row.output_ids == naive_greedy(target, p_b, 14)
    assert any(a != b for a, b in per_round), per_round  # rows accepted different numbers in one round


def test_verify_by_hand():
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # greedy target: 1 then 0
    u, noise = torch.tensor([0.5]), torch.ones(3)
    assert verify([1], None, p, u, noise) == ([1, 0], 1)  # accepted + bonus
    assert verify([2], None, p, u, noise) == ([1], 0)  # rejected: residual is the target's argmax
    q = torch.tensor([[0.0, 0.5, 0.5]])
    pp = torch.tensor([[0.0, 0.25, 0.75], [0.2, 0.3, 0.5]])
    # p/q = 0.5 at token 1: u = 0.4 accepts, u = 0.6 rejects and resamples from norm(max(0, p - q)) = [0, 0, 1]
    assert verify([1], q, pp, torch.tensor([0.4]), noise) == ([1, 2], 1)
    assert verify([1], q, pp, torch.tensor([0.6]), noise) == ([2], 0)


def test_verify_batch_agrees_with_reference():
    g = torch.Generator().manual_seed(0)
    B, K, V = 7, 3, 6
    for one_hot in (False, True):
        p = torch.softmax(torch.randn(B, K + 1, V, generator=g) * 2, -1)
        q = None if one_hot else torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1)
        src = p[:, :K] if q is None else q  # drafts drawn from q (n-gram: from p), so some are accepted
        drafts = (src / torch.empty(B, K, V).exponential_(generator=g)).argmax(-1)
        n_draft = torch.tensor([0, 1, 2, 3, 3, 2, 3])
        u, noise = torch.rand(B, K, generator=g), torch.empty(B, V).exponential_(generator=g)
        tokens, n_acc = verify_batch(drafts, n_draft, q, p, u, noise)
        seen = set()
        for b in range(B):
            n = int(n_draft[b])
            ref, ref_acc = verify(drafts[b, :n].tolist(), None if q is None else q[b, :n], p[b, :n + 1], u[b], noise[b])
            assert int(n_acc[b]) == ref_acc and tokens[b, :ref_acc + 1].tolist() == ref
            seen.add(ref_acc)
        assert len(seen) > 1


@torch.no_grad()
def test_sampled_output_follows_target_distribution():
    """1000 seeded requests, 100 rows at a time: the (2nd, 3rd) tokens follow the target's exact
    joint distribution. The 1st token comes from the prefill; the round after it has one draft, so
    the 2nd token is an accepted draft or a resample and the 3rd a bonus or a plain token."""
    V, N = 5, 1000
    target = tiny_model("gqa", vocab=V, seed=0, dtype=torch.float32, n_layers=1, d_model=16, init_std=0.6)
    draft = tiny_model("gqa", vocab=V, seed=3, dtype=torch.float32, n_layers=1, d_model=16, init_std=0.6)
    prompt = [2]
    dist = lambda ids: torch.softmax(target(torch.tensor([ids])).logits[0, -1].double(), -1)
    exact = torch.zeros(V, V, dtype=torch.float64)
    for a, pa in enumerate(dist(prompt)):
        for b, pb in enumerate(dist(prompt + [a])):
            exact[b] += pa * pb * dist(prompt + [a, b])
    engine = Engine(target, max_batch=100, max_len=8, drafter=DraftModel(draft), spec_k=2)
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=i)) for i in range(N)]
    seqs = [engine.requests[i].sequences[0] for i in ids]
    while engine.has_work():
        engine.step()
    counts = torch.zeros(V, V, dtype=torch.float64)
    for s in seqs:
        counts[s.row.output_ids[1], s.row.output_ids[2]] += 1
    expected = exact * N
    cells = expected >= 5
    chi2 = float(((counts - expected)[cells] ** 2 / expected[cells]).sum())
    dof = int(cells.sum()) - 1
    z = 3.09  # chi-square quantile at p = 0.001 via Wilson-Hilferty
    crit = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < crit, (chi2, crit)
    rate = sum(s.accepted for s in seqs) / sum(s.drafted for s in seqs)
    assert 0.05 < rate < 0.95  # both paths exercised


def test_logprobs_and_penalties_match_plain_decoding():
    target = tiny_model("gqa")
    ps = [p * 2 for p in prompts([5, 8])]
    plain = Engine(target, max_batch=2, max_len=40)
    spec = Engine(target, max_batch=2, max_len=40, drafter=NGramDrafter(3), spec_k=3)
    params = [SamplingParams(max_tokens=10, temperature=0, logprobs=2),
              SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3)]
    a, b = plain.generate(ps, params), spec.generate(ps, params)
    assert [o[0].token_ids for o in a] == [o[0].token_ids for o in b]
    assert b[0][0].logprobs == pytest.approx(a[0][0].logprobs, abs=1e-9)
    assert [list(t) for t in b[0][0].top_logprobs] == [list(t) for t in a[0][0].top_logprobs]


def test_engine_and_speculative_agree_with_top_k_1():
    # sampling with top_k = 1 is greedy in both paths
    target = tiny_model("gqa")
    p = prompts([5])[0]
    sp = SamplingParams(max_tokens=6, temperature=0.8, top_k=1, seed=0)
    eng = Engine(target, max_batch=1, max_len=40).generate([p], sp)[0][0].token_ids
    spec = speculative_generate(target, p, sp, NGramDrafter(), k=2).token_ids
    assert eng == spec == naive_greedy(target, p, 6)


def test_errors():
    target = tiny_model("gqa")
    with pytest.raises(ConfigError, match="spec_k = 0 must be in"):
        speculative_generate(target, [1], SamplingParams(), NGramDrafter(), k=0)
    with pytest.raises(ConfigError, match="spec_k = 16 must be in"):
        Engine(target, max_batch=1, max_len=40, drafter=NGramDrafter(), spec_k=16)
    with pytest.raises(ConfigError, match="n_min"):
        NGramDrafter(1, 2)
    with pytest.raises(ConfigError, match="vocab_size 50 differs"):
        Engine(target, max_batch=1, max_len=40, drafter=DraftModel(tiny_model("gqa", vocab=50)))
