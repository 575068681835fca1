"""Packed projections (model.transformer.pack_projections, layers.PackedLinears), the per-forward
RoPE tables and the per-forward attention mask of the engine's cache: the packed model computes exactly what the unpacked one does (fp32 on CPU: the same
bits for training losses and gradients, the same greedy tokens from the engine), keeps its
parameters, state dict and optimizer behaviour, and falls back to separate GEMMs when the packing
is broken; RoPE and the mask, built once, give the same bits as built per layer. The compiled
decode step traces all of it in one graph."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.quantize import quantize_model
from lmforge.model import pack_projections
from lmforge.model.attention import Attention
from lmforge.model.layers import MLP

from .helpers import naive_greedy, prompts, tiny_model

CONFIGS = {
    "gqa-bias": dict(kind="gqa", qkv_bias=True),  # Llama/Qwen layout with q/k/v biases
    "gpt2": dict(kind="gpt2"),  # no gate: the MLP has nothing to pack
    "parallel-qknorm": dict(kind="gqa", parallel_block=True, qk_norm=True, n_layers=3),
}


def _pair(name: str, dtype=torch.float32):
    """Two identical models (same seed): the first stays unpacked, the second is packed."""
    kw = dict(CONFIGS[name])
    kind = kw.pop("kind")
    a = tiny_model(kind, dtype=dtype, **kw)
    b = tiny_model(kind, dtype=dtype, **kw)
    return a, b, pack_projections(b)


def _batch(vocab=61, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    targets = torch.randint(0, vocab, (3, 11), generator=g)
    targets[0, :4] = -100
    return ids, targets


def test_packing_keeps_parameters_names_and_values():
    model = tiny_model("gqa", dtype=torch.float32, qkv_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    assert pack_projections(model) == 4  # 2 layers x (attention + MLP)
    assert dict(model.named_parameters()) == params  # the same Parameter objects under the same names
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    # the parameters are consecutive row blocks of one buffer
    w = attn.packed.weight
    assert w.shape == (4 * 6 + 2 * 2 * 6, 24)
    assert attn.q.weight.data_ptr() == w.data_ptr()
    assert attn.k.weight.data_ptr() == w[24:].data_ptr() and attn.v.weight.data_ptr() == w[36:].data_ptr()
    assert attn.v.bias.data_ptr() == attn.packed.bias[36:].data_ptr()
    assert mlp.up.weight.data_ptr() == mlp.packed.weight[mlp.gate.weight.shape[0]:].data_ptr()
    # in-place updates reach the buffer (and the GEMM that reads it)
    with torch.no_grad():
        attn.k.weight.add_(1.0)
    assert torch.equal(w[24:36], attn.k.weight)
    # packing again (a second engine on the same model) keeps the buffers, which compiled code and
    # captured CUDA graphs of the first engine read
    Engine(model, max_batch=1, max_len=8)
    assert attn.packed.weight is w and attn.q.weight.data_ptr() == w.data_ptr()
    # a model moved after packing is packed anew
    model.to(torch.float64)
    assert pack_projections(model) == 4 and attn.packed.weight.dtype == torch.float64
    assert attn.packed.holds((attn.q, attn.k, attn.v))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_loss_and_gradients_are_bit_identical(name):
    a, b, _ = _pair(name)
    a.train(), b.train()
    ids, targets = _batch()
    out_a, out_b = a(ids, targets), b(ids, targets)
    assert torch.equal(out_a.loss, out_b.loss)
    out_a.loss.backward()
    out_b.loss.backward()
    grads_b = dict(b.named_parameters())
    for n, p in a.named_parameters():
        assert grads_b[n].grad is not None and torch.equal(p.grad, grads_b[n].grad), n


@pytest.mark.parametrize("name", ["gqa-bias", "parallel-qknorm"])
def test_optimizer_steps_are_bit_identical_and_keep_the_packing(name):
    a, b, _ = _pair(name)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (a, b)]
    for step in range(3):
        ids, targets = _batch(seed=step)
        for m, opt in zip((a, b), opts):
            opt.zero_grad()
            m(ids, targets).loss.backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    attn = b.blocks[0].attn
    assert attn.packed is not None and attn.packed.holds((attn.q, attn.k, attn.v))
    assert torch.equal(attn.packed.weight[:attn.q.weight.shape[0]], attn.q.weight)


def test_load_state_dict_into_a_packed_model_keeps_the_packing():
    source = tiny_model("gqa", dtype=torch.float32, seed=5)
    model = tiny_model("gqa", dtype=torch.float32, seed=0)
    pack_projections(model)
    model.load_state_dict(source.state_dict())
    for m in model.modules():
        if isinstance(m, Attention):
            assert m.packed.holds((m.q, m.k, m.v))
        if isinstance(m, MLP):
            assert m.packed.holds((m.gate, m.up))
    ids, targets = _batch()
    assert torch.equal(model(ids, targets).loss, source(ids, targets).loss)


@pytest.mark.parametrize("kind", ["gqa", "mqa-window", "gpt2", "moe"])
def test_engine_greedy_tokens_equal_packed_and_unpacked(kind):
    a = tiny_model(kind, dtype=torch.float32)
    b = tiny_model(kind, dtype=torch.float32)
    plain = Engine(a, max_batch=3, max_len=40, eos_ids=[], pack=False)
    packed = Engine(b, max_batch=3, max_len=40, eos_ids=[])
    assert plain.packed_layers == 0 and packed.packed_layers > 0
    assert all(m.packed is None for m in a.modules() if isinstance(m, Attention | MLP))
    ps = prompts([5, 9, 2])
    sp = SamplingParams(max_tokens=12, temperature=0)
    got = [c[0].token_ids for c in packed.generate(ps, sp)]
    assert got == [c[0].token_ids for c in plain.generate(ps, sp)]
    assert got == [naive_greedy(a, p, 12) for p in ps]
    with torch.no_grad():  # one GEMM instead of three: equal up to float32 round-off
        ids = torch.tensor([ps[1]])
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=1e-5, atol=1e-5)


def test_engine_sees_in_place_training_updates_of_its_model():
    """GRPO shares its policy with the engine: the trainer's steps must reach the packed buffers."""
    model = tiny_model("gqa", dtype=torch.float32)
    engine = Engine(model, max_batch=2, max_len=40, eos_ids=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    ids, targets = _batch()
    model(ids, targets).loss.backward()
    opt.step()
    model.eval()
    fresh = tiny_model("gqa", dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    ps = prompts([4, 7])
    got = [c[0].token_ids for c in engine.generate(ps, SamplingParams(max_tokens=10, temperature=0))]
    assert got == [naive_greedy(fresh, p, 10) for p in ps]


def test_broken_packing_falls_back_to_separate_gemms(caplog):
    model = tiny_model("gqa", dtype=torch.float32)
    pack_projections(model)
    ids, _ = _batch()
    # a deep copy is not packed (its parameters are separate clones) and computes the same
    clone = copy.deepcopy(model)
    assert all(m.packed is None for m in clone.modules() if isinstance(m, Attention | MLP))
    # .to() allocates every parameter anew: the packing ends, logged, and the outputs stay right
    moved = model.to(torch.float64)
    with caplog.at_level(logging.WARNING, logger="lmforge.model.layers"), torch.no_grad():
        got = moved(ids.clone()).logits
    assert all(m.packed is None for m in moved.modules() if isinstance(m, Attention | MLP))
    with torch.no_grad():
        torch.testing.assert_close(got, clone.to(torch.float64)(ids).logits, rtol=0, atol=0)
    # swapped modules (quantized) are not bypassed: a packed model quantizes like an unpacked one
    a, b, _ = _pair("gqa-bias")
    qa, qb = quantize_model(a, "int8"), quantize_model(b, "int8")
    with torch.no_grad():
        assert torch.equal(qa(ids).logits, qb(ids).logits)
    assert pack_projections(qa) == 0


def test_rope_tables_are_computed_once_per_forward_with_the_same_numbers(monkeypatch):
    import lmforge.model.positions as positions
    import lmforge.model.transformer as transformer

    model = tiny_model("gqa", dtype=torch.float64, n_layers=3)
    ids, _ = _batch()
    calls = []
    real = positions.rope_cos_sin

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(positions, "rope_cos_sin", counted)
    monkeypatch.setattr(transformer, "rope_cos_sin", counted)
    with torch.no_grad():
        once = model(ids).logits
        assert len(calls) == 1
        monkeypatch.setattr(model, "rope_cos_sin", lambda *a: None)  # every layer computes its own
        per_layer = model(ids).logits
    assert len(calls) == 1 + 2 * 3
    assert torch.equal(once, per_layer)


def test_shared_attention_mask_gives_the_same_bits_as_per_layer_masks(monkeypatch):
    """Global and sliding-window layers (rings, and a window too wide for a ring), rows at
    different positions: the cache's once-per-forward mask changes nothing."""
    from lmforge.inference.cache import CacheView, StaticKVCache

    for kind, over in [("gqa", {}), ("mqa-window", {}), ("mqa-window", dict(window=40))]:
        model = tiny_model(kind, dtype=torch.float32, n_layers=3, **over)
        cache = StaticKVCache.for_model(model, 2, 30)
        ids = torch.tensor([[5, 9, 1, 7], [2, 3, 0, 0]])
        pos = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
        with torch.no_grad():
            model(ids, positions=pos, kv_cache=cache.view(slice(0, 2), 4, pos))
            step_ids, step_pos = torch.tensor([[4], [8]]), torch.tensor([[4], [2]])
            shared = model(step_ids, positions=step_pos, kv_cache=cache.view(slice(0, 2), 5, step_pos)).logits
            with monkeypatch.context() as m:
                m.setattr(CacheView, "attention_mask", lambda self, S, window: None)
                per_layer = model(step_ids, positions=step_pos, kv_cache=cache.view(slice(0, 2), 5, step_pos)).logits
        assert torch.equal(shared, per_layer), kind


def _count(gm: torch.fx.GraphModule, name: str) -> int:
    return sum(n.op == "call_function" and getattr(n.target, "__name__", "") == name for n in gm.graph.nodes)


@pytest.mark.parametrize("pack", [True, False])
def test_compiled_decode_step_traces_the_packed_gemms_in_one_graph(pack):
    """fullgraph: no graph break in the engine's steady-state step; the traced graph holds one GEMM
    for q/k/v and one for gate/up per layer when packed (4 per layer + the head, else 7 + 1), and
    one RoPE table and one mask for all layers."""
    model = tiny_model("gqa", dtype=torch.float32)
    engine = Engine(model, max_batch=2, max_len=40, eos_ids=[], pack=pack)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(engine._sample_step, backend=backend, fullgraph=True, dynamic=False)
    tokens = torch.tensor([[3], [7]])
    pos = torch.tensor([[0], [0]])
    key = ("greedy",)
    with torch.inference_mode():
        expected = engine._sample_step(tokens, pos, key, 8)
        got = step(tokens, pos, key, 8)
    assert torch.equal(got, expected)
    assert len(graphs) == 1
    assert _count(graphs[0], "linear") == (4 if pack else 7) * 2 + 1
    assert _count(graphs[0], "cos") == _count(graphs[0], "sin") == 1
    assert _count(graphs[0], "le") == 1  # the mask: key slot <= query position
    torch._dynamo.reset()


def test_compiled_training_step_uses_the_packed_gemms_with_the_same_gradients():
    a, b, _ = _pair("gqa-bias")
    ids, targets = _batch()
    a(ids, targets).loss.backward()
    torch._dynamo.reset()
    compiled = torch.compile(b, backend="aot_eager", fullgraph=True)
    loss = compiled(ids, targets).loss
    loss.backward()
    grads_b = dict(b.named_parameters())
    for n, p in a.named_parameters():
        torch.testing.assert_close(grads_b[n].grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
    torch._dynamo.reset()


def test_compiled_prefill_with_dynamic_shapes_traces_in_one_graph():
    """The engine's prefill is compiled with dynamic shapes (prompt length, rows, attended length as
    symbols): packing, the RoPE table and the shared mask must not break that graph either."""
    model = tiny_model("gqa", dtype=torch.float32)
    engine = Engine(model, max_batch=5, max_len=40, eos_ids=[])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    prefill = torch.compile(engine._forward_from, backend=backend, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for rows, T in [(3, 7), (5, 9)]:  # sizes unlike any cache dimension (duck sizing)
            ids = torch.randint(0, 61, (rows, T), generator=torch.Generator().manual_seed(T))
            pos = torch.arange(T).repeat(rows, 1)
            expected = engine._forward_from(ids, pos, 0, T)
            assert torch.equal(prefill(ids, pos, 0, T), expected)
    assert len(graphs) == 1  # one compilation for both shapes
    assert _count(graphs[0], "linear") == 4 * 2 + 1 and _count(graphs[0], "le") == 1
    torch._dynamo.reset()


def test_packed_model_saves_and_loads_through_the_checkpoint_format(tmp_path):
    """safetensors refuses parameters that are partial views of one storage; lmforge's model
    checkpoint must still save a packed model (e.g. a policy an Engine packed, saved by the
    trainer) and load into packed (packing kept: the engine's graphs read those buffers) and
    unpacked models alike."""
    from lmforge.model import pack_projections
    from lmforge.model.checkpoint import load_weights, save_model

    for kind in ("gqa", "gpt2"):
        m = tiny_model(kind, dtype=torch.float32)
        pack_projections(m)
        save_model(tmp_path / kind, m, m.cfg)
        plain, packed = tiny_model(kind, dtype=torch.float32, seed=7), tiny_model(kind, dtype=torch.float32, seed=9)
        pack_projections(packed)
        ptrs = [p.data_ptr() for p in packed.parameters()]
        for target in (plain, packed):
            load_weights(tmp_path / kind, target)
            for (name, a), b in zip(m.state_dict().items(), target.state_dict().values()):
                assert torch.equal(a, b), name
        assert [p.data_ptr() for p in packed.parameters()] == ptrs


def test_packing_inside_inference_mode_keeps_the_model_trainable():
    """An engine built inside torch.inference_mode() packs the model it shares with training: the
    parameters must stay normal tensors, so a training step still runs and gets gradients."""
    from lmforge.model import pack_projections

    m = tiny_model("gqa", dtype=torch.float32)
    with torch.inference_mode():
        pack_projections(m)
    assert not any(p.is_inference() for p in m.parameters())
    m.train()
    ids = torch.tensor([prompts([9], seed=3)[0]])
    m(ids).logits.float().sum().backward()
    assert m.blocks[0].attn.q.weight.grad is not None
