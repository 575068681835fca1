"""Log-likelihood scoring and bits-per-byte against brute-force per-token computations."""

import math

import pytest
import torch

from lmforge.data.sources import Document
from lmforge.errors import ConfigError
from lmforge.eval.intrinsic import evaluate_corpus
from lmforge.eval.loglik import rolling_logprobs, rolling_windows, score_continuations
from lmforge.model.mla import MLAConfig

from .helpers import brute_logprob, byte_tokenizer, tiny_model


def _requests(seed=3):
    g = torch.Generator().manual_seed(seed)
    ctxs = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (5, 11, 1, 21)]
    reqs = []
    for c in ctxs:
        for m in (1, 3, 6):
            reqs.append((c, torch.randint(0, 257, (m,), generator=g).tolist()))
    reqs.append((ctxs[3], [7] * 9))  # long: the context must be left-truncated
    return reqs


@pytest.mark.parametrize("strategy", ["auto", "cache", "padded"])
def test_continuations_equal_brute_force(strategy):
    model = tiny_model()
    reqs = _requests()
    scores = score_continuations(model, reqs, batch_size=4, strategy=strategy)
    for (c, x), s in zip(reqs, scores):
        row = (c + x)[-(model.cfg.context_length + 1):]  # too long: the context is left-truncated
        ref = brute_logprob(model, row, len(row) - len(x))
        assert s.n_tokens == len(x)
        assert s.logprob == pytest.approx(sum(ref), rel=1e-9, abs=1e-9)


ARCHITECTURES = {
    "rope-gqa": {},
    "learned": dict(positions="learned"),
    "window-nope": dict(window=5, layer_pattern=["local", "global-nope"]),
    "mla": dict(mla=MLAConfig(kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6)),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_cache_batches_questions_and_equals_brute_force(arch):
    """The shared-prefix path packs several questions per pair of forwards (contexts of different
    lengths in one prefill, choices of different lengths in one batch, contexts left-truncated so
    that the longest choice ends at the last position) and still equals brute force per token."""
    model = tiny_model(**ARCHITECTURES[arch])
    L = model.cfg.context_length
    g = torch.Generator().manual_seed(11)
    reqs = []
    for n_ctx, lens in [(7, (2, 5, 1)), (3, (4, 4)), (13, (9, 2, 3, 6)), (12, (2, 7, 3)), (1, (3, 1, 5)),
                        (L + 1 - 6, (6, 2, 1)), (30, (3,))]:
        ctx = torch.randint(0, 257, (n_ctx,), generator=g).tolist()
        reqs += [(ctx, torch.randint(0, 257, (m,), generator=g).tolist()) for m in lens]
    calls = []
    hook = model.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    scores = score_continuations(model, reqs, batch_size=7, strategy="cache")
    hook.remove()
    # 7 questions (contexts of 21 after truncation, 18, 13, 12, 7, 3, 1 tokens; 1, 3, 4, 3, 3, 2, 3
    # choices) packed longest first into at most 7 choice rows: 4 batches of two forwards each
    assert calls[::2] == [(2, 21), (2, 13), (2, 7), (1, 1)]
    assert calls[1::2] == [(4, 5), (7, 8), (5, 4), (3, 4)]
    for (c, x), s in zip(reqs, scores):
        row = (c + x)[-(L + 1):]
        ref = brute_logprob(model, row, len(row) - len(x))
        assert s.n_tokens == len(x)
        assert s.logprob == pytest.approx(sum(ref), rel=1e-9, abs=1e-9)
        assert s.is_greedy == all(
            int(model(torch.tensor([row[max(0, t - L):t]])).logits[0, -1].argmax()) == row[t]
            for t in range(len(row) - len(x), len(row)))


def test_single_token_choices_share_one_forward():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    ctxs = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (4, 9, 17, 2, 30)]
    reqs = [(c, [t]) for c in ctxs for t in (65, 66, 67, 68)]
    calls = []
    hook = model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    scores = score_continuations(model, reqs, batch_size=3)
    hook.remove()
    assert len(calls) == 2  # 5 contexts, 3 per forward
    for (c, x), s in zip(reqs, scores):
        row = (c + x)[-24:]
        assert s.logprob == pytest.approx(brute_logprob(model, row, len(row) - 1)[0], rel=1e-9)
        assert s.n_tokens == 1


def test_is_greedy_flag():
    model = tiny_model()
    ctx = [256, 10, 20]
    greedy = []
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(model(torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    other = greedy[:3] + [(greedy[3] + 1) % 257]
    for strategy in ("auto", "cache", "padded"):
        a, b = score_continuations(model, [(ctx, greedy), (ctx, other)], strategy=strategy)
        assert a.is_greedy and not b.is_greedy
        # single-token choices (the batched-context path of auto/cache)
        a, b = score_continuations(model, [(ctx, greedy[:1]), (ctx, [(greedy[0] + 1) % 257])], strategy=strategy)
        assert a.is_greedy and not b.is_greedy


def test_bad_requests():
    model = tiny_model()
    with pytest.raises(ConfigError, match="continuation"):
        score_continuations(model, [([1], [])])
    with pytest.raises(ConfigError, match="strategy"):
        score_continuations(model, [([1], [2])], strategy="tree")
    with pytest.raises(ConfigError, match="does not fit"):
        score_continuations(model, [([1], [2] * 24)])


@pytest.mark.parametrize("n,L,stride", [(2, 5, 2), (30, 7, 3), (8, 7, 7), (50, 6, 1), (7, 6, 4)])
def test_rolling_windows_cover_each_target_once(n, L, stride):
    counted = []
    for b, e, f in rolling_windows(n, L, stride):
        assert e - 1 - b <= L and b <= f - 1 < e
        counted += list(range(f, e))
        # the first counted target of every window after the first sees >= L - stride + 1 tokens
        if b > 0:
            assert f - b >= L - stride + 1
    assert counted == list(range(1, n))


def test_rolling_logprobs_equal_brute_force():
    model = tiny_model(context=9)
    g = torch.Generator().manual_seed(0)
    seqs = [[256] + torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 31)]
    for stride in (3, 9):
        for s, lp in zip(seqs, rolling_logprobs(model, seqs, stride=stride, batch_size=2)):
            # brute force with exactly the window's context: recompute per target
            ref = []
            for b, e, f in rolling_windows(len(s), 9, stride):
                for t in range(f, e):
                    with torch.no_grad():
                        logits = model(torch.tensor([s[b:t]])).logits[0, -1].double()
                    ref.append(float(torch.log_softmax(logits, -1)[s[t]]))
            assert lp.tolist() == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # a document that fits the context: plain causal log-likelihood
    short = seqs[1]
    lp = rolling_logprobs(model, [short])[0]
    assert lp.tolist() == pytest.approx(brute_logprob(model, short, 1), rel=1e-9)


def test_bits_per_byte_by_hand():
    model = tiny_model(context=12)
    tok = byte_tokenizer()
    docs = [Document("héllo wörld, a longer line of text!", "a", source="x.txt"),
            Document("ab", "b", source="y.jsonl", meta={"domain": "code"}),
            Document("", "c", source="y.jsonl"),
            Document("€uro " * 3, "d", source="y.jsonl", meta={"domain": "code"})]
    res = evaluate_corpus(model, tok, docs, stride=5)
    nats, tokens, n_bytes, per = 0.0, 0, 0, {}
    for d in docs:
        if not d.text:
            continue
        ids = [256] + list(d.text.encode("utf-8"))  # byte tokenizer: one token per byte
        lp = -sum(rolling_logprobs(model, [ids], stride=5)[0].tolist())
        nb = len(d.text.encode("utf-8"))
        nats, tokens, n_bytes = nats + lp, tokens + len(ids) - 1, n_bytes + nb
        p = per.setdefault(d.source, [0.0, 0])
        p[0] += lp
        p[1] += nb
    assert res["documents"] == 3 and res["tokens"] == tokens and res["bytes"] == n_bytes
    assert res["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-9)
    assert res["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-9)
    for src, (lp, nb) in per.items():
        assert res["by_group"][src]["bits_per_byte"] == pytest.approx(lp / math.log(2) / nb, rel=1e-9)
    by_meta = evaluate_corpus(model, tok, docs, stride=5, group_by="meta.domain")["by_group"]
    assert set(by_meta) == {"", "code"} and by_meta["code"]["documents"] == 2
    # a uniform model over 257 tokens: each byte costs exactly log2(257) bits
    uniform = tiny_model(context=12)
    with torch.no_grad():
        uniform.lm_head.weight.zero_() if uniform.lm_head is not None else uniform.tok_emb.weight.zero_()
    r = evaluate_corpus(uniform, tok, docs[:1])
    assert r["bits_per_byte"] == pytest.approx(math.log2(257), rel=1e-9)
    assert r["perplexity"] == pytest.approx(257, rel=1e-9)


def test_bpb_agrees_with_the_trainers_evaluation():
    """For documents that fit the context, eval's bits-per-byte equals the trainer's evaluate_lm
    (same CE, bytes from token byte lengths) on the same [EOT] + document rows."""
    from lmforge.train.metrics import token_byte_lengths
    from lmforge.train.pretrain import evaluate_lm

    model, tok = tiny_model(context=40), byte_tokenizer()
    texts = ["naïve café, 12 €", "def f(x):\n    return x"]
    docs = [Document(t, str(i), source="s") for i, t in enumerate(texts)]
    batches = []
    for t in texts:
        ids = torch.tensor([[256] + list(t.encode())])
        batches.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    with torch.no_grad():
        ref = evaluate_lm(model, batches, "cpu", token_bytes=token_byte_lengths(tok, 257))
    ours = evaluate_corpus(model, tok, docs)
    assert ours["tokens"] == ref["val_tokens"] and ours["bytes"] == ref["val_bytes"]
    # the trainer sums its CE in float32
    assert ours["loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    assert ours["bits_per_byte"] == pytest.approx(ref["val_bpb"], rel=1e-6)
