"""Evaluation: intrinsic metrics (loss, perplexity, bits-per-byte), multiple-choice and generative
tasks, LM-as-a-judge, and the lm-evaluation-harness bridge. See docs/eval.md.

`eval` imports `train`, `inference`, `model`, `tokenizer` and `data`; nothing below it imports `eval`.
"""

from lmforge.eval.intrinsic import evaluate_corpus
from lmforge.eval.loglik import Score, rolling_logprobs, score_continuations

__all__ = ["Score", "evaluate_corpus", "rolling_logprobs", "score_continuations"]
