"""Quality cost of weight-only quantization: validation loss of a trained run, full precision vs
int8 (per channel) vs int4 (groups of 32), on the run's own validation shard.

    python benchmarks/inference_quant.py RUN_DIR [--tokens 32768] [--seq-len 256]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val", help="validation shard (default: RUN_DIR/data/val or RUN_DIR/shards/val)")
    ap.add_argument("--out", default="runs/bench/inference_quant.json")
    args = ap.parse_args()
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
