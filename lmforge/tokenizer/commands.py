"""`lmforge tokenizer train|encode|info`: thin CLI wrappers over the tokenizer library."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lmforge.cli_support import add_corpus_args, add_stage, corpus_from_args


def register(sub) -> None:
    verbs = add_stage(sub, "tokenizer", "byte-level BPE tokenizer: train, encode a corpus, inspect")

    p = verbs.add_parser("train", help="train a tokenizer on a corpus and write a tokenizer directory")
    p.add_argument("--out", required=True, help="tokenizer directory to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="bytes + merges + special tokens")
    p.add_argument("--pattern", default="gpt2", help="pretokenization regex: gpt2, gpt4 or a regex")
    p.add_argument("--special", nargs="*", default=["<|endoftext|>"], metavar="TOKEN",
                   help="special tokens (never split or merged); default <|endoftext|>")
    p.add_argument("--workers", type=int, default=None, help="pretokenization processes (default: all cores)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="bound the word table to this many MB by pruning rare words")
    add_corpus_args(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("encode", help="encode a corpus into token shards (train and val)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="shard directory to write (train.bin/.json, val.bin/.json)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    p.add_argument("--backend", choices=["auto", "reference", "tiktoken"], default="auto",
                   help="encoder (auto: tiktoken when installed; ids are identical)")
    add_corpus_args(p)
    p.set_defaults(func=cmd_encode, split="both")

    p = verbs.add_parser("info", help="vocab size, special tokens and compression (bytes/token) on a corpus")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--max-docs", type=int, default=200, help="documents to measure compression on")
    add_corpus_args(p)
    p.set_defaults(func=cmd_info, split="val")


def cmd_train(args) -> int:
    from lmforge.io import write_json
    from lmforge.tokenizer import save_tokenizer, train_bpe

    corpus = corpus_from_args(args)
    start = time.perf_counter()
    stats: dict = {}
    budget = int(args.memory_budget_mb * 2**20) if args.memory_budget_mb else None
    tok = train_bpe(corpus.texts(), args.vocab_size, pattern=args.pattern, special_tokens=args.special,
                    workers=args.workers, memory_budget=budget, progress=True, stats=stats)
    seconds = time.perf_counter() - start
    out = save_tokenizer(tok, args.out)
    write_json(Path(out) / "train_stats.json", {**stats, "seconds": round(seconds, 3),
                                                "corpus": corpus.spec, "split": args.split,
                                                "skipped_documents": corpus.stats.get("skipped", 0)})
    print(f"trained {tok} in {seconds:.1f}s on {stats.get('chars', 0) / 1e6:.1f}M chars "
          f"({stats.get('unique_words', 0)} unique words) -> {out}")
    if corpus.stats.get("skipped"):
        print(f"skipped {corpus.stats['skipped']} undecodable document(s)")
    if stats.get("pruned_words"):
        print(f"memory budget: pruned {stats['pruned_words']} rare words (counts are approximate)")
    return 0


def cmd_encode(args) -> int:
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.shards import encode_corpus_to_shard

    tok = load_tokenizer(args.tokenizer, backend=args.backend)
    splits = ["train", "val"] if args.split == "both" else [args.split]
    for split in splits:
        args.split = split
        corpus = corpus_from_args(args)
        name = "all" if split == "all" else split
        info = encode_corpus_to_shard(tok, corpus.texts(), Path(args.out) / name,
                                      workers=args.workers or os.cpu_count() or 1,
                                      desc=f"encode {name}", meta={"split": split, "corpus": corpus.spec})
        print(f"{name}: {info['documents']} documents, {info['tokens']} tokens, {info['mb']:.1f} MB "
              f"in {info['seconds']:.1f}s ({info['mb'] / max(info['seconds'], 1e-9):.1f} MB/s, "
              f"backend {tok.backend}) -> {info['path']}")
    return 0


def cmd_info(args) -> int:
    from itertools import islice

    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer, backend="auto")
    print(f"vocab size: {tok.vocab_size} ({len(tok.merges)} merges)")
    print(f"special tokens: {tok.special_tokens}")
    print(f"pattern: {tok.pattern}")
    print(f"hash: {tok.hash}")
    n_bytes = n_tokens = n_docs = 0
    for text in islice(corpus_from_args(args).texts(), args.max_docs):
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tok.encode_ordinary(text))
        n_docs += 1
    if n_tokens:
        print(f"compression: {n_bytes / n_tokens:.3f} bytes/token over {n_docs} documents "
              f"({n_bytes} bytes, {n_tokens} tokens, split {args.split})")
    return 0
