"""Byte-level BPE tokenizer: train, encode/decode/stream, special tokens, save/load, interop.

Public API: `Tokenizer`, `train_bpe`, `load_tokenizer` (and `save_tokenizer`). Formats and interop
(GPT-2 files, Hugging Face tokenizer.json, tiktoken ranks) are in `formats.py`. This package imports
no model code.
"""

from lmforge.tokenizer.formats import load_tokenizer, save_tokenizer
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe

__all__ = ["Tokenizer", "train_bpe", "load_tokenizer", "save_tokenizer"]
