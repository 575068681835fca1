"""`lmforge data ...`: run a pipeline file, show a run's statistics, train a quality classifier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.cli_support import add_stage


def register(sub) -> None:
    verbs = add_stage(sub, "data", "data pipeline: extract, filter, deduplicate, tokenize")

    p = verbs.add_parser("run", help="run a pipeline TOML file (resumes where a previous run stopped)")
    p.add_argument("pipeline", help="pipeline TOML file (see lmforge/data/example_pipeline.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline field, e.g. --set output_dir=/tmp/x --set workers=2")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("stats", help="show the per-step statistics of a pipeline output directory")
    p.add_argument("output_dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_stats)

    p = verbs.add_parser("train-quality", help="train a fastText-style quality classifier "
                                              "(positives = high quality, negatives = the rest)")
    p.add_argument("--positives", nargs="+", required=True, metavar="PATH")
    p.add_argument("--negatives", nargs="+", required=True, metavar="PATH")
    p.add_argument("--out", required=True, help="directory to save the classifier in")
    p.add_argument("--max-docs", type=int, default=0, help="read at most this many documents per side")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--buckets", type=int, default=1 << 18, help="hash buckets for words and bigrams")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_quality)


def cmd_run(args: argparse.Namespace) -> int:
    from lmforge.data.executor import load_pipeline, run_pipeline
    from lmforge.data.pipeline import format_stats

    cfg = load_pipeline(args.pipeline, args.overrides)
    stats = run_pipeline(cfg)
    print(format_stats(stats))
    print(f"outputs in {cfg.output_dir}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline import StepStats, format_stats
    from lmforge.io import read_json

    raw = read_json(Path(args.output_dir) / "stats.json", "pipeline stats")
    if args.json:
        print(json.dumps(raw, indent=2))
    else:
        print(format_stats({k: StepStats.from_dict(v) for k, v in raw.items()}))
    return 0


def cmd_train_quality(args: argparse.Namespace) -> int:
    from lmforge.data.classifier import ClassifierConfig
    from lmforge.data.quality import train_quality

    cfg = ClassifierConfig(epochs=args.epochs, dim=args.dim, buckets=args.buckets, lr=args.lr, seed=args.seed)
    report = train_quality(args.positives, args.negatives, args.out, cfg, max_docs=args.max_docs)
    print(json.dumps(report, indent=2))
    print(f"classifier saved to {args.out}")
    return 0
