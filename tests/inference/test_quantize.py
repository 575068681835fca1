"""Weight-only quantization: int8/int4 against hand formulas, packing round trip, quantized layers
equal dequantized-weight matmuls, the engine runs a quantized model exactly like naive decoding of
that model, and the validation-loss cost on a briefly trained model stays within stated bounds."""

import copy

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.quantize import (
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes,
)
from lmforge.model.layers import Linear

from .helpers import naive_greedy, prompts, tiny_model


def test_int8_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.0], [2.54, 1.0, -0.01]])
    q, scale = quantize_int8(w)
    assert scale.tolist() == pytest.approx([0.01, 0.02])
    assert q.tolist() == [[50, -127, 0], [127, 50, 0]]


def test_int4_pack_round_trip_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(5, 24)
    packed, scale = quantize_int4(w, 8)
    assert packed.shape == (5, 12) and packed.dtype == torch.uint8 and scale.shape == (5, 3)
    q = unpack_int4(packed)
    assert q.min() >= -8 and q.max() <= 7
    deq = (q.view(5, 3, 8).float() * scale[..., None]).view(5, 24)
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6
    vals = torch.arange(-8, 8, dtype=torch.int16).view(1, 16)
    nib = (vals & 0xF).to(torch.uint8)
    assert unpack_int4(nib[:, 0::2] | (nib[:, 1::2] << 4)).tolist() == [list(range(-8, 8))]
    with pytest.raises(ConfigError, match="group_size"):
        quantize_int4(w, 7)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantized_linear_equals_dequantized_matmul(cls):
    torch.manual_seed(0)
    lin = Linear(16, 10, bias=True)
    lin.reset_parameters(0.3)
    torch.nn.init.normal_(lin.bias)
    q = cls(lin) if cls is Int8Linear else cls(lin, group_size=8)
    x = torch.randn(3, 16)
    assert torch.allclose(q(x), x @ q.dequantize().t() + lin.bias, atol=1e-5)
    bound = 0.3 * 3 / (127 if cls is Int8Linear else 7) * 0.5 + 1e-6  # half a step of the largest scale
    assert (q.dequantize() - lin.weight).abs().max() <= bound


def test_engine_on_quantized_model_and_memory():
    model = tiny_model("gqa", dtype=torch.float32, d_model=32, n_heads=4)
    before = weight_bytes(model)
    quantize_model(model, "int8")
    assert model.quantization["layers"] == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert isinstance(model.blocks[0].attn.q, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    assert weight_bytes(model) < before
    p = prompts([6])[0]
    out = Engine(model, max_batch=1, max_len=40).generate([p], SamplingParams(max_tokens=10, temperature=0))
    assert out[0][0].token_ids == naive_greedy(model, p, 10)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "int4")


def test_validation_loss_delta_after_training():
    torch.manual_seed(0)
    V = 31
    model = tiny_model("gqa", vocab=V, dtype=torch.float32, d_model=48, n_heads=4, init_std=0.02)
    model.train()
    # a learnable source: noisy arithmetic progressions mod V
    def batch(n, g):
        start = torch.randint(0, V, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        x = (start + step * torch.arange(33)) % V
        noise = torch.rand(x.shape, generator=g) < 0.1
        return torch.where(noise, torch.randint(0, V, x.shape, generator=g), x)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        x = batch(16, g)
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    val = batch(128, torch.Generator().manual_seed(99))

    @torch.no_grad()
    def val_loss(m):
        return float(m(val[:, :-1], val[:, 1:]).loss)

    base = val_loss(model)
    assert base < 2.5  # it learned something (uniform would be ln 31 = 3.43)
    d8 = val_loss(quantize_model(copy.deepcopy(model), "int8")) - base
    d4 = val_loss(quantize_model(copy.deepcopy(model), "int4", group_size=16)) - base
    print(f"val loss {base:.4f}, int8 delta {d8:+.5f}, int4 delta {d4:+.5f}")
    assert abs(d8) < 0.01 and abs(d4) < 0.1, (base, d8, d4)
