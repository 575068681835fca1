"""Evaluation: intrinsic metrics (loss, perplexity, bits-per-byte), multiple-choice and generative
tasks, LM-as-a-judge, and the lm-evaluation-harness bridge. See docs/eval.md.

`eval` imports `train`, `inference`, `model`, `tokenizer` and `data`; nothing below it imports `eval`.
"""

from lmforge.eval.generative import GenItem, evaluate_generative, extract_number, load_gsm8k, pass_at_k
from lmforge.eval.intrinsic import evaluate_corpus
from lmforge.eval.judge import ChatJudge, PairItem, pairwise_compare
from lmforge.eval.loglik import Score, rolling_logprobs, score_continuations
from lmforge.eval.tasks import MCItem, evaluate_mc, load_mc

__all__ = ["ChatJudge", "GenItem", "MCItem", "PairItem", "Score", "evaluate_corpus", "evaluate_generative",
           "evaluate_mc", "extract_number", "load_gsm8k", "load_mc", "pairwise_compare", "pass_at_k",
           "rolling_logprobs", "score_continuations"]
