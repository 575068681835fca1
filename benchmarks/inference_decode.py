"""Decode throughput: the lmforge engine vs the naive training sampler vs Hugging Face `generate`.

One Llama-shape model with random weights (seeded), exported through lmforge.interop so HF runs the
very same weights. Greedy decoding of `--new` tokens after a `--prompt`-token prompt, timed in the
same process, same threads:
  naive        lmforge.train.generate.generate: re-runs the whole context per token (batch 1)
  hf           transformers `generate` (default dynamic cache, eager)
  hf_static    transformers `generate`, cache_implementation="static", eager (disable_compile=True:
               on CUDA recent transformers would otherwise auto-compile a static-cache decode)
  hf_compile   (CUDA only) HF at its best: static cache with generate's own compiled decode step
               (transformers compiles the decode forward with its `compile_config`, fullgraph and
               CUDA graphs, and runs the prefill eagerly). Wrapping `model.forward` in
               torch.compile(mode="reduce-overhead") by hand, as older docs show, crashed on
               torch 2.11: the static cache is allocated lazily inside the first captured call and
               the next CUDA-graph replay overwrites it.
  engine       lmforge.inference.Engine (preallocated cache, batched decode), eager
  engine_int8  the engine on the int8 weight-only quantized model
  engine_unpacked  the engine, eager, on an unpacked copy of the model (Engine(pack=False))
  engine_compiled  (CUDA only) Engine(compile=True): decode steps compiled by inductor, 8 per
               host launch captured in one CUDA graph, prefill compiled (dynamic shapes)
  engine_compiled_k1  the same with decode_steps=1 (one step per launch and host read)
  engine_compiled_unpacked  engine_compiled on an unpacked copy of the model (Engine(pack=False)):
               q/k/v and gate/up as separate GEMMs, as before packed projections
  engine_fused (CUDA, batches <= fused_decode.MAX_ROWS) engine_compiled with the fused decode step
               (Engine(fused_decode=True): 4-5 Triton kernels per layer instead of the compiled
               model's ~15, captured in the same 8-step CUDA graphs); every other engine variant
               here runs with fused_decode=False
  engine_fused_dot  engine_fused with the tl.dot decode attention (FusedDecoder(attn_impl="dot"))
  engine_fused_head  engine_fused with the one-query-head-per-program attention (attn_impl="head")
  engine_compiled_tuned  (CUDA, only with --tuned) engine_compiled with inductor's coordinate-descent
               tuning (Engine(compile_options=TUNED)): matrix-vector products as tuned Triton
               reductions fused with their neighbours; compiling takes minutes
The other engine variants pack the model (one GEMM for q/k/v and one for gate/up per layer).
Compiled variants get two untimed warm-up calls (compilation, CUDA-graph capture), the others one.
Tokens/s counts generated tokens over all rows; each variant's best of --repeats rounds, the
variants interleaved in rotating order within each round. Greedy outputs are compared with HF's (the fraction
of rows whose tokens are identical is printed; float round-off can flip near-ties).

At batch 1 the table also gives the achieved memory bandwidth: bytes a decode step must read
(every weight once, except that the input embedding reads one row, plus the KV cache at the mean
length prompt + new/2) times steps per second (new / seconds; the time includes the prefill, so
this is a slight underestimate), and its fraction of the card's peak (H100 SXM 3.35 TB/s, H100 PCIe
2.0, H200 4.8, from the device name; --peak-tbs overrides; none on CPU).

  python benchmarks/inference_decode.py                      # CPU, tiny shape, batch 1 and 8
  python benchmarks/inference_decode.py --shape llama124m --batch 1 64   # lent GPU
  python benchmarks/inference_decode.py --shape llama1b --batch 1        # lent GPU: roofline

Shapes: llama124m (alias gpt2s): Llama layout (RMSNorm, SwiGLU, RoPE, untied head), d 768,
12 layers, 12 heads, vocab 32000; llama1b: the TinyLlama 1.1B shape (22 layers, d 2048, GQA 32/4,
d_ff 5632, vocab 32000).

Prints a table and writes JSON (--out, default runs/bench/inference_decode_<device>.json).

--overhead measures the engine's own cost per decode step instead: a 1-layer d-64 model decodes
--new tokens per row; per batch size it prints the engine's time per step (generate's wall time,
prefill included, over --new), the part spent inside the model's forward (forward hooks, same
run; on CUDA each hook synchronizes, so there this is a pessimistic, unpipelined measure), their
difference (the engine's host overhead per step) and the host-sync calls per steady-state step
(pipeline.HostSyncCounter: .item/.tolist/.cpu/bool of a tensor/t[i] = v/torch.tensor).

  PYTHONPATH=. python3 benchmarks/inference_decode.py --overhead --batch 1 8 64 --new 128
  PYTHONPATH=. python3 benchmarks/inference_decode.py --overhead --batch 1 64 --decode-steps 1 8   # multi-step
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import INFERENCE_SHAPES, inference_device, sync, timed

from lmforge.inference import Engine, SamplingParams
from lmforge.inference.engine import TUNED
from lmforge.inference.fused_decode import MAX_ROWS, FusedDecoder
from lmforge.inference.quantize import quantize_model
from lmforge.io import write_json
from lmforge.model import ModelConfig, Transformer
from lmforge.train.generate import generate as naive_generate

# "gpt2s": the name used for the first GPU numbers in docs/benchmarks.md
SHAPES = {**INFERENCE_SHAPES, "gpt2s": INFERENCE_SHAPES["llama124m"]}
PEAK_TBS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35)]  # first match in the device name wins
COMPILED = ("hf_compile", "engine_compiled", "engine_compiled_k1", "engine_compiled_unpacked",
            "engine_compiled_tuned", "engine_fused", "engine_fused_dot", "engine_fused_head")


def peak_tbs(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tbs for key, tbs in PEAK_TBS if key in name), None)


def step_bytes(model: torch.nn.Module, length: int) -> int:
    """Bytes one batch-1 decode step must read: all weights (the input embedding: one row) + the
    KV cache of `length` tokens."""
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    emb = model.tok_emb.weight
    cfg = model.cfg
    if not cfg.tie_embeddings:  # a tied table is read whole by the head
        weights -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    elt = emb.element_size()
    kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * length * elt
    return weights + kv


def run_batch(B, prompts, model, qmodel, unpacked, hf, hf_c, args, device) -> list[dict]:
    """Time every variant at batch B; one row per variant."""
    cfg = model.cfg
    variants = {}
    if B == 1 and "naive" not in args.skip:
        variants["naive"] = lambda: [naive_generate(model, prompts[0].tolist(), args.new,
                                                    context_length=cfg.context_length, temperature=0)]
    hf_in = prompts.to(device)

    def hf_gen(m, **kw):
        with torch.no_grad():
            out = m.generate(hf_in, attention_mask=torch.ones_like(hf_in), max_new_tokens=args.new,
                             min_new_tokens=args.new, do_sample=False, pad_token_id=0, **kw)
        return out[:, args.prompt:].tolist()

    if "hf" not in args.skip:
        variants["hf"] = lambda: hf_gen(hf)
    if "hf_static" not in args.skip:
        variants["hf_static"] = lambda: hf_gen(hf, cache_implementation="static", disable_compile=True)
    if hf_c is not None:  # cache_implementation="static" is set on its generation_config
        variants["hf_compile"] = lambda: hf_gen(hf_c)
    max_len = args.prompt + args.new
    sp = SamplingParams(max_tokens=args.new, temperature=0)
    engines = [("engine", model, False, {}), ("engine_int8", qmodel, False, {}),
               ("engine_unpacked", unpacked, False, {"pack": False})]
    if device.type == "cuda":  # decode steps compiled and captured as CUDA graphs
        engines.append(("engine_compiled", model, True, {}))  # decode_steps: the default (8)
        engines.append(("engine_compiled_k1", model, True, {"decode_steps": 1}))
        engines.append(("engine_compiled_unpacked", unpacked, True, {"pack": False}))
        if args.tuned:
            engines.append(("engine_compiled_tuned", model, True, {"compile_options": TUNED}))
        if B <= MAX_ROWS:
            engines.append(("engine_fused", model, True, {"fused_decode": True}))
            engines.append(("engine_fused_dot", model, True, {"fused_decode": True}))
            engines.append(("engine_fused_head", model, True, {"fused_decode": True}))
    for name, m, compiled, opts in engines:
        if name not in args.skip and m is not None:
            opts = {"fused_decode": False, **opts}  # the fused step only where named
            engine = Engine(m, max_batch=B, max_len=max_len, eos_ids=[], compile=compiled, **opts)
            if name in ("engine_fused_dot", "engine_fused_head"):  # the fused step, one attention kernel
                engine.fused = FusedDecoder(m, engine.cache, attn_impl=name.split("_")[-1])
            variants[name] = lambda engine=engine: [c[0].token_ids for c in engine.generate(prompts.tolist(), sp)]
    outs, best = {}, {}
    for name, fn in list(variants.items()):
        try:
            for _ in range(2 if name in COMPILED else 1):  # warm-up (compiled: compile, then capture)
                fn()
        except Exception as e:  # one broken rival must not cost the other rows; report it
            print(f"batch {B}: variant {name} failed and is left out: {type(e).__name__}: {str(e)[:300]}")
            del variants[name]
    names = list(variants)
    for r in range(args.repeats):  # interleaved, rotating order: the shared machine's load drifts
        for name in names[r % len(names):] + names[:r % len(names)]:
            secs, outs[name] = timed(variants[name], device)
            print(f"batch {B} round {r}: {name} {B * args.new / secs:.1f} tok/s", flush=True)  # kept if a cap hits
            best[name] = min(best.get(name, float("inf")), secs)
    rows = [{"batch": B, "variant": n, "seconds": best[n], "tokens_per_s": B * args.new / best[n]} for n in names]
    speed = {r["variant"]: r["tokens_per_s"] for r in rows}
    ref = outs.get("hf")
    peak = peak_tbs(device, args.peak_tbs)
    mean_len = args.prompt + args.new // 2
    for r in rows:
        r["same_as_hf"] = sum(a == b for a, b in zip(outs[r["variant"]], ref)) / len(ref) if ref else None
        r["vs_hf"] = speed[r["variant"]] / speed["hf"] if "hf" in speed else None
        r["vs_naive"] = speed[r["variant"]] / speed["naive"] if "naive" in speed else None
        r["bandwidth_tbs"] = r["bandwidth_frac"] = None
        if B == 1 and r["variant"] != "naive":  # naive re-reads the whole context: not a decode step
            m = qmodel if r["variant"] == "engine_int8" else model
            r["step_bytes"] = step_bytes(m, mean_len)
            r["bandwidth_tbs"] = r["step_bytes"] * (args.new / r["seconds"]) / 1e12
            r["bandwidth_frac"] = r["bandwidth_tbs"] / peak if peak else None
    return rows

@torch.inference_mode()
def overhead_row(B: int, k: int, model, args, device) -> dict:
    """Engine time per decode step (token per row) with k steps per launch, the part of it spent
    inside the model's forward (measured in the same run by forward hooks), their difference, and
    host syncs per steady-state decode step."""
    from lmforge.inference.pipeline import HostSyncCounter

    sp = SamplingParams(max_tokens=args.new, temperature=0)
    engine = Engine(model, max_batch=B, max_len=args.prompt + args.new + 1, eos_ids=[], decode_steps=k)
    prompts = torch.randint(0, model.cfg.vocab_size, (B, args.prompt)).tolist()
    inside = [0.0, 0.0]  # seconds in forward, start of the current call

    def pre(*_):
        sync(device)
        inside[1] = time.perf_counter()

    def post(*_):
        sync(device)
        inside[0] += time.perf_counter() - inside[1]

    best = None
    for r in range(args.repeats + 1):  # round 0 warms up
        hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
        inside[0] = 0.0
        secs = timed(lambda: engine.generate(prompts, sp), device)[0]
        for h in hooks:
            h.remove()
        if r and (best is None or secs < best[0]):
            best = (secs, inside[0])
    for p in prompts:
        engine.add_request(p, sp)
    engine.step()
    engine.step()
    with HostSyncCounter() as syncs:  # three steady-state launches (3k decode steps)
        for _ in range(3):
            engine.step()
    while engine.has_work():
        engine.step()
    step, fwd = best[0] / args.new, best[1] / args.new
    return {"batch": B, "decode_steps": k, "step_us": step * 1e6, "forward_us": fwd * 1e6,
            "overhead_us": (step - fwd) * 1e6,
            "syncs_per_step": {name: v / (3 * k) for name, v in sorted(syncs.counts.items())}}


def overhead(args, device) -> list[dict]:
    """--overhead: one row per batch size for a 1-layer d-64 model (its forward is the floor)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, context_length=1024, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      attention_backend="sdpa")
    model = Transformer(cfg).to(device).eval()
    rows = [overhead_row(B, k, model, args, device) for B in args.batch for k in args.decode_steps]
    print(f"{'batch':>5} {'k':>3} {'step us':>9} {'forward us':>10} {'overhead us':>11}  host syncs per steady step")
    for r in rows:
        print(f"{r['batch']:>5} {r['decode_steps']:>3} {r['step_us']:>9.0f} {r['forward_us']:>10.0f} "
              f"{r['overhead_us']:>11.0f}  {r['syncs_per_step']}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4, help="timed rounds (best kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--skip", nargs="*", default=[], help="variants to skip")
    ap.add_argument("--peak-tbs", type=float, default=None, help="the card's peak memory bandwidth, TB/s")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tuned", action="store_true",
                    help="also engine_compiled_tuned (coordinate-descent tuning; minutes of compilation)")
    ap.add_argument("--overhead", action="store_true", help="the engine's host overhead per step (1-layer model)")
    ap.add_argument("--decode-steps", type=int, nargs="+", default=[1], help="--overhead: decode steps per launch")
    args = ap.parse_args()
    device, dtype = inference_device(args.threads)
    if args.overhead:
        rows = overhead(args, device)
        out = Path(args.out or f"runs/bench/inference_overhead_{device.type}.json")
        write_json(out, {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                         "threads": torch.get_num_threads(), "torch": torch.__version__, "prompt": args.prompt,
                         "new": args.new, "command": " ".join(sys.argv),
                         "date": datetime.date.today().isoformat(), "results": rows})
        print(f"wrote {out}")
        return 0
    cfg = ModelConfig(**SHAPES[args.shape], attention_backend="sdpa", tie_embeddings=False)
    with torch.device(device):  # initialised where it runs: a 1.1B model's CPU init took > 100 s
        model = Transformer(cfg).to(dtype).eval()

    import transformers

    from lmforge.interop.hf import export_hf

    hf = hf_c = None
    if {"hf", "hf_static", "hf_compile"} - set(args.skip):  # no export or HF load when no HF row runs
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(model, Path(tmp) / "hf")
            hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).to(device).eval()
            if device.type == "cuda" and "hf_compile" not in args.skip:  # generate compiles the decode step
                hf_c = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).to(device)
                hf_c = hf_c.eval()
                hf_c.generation_config.cache_implementation = "static"
                if not hasattr(hf_c.generation_config, "compile_config"):
                    raise SystemExit(f"transformers {transformers.__version__} has no generation compile_config: "
                                     "hf_compile needs transformers >= 4.49 (or pass --skip hf_compile)")

    qmodel = quantize_model(copy.deepcopy(model), "int8") if "engine_int8" not in args.skip else None
    # a deep copy is never packed (its parameters are clones); the other engines pack `model`
    wants_unpacked = {"engine_unpacked", "engine_compiled_unpacked"} - set(args.skip)
    unpacked = copy.deepcopy(model) if wants_unpacked else None
    g = torch.Generator().manual_seed(1)
    rows = []
    for B in args.batch:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=g)
        rows += run_batch(B, prompts, model, qmodel, unpacked, hf, hf_c, args, device)

    print(f"{'batch':>5} {'variant':<24} {'tok/s':>10} {'x hf':>7} {'x naive':>8} {'same as hf':>10} "
          f"{'TB/s':>7} {'of peak':>7}")
    for r in rows:
        f = lambda v, spec: format(v, spec) if v is not None else format("-", spec.split(".")[0])
        print(f"{r['batch']:>5} {r['variant']:<24} {r['tokens_per_s']:>10.1f} {f(r['vs_hf'], '>7.2f')} "
              f"{f(r['vs_naive'], '>8.2f')} {f(r['same_as_hf'], '>10.2f')} {f(r['bandwidth_tbs'], '>7.3f')} "
              f"{f(r['bandwidth_frac'], '>7.1%')}")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or f"runs/bench/inference_decode_{device.type}.json")
    write_json(out, {"device": dev_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "shape": args.shape, "prompt": args.prompt,
                     "new": args.new, "peak_tbs": peak_tbs(device, args.peak_tbs), "command": " ".join(sys.argv),
                     "date": datetime.date.today().isoformat(), "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
