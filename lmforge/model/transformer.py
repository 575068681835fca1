"""The decoder-only Transformer: one class covering GPT-2, Llama/Qwen/Mistral, Gemma-2 and
DeepSeek-V3-style models through `ModelConfig` switches.

Architecture choices (each a config field, see config.py):
- token embedding, plus learned or sinusoidal absolute positions, or RoPE inside attention, or none;
- blocks: pre-norm (default), post-norm (original Transformer) or sandwich (Gemma 2), serial or
  parallel (attention ‖ MLP, GPT-J/PaLM); RMSNorm or LayerNorm;
- attention: MHA/GQA/MQA, per-layer local (sliding window) / global and RoPE / NoPE pattern,
  QK-norm, logit soft-capping; or multi-head latent attention (mla.py);
- feed-forward: dense MLP (plain or GLU) or mixture of experts (moe.py), first n layers dense;
- output head tied to the embedding or not, final logit soft-capping, z-loss;
- multi-token prediction (DeepSeek-V3): depth-k modules, each norm(h) ‖ norm(emb(t_{i+k})) ->
  linear -> block -> the shared output head, predicting token i+k+1.

`Transformer.__init__` only builds shapes (it works on the meta device); `init_weights()` does and
documents all initialisation. This module knows nothing of optimizers, parallelism or checkpoint
files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.attention import Attention
from lmforge.model.cache import KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.layers import (
    MLP,
    Embedding,
    LayerNorm,
    Linear,
    RMSNorm,
    cross_entropy,
    dropout,
    make_norm,
    softcap,
    trunc_normal_,
    upcast,
)
from lmforge.model.positions import rope_cos_sin, sinusoidal_embedding


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]
    loss: torch.Tensor | None = None  # mean CE over targets != -100 + sum(aux)
    ce_sum: torch.Tensor | None = None  # sum of per-token CE (float32)
    n_tokens: torch.Tensor | None = None  # number of targets != -100
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted terms included in loss
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics


def _attention(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.mla is None:
        return Attention(cfg, layer)
    from lmforge.model.mla import MultiHeadLatentAttention

    return MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.mla,
                                    cfg.rope_theta if cfg.layer_uses_rope(layer) else None,
                                    cfg.attention_backend, window=cfg.layer_window(layer),
                                    norm_eps=cfg.norm_eps, dropout=cfg.dropout, init_std=cfg.init_std)


def _feed_forward(cfg: ModelConfig, layer: int) -> nn.Module:
    if not cfg.layer_is_moe(layer):
        return MLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.glu, cfg.bias)
    from lmforge.model.moe import MoE

    return MoE(cfg.d_model, cfg.moe, cfg.activation, cfg.glu, init_std=cfg.init_std)


class Block(nn.Module):
    """One layer: attention and feed-forward, each on a residual branch, normed per cfg.norm_placement.

    forward(x [B, T, d], positions [B, T], doc_ids, cache, rope) -> (x, aux losses, metrics); the last
    two are empty dicts unless the feed-forward is a mixture of experts.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = lambda: make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.placement, self.parallel, self.p_drop = cfg.norm_placement, cfg.parallel_block, cfg.dropout
        self.norm1 = norm()
        self.attn = _attention(cfg, layer)
        self.norm2 = None if self.parallel else norm()
        self.mlp = _feed_forward(cfg, layer)
        sandwich = cfg.norm_placement == "sandwich"
        self.post_attn_norm = norm() if sandwich else nn.Identity()
        self.post_mlp_norm = norm() if sandwich else nn.Identity()

    def ffn(self, x):
        out = self.mlp(x)
        y, aux, metrics = out if isinstance(out, tuple) else (out, {}, {})
        return dropout(y, self.p_drop, self.training), aux, metrics

    def forward(self, x, positions, doc_ids=None, cache=None, rope=None):
        # rope: the model's per-forward (cos, sin) for standard attention layers (None: they compute it)
        attn = (lambda h: self.attn(h, positions, doc_ids, cache)) if rope is None else (
            lambda h: self.attn(h, positions, doc_ids, cache, rope))
        if self.parallel:  # both branches read the same input (normed first unless post-norm)
            h = x if self.placement == "post" else self.norm1(x)
            y, aux, metrics = self.ffn(h)
            x = x + attn(h) + y
            return (self.norm1(x) if self.placement == "post" else x), aux, metrics
        if self.placement == "post":
            x = self.norm1(x + attn(x))
            y, aux, metrics = self.ffn(x)
            return self.norm2(x + y), aux, metrics
        x = x + self.post_attn_norm(attn(self.norm1(x)))
        y, aux, metrics = self.ffn(self.norm2(x))
        return x + self.post_mlp_norm(y), aux, metrics


class MTPModule(nn.Module):
    """DeepSeek-V3 multi-token prediction module of depth k: h' = Block(W [norm(h); norm(emb(t_{i+k}))])."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        norm = lambda: make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.norm_h, self.norm_emb, self.norm_out = norm(), norm(), norm()
        self.proj = Linear(2 * cfg.d_model, cfg.d_model)
        self.block = Block(cfg, cfg.n_layers + depth - 1)

    def forward(self, h, emb, positions, doc_ids=None):
        x = self.proj(torch.cat((self.norm_h(h), self.norm_emb(emb)), dim=-1))
        return self.block(x, positions, doc_ids)


class Transformer(nn.Module):
    """forward(input_ids [B, T], targets [B, T] | None, *, positions, doc_ids, kv_cache) -> ModelOutput."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = Embedding(cfg.context_length, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # a post-norm block already ends in a norm
        self.norm_f = (nn.Identity() if cfg.norm_placement == "post"
                       else make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias))
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size)
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.mtp_depth + 1))
        if cfg.fused_ops:  # the same functions through lmforge.kernels (see RMSNorm / MLP)
            for m in self.modules():
                if isinstance(m, RMSNorm | MLP):
                    m.fused = "auto"
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation, in one place (call after `to_empty` when built on the meta device).

        - Linear and Embedding weights: normal(0, init_std²) truncated at ±3σ (GPT-2 uses 0.02).
        - Output projections of residual branches (`attn.o`, MLA's `attn.o_proj`, `mlp.down`, and
          the MoE's stacked output weights `w_out`, `shared_out`): σ / sqrt(2·n_layers) (GPT-2),
          because each layer adds two branches to the residual stream and its variance would
          otherwise grow with depth.
        - Biases 0; norm weights 1.
        - A module that holds parameters or buffers directly (the MoE's stacked expert weights,
          router and routing bias) gets its own `reset_parameters(std)` (which also zeroes its
          buffers), then its weights named `*out*` or `*down*` are redrawn with the residual σ.
        - A tied output head is the embedding, so it gets the embedding's init.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, Linear):
                residual = name.endswith(("attn.o", "attn.o_proj", "mlp.down"))
                m.reset_parameters(out_std if residual else std)
            elif isinstance(m, Embedding):
                m.reset_parameters(std)
            elif isinstance(m, RMSNorm | LayerNorm):
                m.reset_parameters()
            elif m is not self and (any(True for _ in m.parameters(recurse=False))
                                    or any(True for _ in m.buffers(recurse=False))):
                m.reset_parameters(std)
                for pname, p in m.named_parameters(recurse=False):
                    if "out" in pname or "down" in pname:
                        trunc_normal_(p, out_std)

    # -- pieces of forward ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Token (+ position) embeddings. `start` says every row holds positions start..start+T-1
        (forward's default): a learned table is then read as one slice broadcast over the batch,
        whose gradient is a sum over the batch instead of a scatter-add of B·T rows."""
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None and start is not None:
            x = x + self.pos_emb.weight[start:start + input_ids.shape[1]]
        elif self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif self.cfg.positions == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.cfg.d_model).to(x.dtype)
        return dropout(x, self.cfg.dropout, self.training)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Normed hidden states [.., d] -> logits [.., V] (tied or own weight, final soft-cap).
        An untied head is called as a module, so inference can swap in a quantized linear."""
        logits = x @ self.tok_emb.weight.t() if self.lm_head is None else self.lm_head(x)
        return softcap(logits, self.cfg.final_softcap)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE feed-forward modules (for the trainer's routing-bias updates and load logging)."""
        blocks = list(self.blocks) + [m.block for m in self.mtp]
        return [b.mlp for b in blocks if not isinstance(b.mlp, MLP)]

    def rope_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary (cos, sin) of `positions` that every standard attention layer applies, computed
        once per forward instead of twice per layer (the compiler does not reliably share them
        across layers); float64 for float64 activations, as apply_rope does. None without RoPE
        layers, or with MLA (its rope dimension is its own)."""
        cfg = self.cfg
        if cfg.mla is not None or not any(cfg.layer_uses_rope(i) for i in range(cfg.n_layers)):
            return None
        return rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta,
                            torch.float64 if dtype == torch.float64 else torch.float32, cfg.rope_scaling)

    def _positions(self, input_ids, positions, kv_cache):
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            last = start + T - 1
        elif positions.shape != input_ids.shape:
            raise ConfigError(f"positions has shape {tuple(positions.shape)}, expected {(B, T)}")
        else:
            last = int(positions.max()) if self.pos_emb is not None else -1  # sync only when needed
        if self.pos_emb is not None and last >= self.cfg.context_length:
            raise ConfigError(f"position {last} is beyond the learned position table "
                              f"(context_length = {self.cfg.context_length})")
        return positions

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> ModelOutput:
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        if kv_cache is not None and doc_ids is not None:
            raise ConfigError("doc_ids with kv_cache is not supported: decode one document per row")
        start = None if positions is not None else (kv_cache.length if kv_cache is not None else 0)
        positions = self._positions(input_ids, positions, kv_cache)
        x = self.embed(input_ids, positions, start)
        rope = self.rope_cos_sin(positions, x.dtype)
        aux: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x, block_aux, block_metrics = block(x, positions, doc_ids,
                                                kv_cache.layer(i) if kv_cache is not None else None, rope)
            for k, v in block_aux.items():
                aux[k] = aux[k] + v if k in aux else v
            metrics.update({f"{k}/{i}": v for k, v in block_metrics.items()})
        if targets is None:
            return ModelOutput(logits=self.head(self.norm_f(x)), aux=aux, metrics=metrics)
        if targets.shape != input_ids.shape:
            raise ConfigError(f"targets has shape {tuple(targets.shape)}, expected {tuple(input_ids.shape)}")
        logits, ce_sum, n_tokens, z_sum = self.loss_terms(self.norm_f(x), targets)
        denom = n_tokens.clamp_min(1)
        if self.cfg.z_loss > 0:
            aux["z_loss"] = self.cfg.z_loss * z_sum / denom
        if len(self.mtp):
            aux["mtp"] = self._mtp_loss(x, targets, positions, doc_ids, aux, metrics)
        loss = ce_sum / denom + sum(aux.values())
        return ModelOutput(logits=logits, loss=loss, ce_sum=ce_sum, n_tokens=n_tokens, aux=aux,
                           metrics=metrics)

    def loss_terms(self, h: torch.Tensor, targets: torch.Tensor, z_loss: float | None = None):
        """Normed hidden states [B, T, d] and targets -> (logits | None, ce_sum, n_tokens, z_sum).

        z_sum is the sum of logsumexp² over valid targets (None unless z_loss > 0). With
        `fused_loss` the kernels' chunked linear + cross-entropy never materialises the logits
        (returned as None); it computes the CE and z-loss gradients in one pass, so the z-loss
        gradient flows through `ce_sum` and `z_sum` is a detached value: `ce_sum + z_loss·z_sum`
        is exact in value and gradient, which is how the loss uses them. `z_loss` defaults to the
        config's coefficient (MTP heads pass 0).
        """
        z_loss = self.cfg.z_loss if z_loss is None else z_loss
        if not self.cfg.fused_loss:
            logits = self.head(h)
            ce_sum = cross_entropy(logits, targets).sum()
            z_sum = None
            if z_loss > 0:
                lse = torch.logsumexp(upcast(logits), dim=-1)
                z_sum = (lse.square() * (targets != -100)).sum()
            return logits, ce_sum, (targets != -100).sum(), z_sum
        from lmforge.kernels.linear_cross_entropy import linear_cross_entropy

        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):  # the head matmul in the autocast dtype
            dtype = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dtype), w.to(dtype)
        elif h.dtype != w.dtype:
            h = h.to(w.dtype)
        r = linear_cross_entropy(h, w, targets, softcap=self.cfg.final_softcap, z_loss=z_loss)
        ce_sum = r.loss_sum - z_loss * r.z_sum if z_loss > 0 else r.loss_sum
        return None, ce_sum, r.n_tokens, (r.z_sum if z_loss > 0 else None)

    def _mtp_loss(self, h, targets, positions, doc_ids, aux, metrics) -> torch.Tensor:
        """mtp_loss_weight · mean over depths k of the mean CE of predicting t_{i+k+1} at position i.

        targets[:, i] is t_{i+1}, so depth k embeds t_{i+k} = targets[:, i+k-1] and predicts
        targets[:, i+k], for the T-k positions where both exist. An ignored target (-100) used as an
        input token is embedded as token 0 (its own prediction is ignored anyway).
        """
        T = targets.shape[1]
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            L = T - k
            if L <= 0:
                break
            emb = self.tok_emb(targets[:, k - 1:T - 1].clamp_min(0))
            d = doc_ids[:, :L] if doc_ids is not None else None
            h, block_aux, block_metrics = module(h[:, :L], emb, positions[:, :L], d)
            for key, v in block_aux.items():
                aux[key] = aux[key] + v if key in aux else v
            metrics.update({f"{key}/mtp{k}": v for key, v in block_metrics.items()})
            _, ce_sum, n, _ = self.loss_terms(module.norm_out(h), targets[:, k:T], z_loss=0.0)
            losses.append(ce_sum / n.clamp_min(1))
            metrics[f"mtp_ce/{k}"] = losses[-1].detach()
        if not losses:
            return h.new_zeros(())
        return self.cfg.mtp_loss_weight * torch.stack(losses).mean()


def pack_projections(model: nn.Module) -> int:
    """Store each attention layer's q/k/v and each gated MLP's gate/up as one buffer, so one GEMM
    computes them (layers.PackedLinears); returns the number of layers packed.

    The parameters stay the same objects with the same names, shapes and values (their data become
    views of the buffers), so state dicts, checkpoints, optimizers and anyone else holding the
    model (a trainer sharing it with the inference engine) keep working; in-place updates reach
    the buffers. Layers whose Linears were swapped (quantized, tensor-parallel, adapters) are left
    as they are. Call it after moving the model to its device and dtype (`.to()` allocates every
    parameter anew and so ends the packing: the layers then fall back to separate GEMMs, logged).
    """
    from lmforge.model.attention import Attention

    return sum(m.pack() for m in model.modules() if isinstance(m, Attention | MLP))
