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
