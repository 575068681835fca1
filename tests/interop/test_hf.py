"""HF interop: tiny random checkpoints, with `transformers` as the reference, both directions."""

import json

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.interop import export_hf, import_hf
from lmforge.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=5000.0)),
    "llama-bias-mha-tied": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True,
                                                           num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=12, num_key_value_heads=1)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=3)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=5, num_experts_per_tok=2, sliding_window=4)),
}


def hf_model(name, seed=0):
    cls, extra = FAMILIES[name]
    cfg = cls(**{**SHAPE, **extra}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms: randomise everything
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def tokens(T=11):
    return torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_matches_transformers_logits(name, tmp_path):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    ours = import_hf(tmp_path).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,family", [
    (dict(), "llama"),
    (dict(bias=True, tie_embeddings=True, n_kv_heads=1), "llama"),
    (dict(qkv_bias=True), "qwen2"),
    (dict(qk_norm=True, head_dim=10), "qwen3"),
    (dict(window=4), "mistral"),
    (dict(moe="mixtral"), "mixtral"),
    (dict(rope="llama3", rope_theta=5e5), "llama"),
])
def test_export_loads_in_transformers_with_equal_logits_and_exact_keys(kw, family, tmp_path):
    from lmforge.model.moe import MoEConfig

    if kw.get("rope") == "llama3":
        from lmforge.model.positions import RopeScaling

        kw = dict(kw, rope=None, rope_scaling=RopeScaling(factor=4.0, original_context_length=12))
        kw.pop("rope")
    if kw.get("moe") == "mixtral":
        # transformers' grouped expert matmul needs 16-byte aligned rows: widths multiple of 4
        kw = dict(d_model=32, n_heads=4, n_kv_heads=2,
                  moe=MoEConfig(n_experts=4, top_k=2, d_expert=24, routing="softmax_topk", normalize_topk=True))
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=61, context_length=64, d_model=30, n_layers=2, n_heads=3,
                                n_kv_heads=3, d_ff=44, rope_theta=300.0, norm_eps=1e-6), **kw})
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    export_hf(ours, tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == family
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    from safetensors import safe_open

    def keys(d):
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return set(f.keys())

    ref.save_pretrained(tmp_path / "again")  # the tensor names transformers itself writes
    assert keys(tmp_path / "hf") == keys(tmp_path / "again")
    x = tokens(13)
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)
    back = import_hf(tmp_path / "hf")  # round trip is the identity
    if cfg.moe is None:
        assert back.cfg == cfg
    else:  # the same function, in Mixtral's spelling: softmax over the chosen k logits
        assert back.cfg.moe.routing == "topk_softmax" and back.cfg.moe.n_experts == 4
        torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_unmappable_models_say_why(tmp_path):
    from lmforge.model.moe import MoEConfig

    moe = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4,
                                  moe=MoEConfig(n_experts=2, n_shared_experts=1, aux_free_bias=True)))
    with pytest.raises(CheckpointError, match="n_shared_experts = 1 has no HF Mixtral equivalent.*"
                                              "aux_free_bias = true"):
        export_hf(moe, tmp_path / "x")
    gpt2 = Transformer(ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, norm="layernorm",
                                   positions="learned", glu=False, activation="gelu"))
    with pytest.raises(CheckpointError, match="norm = 'layernorm'.*positions = 'learned'"):
        export_hf(gpt2, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "mixtral").mkdir()
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps({"model_type": "qwen2_moe"}))
    with pytest.raises(CheckpointError, match="model_type 'qwen2_moe'.*MoE families"):
        import_hf(tmp_path / "mixtral")


def test_import_rejects_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("llama").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], "
                                              r"unexpected \['model.layers.0.self_attn.extra.weight'\]"):
        import_hf(tmp_path)


def test_import_rejects_rope_scaling(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope type 'yarn'"):
        import_hf(tmp_path)


def test_cli_round_trip_through_hf_in_bf16(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model.checkpoint import load_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    model = Transformer(cfg)
    save_model(tmp_path / "ours", model, cfg)
    assert main(["interop", "export-hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"),
                 "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["interop", "import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, back_cfg = load_model(tmp_path / "back")
    assert back_cfg == cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), n  # exactly the bf16 rounding
    assert "wrote" in capsys.readouterr().out


def test_import_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = hf_model("qwen2")
    ref.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(import_hf(tmp_path)(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
