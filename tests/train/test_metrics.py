"""MFU, bits per byte, the unigram baseline, activation checkpointing (same gradients)."""

import math

import numpy as np
import pytest
import torch

from lmforge.train.metrics import bits_per_byte, mfu, peak_flops, unigram_log_probs
from lmforge.train.trainer import apply_activation_checkpointing, lm_loss

from .conftest import VOCAB, tiny_model


def test_mfu_and_peaks():
    assert peak_flops("cpu") is None
    assert mfu(6e8, 1000.0, None) is None
    assert mfu(6e8, 1000.0, 1e12) == pytest.approx(0.6)


def test_bits_per_byte_and_unigram_by_hand():
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    logp = unigram_log_probs(np.array([0, 0, 1, 3]), vocab_size=4)
    # add-one smoothing: counts 3, 2, 1, 2 over 8
    assert torch.allclose(logp.exp(), torch.tensor([3, 2, 1, 2], dtype=torch.float64) / 8)


def test_activation_checkpointing_same_gradients():
    x = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model, _ = tiny_model(seed=4)
        names = list(model.state_dict())
        if ckpt:
            assert apply_activation_checkpointing(model) == 2
            assert list(model.state_dict()) == names  # checkpoint key names are unchanged
        loss, n, _ = lm_loss(model, {"input_ids": x, "targets": x})
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
