"""GPU path of the trainer (bf16 autocast, compile, pinned prefetch); excluded by default (-m gpu)."""

import pytest
import torch

from lmforge.data.loader import Prefetcher, RandomWindowSampler, TokenStream
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import Trainer, lm_loss

from .conftest import VOCAB, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_gpu_training_learns(shard_dir, optimizer):
    model, mcfg = tiny_model(seed=0)
    model = model.cuda()
    cfg = TrainConfig(batch_size=8, max_steps=40, warmup_steps=5, compile=True, progress=False,
                      eval_every=0, checkpoint_every=0, optimizer=optimizer, lr=3e-3, log_every=10)
    opt = build_optimizer(model, optimizer, lr=cfg.lr, vocab_size=VOCAB)
    batches = Prefetcher(RandomWindowSampler(TokenStream(shard_dir), 8, 23, seed=0), "cuda")
    t = Trainer(model, opt, batches, lm_loss, cfg, model_config=mcfg)
    t.train()
    losses = [r["loss"] for r in t.history]
    assert losses[-1] < losses[0] - 0.5
    assert batches.state_dict()["step"] == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_with_accumulation_give_the_compiled_losses(shard_dir):
    """compile_mode = "reduce-overhead" with 3 micro-batches per step: the graphs are replayed (the
    trainer's gradients are never graph outputs) and the losses are those of the default compile."""
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        model, mcfg = tiny_model(seed=0)
        model = model.cuda()
        cfg = TrainConfig(batch_size=4, grad_accum=3, max_steps=12, warmup_steps=2, compile=True,
                          compile_mode=mode, progress=False, eval_every=0, checkpoint_every=0, lr=3e-3,
                          log_every=4)
        opt = build_optimizer(model, "adamw", lr=cfg.lr, vocab_size=VOCAB)
        batches = Prefetcher(RandomWindowSampler(TokenStream(shard_dir), 4, 23, seed=0), "cuda")
        t = Trainer(model, opt, batches, lm_loss, cfg, model_config=mcfg)
        t.train()
        losses[mode] = [r["loss"] for r in t.history]
    assert len(losses["reduce-overhead"]) == 12
    assert losses["reduce-overhead"] == pytest.approx(losses["default"], rel=1e-5, abs=1e-6)
