"""CLI: `lmforge eval PATH --tasks bpb mmlu=FILE hellaswag=FILE arc=FILE gsm8k=FILE ...`.

PATH is a run directory (latest checkpoint and its tokenizer), a model/checkpoint directory or an HF
export, loaded as `lmforge serve` loads them. Results go to PATH/eval/results.json (or --out), a
table is printed, and a run directory's report.html gets an Evaluation section. Task specs are
described in lmforge/eval/run.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.cli_support import add_corpus_args, corpus_from_args


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: bits-per-byte, multiple-choice and generative tasks",
                       description="Evaluate a run/model directory on tasks and record the results.")
    p.add_argument("path", help="run directory, model/checkpoint directory, or HF export directory")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help="bpb | mmlu=FILE | hellaswag=FILE | arc=FILE | mc=FILE | gsm8k=FILE | gen=FILE | judge=FILE "
                        "(optionally named: mmlu:algebra=FILE)")
    p.add_argument("--tokenizer", help="tokenizer directory or file (default: found next to the model)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N items of each task file")
    p.add_argument("--batch-size", type=int, default=32, help="continuations (choices) per forward")
    p.add_argument("--strategy", choices=["auto", "cache", "padded"], default="auto",
                   help="multiple-choice scoring: auto (default), cache (shared context in a KV cache, "
                        "many questions per forward) or padded (full rows); all give the same numbers")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride for bpb (default: context/2)")
    p.add_argument("--max-documents", type=int, default=None, help="bpb: at most N documents")
    p.add_argument("--n-samples", type=int, default=1, help="generative: samples per item (pass@k, maj@n)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=256, help="generative: tokens per answer")
    p.add_argument("--max-batch", type=int, default=8, help="generative: sequences decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extractor", choices=["number", "letter", "exact"], default="exact",
                   help="gen task: how answers are read and compared")
    p.add_argument("--stop", nargs="*", default=None, help="gen task: stop strings (default: a blank line)")
    p.add_argument("--judge-url", default=None, help="judge task: OpenAI-compatible base URL (…/v1)")
    p.add_argument("--judge-model", default=None, help="judge task: model name at that endpoint")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                   help="judge task: environment variable holding the API key (if any)")
    p.add_argument("--out", default=None, help="results directory (default: PATH/eval)")
    p.add_argument("--no-report", action="store_true", help="do not touch the run's report.html")
    add_corpus_args(p)
    p.set_defaults(func=cmd_eval, split="val")  # bpb's natural default is the held-out split


def cmd_eval(args) -> int:
    import torch

    from lmforge.eval.run import append_to_report, format_table, parse_task, run_tasks, write_results
    from lmforge.inference.commands import load_for_inference

    specs = [parse_task(t) for t in args.tasks]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, name = load_for_inference(args.path, args.tokenizer, device, args.dtype)
    path = Path(args.path)

    def engine_factory():
        from lmforge.inference.engine import Engine

        return Engine(model, tokenizer=tok, max_batch=max(args.max_batch, args.n_samples))

    corpus = corpus_from_args(args) if any(s.kind == "bpb" for s in specs) else None
    judge = None
    if args.judge_url:
        import os

        from lmforge.eval.judge import ChatJudge

        judge = ChatJudge(args.judge_url, args.judge_model or "judge", api_key=os.environ.get(args.judge_key_env))
    results = run_tasks(model, tok, specs, corpus=corpus, engine_factory=engine_factory,
                        num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                        strategy=args.strategy,
                        stride=args.stride, max_documents=args.max_documents, n_samples=args.n_samples,
                        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                        judge=judge, extractor=args.extractor, stop=args.stop)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "checkpoint": _checkpoint(path),
            "device": str(device), "num_fewshot": args.num_fewshot}
    out = write_results(Path(args.out) if args.out else path / "eval", name, results, meta)
    print(format_table(results))
    print(f"results: {out}")
    if not args.no_report and (path / "checkpoints").is_dir():
        append_to_report(path / "report.html", out)
        print(f"report: {path / 'report.html'}")
    return 0


def _checkpoint(path: Path) -> str:
    if (path / "checkpoints").is_dir():
        from lmforge.model.checkpoint import list_checkpoints

        ckpts = list_checkpoints(path / "checkpoints")
        return str(ckpts[-1]) if ckpts else str(path)
    return str(path)
