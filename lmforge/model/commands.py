"""`lmforge model info|presets`: print a model's shape, parameter counts, FLOPs and training memory."""

from __future__ import annotations

from lmforge.cli_support import add_stage


def register(sub) -> None:
    verbs = add_stage(sub, "model", "model architectures: inspect presets, parameter/FLOP/memory accounting")

    p = verbs.add_parser("info", help="parameters, FLOPs per token and training memory of a model config")
    p.add_argument("--preset", default="tiny", help="preset name or path to a TOML file of ModelConfig fields")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. n_layers=24 moe.top_k=1")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, for the memory estimate")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: context_length)")
    p.add_argument("--checkpointing", action="store_true", help="estimate with activation checkpointing")
    p.set_defaults(func=cmd_info)

    p = verbs.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n:,.0f} ({n / size:.2f}{unit})"
    return f"{n:,.0f}"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def format_info(cfg, batch_size: int, seq_len: int, checkpointing: bool = False) -> str:
    from lmforge.model.accounting import count_params, flops_per_token, memory_estimate

    params = count_params(cfg)
    flops = flops_per_token(cfg, seq_len)
    mem = memory_estimate(cfg, batch_size, seq_len, activation_checkpointing=checkpointing)
    kinds = sorted({cfg.layer_kind(i) for i in range(cfg.n_layers)})
    ff = "dense" if cfg.moe is None else (
        f"MoE {cfg.moe.n_experts} experts top-{cfg.moe.top_k}"
        f"{f' + {cfg.moe.n_shared_experts} shared' if cfg.moe.n_shared_experts else ''}"
        f"{f' (first {cfg.n_dense_layers} dense)' if cfg.n_dense_layers else ''}")
    attn = "MLA" if cfg.mla is not None else (
        "MHA" if cfg.n_kv_heads == cfg.n_heads else "MQA" if cfg.n_kv_heads == 1 else "GQA")
    heads = (f"{cfg.n_kv_heads} kv, head_dim {cfg.head_dim}" if cfg.mla is None else
             f"latent {cfg.mla.kv_lora_rank}, qk {cfg.mla.qk_head_dim}, v {cfg.mla.v_head_dim}")
    rows = [
        ("shape", f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads ({heads}), "
                  f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, context {cfg.context_length}"),
        ("architecture", f"{attn}, {cfg.norm} {cfg.norm_placement}-norm"
                         f"{', parallel' if cfg.parallel_block else ''}, {cfg.activation}"
                         f"{' GLU' if cfg.glu else ''}, positions {cfg.positions}, layers {'/'.join(kinds)}"
                         f"{f' window {cfg.window}' if cfg.window else ''}, {ff}"
                         f"{', tied head' if cfg.tie_embeddings else ''}"
                         f"{f', MTP depth {cfg.mtp_depth}' if cfg.mtp_depth else ''}"),
        ("parameters", _fmt_count(params["total"])),
        ("  embedding", _fmt_count(params["embedding"])),
        ("  non-embedding", _fmt_count(params["non_embedding"])),
    ]
    if params["mtp"]:
        rows.append(("  of which MTP", _fmt_count(params["mtp"])))
    if params["active"] != params["total"]:
        rows.append(("  active per token", _fmt_count(params["active"])))
    rows += [
        (f"FLOPs/token @ {seq_len}", f"forward {flops['forward'] / 1e9:,.3f} G, training (3x) "
                                     f"{flops['total'] / 1e9:,.3f} G, attention {flops['attention_fraction']:.1%}"),
        (f"training memory (batch {batch_size} x {seq_len})", ""),
        ("  weights fp32", _fmt_bytes(mem["weights"])),
        ("  grads fp32", _fmt_bytes(mem["grads"])),
        ("  AdamW state", _fmt_bytes(mem["optimizer"])),
        (f"  activations bf16{' (checkpointed)' if checkpointing else ''}", _fmt_bytes(mem["activations"])),
        ("  total (estimate)", _fmt_bytes(mem["total"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_info(args) -> int:
    from lmforge.model.presets import get_preset

    cfg = get_preset(args.preset, args.overrides)
    print(format_info(cfg, args.batch_size, args.seq_len or cfg.context_length, args.checkpointing))
    return 0


def cmd_presets(args) -> int:
    from lmforge.model.accounting import count_params
    from lmforge.model.presets import get_preset, preset_names

    for name in preset_names():
        print(f"{name:<20} {_fmt_count(count_params(get_preset(name))['total'])}")
    return 0
