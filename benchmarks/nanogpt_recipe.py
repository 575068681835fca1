"""The nanoGPT GPT-2 training recipe, written out as the baseline for benchmarks/train_gpt2.py.

karpathy/nanoGPT's model.py/train.py reduced to what a training step does: its GPT module (one c_attn
GEMM for q, k, v; SDPA causal attention; tanh GELU; tied head), fused torch AdamW with decay on
matrices only, random windows from a memmap copied pinned and non-blocking, warmup + cosine LR, and
loss.item() once per step. `NanoAttention.cudnn_first` (off by default, as published) asks SDPA for
cuDNN attention first, for a like-for-like row when lmforge uses it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class NanoAttention(nn.Module):
    cudnn_first = False

    def __init__(self, d, h):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.h = h

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        if self.cudnn_first:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = NanoAttention(d, h)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, vocab, ctx, d, n_layers, h):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(NanoBlock(d, h) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def nano_optimizer(model, lr, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def nano_get_batch(data, B, T, device, rng):
    ix = rng.integers(0, len(data) - T - 1, size=B)
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def nano_lr(step, max_steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    ratio = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * 0.1 + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - lr * 0.1)



class NanoRunner:
    """One nanoGPT optimizer step per call (B x T x accum tokens)."""

    def __init__(self, shape, data, B, T, accum, device, compile, lr=6e-4, max_steps=1000, warmup=0, seed=0,
                 module=None):
        torch.manual_seed(seed)
        self.raw = (module if module is not None else NanoGPT(**shape)).to(device)
        self.model = torch.compile(self.raw) if compile else self.raw
        self.opt = nano_optimizer(self.raw, lr, device)
        self.data, self.B, self.T, self.accum, self.device = data, B, T, accum, device
        self.rng = np.random.default_rng(seed)
        self.lr, self.max_steps, self.warmup, self.step_i = lr, max_steps, warmup, 0
        self.ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
            "cpu", enabled=False)

    def step(self):
        for g in self.opt.param_groups:
            g["lr"] = nano_lr(self.step_i, self.max_steps, self.lr, self.warmup)
        x, y = nano_get_batch(self.data, self.B, self.T, self.device, self.rng)
        for _ in range(self.accum):
            with self.ctx:
                loss = self.model(x, y) / self.accum
            x, y = nano_get_batch(self.data, self.B, self.T, self.device, self.rng)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_i += 1
        return loss.item() * self.accum

    @torch.no_grad()
    def val_loss(self, batches):
        self.raw.eval()
        tot = n = 0
        for b in batches:
            with self.ctx:
                loss = self.raw(b["input_ids"].to(self.device), b["targets"].to(self.device))
            tot += loss.item() * b["targets"].numel()
            n += b["targets"].numel()
        self.raw.train()
        return tot / n
