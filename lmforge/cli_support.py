"""Small helpers that stage `commands.py` modules share to build their part of the CLI.

(`lmforge.cli` only discovers and dispatches; nothing imports it, so shared CLI pieces live here.)
"""

from __future__ import annotations

import argparse


def add_stage(sub, name: str, help: str):
    """Add `lmforge <name>` with its own verbs; returns the verbs' subparsers action."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(_parser=p)
    return p.add_subparsers(dest=f"{name}_verb", metavar="<verb>")


def add_corpus_args(p: argparse.ArgumentParser, default: str = "embedded") -> None:
    """The corpus options every stage that reads documents accepts."""
    p.add_argument("--corpus", nargs="+", default=[default], metavar="PATH",
                   help="text/JSONL(.gz/.zst)/Parquet files, directories or globs, or 'embedded' "
                        "(the Python standard library source of this interpreter; the default)")
    p.add_argument("--split", choices=["train", "val", "all"], default="train",
                   help="which split of the corpus (validation documents are chosen by a stable hash)")
    p.add_argument("--text-field", default="text", help="field that holds the text in JSONL/Parquet")
    p.add_argument("--separator", default="<|endoftext|>",
                   help="document separator in plain text files")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip undecodable documents (and report how many) instead of failing")


def corpus_from_args(args: argparse.Namespace):
    """Build the Corpus described by add_corpus_args' options."""
    from lmforge.data.sources import Corpus

    return Corpus(args.corpus, split=None if args.split == "all" else args.split,
                  text_field=args.text_field, separator=args.separator,
                  errors="skip" if args.skip_bad else "strict")
