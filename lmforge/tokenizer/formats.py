"""Tokenizer files: our own JSON format, the tokenizer directory artifact, and interop formats.

Own format (`tokenizer.json` in a tokenizer directory), versioned:

    {"format": "lmforge.tokenizer", "version": 1, "hash": "<16 hex>", "pattern": "<regex>",
     "pattern_name": "gpt2" | "gpt4" | null,
     "vocab": ["00", "01", ..., "6865"],          # token id -> its bytes in hex
     "merges": [[a, b, new], ...],               # in merge (rank) order
     "special_tokens": {"<|endoftext|>": 8191}}

The hash is recomputed on load and must match, so a corrupted or hand-edited file is caught.
Interop: GPT-2 `vocab.json` + `merges.txt` (byte-to-unicode mapping), Hugging Face `tokenizer.json`
(export and import; the `tokenizers` library gives identical ids), and tiktoken's mergeable-ranks
text format (`base64(token) rank` per line).
"""

from __future__ import annotations

import base64
import functools
import json
import os
from pathlib import Path

from lmforge.errors import LMForgeError, TokenizerError
from lmforge.io import atomic_dir, read_json, write_json, write_text
from lmforge.tokenizer.pretokenize import GPT2_PATTERN, pattern_name
from lmforge.tokenizer.tokenizer import Tokenizer

FORMAT = "lmforge.tokenizer"
VERSION = 1
OWN_FILE = "tokenizer.json"
HF_FILE = "hf_tokenizer.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"


# ---------------------------------------------------------------------- own format

def to_dict(tok: Tokenizer) -> dict:
    return {"format": FORMAT, "version": VERSION, "hash": tok.hash, "pattern": tok.pattern,
            "pattern_name": pattern_name(tok.pattern),
            "vocab": [tok.vocab[i].hex() for i in range(tok.vocab_size)],
            "merges": [list(m) for m in tok.merges], "special_tokens": dict(tok.special_tokens)}


def from_dict(d: dict, where: str = "tokenizer") -> Tokenizer:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise TokenizerError(f"{where}: not an lmforge tokenizer (format={got!r}, expected {FORMAT!r})")
    if d.get("version") != VERSION:
        raise TokenizerError(f"{where}: tokenizer format version {d.get('version')!r} is not supported "
                             f"(expected {VERSION})")
    try:
        vocab = {i: bytes.fromhex(h) for i, h in enumerate(d["vocab"])}
        merges = [(int(a), int(b), int(n)) for a, b, n in d["merges"]]
        specials = {str(s): int(i) for s, i in d["special_tokens"].items()}
        pattern = d["pattern"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{where}: malformed tokenizer file ({type(e).__name__}: {e})") from None
    try:
        tok = Tokenizer(vocab, merges, specials, pattern)
    except TokenizerError as e:
        raise TokenizerError(f"{where}: {e}") from None
    if d.get("hash") != tok.hash:
        raise TokenizerError(f"{where}: content hash {tok.hash} does not match the recorded hash "
                             f"{d.get('hash')!r}; the file is corrupt or was edited")
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, exports: bool = True) -> Path:
    """Write the tokenizer directory artifact atomically: tokenizer.json (+ HF and tiktoken exports)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / OWN_FILE, to_dict(tok), indent=None)
        if exports:
            write_json(tmp / HF_FILE, to_hf_dict(tok), indent=None)
            write_tiktoken_ranks(tok, tmp / TIKTOKEN_FILE)
    return out_dir


def load_tokenizer(path: str | os.PathLike, backend: str = "reference") -> Tokenizer:
    """Load a tokenizer directory (or our tokenizer.json, or a HF tokenizer.json, or a GPT-2 dir)."""
    path = Path(path)
    if path.is_dir():
        vocabs, merges = sorted(path.glob("*vocab.json")), sorted(path.glob("*merges.txt"))
        if (path / OWN_FILE).exists():
            path = path / OWN_FILE
        elif len(vocabs) == 1 and len(merges) == 1:  # GPT-2 style: vocab.json + merges.txt
            tok = load_gpt2(vocabs[0], merges[0])
            tok.set_backend(backend)
            return tok
        else:
            raise TokenizerError(f"{path}: no {OWN_FILE} (or GPT-2 vocab.json + merges.txt) in this directory")
    if not path.exists():
        raise TokenizerError(f"tokenizer not found: {path}")
    try:
        d = read_json(path, "tokenizer file")
    except LMForgeError as e:
        raise TokenizerError(str(e)) from None
    if isinstance(d, dict) and "model" in d and "format" not in d:
        tok = from_hf_dict(d, str(path))
    else:
        tok = from_dict(d, str(path))
    tok.set_backend(backend)
    return tok


# ---------------------------------------------------------------------- GPT-2 files

@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (so BPE files are text)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


@functools.cache
def _unicode_table() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _unicode_to_bytes(token: str, where: str) -> bytes:
    table = _unicode_table()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"{where}: token {token!r} has character {e.args[0]!r} outside GPT-2's "
                             "byte-to-unicode alphabet") from None


def _from_string_vocab(vocab_s: dict[str, int], merges_s: list[tuple[str, str]], specials_s: set[str],
                       pattern: str, where: str) -> Tokenizer:
    """Build from byte-level (byte-to-unicode) vocab and merges; unreachable tokens are specials."""
    vocab: dict[int, bytes] = {}
    specials: dict[str, int] = {}
    for s, i in vocab_s.items():
        if s in specials_s:
            specials[s] = int(i)
            vocab[int(i)] = s.encode("utf-8")
    merges = []
    for lineno, (a, b) in enumerate(merges_s, 1):
        for part in (a, b, a + b):
            if part not in vocab_s:
                raise TokenizerError(f"{where}: merge {lineno} ({a} {b}) uses {part!r}, which is not in the vocab")
        merges.append((vocab_s[a], vocab_s[b], vocab_s[a + b]))
    reachable = {vocab_s[s] for s in vocab_s if len(s) == 1} | {m[2] for m in merges}
    for s, i in vocab_s.items():
        if s in specials_s:
            continue
        if i not in reachable:
            specials[s] = int(i)  # not a byte and not made by a merge: an added (special) token
            vocab[int(i)] = s.encode("utf-8")
        else:
            vocab[int(i)] = _unicode_to_bytes(s, where)
    return Tokenizer(vocab, merges, specials, pattern)


def load_gpt2(vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
              pattern: str = GPT2_PATTERN) -> Tokenizer:
    """Load GPT-2 style `vocab.json` (token string -> id) and `merges.txt` ("a b" per line)."""
    vocab_s = read_json(vocab_path, "GPT-2 vocab.json")
    if not isinstance(vocab_s, dict):
        raise TokenizerError(f"{vocab_path}: expected a JSON object token -> id")
    try:
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"GPT-2 merges.txt not found: {merges_path}") from None
    merges_s = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{merges_path} line {lineno}: expected two tokens 'a b', got {line!r}")
        merges_s.append((parts[0], parts[1]))
    return _from_string_vocab(vocab_s, merges_s, set(), pattern, str(vocab_path))


# ---------------------------------------------------------------------- Hugging Face tokenizer.json

def to_hf_dict(tok: Tokenizer) -> dict:
    """A Hugging Face `tokenizer.json`: regex Split + ByteLevel pretokenizer, BPE model, specials."""
    b2u = bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)
    vocab = {enc(b): i for i, b in tok.vocab.items() if i not in tok.special_ids}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab,
                  "merges": [[enc(tok.vocab[a]), enc(tok.vocab[b])] for a, b, _ in tok.merges]},
    }


def _hf_pattern(pre: dict | None, where: str) -> str:
    if not pre:
        raise TokenizerError(f"{where}: no pre_tokenizer; only byte-level BPE tokenizers are supported")
    kind = pre.get("type")
    if kind == "Sequence":
        pattern = None
        for p in pre.get("pretokenizers", []):
            if p.get("type") == "Split":
                pattern = p["pattern"].get("Regex") or regex_escape(p["pattern"].get("String", ""))
            elif p.get("type") == "ByteLevel" and p.get("use_regex", True):
                pattern = GPT2_PATTERN
        if pattern:
            return pattern
    if kind == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise TokenizerError(f"{where}: ByteLevel add_prefix_space=true is not supported")
        return GPT2_PATTERN
    raise TokenizerError(f"{where}: unsupported pre_tokenizer {kind!r} (expected ByteLevel or "
                         "Sequence[Split(Regex), ByteLevel])")


def regex_escape(s: str) -> str:
    import regex

    return regex.escape(s)


def from_hf_dict(d: dict, where: str = "tokenizer.json") -> Tokenizer:
    """Import a byte-level BPE `tokenizer.json` (GPT-2 / Llama-3 / our export style)."""
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{where}: model type {model.get('type')!r} is not supported (expected BPE)")
    pattern = _hf_pattern(d.get("pre_tokenizer"), where)
    merges_s = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    vocab_s = dict(model.get("vocab", {}))
    specials = set()
    for t in d.get("added_tokens", []):
        vocab_s[t["content"]] = t["id"]
        specials.add(t["content"])
    return _from_string_vocab(vocab_s, merges_s, specials, pattern, where)


# ---------------------------------------------------------------------- tiktoken ranks

def write_tiktoken_ranks(tok: Tokenizer, path: str | os.PathLike) -> None:
    """tiktoken's `.tiktoken` text format: `base64(token bytes) rank` per line, specials excluded."""
    ranks = tok.mergeable_ranks()
    lines = [f"{base64.b64encode(b).decode('ascii')} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    write_text(path, "\n".join(lines) + "\n")


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks = {}
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise TokenizerError(f"tiktoken ranks file not found: {path}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            b64, rank = line.split()
            ranks[base64.b64decode(b64, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path} line {lineno}: expected 'base64 rank', got {line!r} ({e})") from None
    return ranks


def hf_json(tok: Tokenizer) -> str:
    return json.dumps(to_hf_dict(tok), ensure_ascii=False)
