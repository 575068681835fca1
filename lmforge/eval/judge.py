"""LM-as-a-judge: pairwise comparison of two models' answers by a judge model behind any
OpenAI-compatible chat endpoint (`lmforge serve`, vLLM, a hosted API).

Each question is judged twice, with the answers in both orders, to cancel the judge's position
bias (Zheng et al. 2023, MT-bench): a model wins a question only if it wins in both orders; a split
decision, a tie or an unreadable verdict counts as a tie. Scores are win 1, tie 0.5, loss 0; the
win rate of model A is their mean, with a percentile-bootstrap confidence interval over questions
(seeded). The report also gives how often the judge picked the first-shown answer and how often its
two verdicts agreed, which show how much bias the swap removed.

Verdicts are read as MT-bench formats them: "[[A]]", "[[B]]" or "[[C]]" (tie); failing that, a
lone "A"/"B" at the start of the reply. `answer_with_engine` produces a model's answers through
the chat template (what `lmforge eval PATH --tasks judge=FILE` compares against FILE's answers).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmforge.errors import ConfigError, LMForgeError

JUDGE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Avoid any position biases and do not let the "
    "length of the responses or the order in which they were presented influence your decision. "
    'After your explanation, output your final verdict strictly in this format: "[[A]]" if '
    'assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.\n\n'
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie', or None when the reply holds no verdict."""
    m = re.search(r"\[\[([ABC])\]\]", text)
    if m:
        return {"A": "A", "B": "B", "C": "tie"}[m.group(1)]
    m = re.match(r"\s*(?:\*\*)?([AB])(?:\*\*)?\b", text)
    if m:
        return m.group(1)
    return "tie" if re.match(r"\s*tie\b", text, re.IGNORECASE) else None


class ChatJudge:
    """Ask a judge model through POST {base_url}/chat/completions (OpenAI format) at temperature 0.
    `http` may be any httpx-compatible client (e.g. FastAPI's TestClient for an in-process server)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_tokens: int = 512,
                 template: str = JUDGE_TEMPLATE, http=None, timeout: float = 120.0):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens, self.template = model, max_tokens, template
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(timeout=timeout)

    def prompt(self, question: str, answer_a: str, answer_b: str) -> str:
        return self.template.format(question=question, answer_a=answer_a, answer_b=answer_b)

    def __call__(self, question: str, answer_a: str, answer_b: str) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": self.prompt(question, answer_a, answer_b)}]}
        r = self.http.post(self.url, json=body, headers=self.headers)
        if r.status_code != 200:
            raise LMForgeError(f"judge endpoint {self.url} answered {r.status_code}: {r.text[:200]}")
        return r.json()["choices"][0]["message"]["content"]


@dataclass
class PairItem:
    question: str
    answer_a: str  # model A's answer
    answer_b: str  # model B's answer


def bootstrap_ci(scores: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores`."""
    if len(scores) == 0:
        raise ConfigError("no scores to bootstrap")
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def pairwise_compare(items: list[PairItem], judge: Callable[[str, str, str], str], *, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Judge every item in both orders; win rate of model A with a bootstrap CI (module docstring)."""
    if not items:
        raise ConfigError("no items to judge")
    scores, details, first_picked, agree, invalid = [], [], 0, 0, 0
    for it in items:
        raw1 = judge(it.question, it.answer_a, it.answer_b)  # A shown first
        raw2 = judge(it.question, it.answer_b, it.answer_a)  # B shown first
        v1, v2 = parse_verdict(raw1), parse_verdict(raw2)
        invalid += (v1 is None) + (v2 is None)
        first_picked += (v1 == "A") + (v2 == "A")
        # in model terms: which model did each verdict favour
        m1 = {"A": "a", "B": "b"}.get(v1 or "", "tie")
        m2 = {"A": "b", "B": "a"}.get(v2 or "", "tie")
        agree += m1 == m2
        outcome = m1 if m1 == m2 else "tie"
        scores.append({"a": 1.0, "tie": 0.5, "b": 0.0}[outcome])
        details.append({"verdicts": [v1, v2], "outcome": outcome, "replies": [raw1, raw2]})
    s = np.array(scores)
    lo, hi = bootstrap_ci(s, confidence, seed=seed)
    n = len(items)
    return {"win_rate": float(s.mean()), "ci_low": lo, "ci_high": hi, "confidence": confidence,
            "wins": int((s == 1).sum()), "ties": int((s == 0.5).sum()), "losses": int((s == 0).sum()),
            "first_position_rate": first_picked / (2 * n), "consistency": agree / n,
            "invalid_verdicts": invalid, "n": n, "items": details}


def answer_with_engine(engine, tokenizer, questions: list[str], max_tokens: int = 256) -> list[str]:
    """Greedy chat replies of the engine's model to each question."""
    from lmforge.inference.chat import apply_chat_template
    from lmforge.inference.sampling import SamplingParams

    prompts, params = [], []
    for q in questions:
        cp = apply_chat_template([{"role": "user", "content": q}], tokenizer)
        prompts.append(cp.ids)
        budget = max(1, min(max_tokens, engine.max_len - len(cp.ids)))
        params.append(SamplingParams(max_tokens=budget, temperature=0, stop=cp.stop, stop_ids=cp.stop_ids))
    return [out[0].text for out in engine.generate(prompts, params)]
