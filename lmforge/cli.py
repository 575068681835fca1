"""`lmforge <stage> <verb>`: the command line, a thin layer over the library.

Each stage package that has commands provides `lmforge/<stage>/commands.py` with
`register(subparsers)`, which adds its parsers and sets `func=handler` on each; a handler takes the
parsed args and returns an exit code (or None for 0). This file only discovers and dispatches.

Errors: an `LMForgeError` prints as one line `error: <message>` and exits with 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from lmforge import __version__
from lmforge.errors import LMForgeError

# Stage packages, in lifecycle order; each is asked for its commands if it has a commands module.
STAGES = ["tokenizer", "data", "model", "kernels", "train", "distributed", "inference", "eval",
          "scaling", "align", "interop"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build language models from scratch.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for stage in STAGES:
        name = f"lmforge.{stage}.commands"
        if importlib.util.find_spec(f"lmforge.{stage}") is None or importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # `lmforge` or `lmforge <stage>` alone: show the relevant help.
        target = getattr(args, "_parser", parser)
        target.print_help()
        return 1
    try:
        code = args.func(args)
    except LMForgeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
