"""CLI: `lmforge run` (the main job), `lmforge train` (pretraining from a config) and
`lmforge generate` (sample from a trained run). Thin wrappers over run.py / pretrain.py / generate.py.

Config overrides are positional dotted `section.key=value` pairs, e.g.
`lmforge train --config configs/gpt2-small.toml train.lr=6e-4 model.n_layers=6`.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError

DEFAULT_PRESET = "tiny-cpu"


def resolve_preset(name: str | None) -> Path | None:
    """A preset name (configs/<name>.toml, looked up in ./configs and the source tree's configs/) or a
    path. The tiny CPU preset is also the built-in default, so it works without the file."""
    if name is None:
        return None
    p = Path(name)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        if (root / f"{name}.toml").exists():
            return root / f"{name}.toml"
    if name == DEFAULT_PRESET:
        return None
    raise ConfigError(f"run preset {name!r} not found (looked for configs/{name}.toml); give a .toml path")


def register(sub) -> None:
    p = sub.add_parser("run", help="the main job: tokenizer -> shards -> train -> eval -> samples -> report",
                       description="Run the whole pipeline on a corpus (default: the embedded corpus, tiny "
                                   "CPU preset). Stages whose artifacts exist and match are skipped.")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="configs/<name>.toml or a path (default tiny-cpu)")
    p.add_argument("--out", default="runs/main", help="run directory (default runs/main)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.max_steps=100")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="pretrain a model on token shards from a config",
                       description="Pretrain from a run config (TOML) plus dotted overrides; --resume "
                                   "continues from the run directory's latest checkpoint.")
    p.add_argument("--config", help="run config TOML (default: built-in tiny defaults)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--tokenizer", help="tokenizer dir (enables bits per byte and samples)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run directory's latest checkpoint (bit-exact); without it, a "
                        "run directory that already holds checkpoints is refused")
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this node (starts torchrun; train.batch_size is per process)")
    p.add_argument("--dp", default="ddp", choices=["ddp", "naive", "zero1", "zero2", "fsdp"],
                   help="data-parallel method under --nproc/torchrun (default ddp: own bucketed DDP)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP gradient bucket size in MB")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. data.train_shards=runs/x/data/train train.lr=1e-3")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a trained run or model directory")
    p.add_argument("--run", help="run directory (latest checkpoint + run_dir/tokenizer)")
    p.add_argument("--model", help="model or checkpoint directory (with --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory")
    p.add_argument("--prompt", default="", help="text to continue (after a BOS token)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)


def cmd_run(args) -> int:
    from lmforge.train.pretrain import load_run_config
    from lmforge.train.run import run_main_job

    cfg = load_run_config(resolve_preset(args.preset), args.overrides)
    result = run_main_job(cfg, args.out)
    bpb, uni = result.get("val_bpb"), result.get("unigram_bpb")
    if bpb is not None and uni is not None:
        print(f"validation bits/byte: model {bpb:.4f} vs unigram baseline {uni:.4f} "
              f"({'below' if bpb < uni else 'NOT below'} the baseline)")
    return 0


def cmd_train(args) -> int:
    from lmforge.train.checkpoint import list_checkpoints
    from lmforge.train.pretrain import load_run_config, pretrain

    parallelize = None
    if args.nproc is not None or _under_torchrun():
        from lmforge.distributed.launch import pretrain_parallelize, relaunch, under_torchrun

        if not under_torchrun():
            return relaunch(args.nproc)
        parallelize = pretrain_parallelize(args.dp, args.bucket_mb)
    elif args.resume:  # one process continuing a data-parallel run: its checkpoint may be sharded
        from lmforge.distributed.launch import checkpoint_kind, pretrain_parallelize

        kind = checkpoint_kind(args.out)
        if kind is not None:
            parallelize = pretrain_parallelize(kind, args.bucket_mb)
    cfg = load_run_config(args.config, args.overrides)
    if not args.resume and list_checkpoints(Path(args.out) / "checkpoints"):
        raise ConfigError(f"{args.out}/checkpoints already holds checkpoints: pass --resume to continue that "
                          "run, or choose another --out")
    tok = None
    if args.tokenizer:
        from lmforge.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer, backend="auto")
    summary = pretrain(cfg, args.out, resume=args.resume, tokenizer=tok, parallelize=parallelize)
    if not summary["trainer"].is_main:  # rank-0-only output
        return 0
    ev = summary["final_eval"]
    print(f"trained {summary['step']} steps, {summary['tokens']} tokens in {summary['seconds']:.0f}s "
          f"({summary['stop']}); " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float)))
    return 0


def _under_torchrun() -> bool:
    import os

    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def cmd_generate(args) -> int:
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.checkpoint import list_checkpoints
    from lmforge.train.generate import generate

    if args.run:
        ckpts = list_checkpoints(Path(args.run) / "checkpoints")
        if not ckpts:
            raise ConfigError(f"{args.run}: no checkpoints in {args.run}/checkpoints")
        model_dir, tok_dir = ckpts[-1], args.tokenizer or Path(args.run) / "tokenizer"
    elif args.model and args.tokenizer:
        model_dir, tok_dir = Path(args.model), args.tokenizer
    else:
        raise ConfigError("generate needs --run DIR, or --model DIR and --tokenizer DIR")
    model, cfg = load_model(model_dir, device=args.device)
    tok = load_tokenizer(tok_dir, backend="auto")
    ids = [tok.eot_id] + tok.encode(args.prompt)
    new = generate(model, ids, args.max_new_tokens, context_length=cfg.context_length,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   stop_ids=[tok.eot_id], seed=args.seed)
    print(args.prompt + tok.decode(new))
    return 0
