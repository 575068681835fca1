"""CLI: `lmforge serve PATH` (OpenAI-compatible server + web chat page) and `lmforge chat PATH`
(terminal chat with streaming). `lmforge generate` is the training stage's.

PATH is a run directory (its latest checkpoint and `tokenizer/`), a model or checkpoint directory
(`model_config.json`; pass --tokenizer unless it has a `tokenizer/` next to it), or a Hugging Face
export (`config.json` + safetensors, read through lmforge.interop; its tokenizer.json if present).

Speculative decoding (exact: the same distribution, greedy text identical): `--draft DIR` drafts
with a smaller model (any of the PATH forms; same vocabulary), `--ngram N` with prompt lookup;
`--spec-k` drafts per round. `--prefix-cache BLOCKS` keeps the KV of shared prompt prefixes (system
prompts, few-shot examples, earlier chat turns) in a pool of BLOCKS blocks of `--block-size` tokens.

For benchmarks, `serve --batching static` turns continuous batching off (a batch starts only when
the last one has finished) and `--ignore-eos` makes replies run to max_tokens (the end-of-text
token is sampled like any other; stop strings and chat templates' stop ids still apply).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.errors import ConfigError


def _add_model_args(p) -> None:
    p.add_argument("path", help="run directory, model/checkpoint directory, or HF export directory")
    p.add_argument("--tokenizer", help="tokenizer directory or file (default: found next to the model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights/cache dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of linear layers")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache rows)")
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: the model's context)")
    p.add_argument("--compile", action="store_true", help="CUDA-graph the decode step (CUDA only)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled per step (bounds the stall of running streams)")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", default=None, help="speculative decoding with this draft model (run/model/HF dir)")
    spec.add_argument("--ngram", type=int, default=None, help="speculative decoding by prompt lookup of up to N tokens")
    p.add_argument("--spec-k", type=int, default=4, help="drafted tokens per speculative round (1..15)")
    p.add_argument("--prefix-cache", type=int, default=0, metavar="BLOCKS",
                   help="reuse the KV of shared prompt prefixes: pool size in blocks (0: off)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per prefix-cache block")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a chat page",
                       description="Start an OpenAI-compatible server (/v1/models, /v1/completions, "
                                   "/v1/chat/completions, streaming) with a web chat page at /.")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: directory name)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="static: new requests start only when the running batch has finished (a baseline)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the end-of-text token (fixed reply lengths for benchmarks)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming)")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)


def load_for_inference(path, tokenizer=None, device="cpu", dtype=None):
    """(model, tokenizer, name) from a run dir, model dir or HF export (see the module docstring)."""
    import torch

    from lmforge.tokenizer import load_tokenizer

    path = Path(path)
    model, tok_path = load_model_dir(path, tokenizer)
    if tok_path is None:
        raise ConfigError(f"{path}: no tokenizer found next to the model; pass --tokenizer")
    tok = load_tokenizer(tok_path, backend="auto")
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    name = path.name if path.name not in ("", ".") else "lmforge"
    return model, tok, name


def load_model_dir(path, tokenizer=None):
    """(model on CPU, tokenizer path or None) from a run dir, model dir or HF export."""
    from lmforge.model.checkpoint import CONFIG, load_model

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a run, model or HF export directory)")
    tok_path = Path(tokenizer) if tokenizer else None
    if (path / "checkpoints").is_dir():
        from lmforge.model.checkpoint import list_checkpoints

        ckpts = list_checkpoints(path / "checkpoints")
        if not ckpts:
            raise ConfigError(f"{path}: no checkpoints in {path / 'checkpoints'}")
        model, _ = load_model(ckpts[-1])
        tok_path = tok_path or path / "tokenizer"
    elif (path / CONFIG).exists():
        model, _ = load_model(path)
        tok_path = tok_path or next((d for d in (path / "tokenizer", path.parent.parent / "tokenizer")
                                     if d.exists()), None)
    elif (path / "config.json").exists():
        from lmforge.interop.hf import import_hf

        model = import_hf(path)
        model = model[0] if isinstance(model, tuple) else model
        tok_path = tok_path or (path / "tokenizer.json" if (path / "tokenizer.json").exists() else None)
    else:
        raise ConfigError(f"{path}: no checkpoints/, {CONFIG} or config.json: not a run, model or HF export")
    return model, tok_path


def drafter_from_args(args, device: str, dtype: str | None):
    """The speculative drafter that --draft / --ngram ask for (None: plain decoding)."""
    import torch

    from lmforge.inference.speculative import DraftModel, NGramDrafter

    if getattr(args, "ngram", None) is not None:
        if args.ngram < 1:
            raise ConfigError(f"--ngram {args.ngram} must be >= 1")
        return NGramDrafter(args.ngram)
    if getattr(args, "draft", None):
        model, _ = load_model_dir(args.draft)
        dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
        return DraftModel(model.to(device=device, dtype=getattr(torch, dtype)))
    return None


def _engine(args):
    from lmforge.inference.engine import Engine

    device = args.device or ("cuda" if _cuda() else "cpu")
    model, tok, name = load_for_inference(args.path, args.tokenizer, device, args.dtype)
    if args.quantize:
        from lmforge.inference.quantize import quantize_model

        quantize_model(model, args.quantize)
    eos_ids = [] if getattr(args, "ignore_eos", False) else None
    engine = Engine(model, tokenizer=tok, max_batch=args.max_batch, max_len=args.max_len, compile=args.compile,
                    eos_ids=eos_ids, prefill_chunk=args.prefill_chunk, drafter=drafter_from_args(args, device, args.dtype),
                    spec_k=args.spec_k, prefix_blocks=args.prefix_cache, block_size=args.block_size)
    return engine, tok, name


def cmd_serve(args) -> int:
    from lmforge.errors import require

    require("uvicorn", "lmforge serve", "serve")
    import uvicorn

    from lmforge.inference.server import create_app

    engine, tok, name = _engine(args)
    app = create_app(engine, tok, model_name=args.name or name, max_queue=args.max_queue, batching=args.batching)
    print(f"serving {args.name or name} on http://{args.host}:{args.port} (chat page at /)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_chat(args, stdin=None, stdout=None) -> int:
    from lmforge.inference.chat import apply_chat_template
    from lmforge.inference.sampling import SamplingParams

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    engine, tok, name = _engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    stdout.write(f"chatting with {name} (empty line or Ctrl-D quits)\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = apply_chat_template(messages, tok)
        budget = engine.max_len - len(prompt.ids)
        if budget < 1:
            stdout.write("[the conversation no longer fits the context; start a new chat]\n")
            return 0
        params = SamplingParams(max_tokens=min(args.max_tokens, budget), temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, stop=prompt.stop, stop_ids=prompt.stop_ids)
        rid = engine.add_request(prompt.ids, params)
        reply = ""
        while engine.has_work():
            for ev in engine.step():
                if ev.request_id == rid:
                    stdout.write(ev.text)
                    stdout.flush()
                    reply += ev.text
        stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
