"""The bundled default input: HTML pages that the standard library's `pydoc` renders for stdlib
modules, wrapped into gzipped WARC files, so every pipeline stage can act on real HTML offline.

`example:pydoc` in a pipeline's `input` names this input; it is generated on first use under
`<output_dir>/input/`. The pages are rendered in a fresh isolated interpreter (so module state left
by the calling process cannot leak into them) and object addresses (`at 0x7f...`) are replaced by
`at 0x0`, so the same Python produces the same bytes every time.
A few pages are also stored under a second "mirror" URL, and a few mirrors are slightly edited, as
crawls contain exact and near-duplicate copies; the dedup steps should find exactly those.
"""

from __future__ import annotations

import importlib
import json
import pydoc
import re
import subprocess
import sys
import warnings
from pathlib import Path

from lmforge.data.readers import write_warc

EXAMPLE_INPUT = "example:pydoc"
MODULES = [
    "abc", "argparse", "base64", "bisect", "calendar", "cmd", "colorsys", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "difflib", "enum", "filecmp", "fnmatch", "fractions",
    "functools", "getopt", "glob", "graphlib", "gzip", "heapq", "hmac", "html", "ipaddress", "json",
    "keyword", "linecache", "locale", "mimetypes", "numbers", "operator", "optparse",
    "pathlib", "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "shlex", "shutil",
    "statistics", "string", "stringprep", "tabnanny", "tempfile", "textwrap", "timeit", "tokenize",
    "tomllib", "traceback", "uuid", "warnings", "wave", "weakref", "zipfile",
]
MIRRORED = ["heapq", "bisect", "textwrap", "fnmatch", "shlex", "sched"]  # exact copies
EDITED = ["bisect", "sched"]  # near copies: one line appended to the mirror


def render(module: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = importlib.import_module(module)
        html = pydoc.HTMLDoc()
        return html.page(pydoc.describe(obj), html.document(obj, module)).encode("utf-8")


_ADDRESS = re.compile(rb"(at(?: |&nbsp;))0x[0-9a-fA-F]+")


def render_isolated(modules: list[str]) -> dict[str, bytes]:
    """Render pages in a fresh `python -I` process, object addresses normalised."""
    root = str(Path(__file__).resolve().parents[2])  # so `-I` still finds this lmforge checkout
    code = (f"import json, sys\nsys.path.insert(0, {root!r})\nfrom lmforge.data.example import render\n"
            "json.dump({m: render(m).decode() for m in sys.argv[1:]}, sys.stdout)")
    out = subprocess.run([sys.executable, "-I", "-c", code, *modules], check=True, capture_output=True).stdout
    return {m: _ADDRESS.sub(rb"\g<1>0x0", html.encode()) for m, html in json.loads(out).items()}


def make_example_input(directory: str | Path, n_files: int = 4) -> list[Path]:
    """Write the example WARC files (if not there yet) and return their paths."""
    directory = Path(directory)
    paths = [directory / f"pydoc_{i:02d}.warc.gz" for i in range(n_files)]
    if all(p.exists() for p in paths):
        return paths
    html = render_isolated(MODULES)
    pages = [(f"https://docs.example.org/{m}.html", html[m]) for m in MODULES]
    for m in MIRRORED:
        body = html[m]
        if m in EDITED:
            body = body.replace(b"</body>", b"<p>Mirrored copy, retrieved from the documentation archive.</p></body>")
        pages.append((f"https://mirror.example.net/python/{m}.html", body))
    for i, p in enumerate(paths):
        write_warc(p, pages[i::n_files])
    return paths
