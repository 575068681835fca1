"""Evaluation: intrinsic metrics (loss, perplexity, bits-per-byte), multiple-choice and generative
tasks, LM-as-a-judge, and the lm-evaluation-harness bridge (eval/harness.py, imported on demand).
See docs/eval.md.

`eval` imports `train`, `inference`, `model`, `tokenizer` and `data`; nothing below it imports `eval`.
Exports are lazy, so building the CLI does not import torch.
"""

from lmforge.lazy import lazy_exports

_EXPORTS = {
    "ChatJudge": "judge", "PairItem": "judge", "pairwise_compare": "judge",
    "GenItem": "generative", "evaluate_generative": "generative", "extract_number": "generative",
    "load_gsm8k": "generative", "pass_at_k": "generative",
    "evaluate_corpus": "intrinsic",
    "Score": "loglik", "rolling_logprobs": "loglik", "score_continuations": "loglik",
    "MCItem": "tasks", "evaluate_mc": "tasks", "load_mc": "tasks",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
