"""GPT-2 small pretraining on one GPU: lmforge's Trainer vs the nanoGPT recipe, in one run.

Throughput: tokens/s and MFU of one optimizer step (micro-batch 12 x 1024 tokens, 5 accumulation
steps, bf16 autocast, torch.compile) for
  - nanogpt: the nanoGPT recipe written out below (its GPT module, SDPA causal attention, fused
    torch AdamW, random windows from a memmap with pinned non-blocking copies, loss.item() per step);
  - lmforge: lmforge.model.Transformer (gpt2-small preset) + Trainer (compile, own AdamW, random-window
    sampler + prefetcher), micro-batch 12 and a larger micro-batch.
Both use vocab 50304 (GPT-2's 50257 padded to a multiple of 64, as nanoGPT does) and the same data.

Quality per token (--quality): validation loss after the same number of tokens on the embedded corpus
(tokenized with the tokenizer in --tokenizer) for the nanoGPT recipe (AdamW 6e-4, cosine), lmforge
with that same AdamW recipe, and lmforge with Muon; plus how many tokens each needed to reach the
recipe's final loss.

Writes JSON to --out and prints a table. `--smoke` runs tiny shapes on CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------- the nanoGPT recipe


class NanoAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.h = h

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
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


# ------------------------------------------------------------------------- lmforge


def lmforge_trainer(model_cfg, shard, B, T, accum, device, compile, optimizer="adamw", lr=6e-4, muon_lr=0.02,
                    max_steps=1000, warmup=0, seed=0, module=None):
    from lmforge.data.loader import Prefetcher, RandomWindowSampler, TokenStream
    from lmforge.model import Transformer
    from lmforge.train.config import TrainConfig
    from lmforge.train.optim import build_optimizer
    from lmforge.train.trainer import Trainer, lm_loss

    cfg = TrainConfig(seed=seed, batch_size=B, grad_accum=accum, seq_len=T, max_steps=max_steps,
                      sampler="random", document_mask=False, optimizer=optimizer, lr=lr, muon_lr=muon_lr,
                      warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1, compile=compile,
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


def timed(step_fn, warmup, iters, device):
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def write_random_shard(path, n_tokens, vocab, seed=0):
    from lmforge.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(path, vocab_size=vocab, tokenizer_hash="random", bos_id=0) as w:
        w.write(rng.integers(0, vocab, size=n_tokens))
    return path


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
    shard = write_random_shard(Path(out["tmp"]) / "random", 4_000_000 if not args.smoke else 200_000,
                               mcfg.vocab_size)
    data, _ = open_shard(shard)
    fpt = flops_per_token(mcfg, T)["total"]
    peak = peak_flops(device)
    rows = []
    variants = [("nanogpt recipe", "nano", args.batch), ("lmforge", "lmforge", args.batch)]
    if args.big_batch:
        variants.append((f"lmforge B={args.big_batch}", "lmforge", args.big_batch))
    if args.diagnose:  # which half costs what: swap the models between the two loops
        variants += [("lmforge model, nano loop", "nano+lmforge-model", args.batch),
                     ("nano model, lmforge loop", "lmforge+nano-model", args.batch)]
    from lmforge.model import Transformer

    for name, kind, B in variants:
        accum = max(1, args.batch * args.accum // B)
        if kind.startswith("nano"):
            module = LMForgeAsNano(Transformer(mcfg)) if kind.endswith("lmforge-model") else None
            runner = NanoRunner(shape, data, B, T, accum, device, compile=args.compile, module=module)
            fn = runner.step
        else:
            module = NanoAsLMForge(NanoGPT(**shape)) if kind.endswith("nano-model") else None
            trainer = lmforge_trainer(mcfg, shard, B, T, accum, device, compile=args.compile, module=module)
            fn = trainer.train_step
        t0 = time.perf_counter()
        try:
            sec = timed(fn, args.warmup, args.iters, device)
        except Exception as e:  # record and go on: one broken variant must not lose the others
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"variant": name, "micro_batch": B, "accum": accum, "error": f"{type(e).__name__}: {e}"})
            continue
        tokens = B * T * accum
        tps = tokens / sec
        rows.append({"variant": name, "micro_batch": B, "accum": accum, "step_s": sec, "tokens_per_s": tps,
                     "mfu": fpt * tps / peak if peak else None, "wall_s": time.perf_counter() - t0,
                     "max_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None})
        print(f"  {name}: {tps:,.0f} tok/s ({rows[-1]['wall_s']:.0f}s incl. compile)", flush=True)
        del fn
        if kind.startswith("nano"):
            del runner
        else:
            del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    base = rows[0].get("tokens_per_s")
    for r in rows:
        r["ratio_vs_nanogpt"] = r["tokens_per_s"] / base if base and "tokens_per_s" in r else None
    return {"device": device_name(device), "flops_per_token": fpt, "peak_flops": peak, "rows": rows}


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
        print(f"{'variant':<22}{'micro':>6}{'accum':>6}{'tok/s':>12}{'MFU':>8}{'vs nanoGPT':>12}{'mem GB':>8}")
        for r in th["rows"]:
            if "error" in r:
                print(f"{r['variant']:<22} FAILED: {r['error'][:80]}")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
            mem = f"{r['max_mem_gb']:.1f}" if r["max_mem_gb"] else "-"
            print(f"{r['variant']:<22}{r['micro_batch']:>6}{r['accum']:>6}{r['tokens_per_s']:>12,.0f}{mfu:>8}"
                  f"{r['ratio_vs_nanogpt']:>11.3f}x{mem:>8}")
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
