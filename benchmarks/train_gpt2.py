"""GPT-2 small pretraining on one GPU: lmforge's Trainer vs the nanoGPT recipe, in one run.

Throughput: tokens/s and MFU of one optimizer step (micro-batch 12 x 1024 tokens, 5 accumulation
steps, bf16 autocast, torch.compile) for the variants in --variants (comma-separated):
  - nano: the nanoGPT recipe (benchmarks/nanogpt_recipe.py: its GPT module, SDPA causal attention
    with torch's default backend order, fused torch AdamW, memmap random windows with pinned
    non-blocking copies, loss.item() per step); always the first row, the 1.000x of the ratios;
  - lmforge: lmforge.model.Transformer (gpt2-small preset) + Trainer (compile, own AdamW, random-window
    sampler + prefetcher; loss and grad norm read at log points, train.check_every = 0), as a user
    gets it;
  - lmforge-sync: lmforge reading the loss every step before the update (train.check_every = 1);
  - lmforge-cudagraphs, big-cudagraphs: lmforge (at micro-batch --batch / --big-batch) with
    train.compile_mode = "reduce-overhead" (each micro-step's forward and backward replayed as CUDA
    graphs);
  - nano-cudnn: the recipe with SDPA asked for cuDNN attention first (torch 2.11 already picks it
    on Hopper: this row checks that);
  - lmforge-cpp-wrapper: lmforge with train.compile_cpp_wrapper (kernels launched from C++);
  - nano-big, big-cpp-wrapper: the recipe, and lmforge with cpp_wrapper, at micro-batch --big-batch;
  any variant as KEY:B runs at micro-batch B (accumulation --batch * --accum / B), e.g. big:60;
  - lmforge-before: ablation, the model and optimizer code as before the speed work (x @ W.t() + b,
    written-out layer norm, gathered positions, 3 q/k/v GEMMs, multi-tensor AdamW);
  - lmforge-3-qkv: ablation, only the one-GEMM q/k/v projection undone;
Variants that differ from another only in how it is compiled must reproduce its losses step for step
(same init, same data): the table prints the largest difference.
  - lmforge-fused-loss: lmforge with `fused_loss` (lmforge.kernels' chunked linear + cross-entropy);
  - big: lmforge at micro-batch --big-batch (same tokens per step);
  --diagnose adds each model in the other's loop (which half costs what).
Both use vocab 50304 (GPT-2's 50257 padded to a multiple of 64, as nanoGPT does) and the same data.
Before timing, lmforge's model loaded with the recipe's weights must give the recipe's loss and
gradients (fp32): the rows compare two implementations of one function. Graph breaks are counted.

--profile: after timing, a few steps of each variant under torch.profiler; prints device time per
step by kernel group (gemm / attention / fused elementwise (triton) / optimizer / other) side by
side, and each variant's top kernels.

Quality per token (--quality): validation loss after the same number of tokens on the embedded corpus
(tokenized with the tokenizer in --tokenizer) for the nanoGPT recipe (AdamW 6e-4, cosine), lmforge
with that same AdamW recipe, and lmforge with Muon; plus how many tokens each needed to reach the
recipe's final loss.

Timing: --warmup steps, then --iters steps back to back, as in a training loop (no sync between
steps beyond the step's own: the recipe reads its loss every step, lmforge at log points, here once
after the last step); device events mark each step's start; the rows report the median step.
"loader ms": host time per optimizer step the training thread spends getting its batches.

Writes JSON to --out and prints a table. `--smoke` runs tiny shapes on CPU to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from nanogpt_recipe import NanoAttention, NanoGPT, NanoRunner  # benchmarks/ is on sys.path


class LMForgeAsNano(nn.Module):
    """lmforge's Transformer behind nanoGPT's forward(idx, targets) -> mean loss (diagnostic variant)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model(idx, targets).loss


class NanoAsLMForge(nn.Module):
    """nanoGPT's module behind lmforge's output interface (ce_sum, n_tokens), for lm_loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        from types import SimpleNamespace

        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.model.wte(idx) + self.model.wpe(pos)
        for block in self.model.h:
            x = block(x)
        logits = self.model.lm_head(self.model.ln_f(x))
        ce_sum = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), reduction="sum")
        return SimpleNamespace(ce_sum=ce_sum, n_tokens=(targets != -100).sum(), aux={})


# ------------------------------------------------------------------------- lmforge


def lmforge_trainer(model_cfg, shard, B, T, accum, device, compile, optimizer="adamw", lr=6e-4, muon_lr=0.02,
                    max_steps=1000, warmup=0, seed=0, module=None, cpp_wrapper=False, compile_mode="default",
                    check_every=0):
    from lmforge.data.loader import Prefetcher, RandomWindowSampler, TokenStream
    from lmforge.model import Transformer
    from lmforge.train.config import TrainConfig
    from lmforge.train.optim import build_optimizer
    from lmforge.train.trainer import Trainer, lm_loss

    cfg = TrainConfig(seed=seed, batch_size=B, grad_accum=accum, seq_len=T, max_steps=max_steps,
                      sampler="random", document_mask=False, optimizer=optimizer, lr=lr, muon_lr=muon_lr,
                      warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1, compile=compile,
                      compile_cpp_wrapper=cpp_wrapper, compile_mode=compile_mode, check_every=check_every,
                      eval_every=0, checkpoint_every=0, progress=False, log_every=10**9,
                      device=device.type)
    torch.manual_seed(seed)
    model = (module if module is not None else Transformer(model_cfg)).to(device)
    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=muon_lr,
                          vocab_size=model_cfg.vocab_size)
    batches = RandomWindowSampler(TokenStream(shard), B, T, seed=seed)
    if device.type == "cuda":
        batches = Prefetcher(batches, device)
    return Trainer(model, opt, batches, lm_loss, cfg, model_config=model_cfg)


@torch.no_grad()
def lmforge_val_loss(trainer, batches, device):
    from lmforge.train.trainer import autocast_context

    model = trainer.model
    model.eval()
    ce = n = 0.0
    for b in batches:
        with autocast_context(device, "auto"):
            out = model(b["input_ids"].to(device), b["targets"].to(device))
        ce += out.ce_sum.item()
        n += out.n_tokens.item()
    model.train()
    return ce / n


# ------------------------------------------------------------------------- measurements


def write_random_shard(path, n_tokens, vocab, seed=0):
    from lmforge.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(path, vocab_size=vocab, tokenizer_hash="random", bos_id=0) as w:
        w.write(rng.integers(0, vocab, size=n_tokens))
    return path


def nano_to_lmforge(nano, model):
    """Copy a NanoGPT's weights into an lmforge Transformer of the same shape (c_attn -> q, k, v)."""
    src = nano.state_dict()
    dst = {"tok_emb.weight": src["wte.weight"], "pos_emb.weight": src["wpe.weight"],
           "norm_f.weight": src["ln_f.weight"], "norm_f.bias": src["ln_f.bias"]}
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "attn.o", "c_fc": "mlp.up", "c_proj": "mlp.down"}
    for i in range(len(nano.h)):
        for a, b in names.items():
            for t in ("weight", "bias"):
                dst[f"blocks.{i}.{b}.{t}"] = src[f"h.{i}.{a}.{t}"]
        for t in ("weight", "bias"):
            for name, part in zip("qkv", src[f"h.{i}.attn.c_attn.{t}"].chunk(3)):
                dst[f"blocks.{i}.attn.{name}.{t}"] = part
    model.load_state_dict(dst, strict=True)


def check_same_function(mcfg, shape, device, T):
    """lmforge's model with nanoGPT's weights computes nanoGPT's loss and gradients (fp32, eager):
    the speed comparison is between two implementations of one function."""
    from lmforge.model import Transformer

    torch.manual_seed(0)
    nano = NanoGPT(**shape).to(device)
    ours = Transformer(mcfg).to(device)
    nano_to_lmforge(nano, ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, mcfg.vocab_size, (2, T + 1), generator=g).to(device)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = nano(idx, targets)
        ref.backward()
        got = ours(idx, targets).loss
        got.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    attn0 = ours.blocks[0].attn
    pairs = {"wte": (nano.wte.weight.grad, ours.tok_emb.weight.grad),
             "wpe": (nano.wpe.weight.grad, ours.pos_emb.weight.grad),
             "h.0.c_fc": (nano.h[0].c_fc.weight.grad, ours.blocks[0].mlp.up.weight.grad),
             "h.0.c_attn": (nano.h[0].attn.c_attn.weight.grad,
                            torch.cat([attn0.q.weight.grad, attn0.k.weight.grad, attn0.v.weight.grad])),
             "h.0.ln_1": (nano.h[0].ln_1.weight.grad, ours.blocks[0].norm1.weight.grad)}
    rel = {name: ((a - b).norm() / a.norm()).item() for name, (a, b) in pairs.items()}
    out = {"loss_nano": ref.item(), "loss_lmforge": got.item(), "loss_rel_diff": abs(ref.item() - got.item()) / ref.item(),
           "grad_rel_diff": rel}
    ok = out["loss_rel_diff"] < 1e-5 and max(rel.values()) < 1e-4
    print(f"  same function: loss {out['loss_nano']:.6f} vs {out['loss_lmforge']:.6f}, max grad rel diff "
          f"{max(rel.values()):.1e} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    out["ok"] = ok
    return out


KERNEL_GROUPS = [  # (group, name fragments); first match wins (cuDNN attention names contain 'wgmma')
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma", "sm90_", "aten::mm", "aten::addmm")),
    ("optimizer/clip", ("adam", "multi_tensor", "foreach")),
    ("fused elementwise (triton)", ("triton",)),
    ("copies/memset", ("memcpy", "memset")),
]


def kernel_group(name):
    low = name.lower()
    for group, frags in KERNEL_GROUPS:
        if any(f in low for f in frags):
            return group
    return "other"


def profile_steps(step_fn, steps, device):
    """Over `steps` profiled steps: kernel (device) time per step by group, kernel launches per step,
    the top kernels, and the host time spent inside compiled-graph calls (on CPU: operator time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step_fn()
        if cuda:
            torch.cuda.synchronize()
    per_kernel, launches, host_ms, host_calls = {}, 0, 0.0, 0
    for e in prof.key_averages():
        if e.key.startswith("## Call CompiledFxGraph"):
            host_ms += e.cpu_time_total / 1e3 / steps
            host_calls += e.count
        # CPU-side rows and GPU-side annotation ranges ("Optimizer.step#AdamW.step") would count
        # kernels twice
        if cuda and (e.device_type != DeviceType.CUDA or e.key.startswith(("Optimizer.", "## ", "ProfilerStep"))):
            continue
        t = (getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if t > 0:
            per_kernel[e.key] = per_kernel.get(e.key, 0.0) + t / 1e3 / steps  # ms per step
            launches += e.count
    groups = {}
    for k, t in per_kernel.items():
        groups[kernel_group(k)] = groups.get(kernel_group(k), 0.0) + t
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:40]
    return {"ms_per_step": groups, "total_ms": sum(per_kernel.values()), "launches_per_step": launches / steps,
            "compiled_graph_host_ms_per_step": host_ms, "compiled_graph_calls_per_step": host_calls / steps,
            "top": [{"kernel": k, "ms": t, "group": kernel_group(k)} for k, t in top]}


def find_syncs(step_fn, device):
    """Where one step waits for the GPU: torch's sync debug mode warns at each synchronizing call."""
    if device.type != "cuda":
        return {}
    import warnings

    found = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            found[where] = found.get(where, 0) + 1
    return found


def print_profiles(profiles, rows):
    names = list(profiles)
    step_ms = {r["variant"]: r["step_s"] * 1e3 for r in rows if "step_s" in r}
    groups = [g for g, _ in KERNEL_GROUPS] + ["other"]
    print("\nper optimizer step: kernel time by group (ms, share of kernel time), GPU idle, launches, host")
    print(f"{'':<28}" + "".join(f"{n[:26]:>28}" for n in names))
    for g in groups + ["kernel total"]:
        cells = []
        for n in names:
            p = profiles[n]
            t = p["total_ms"] if g == "kernel total" else p["ms_per_step"].get(g, 0.0)
            cells.append(f"{t:>18.2f} ({t / max(p['total_ms'], 1e-9):6.1%})")
        print(f"{g:<28}" + "".join(f"{c:>28}" for c in cells))
    extra = {"step wall (timed)": lambda n, p: f"{step_ms.get(n, float('nan')):.2f}",
             "GPU idle": lambda n, p: f"{step_ms.get(n, float('nan')) - p['total_ms']:.2f}",
             "kernel launches": lambda n, p: f"{p['launches_per_step']:.0f}",
             "host ms in compiled graphs": lambda n, p: (f"{p['compiled_graph_host_ms_per_step']:.1f} "
                                                         f"({p['compiled_graph_calls_per_step']:.0f} calls)"),
             "syncs per step": lambda n, p: " ".join(f"{k}x{v}" for k, v in p.get("syncs", {}).items()) or "-"}
    for label, fn in extra.items():
        print(f"{label:<28}" + "".join(f"{fn(n, profiles[n])[:27]:>28}" for n in names))
    for n in names:
        print(f"top kernels, {n}:")
        for r in profiles[n]["top"][:8]:
            print(f"  {r['ms']:8.2f} ms  {r['group'][:10]:<10}  {r['kernel'][:100]}")


def graph_stats():
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "unique_graphs": int(counters["stats"]["unique_graphs"])}


VARIANTS = {  # key -> (row label, loop, model)
    "nano": ("nanogpt recipe", "nano", "nano"),
    "lmforge": ("lmforge", "lmforge", "lmforge"),
    "nano-cudnn": ("nanogpt recipe + cuDNN attn", "nano", "nano"),
    "lmforge-fused-loss": ("lmforge + fused linear-CE", "lmforge", "lmforge"),
    "lmforge-cpp-wrapper": ("lmforge, inductor cpp_wrapper", "lmforge", "lmforge"),
    "lmforge-cudagraphs": ("lmforge, CUDA graphs", "lmforge", "lmforge"),
    "lmforge-sync": ("lmforge, loss read every step", "lmforge", "lmforge"),
    "lmforge-before": ("lmforge, previous model code", "lmforge", "lmforge"),
    "lmforge-3-qkv": ("lmforge, 3 q/k/v GEMMs", "lmforge", "lmforge"),
    "big": ("lmforge big micro-batch", "lmforge", "lmforge"),
    "nano-big": ("nanogpt recipe big micro-batch", "nano", "nano"),
    "big-cpp-wrapper": ("lmforge big micro-batch, cpp_wrapper", "lmforge", "lmforge"),
    "big-cudagraphs": ("lmforge big micro-batch, CUDA graphs", "lmforge", "lmforge"),
    "lmforge-model-nano-loop": ("lmforge model, nano loop", "nano", "lmforge"),
    "nano-model-lmforge-loop": ("nano model, lmforge loop", "lmforge", "nano"),
}
SAME_RUN_AS = {  # variants that must reproduce another variant's losses step for step (same init, data)
    "nano-cudnn": "nano", "lmforge-cpp-wrapper": "lmforge", "lmforge-fused-loss": "lmforge",
    "lmforge-before": "lmforge", "lmforge-3-qkv": "lmforge", "big-cpp-wrapper": "big",
    "lmforge-cudagraphs": "lmforge", "lmforge-sync": "lmforge", "big-cudagraphs": "big",
}
BIG = ("big", "nano-big", "big-cpp-wrapper", "big-cudagraphs")


def previous_code(key):
    """Ablations: this session's model and optimizer changes undone, patched in for one variant."""
    from unittest import mock

    from lmforge.model.attention import Attention
    from lmforge.model.layers import LayerNorm, Linear, upcast
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import AdamW, _adamw_group

    def linear(self, x):  # bias added after the matmul: float32 output under autocast
        y = x @ self.weight.t()
        return y + self.bias if self.bias is not None else y

    def layer_norm(self, x):  # written out
        xf = upcast(x)
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        y = ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def foreach_adamw(self, closure=None):
        for group in self.param_groups:
            _adamw_group(group, self.state, True, fused=False)

    embed = Transformer.embed
    stack = contextlib.ExitStack()
    if key in ("lmforge-before", "lmforge-3-qkv"):
        stack.enter_context(mock.patch.object(Attention, "project_qkv",
                                              lambda self, x: (self.q(x), self.k(x), self.v(x))))
    if key == "lmforge-before":
        stack.enter_context(mock.patch.object(Linear, "forward", linear))
        stack.enter_context(mock.patch.object(LayerNorm, "forward", layer_norm))
        stack.enter_context(mock.patch.object(Transformer, "embed",
                                              lambda self, ids, pos, start=None: embed(self, ids, pos)))
        stack.enter_context(mock.patch.object(AdamW, "step", foreach_adamw))
    return stack


class TimedBatches:
    """Host time the training thread spends getting each batch (with the Prefetcher: waiting for
    the background read, then issuing the copy): is the loader on the critical path?"""

    def __init__(self, batches):
        self.batches, self.seconds, self.calls = batches, 0.0, 0

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return batch

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)


def time_steps(step, device, *, iters, warmup, finish=lambda: None, after_warmup=lambda: None):
    """Median and mean ms of `iters` steps run back to back, as in a training loop: no sync between
    steps beyond what the step does itself (the recipe reads its loss each step; lmforge reads at
    log points, here `finish` after the last step). Device events mark each step's start."""
    for _ in range(warmup):
        step()
    finish()
    after_warmup()
    if device.type != "cuda":
        t0 = time.perf_counter()
        marks = []
        for _ in range(iters):
            marks.append(time.perf_counter())
            step()
        finish()
        marks.append(time.perf_counter())
        deltas = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        return statistics.median(deltas), (marks[-1] - t0) * 1e3 / iters
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    for i in range(iters):
        events[i].record()
        step()
    finish()
    events[-1].record()
    torch.cuda.synchronize()
    deltas = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    return statistics.median(deltas), events[0].elapsed_time(events[-1]) / iters


def run_variant(key, args, device, mcfg, shape, data, shard, fpt, peak, rows, profiles):
    """Build, time (and profile) one variant; appends its row to `rows`."""
    from lmforge.model import Transformer

    T = args.seq_len
    base, _, size = key.partition(":")  # "big:60": variant big at micro-batch 60
    name, loop, model_kind = VARIANTS[base]
    B = int(size) if size else args.big_batch if base in BIG else args.batch
    name += f" ({B}x{max(1, args.batch * args.accum // B)})" if size else ""
    accum = max(1, args.batch * args.accum // B)
    NanoAttention.cudnn_first = base == "nano-cudnn"
    cfg = mcfg.replace(fused_loss=True) if base == "lmforge-fused-loss" else mcfg
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loader = None
    if loop == "nano":
        module = LMForgeAsNano(Transformer(cfg)) if model_kind == "lmforge" else None
        runner = NanoRunner(shape, data, B, T, accum, device, compile=args.compile, module=module)
        losses = []

        def step(runner=runner, losses=losses):
            losses.append(runner.step())

        finish = lambda: None  # noqa: E731
    else:
        module = NanoAsLMForge(NanoGPT(**shape)) if model_kind == "nano" else None
        runner = lmforge_trainer(cfg, shard, B, T, accum, device, compile=args.compile, module=module,
                                 cpp_wrapper=base in ("lmforge-cpp-wrapper", "big-cpp-wrapper"),
                                 compile_mode="reduce-overhead" if base.endswith("cudagraphs") else "default",
                                 check_every=1 if base == "lmforge-sync" else 0)
        runner.batches = loader = TimedBatches(runner.batches)
        read = runner.check_every == 1  # else the loss is read at log points (here: finish)

        def step(runner=runner, read=read):
            runner.train_step(read=read)

        finish = runner.read_stats

    t0 = time.perf_counter()
    try:
        reset = (lambda: setattr(loader, "seconds", 0.0) or setattr(loader, "calls", 0)) if loader else (lambda: None)
        step_ms, mean_ms = time_steps(step, device, iters=args.iters, warmup=args.warmup, finish=finish,
                                      after_warmup=reset)
        if loop == "lmforge":
            losses = [r["loss"] for r in runner.history]
            loader_ms = loader.seconds * 1e3 / (loader.calls / accum)  # per optimizer step
        losses = losses[:]  # the warmup and timed steps; profiling steps come after
        if args.profile:
            profiles[name] = profile_steps(step, args.profile_steps, device)
            profiles[name]["syncs"] = find_syncs(step, device)
            finish()
            pr = profiles[name]
            print(f"    profile: kernels {pr['total_ms']:.1f} ms/step ({pr['launches_per_step']:.0f} launches), "
                  f"host in compiled graphs {pr['compiled_graph_host_ms_per_step']:.1f} ms/step, "
                  + ", ".join(f"{g} {t:.1f}" for g, t in sorted(pr["ms_per_step"].items())), flush=True)
    except Exception as e:  # record and go on: one broken variant must not lose the others
        print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        rows.append({"variant": name, "micro_batch": B, "accum": accum, "error": f"{type(e).__name__}: {e}"})
        return
    finally:
        NanoAttention.cudnn_first = False
    sec = step_ms / 1e3
    tps = B * T * accum / sec
    rows.append({"variant": name, "key": key, "micro_batch": B, "accum": accum, "step_s": sec,
                 "mean_step_s": mean_ms / 1e3, "losses": losses,
                 "loader_ms_per_step": loader_ms if loop == "lmforge" else None,
                 "tokens_per_s": tps, "mfu": fpt * tps / peak if peak else None,
                 "wall_s": time.perf_counter() - t0, **graph_stats(),
                 "max_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None})
    print(f"  {name}: {tps:,.0f} tok/s (median step {step_ms:.2f} ms, mean {mean_ms:.2f}; "
          f"{rows[-1]['wall_s']:.0f}s incl. compile, {rows[-1]['graph_breaks']} graph breaks)", flush=True)
    del step, runner


def throughput(args, device, out):

    from lmforge.data.shards import open_shard
    from lmforge.model import flops_per_token, get_preset
    from lmforge.train.metrics import device_name, peak_flops

    T = args.seq_len
    mcfg = get_preset(args.preset).replace(vocab_size=50304)
    if args.smoke:
        mcfg = mcfg.replace(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, context_length=T, head_dim=None,
                            d_ff=256)
    shape = dict(vocab=mcfg.vocab_size, ctx=mcfg.context_length, d=mcfg.d_model, n_layers=mcfg.n_layers,
                 h=mcfg.n_heads)
    check = check_same_function(mcfg, shape, device, T)
    shard = write_random_shard(Path(out["tmp"]) / "random", 4_000_000 if not args.smoke else 200_000,
                               mcfg.vocab_size)
    data, _ = open_shard(shard)
    fpt = flops_per_token(mcfg, T)["total"]
    peak = peak_flops(device)
    rows, profiles = [], {}
    keys = ["nano"] + [k for k in args.variants.split(",") if k and k != "nano"]
    keys += (["big"] if args.big_batch and "big" not in keys else [])
    keys += ["lmforge-model-nano-loop", "nano-model-lmforge-loop"] if args.diagnose else []
    for key in keys:
        if key.partition(":")[0] not in VARIANTS:
            raise SystemExit(f"--variants: unknown {key!r} (known: {', '.join(VARIANTS)})")
        with previous_code(key.partition(":")[0]):
            run_variant(key, args, device, mcfg, shape, data, shard, fpt, peak, rows, profiles)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # partial results survive a timeout
        Path(args.out + ".partial").write_text(json.dumps({"rows": rows, "profiles": profiles}, indent=1))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    recipe = rows[0].get("tokens_per_s")
    by_key = {r.get("key"): r for r in rows}
    for r in rows:
        r["ratio_vs_nanogpt"] = r["tokens_per_s"] / recipe if recipe and "tokens_per_s" in r else None
        base, colon, size = (r.get("key") or "").partition(":")
        ref = by_key.get(SAME_RUN_AS.get(base, "") + colon + size)
        if ref is not None and "losses" in r and "losses" in ref:
            n = min(len(r["losses"]), len(ref["losses"]))
            r["max_loss_diff_vs_" + ref["key"]] = max(abs(a - b) for a, b in zip(r["losses"][:n], ref["losses"][:n]))
    # each implementation at its best micro-batch (among the rows of this call): recipe rows run the
    # recipe's model in its loop, lmforge rows lmforge's model in the Trainer
    best = {}
    for r in rows:
        _, loop, model = VARIANTS[r.get("key", "nano").partition(":")[0]]
        if "tokens_per_s" in r and loop == model:
            if loop not in best or r["tokens_per_s"] > best[loop]["tokens_per_s"]:
                best[loop] = r
    best_ratio = (best["lmforge"]["tokens_per_s"] / best["nano"]["tokens_per_s"]
                  if "lmforge" in best and "nano" in best else None)
    return {"device": device_name(device), "flops_per_token": fpt, "peak_flops": peak, "rows": rows,
            "same_function": check, "profiles": profiles,
            "best": {k: r["variant"] for k, r in best.items()}, "best_ratio": best_ratio}


def quality(args, device, out):
    from lmforge.data.loader import DocumentPacker, TokenStream
    from lmforge.data.sources import Corpus
    from lmforge.model import get_preset
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.shards import encode_corpus_to_shard

    tok = load_tokenizer(args.tokenizer, backend="auto")
    tmp = Path(out["tmp"])
    t0 = time.perf_counter()
    for split in ("train", "val"):
        encode_corpus_to_shard(tok, Corpus(["embedded"], split=split).texts(), tmp / split,
                               workers=os.cpu_count() or 1, progress=False)
    encode_s = time.perf_counter() - t0
    vocab = -(-tok.vocab_size // 64) * 64
    T = args.seq_len
    mcfg = get_preset(args.preset).replace(vocab_size=vocab)
    if args.smoke:
        mcfg = mcfg.replace(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, context_length=T, head_dim=None,
                            d_ff=256)
    shape = dict(vocab=vocab, ctx=mcfg.context_length, d=mcfg.d_model, n_layers=mcfg.n_layers, h=mcfg.n_heads)
    from lmforge.data.shards import open_shard

    data, _ = open_shard(tmp / "train")
    val_stream = TokenStream(tmp / "val")
    val = [b for _, b in zip(range(args.val_batches), DocumentPacker(val_stream, args.batch, T, loop=False))]
    # whole rows only (the packer pads the last row of the split with ignored targets)
    val = [{"input_ids": b["input_ids"], "targets": b["targets"]} for b in val if (b["targets"] != -100).all()]
    if not val:
        raise SystemExit("validation split too small for one batch")
    steps, B, accum = args.quality_steps, args.batch, args.quality_accum
    warmup = max(1, steps // 20)
    every = max(1, steps // 8)
    runs = {}
    for name in ("nanogpt recipe (AdamW 6e-4)", "lmforge AdamW 6e-4", "lmforge Muon"):
        t1 = time.perf_counter()
        if name.startswith("nanogpt"):
            r = NanoRunner(shape, data, B, T, accum, device, compile=False, lr=6e-4, max_steps=steps, warmup=warmup)
            step, val_fn = r.step, (lambda r=r: r.val_loss(val))
        else:
            muon = "Muon" in name
            tr = lmforge_trainer(mcfg, tmp / "train", B, T, accum, device, compile=False,
                                 optimizer="muon" if muon else "adamw", lr=args.muon_adam_lr if muon else 6e-4,
                                 muon_lr=args.muon_lr, max_steps=steps, warmup=warmup)
            step, val_fn = tr.train_step, (lambda tr=tr: lmforge_val_loss(tr, val, device))
        curve = []
        try:
            for i in range(1, steps + 1):
                step()
                if i % every == 0 or i == steps:
                    curve.append((i * B * T * accum, val_fn()))
        except Exception as e:
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            curve.append((0, float("nan")))
        runs[name] = {"curve": curve, "final_val_loss": curve[-1][1], "seconds": time.perf_counter() - t1}
        print(f"  {name}: val loss {curve[-1][1]:.4f} after {curve[-1][0]:,} tokens", flush=True)
    target = runs["nanogpt recipe (AdamW 6e-4)"]["final_val_loss"]
    for r in runs.values():
        reached = [t for t, v in r["curve"] if v <= target]
        r["tokens_to_recipe_loss"] = reached[0] if reached else None
    return {"encode_s": encode_s, "vocab": vocab, "steps": steps, "tokens_per_step": B * T * accum, "runs": runs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--accum", type=int, default=5)
    ap.add_argument("--big-batch", type=int, default=0, help="also time lmforge at this micro-batch")
    ap.add_argument("--variants", default="nano,lmforge", help="comma-separated, see above; nano comes first")
    ap.add_argument("--profile", action="store_true", help="kernel-group profile of each variant")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--diagnose", action="store_true", help="also time each model in the other's loop")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--tokenizer", default=".devwork/train_bench/tokenizer")
    ap.add_argument("--quality-steps", type=int, default=200)
    ap.add_argument("--quality-accum", type=int, default=1)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--muon-lr", type=float, default=0.02)
    ap.add_argument("--muon-adam-lr", type=float, default=3e-3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--out", default=os.environ.get("OUT", ".") + "/train_gpt2.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = {"tmp": tmp}
        if not args.skip_throughput:
            result["throughput"] = throughput(args, device, ctx)
        if args.quality:
            result["quality"] = quality(args, device, ctx)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if "throughput" in result:
        th = result["throughput"]
        print(f"\nGPT-2 small ({args.preset}, T={args.seq_len}, bf16) on {th['device']}, torch {torch.__version__}")
        if th["profiles"]:
            print_profiles(th["profiles"], th["rows"])
        print(f"\nGPT-2 small ({args.preset}, T={args.seq_len}, bf16) on {th['device']}, torch {torch.__version__}; "
              f"same function check: {'OK' if th['same_function']['ok'] else 'MISMATCH'}")
        print(f"{'variant':<44}{'micro':>6}{'accum':>6}{'tok/s':>12}{'MFU':>8}{'vs nanoGPT':>12}{'mem GB':>8}"
              f"{'breaks':>8}{'loader ms':>10}  max |loss diff| over warmup + timed steps")
        for r in th["rows"]:
            if "error" in r:
                print(f"{r['variant']:<44} FAILED: {r['error'][:80]}")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
            mem = f"{r['max_mem_gb']:.1f}" if r["max_mem_gb"] else "-"
            same = next((f"{v:.1e} vs {k[len('max_loss_diff_vs_'):]}" for k, v in r.items()
                         if k.startswith("max_loss_diff_vs_")), "")
            loader = f"{r['loader_ms_per_step']:.2f}" if r.get("loader_ms_per_step") is not None else "-"
            print(f"{r['variant']:<44}{r['micro_batch']:>6}{r['accum']:>6}{r['tokens_per_s']:>12,.0f}{mfu:>8}"
                  f"{r['ratio_vs_nanogpt']:>11.3f}x{mem:>8}{r['graph_breaks']:>8}{loader:>10}  {same}")
        if th.get("best_ratio"):
            print(f"each at its best micro-batch in this call: {th['best']['lmforge']} / {th['best']['nano']} = "
                  f"{th['best_ratio']:.3f}x")
    if "quality" in result:
        q = result["quality"]
        print(f"\nquality: {q['steps']} steps x {q['tokens_per_step']:,} tokens, vocab {q['vocab']}")
        print(f"{'run':<30}{'final val loss':>16}{'tokens to recipe loss':>24}")
        for name, r in q["runs"].items():
            reach = f"{r['tokens_to_recipe_loss']:,}" if r["tokens_to_recipe_loss"] else "not reached"
            print(f"{name:<30}{r['final_val_loss']:>16.4f}{reach:>24}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
