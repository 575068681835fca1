"""The Trainer with the real Transformer: token-weighted accumulation, overfitting, bit-exact resume,
checkpoint refusal, NaN stop."""

import math

import pytest
import torch

from lmforge.data.loader import DocumentPacker, Prefetcher, TokenStream
from lmforge.errors import CheckpointError
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import Trainer, TrainingDiverged, lm_loss

from .conftest import VOCAB, tiny_model


class ListBatches:
    """Cycles over fixed rows, `batch_size` at a time (a resumable batch builder)."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.bs, self.i = x, y, batch_size, 0

    def __next__(self):
        idx = [(self.i + j) % len(self.x) for j in range(self.bs)]
        self.i += self.bs
        return {"input_ids": self.x[idx], "targets": self.y[idx]}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def _cfg(**kw):
    base = dict(max_steps=3, warmup_steps=0, eval_every=0, checkpoint_every=0, progress=False, log_every=1,
                lr=1e-2, grad_clip=0.0, schedule="constant")
    return TrainConfig(**{**base, **kw})


def test_accumulation_is_token_weighted():
    """Micro-batch 1 x accumulation 8 == micro-batch 8 x accumulation 1, with rows of very different
    numbers of valid targets (a per-micro-batch mean would weight them wrongly)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (8, 19), generator=g)
    y = torch.randint(0, VOCAB, (8, 19), generator=g)
    for r in range(8):
        y[r, : 2 * r] = -100  # row r has 19 - 2r valid targets
    grads, params = [], []
    for bs, accum in [(8, 1), (1, 8)]:
        model, mcfg = tiny_model(seed=1)
        opt = build_optimizer(model, "adamw", lr=1e-2, vocab_size=VOCAB)
        t = Trainer(model, opt, ListBatches(x, y, bs), lm_loss, _cfg(batch_size=bs, grad_accum=accum),
                    model_config=mcfg)
        rec = t.train_step()
        grads.append([p.grad.clone() for p in model.parameters()])
        t.train_step()
        params.append([p.detach().clone() for p in model.parameters()])
        assert rec["tokens"] == sum(19 - 2 * r for r in range(8))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the logged loss is the token-weighted mean CE of the big batch
    model, _ = tiny_model(seed=1)
    with torch.no_grad():
        out = model(x, y)
    assert out.loss.item() == pytest.approx(grads and out.ce_sum.item() / out.n_tokens.item())


def test_tiny_model_overfits_tiny_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (2, 17), generator=g)
    y = torch.randint(0, VOCAB, (2, 17), generator=g)
    model, mcfg = tiny_model(seed=0)
    opt = build_optimizer(model, "adamw", lr=3e-2, weight_decay=0.0, vocab_size=VOCAB)
    t = Trainer(model, opt, ListBatches(x, y, 2), lm_loss, _cfg(max_steps=30, batch_size=2), model_config=mcfg)
    first = t.train_step()["loss"]
    assert first == pytest.approx(math.log(VOCAB), rel=0.1)
    for _ in range(29):
        last = t.train_step()["loss"]
    assert last < 0.01 * first  # memorised (random tokens: nothing to generalise)


def _packed_trainer(run_dir, shard_dir, max_steps, optimizer="adamw", hooks=None, prefetch=False, **kw):
    model, mcfg = tiny_model(seed=3, dropout=0.1)  # dropout: the RNG state must be restored too
    kw = {**dict(warmup_steps=3, checkpoint_every=2, keep_checkpoints=2), **kw}
    cfg = _cfg(max_steps=max_steps, batch_size=3, grad_accum=2, optimizer=optimizer, schedule="cosine",
               grad_clip=1.0, **kw)
    opt = build_optimizer(model, optimizer, lr=cfg.lr, muon_lr=cfg.muon_lr, vocab_size=VOCAB)
    batches = DocumentPacker(TokenStream(shard_dir), cfg.batch_size, 23)
    if prefetch:  # reads run one batch ahead on a background thread
        batches = Prefetcher(batches, "cpu")
    return Trainer(model, opt, batches, lm_loss, cfg, run_dir=run_dir, model_config=mcfg, hooks=hooks)


class _Kill(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_kill_and_resume_is_bit_exact(tmp_path, shard_dir, optimizer):
    full = _packed_trainer(tmp_path / "full", shard_dir, 6, optimizer)
    full.train()
    reference = [r["loss"] for r in full.history]

    def kill_at_5(trainer, record):
        if record["step"] == 5:
            raise _Kill

    t = _packed_trainer(tmp_path / "run", shard_dir, 6, optimizer, hooks=[kill_at_5])
    with pytest.raises(_Kill):
        t.train()
    ckpts = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert ckpts == ["step_000002", "step_000004"]  # kept the last 2
    resumed = _packed_trainer(tmp_path / "run", shard_dir, 6, optimizer)
    resumed.train(resume=True)
    assert [r["loss"] for r in resumed.history] == reference[4:]  # exactly, not approximately
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    from lmforge.train.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))


def test_prefetched_kill_and_resume_equals_the_plain_run(tmp_path, shard_dir):
    """The background read-ahead changes nothing: a prefetched run killed at step 3 and resumed
    gives bit for bit the losses and weights of an uninterrupted run without prefetching."""
    full = _packed_trainer(tmp_path / "full", shard_dir, 5)
    full.train()

    def kill_at_3(trainer, record):
        if record["step"] == 3:
            raise _Kill

    t = _packed_trainer(tmp_path / "run", shard_dir, 5, hooks=[kill_at_3], prefetch=True)
    with pytest.raises(_Kill):
        t.train()
    assert [r["loss"] for r in t.history] == [r["loss"] for r in full.history[:3]]
    resumed = _packed_trainer(tmp_path / "run", shard_dir, 5, prefetch=True)
    resumed.train(resume=True)  # from step 2: the batch read ahead at kill time is not consumed
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[2:]]
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_bad_checkpoints_are_refused(tmp_path, shard_dir):
    t = _packed_trainer(tmp_path / "run", shard_dir, 4)
    t.train()
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    # a different trajectory (changed warmup) is refused, naming the field
    other = _packed_trainer(tmp_path / "run", shard_dir, 8, warmup_steps=5)
    with pytest.raises(CheckpointError, match="train.warmup_steps = 3"):
        other.train(resume=True)
    # a different model is refused
    from lmforge.train.checkpoint import load_checkpoint

    model, mcfg = tiny_model(d_model=30, n_heads=3)
    opt = build_optimizer(model, "adamw", lr=1e-3)
    with pytest.raises(CheckpointError, match="model.d_model = 24 there, 30 now"):
        load_checkpoint(ckpt, model=model, optimizer=opt, model_config=mcfg, train_config={})
    # flipped byte -> checksum; truncated -> size
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = _packed_trainer(tmp_path / "run", shard_dir, 8)
    with pytest.raises(CheckpointError, match="sha256"):
        again.train(resume=True)
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        again.train(resume=True)


def _poisoned_from(step, grad_accum=2):
    """lm_loss that returns NaN from optimizer step `step` (1-based) on."""
    calls = {"n": 0}

    def poisoned(model, batch):
        loss, n, m = lm_loss(model, batch)
        calls["n"] += 1
        if calls["n"] > grad_accum * (step - 1):
            loss = loss * float("nan")
        return loss, n, m

    return poisoned


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, shard_dir):
    """check_every = 0 (auto) on CPU: each step is read before its update, so the NaN never reaches
    the weights."""
    t = _packed_trainer(tmp_path / "run", shard_dir, 10, log_every=4)
    assert t.check_every == 1
    t.loss_fn = _poisoned_from(6)
    with pytest.raises(TrainingDiverged, match="step 6: loss = nan.*stopped before the update"):
        t.train()
    assert t.step == 5 and all(torch.isfinite(p).all() for p in t.model.parameters())
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_000002", "step_000004"]
    good = _packed_trainer(tmp_path / "run", shard_dir, 10)
    assert good.resume() and good.step == 4
    assert all(torch.isfinite(p).all() for p in good.model.parameters())
