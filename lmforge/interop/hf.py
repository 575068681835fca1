"""Hugging Face checkpoints: export lmforge models as Llama / Qwen2 / Qwen3 / Mistral
(`config.json` + `model.safetensors`) and import such checkpoints back, exactly.

What maps: RMSNorm pre-norm serial blocks, SwiGLU MLPs, RoPE with a plain theta (no scaling),
MHA/GQA/MQA, tied or untied head; per family:
- llama:   optional biases on all attention projections (`attention_bias`) and MLP (`mlp_bias`);
- qwen2:   biases on q/k/v only;
- qwen3:   QK-norm (per-head RMSNorm on q and k), no biases;
- mistral: a sliding window on every layer;
- mixtral: every layer a mixture of experts with softmax top-k routing renormalised over the k
  chosen (our `topk_softmax`, or `softmax_topk` with `normalize_topk`), no shared experts, no
  capacity limit or routing bias; our stacked expert weights are split into Mixtral's per-expert
  w1 (gate), w3 (up), w2 (down) and back.
Our RoPE uses HF's rotate-half layout (see model/positions.py), so q/k weights map unpermuted.
Anything else (other MoE variants, MLA, MTP, post/sandwich norms, softcaps, learned positions,
per-layer window patterns, rope scaling other than Llama-3's) raises CheckpointError naming the field that cannot map;
key sets are checked strictly both ways (a missing or unexpected tensor is an error, never skipped).

Neither direction needs `transformers`; the tests use it as the reference implementation.
Tokenizer export is the tokenizer stage's job.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import CheckpointError
from lmforge.io import atomic_dir, read_json
from lmforge.model.config import ModelConfig
from lmforge.model.positions import RopeScaling

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
# Per-layer tensors: lmforge name -> HF name (both relative to the layer prefix).
_LAYER_KEYS = {
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "attn.q.bias": "self_attn.q_proj.bias",
    "attn.k.bias": "self_attn.k_proj.bias",
    "attn.v.bias": "self_attn.v_proj.bias",
    "attn.o.bias": "self_attn.o_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
    "mlp.gate.bias": "mlp.gate_proj.bias",
    "mlp.up.bias": "mlp.up_proj.bias",
    "mlp.down.bias": "mlp.down_proj.bias",
}
_GLOBAL_KEYS = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}


def _moe_unmappable(cfg: ModelConfig) -> list[str]:
    """Reasons the MoE of `cfg` is not a Mixtral MoE."""
    m = cfg.moe
    mixtral_routing = m.routing == "topk_softmax" or (m.routing == "softmax_topk" and m.normalize_topk)
    checks = [
        (not mixtral_routing, f"moe.routing = {m.routing!r}, normalize_topk = {m.normalize_topk} (Mixtral: "
                              "softmax over the top k)"),
        (m.n_shared_experts > 0, f"moe.n_shared_experts = {m.n_shared_experts}"),
        (m.route_scale != 1.0, f"moe.route_scale = {m.route_scale}"),
        (m.capacity_factor is not None, f"moe.capacity_factor = {m.capacity_factor}"),
        (m.aux_free_bias, "moe.aux_free_bias = true (a routing bias)"),
        (cfg.n_dense_layers > 0, f"n_dense_layers = {cfg.n_dense_layers}"),
        (cfg.qk_norm or cfg.qkv_bias or cfg.bias, "qk_norm or biases with moe"),
    ]
    return [f"{why} has no HF Mixtral equivalent" for bad, why in checks if bad]


def _unmappable(cfg: ModelConfig) -> list[str]:
    """Reasons `cfg` has no HF Llama-family equivalent (empty if it maps)."""
    checks = [
        (cfg.mla is not None, "mla is set (multi-head latent attention)"),
        (cfg.mtp_depth > 0, f"mtp_depth = {cfg.mtp_depth} (multi-token prediction modules)"),
        (cfg.norm != "rmsnorm", f"norm = {cfg.norm!r} (needs 'rmsnorm')"),
        (cfg.norm_placement != "pre", f"norm_placement = {cfg.norm_placement!r} (needs 'pre')"),
        (cfg.parallel_block, "parallel_block = true"),
        (not (cfg.glu and cfg.activation == "silu"),
         f"activation = {cfg.activation!r}, glu = {cfg.glu} (needs SwiGLU: 'silu' with glu)"),
        (cfg.positions != "rope", f"positions = {cfg.positions!r} (needs 'rope')"),
        (cfg.layer_pattern is not None, f"layer_pattern = {cfg.layer_pattern} (per-layer kinds)"),
        (cfg.attn_softcap is not None, "attn_softcap is set"),
        (cfg.final_softcap is not None, "final_softcap is set"),
        (cfg.bias and not cfg.qkv_bias, "bias = true with qkv_bias = false"),
        (cfg.qk_norm and cfg.qkv_bias, "qk_norm with biases (Qwen3 has no biases)"),
        (cfg.window is not None and (cfg.qk_norm or cfg.qkv_bias),
         "window with qk_norm or biases (only Mistral has a window on every layer)"),
    ]
    return [why for bad, why in checks if bad] + (_moe_unmappable(cfg) if cfg.moe is not None else [])


def family_for(cfg: ModelConfig) -> str:
    """The HF family that represents `cfg`, or CheckpointError listing why none does."""
    reasons = _unmappable(cfg)
    if reasons:
        raise CheckpointError("this model cannot be exported to a HF Llama/Qwen2/Qwen3/Mistral "
                              "checkpoint: " + "; ".join(reasons))
    if cfg.moe is not None:
        return "mixtral"
    if cfg.window is not None:
        return "mistral"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    return "llama"


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    s = cfg.rope_scaling
    return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_context_length}


def to_hf_config(cfg: ModelConfig, family: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` of `cfg` as HF family `family` (default: `family_for(cfg)`)."""
    auto = family_for(cfg)
    family = family or auto
    if family not in FAMILIES:
        raise CheckpointError(f"HF family {family!r} must be one of {list(FAMILIES)}")
    if family != auto and not (auto == "llama" and family == "mistral"):  # Mistral without a window
        raise CheckpointError(f"this model maps to HF family {auto!r}, not {family!r}")
    out = {
        "architectures": [_ARCH[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
    }
    if family == "llama":
        out.update(attention_bias=bool(cfg.bias), mlp_bias=bool(cfg.bias))
    elif family == "qwen3":
        out.update(attention_bias=False)
    elif family == "mistral":
        out.update(sliding_window=cfg.window)
    elif family == "mixtral":
        out.update(sliding_window=cfg.window, num_local_experts=cfg.moe.n_experts,
                   num_experts_per_tok=cfg.moe.top_k, intermediate_size=cfg.moe.expert_width(cfg.d_model, True),
                   router_aux_loss_coef=cfg.moe.balance_loss_coef, output_router_logits=False)
    return out


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig equivalent to a HF Llama/Qwen2/Qwen3/Mistral config, or CheckpointError."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} (architectures {hf.get('architectures')}) "
                              f"cannot be imported; supported: {', '.join(FAMILIES)} "
                              "(other MoE families, e.g. qwen2_moe or deepseek_v3, are not)")

    def get(key, default=None):
        return hf.get(key, default)

    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        try:
            scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                  high_freq_factor=float(rope["high_freq_factor"]),
                                  original_context_length=int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise CheckpointError(f"{source}: llama3 rope scaling lacks {e}") from None
    elif rope_type not in ("default", None):
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (default and llama3 are)")
    theta = rope.get("rope_theta", get("rope_theta", 10000.0))
    if get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {get('hidden_act')!r} is not supported (needs 'silu')")
    attention_bias = bool(get("attention_bias", family == "qwen2"))
    mlp_bias = bool(get("mlp_bias", False))
    if family == "llama" and attention_bias != mlp_bias:
        raise CheckpointError(f"{source}: attention_bias = {attention_bias} with mlp_bias = {mlp_bias} "
                              "is not supported (lmforge biases all Linears or none)")
    if family in ("qwen3",) and attention_bias:
        raise CheckpointError(f"{source}: qwen3 with attention_bias = true is not supported")
    window, moe = None, None
    if family in ("mistral", "mixtral"):
        window = get("sliding_window")
    if family == "mixtral":
        from lmforge.model.moe import MoEConfig

        moe = MoEConfig(n_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
                        d_expert=get("intermediate_size"), routing="topk_softmax",
                        balance_loss_coef=get("router_aux_loss_coef", 0.0))
    elif family in ("qwen2", "qwen3") and get("use_sliding_window", False):
        raise CheckpointError(f"{source}: use_sliding_window = true (per-layer windows) is not supported")
    n_heads = get("num_attention_heads")
    return ModelConfig(
        vocab_size=get("vocab_size"), context_length=get("max_position_embeddings", 2048),
        d_model=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads,
        head_dim=get("head_dim") or get("hidden_size") // n_heads, d_ff=get("intermediate_size"),
        norm_eps=get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        bias=attention_bias if family == "llama" else False,
        qkv_bias=attention_bias if family in ("llama", "qwen2") else False,
        qk_norm=family == "qwen3", window=window, moe=moe,
        tie_embeddings=bool(get("tie_word_embeddings", False)), init_std=get("initializer_range", 0.02))


def _hf_name(name: str) -> str:
    """lmforge parameter name -> HF tensor name (dense parameters)."""
    if name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[name]
    _, layer, rest = name.split(".", 2)  # blocks.<i>.<rest>
    if rest not in _LAYER_KEYS:
        raise CheckpointError(f"parameter {name} has no HF equivalent")
    return f"model.layers.{layer}.{_LAYER_KEYS[rest]}"


def to_hf_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge parameters -> HF tensors. MoE layers become Mixtral's per-expert w1/w3/w2 and gate."""
    out = {}
    for name, t in params.items():
        if ".mlp.router" in name or ".mlp.w_in" in name or ".mlp.w_out" in name:
            layer = name.split(".")[1]
            pre = f"model.layers.{layer}.block_sparse_moe"
            if name.endswith("router"):
                out[f"{pre}.gate.weight"] = t
            elif name.endswith("w_in"):  # [E, d, 2f], gate | up side by side
                f = t.shape[-1] // 2
                for e in range(t.shape[0]):
                    out[f"{pre}.experts.{e}.w1.weight"] = t[e, :, :f].t()
                    out[f"{pre}.experts.{e}.w3.weight"] = t[e, :, f:].t()
            else:  # w_out [E, f, d]
                for e in range(t.shape[0]):
                    out[f"{pre}.experts.{e}.w2.weight"] = t[e].t()
        else:
            out[_hf_name(name)] = t
    return out


def from_hf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors (already checked against `hf_names(cfg)`) -> lmforge parameters."""
    state = {}
    for name in _param_names(cfg):
        if ".mlp.router" in name or ".mlp.w_in" in name or ".mlp.w_out" in name:
            pre = f"model.layers.{name.split('.')[1]}.block_sparse_moe"
            E = cfg.moe.n_experts
            if name.endswith("router"):
                state[name] = tensors[f"{pre}.gate.weight"]
            elif name.endswith("w_in"):
                state[name] = torch.stack([torch.cat((tensors[f"{pre}.experts.{e}.w1.weight"].t(),
                                                      tensors[f"{pre}.experts.{e}.w3.weight"].t()), dim=-1)
                                           for e in range(E)])
            else:
                state[name] = torch.stack([tensors[f"{pre}.experts.{e}.w2.weight"].t() for e in range(E)])
        else:
            state[name] = tensors[_hf_name(name)]
    return state


def _meta_model(cfg: ModelConfig):
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


def _param_names(cfg: ModelConfig) -> list[str]:
    return [n for n, _ in _meta_model(cfg).named_parameters()]


def hf_names(cfg: ModelConfig) -> set[str]:
    """The exact set of HF tensor names a checkpoint of `cfg` has."""
    return set(to_hf_tensors(dict(_meta_model(cfg).named_parameters())))


def _check_keys(expected: set[str], got: set[str], where: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensor names do not match the config: "
                              f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def export_hf(model, out_dir: str | Path, family: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (an lmforge Transformer) as a HF checkpoint directory; returns its path."""
    from safetensors.torch import save_file

    cfg = model.cfg
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    hf_cfg = to_hf_config(cfg, family, dtype)  # first: says why a model cannot map
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone()
               for k, v in to_hf_tensors(params).items()}
    _check_keys(hf_names(cfg), set(tensors), "lmforge model")
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        files = sorted(set(read_json(index, "safetensors index")["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(path / f)))
        return tensors
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are read; pickled .bin files are not)")


# Buffers some older exports stored; they are recomputed from the config, not weights.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def import_hf(path: str | Path, dtype: torch.dtype = torch.float32, attention_backend: str | None = None):
    """Load a HF Llama/Qwen2/Qwen3/Mistral checkpoint directory as an lmforge Transformer."""
    path = Path(path)
    cfg = from_hf_config(read_json(path / "config.json", "HF config"), str(path / "config.json"))
    if attention_backend:
        cfg.attention_backend = attention_backend
    tensors = {k: v for k, v in _read_tensors(path).items() if not k.endswith(_DERIVED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        # some tied checkpoints also store the head; accept it only if it is the embedding
        if not torch.equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            raise CheckpointError(f"{path}: tie_word_embeddings = true but lm_head.weight differs "
                                  "from model.embed_tokens.weight")
        del tensors["lm_head.weight"]
    _check_keys(hf_names(cfg), set(tensors), str(path))
    try:
        state = {k: v.to(dtype) for k, v in from_hf_tensors(tensors, cfg).items()}
    except RuntimeError as e:  # experts of different shapes
        raise CheckpointError(f"{path}: tensors do not fit config.json: {e}") from None
    model = _meta_model(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches between config.json and the tensors
        raise CheckpointError(f"{path}: tensors do not fit config.json: {e}") from None
    buffers = {n for n, _ in model.named_buffers()}
    assert not unexpected and set(missing) <= buffers, (missing, unexpected)
    for m in model.modules():  # MoE routing bias / load counters: zero (Mixtral has no bias)
        for name, buf in m._buffers.items():
            if buf is not None and buf.is_meta:
                m._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
    return model
