"""Model save/load (safetensors + JSON): identical outputs, tied weights, refusal of bad files."""

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.model.checkpoint import load_model, load_model_config, save_model

from .conftest import tiny_model


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(tmp_path, tie):
    model, cfg = tiny_model(seed=5, tie_embeddings=tie, positions="learned", norm="layernorm", bias=True)
    save_model(tmp_path, model, cfg)
    loaded, cfg2 = load_model(tmp_path)
    assert cfg2 == cfg
    x = torch.randint(0, cfg.vocab_size, (2, 13))
    model.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)
    if tie:
        assert loaded.lm_head is None
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_refuses_bad_files(tmp_path):
    model, cfg = tiny_model()
    save_model(tmp_path, model, cfg)
    other, ocfg = tiny_model(d_model=30, n_heads=3)
    save_model(tmp_path / "other", other, ocfg)
    (tmp_path / "model.safetensors").replace(tmp_path / "ok.safetensors")
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)
    (tmp_path / "model_config.json").write_text('{"format": "something"}')
    with pytest.raises(CheckpointError, match="not an lmforge model config"):
        load_model_config(tmp_path)
