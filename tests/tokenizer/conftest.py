"""Shared fixtures for tokenizer tests: GPT-2 files (skipped with a reason when absent), sample texts."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPT2_DIR = REPO.parent / "shared" / "data" / "gpt2"

MULTILINGUAL = (
    "Größenwahn und Übermut: naïve café owners say «bonjour» — 東京は日本の首都です。"
    " Привет, как дела? مرحبا بالعالم! नमस्ते दुनिया। 안녕하세요 세계. Ελληνικά ϕ≠φ. "
    "Emoji: 👩‍👩‍👧‍👦 🇺🇳 ✔️ tabs\tand\u00a0nbsp\u2028line sep, numbers ١٢٣ ½ Ⅻ 3.14e-10\r\n"
)


@pytest.fixture(scope="session")
def gpt2_files():
    vocab, merges = GPT2_DIR / "gpt2_vocab.json", GPT2_DIR / "gpt2_merges.txt"
    if not (vocab.exists() and merges.exists()):
        pytest.skip(f"GPT-2 files not found at {GPT2_DIR} (expected gpt2_vocab.json and gpt2_merges.txt)")
    return vocab, merges


@pytest.fixture(scope="session")
def gpt2(gpt2_files):
    from lmforge.tokenizer.formats import load_gpt2

    return load_gpt2(*gpt2_files)


@pytest.fixture(scope="session")
def prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)[:40])


@pytest.fixture(scope="session")
def code() -> str:
    import json
    import textwrap

    return Path(json.__file__).read_text() + Path(textwrap.__file__).read_text()


@pytest.fixture(scope="session")
def small_tokenizer(code, prose):
    """A 600-token tokenizer trained in-process on a little code and prose."""
    from lmforge.tokenizer import train_bpe

    return train_bpe([code, prose[:50_000], MULTILINGUAL], 600, special_tokens=["<|endoftext|>", "<|pad|>"],
                     workers=1)
