"""Weight-only quantization: its quality cost on a trained run, and its decode speed.

Quality: validation loss of a trained run, full precision vs int8 (per channel) vs int4 (groups of
32), on the run's own validation shard.

    python benchmarks/inference_quant.py RUN_DIR [--tokens 32768] [--seq-len 256]

Speed (--decode): greedy decode tokens/s of the engine on a random-weight model of --shape, full
precision (bf16 on CUDA) vs the same model int8 vs int4, at each --batch, best of --repeats, the
variants interleaved; with --compile (CUDA) each engine decodes through CUDA graphs, inductor
compiling the dequantize together with the matmul. Also reports weight bytes and the fraction of
rows whose greedy tokens equal full precision's (random weights: near-ties flip, so this is a
sanity check, not the quality measure; that is the loss above).

    python benchmarks/inference_quant.py --decode --shape llama124m --batch 1 64 --compile   # lent GPU

RUN_DIR is an `lmforge run` / `lmforge train` directory (latest checkpoint, data/val.* or shards/val.*). The loss
is the mean next-token cross-entropy over the first --tokens tokens of the validation shard, cut
into rows of --seq-len. Also reports the bytes of weights (parameters + quantized buffers).
Prints a table and writes JSON (--out, default runs/bench/inference_quant.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch

from lmforge.data.shards import open_shard
from lmforge.inference import Engine, SamplingParams
from lmforge.inference.quantize import quantize_model, weight_bytes
from lmforge.io import write_json
from lmforge.model.checkpoint import list_checkpoints, load_model


@torch.no_grad()
def val_loss(model, tokens: torch.Tensor, seq_len: int, batch: int = 8) -> float:
    rows = tokens[: (len(tokens) - 1) // seq_len * seq_len + 1]
    x = rows[:-1].view(-1, seq_len)
    y = rows[1:].view(-1, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch], y[i:i + batch])
        total += float(out.ce_sum)
        count += int(out.n_tokens)
    return total / count


def decode_speed(args) -> int:
    import platform

    from common import INFERENCE_SHAPES, inference_device, timed

    from lmforge.model import ModelConfig, Transformer

    device, dtype = inference_device(args.threads)
    shape = INFERENCE_SHAPES[args.shape]
    full = Transformer(ModelConfig(**shape, attention_backend="sdpa")).eval()
    models = {"full": full}
    for mode in ("int8", "int4"):  # quantized from the fp32 weights, then cast like the full model
        models[mode] = quantize_model(copy.deepcopy(full), mode)
    models = {k: m.to(device, dtype) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    sp = SamplingParams(max_tokens=args.new, temperature=0)
    rows = []
    for B in args.batch:
        prompts = torch.randint(0, shape["vocab_size"], (B, args.prompt), generator=g).tolist()
        engines = {k: Engine(m, max_batch=B, max_len=args.prompt + args.new, eos_ids=[],
                             compile=args.compile and device.type == "cuda") for k, m in models.items()}
        fns = {k: (lambda e=e, p=prompts: [c[0].token_ids for c in e.generate(p, sp)]) for k, e in engines.items()}
        for k, fn in fns.items():
            for _ in range(2 if engines[k].compiled else 1):  # warm-up (compiled: compile, then capture)
                fn()
        best, outs = {}, {}
        names = list(fns)
        for r in range(args.repeats):  # interleaved, rotating order
            for k in names[r % len(names):] + names[:r % len(names)]:
                secs, outs[k] = timed(fns[k], device)
                best[k] = min(best.get(k, float("inf")), secs)
        for k in names:
            rows.append({"batch": B, "mode": k, "tokens_per_s": B * args.new / best[k],
                         "vs_full": best["full"] / best[k], "weight_bytes": weight_bytes(models[k]),
                         "same_as_full": sum(a == b for a, b in zip(outs[k], outs["full"])) / B,
                         "compiled": engines[k].compiled})
    print(f"{args.shape}, {device.type} {dtype}, prompt {args.prompt}, {args.new} greedy tokens, best of {args.repeats}")
    print(f"{'batch':>5} {'mode':<5} {'tok/s':>10} {'x full':>7} {'weight MB':>10} {'same as full':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['mode']:<5} {r['tokens_per_s']:>10.1f} {r['vs_full']:>7.2f} "
              f"{r['weight_bytes'] / 1e6:>10.1f} {r['same_as_full']:>12.2f}")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = Path(args.out if args.out != "runs/bench/inference_quant.json" else
               f"runs/bench/inference_quant_decode_{device.type}.json")
    write_json(out, {"device": dev_name, "dtype": str(dtype), "torch": torch.__version__, "args": vars(args),
                     "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(), "results": rows})
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--decode", action="store_true", help="decode speed on a random-weight model instead")
    ap.add_argument("--shape", default="tiny", help="(--decode) a benchmarks/common.py INFERENCE_SHAPES name")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="(--decode) rows decoding together")
    ap.add_argument("--prompt", type=int, default=32, help="(--decode) prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="(--decode) generated tokens")
    ap.add_argument("--repeats", type=int, default=2, help="(--decode) timed rounds")
    ap.add_argument("--compile", action="store_true", help="(--decode) CUDA-graph decode (CUDA only)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val", help="validation shard (default: RUN_DIR/data/val or RUN_DIR/shards/val)")
    ap.add_argument("--out", default="runs/bench/inference_quant.json")
    args = ap.parse_args()
    if args.decode:
        return decode_speed(args)
    if args.run_dir is None:
        ap.error("RUN_DIR is required (or --decode)")
    run = Path(args.run_dir)
    ckpts = list_checkpoints(run / "checkpoints")
    if not ckpts:
        raise SystemExit(f"{run}: no checkpoints")
    model, cfg = load_model(ckpts[-1])
    model.eval()
    seq_len = min(args.seq_len, cfg.context_length)
    val = Path(args.val) if args.val else next((d / "val" for d in (run / "data", run / "shards")
                                                  if (d / "val.json").exists()), None)
    if val is None:
        raise SystemExit(f"{run}: no data/val.* or shards/val.* shard; pass --val")
    toks, header = open_shard(val)
    if header["vocab_size"] > cfg.vocab_size:
        raise SystemExit(f"{val}: vocabulary {header['vocab_size']} does not fit the model's {cfg.vocab_size}")
    tokens = torch.from_numpy(toks[: args.tokens + 1].astype("int64"))
    rows = []
    base = None
    for mode in ("full", "int8", "int4"):
        m = model if mode == "full" else quantize_model(copy.deepcopy(model), mode)
        loss = val_loss(m, tokens, seq_len)
        base = loss if base is None else base
        rows.append({"mode": mode, "val_loss": loss, "delta": loss - base, "weight_bytes": weight_bytes(m)})
    print(f"{ckpts[-1]}: {len(tokens) - 1} validation tokens, rows of {seq_len}")
    print(f"{'mode':<6} {'val loss':>9} {'delta':>9} {'weight MB':>10}")
    for r in rows:
        print(f"{r['mode']:<6} {r['val_loss']:>9.4f} {r['delta']:>+9.4f} {r['weight_bytes'] / 1e6:>10.2f}")
    write_json(Path(args.out), {"checkpoint": str(ckpts[-1]), "tokens": len(tokens) - 1, "seq_len": seq_len,
                                "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                                "results": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
