"""Generative tasks: generate with the inference engine, extract an answer, check it, and spend
test-time compute with k samples (pass@k, majority voting).

- Extraction: `extract_number` (GSM8K-style: the last number in the text, commas and a trailing
  period removed, "#### 42" gold answers too), `extract_letter` (a multiple-choice letter),
  `normalize_text` (SQuAD-style exact match: lowercase, no punctuation/articles/extra spaces).
- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. 2021 (Codex),
  1 - C(n-c, k) / C(n, k), computed as a stable product.
- `majority_vote`: the most common extracted answer (self-consistency, Wang et al. 2022); ties go
  to the answer seen first; None (nothing extracted) never wins.
- `evaluate_generative(engine, tokenizer, items, ...)`: one request of n samples per item through
  `Engine.generate` (continuous batching, a shared prefill per item), stop strings, then accuracy
  of the first sample, pass@k for each k <= n and maj@n.

Tasks are `GenItem(prompt, answer)`; `load_gsm8k` reads GSM8K JSONL (question, answer with
"#### N") into the harness's "Question: ..\\nAnswer:" prompt, with few-shot examples.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import ConfigError, DataError
from lmforge.eval.tasks import LETTERS, read_records

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def canonical_number(s: str) -> str | None:
    """'1,234.50' -> '1234.5', '-0.0' -> '0', '$7' -> '7'; None if `s` is not a number."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def extract_number(text: str) -> str | None:
    """The last number in `text` in canonical form; after a GSM8K '####' marker, the number there."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    for raw in reversed(found):
        raw = raw.rstrip(",")
        # "1,2,3" lists: a comma is a thousands separator only before exactly three digits
        if "," in raw and not re.fullmatch(r"-?\$?\d{1,3}(,\d{3})+(\.\d+)?", raw):
            raw = raw.split(",")[-1]
        value = canonical_number(raw)
        if value is not None:
            return value
    return None


def extract_letter(text: str, n_choices: int = 4) -> str | None:
    """The answer letter: after 'answer is', in '(B)', or a standalone letter at the start."""
    letters = LETTERS[:n_choices]
    for pattern in (rf"answer\s*(?:is|:)\s*\(?([{letters}])\b", rf"\(([{letters}])\)", rf"^\s*([{letters}])\b"):
        m = re.search(pattern, text, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        if m:
            return m.group(1).upper()
    return None


def normalize_text(s: str) -> str:
    s = re.sub(r"[^\w\s]", "", s.lower())
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


EXTRACTORS = {"number": extract_number, "letter": extract_letter, "exact": normalize_text}


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def majority_vote(answers: list[str | None]) -> str | None:
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


@dataclass
class GenItem:
    prompt: str
    answer: str  # the gold answer, already in the extractor's canonical form


def load_gsm8k(path: str | Path, num_fewshot: int = 0, fewshot_path: str | Path | None = None) -> list[GenItem]:
    """GSM8K JSONL/Parquet (question, answer '... #### N') -> items; the first `num_fewshot` rows of
    `fewshot_path` (default: of the file itself, then left out) become worked examples."""
    rows = read_records(path)
    for i, r in enumerate(rows):
        if "question" not in r or "answer" not in r or "####" not in str(r["answer"]):
            raise DataError(f"{path}: row {i} needs 'question' and an 'answer' containing '#### N'")
    shots = read_records(fewshot_path)[:num_fewshot] if fewshot_path else rows[:num_fewshot]
    if not fewshot_path:
        rows = rows[num_fewshot:]
    head = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return [GenItem(f"{head}Question: {r['question']}\nAnswer:", extract_number(r["answer"])) for r in rows]


GSM8K_STOP = ["Question:", "\n\n"]


def load_gen(path: str | Path, extractor: str) -> list[GenItem]:
    """Generic generative task rows {prompt, answer}; the gold answer is put in the extractor's form."""
    if extractor not in EXTRACTORS:
        raise ConfigError(f"unknown extractor {extractor!r} (expected one of {sorted(EXTRACTORS)})")
    items = []
    for i, r in enumerate(read_records(path)):
        if "prompt" not in r or "answer" not in r:
            raise DataError(f"{path}: row {i} needs 'prompt' and 'answer'")
        gold = str(r["answer"])
        gold = gold if extractor == "exact" else EXTRACTORS[extractor](gold)  # exact: normalised later
        if gold is None:
            raise DataError(f"{path}: row {i}: no {extractor} answer in {r['answer']!r}")
        items.append(GenItem(str(r["prompt"]), gold))
    return items


def evaluate_generative(engine, tokenizer, items: list[GenItem], *, extractor: str = "number", n: int = 1,
                        temperature: float = 0.0, top_p: float | None = None, max_tokens: int = 256,
                        stop: list[str] | None = None, seed: int = 0, ks: list[int] | None = None) -> dict:
    """Generate n samples per item and score them (see the module docstring)."""
    from lmforge.inference.sampling import SamplingParams

    if extractor not in EXTRACTORS:
        raise ConfigError(f"unknown extractor {extractor!r} (expected one of {sorted(EXTRACTORS)})")
    if n > 1 and temperature == 0:
        raise ConfigError("n > 1 samples with temperature 0 would all be the same; set temperature > 0")
    extract = EXTRACTORS[extractor]
    encode = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    # A prompt too long for the cache keeps its end (the question), leaving room for the answer.
    keep = engine.max_len - min(max_tokens, engine.max_len // 2)
    prompts = [([tokenizer.eot_id] + encode(it.prompt))[-keep:] for it in items]
    params = [SamplingParams(max_tokens=max(1, min(max_tokens, engine.max_len - len(p))), temperature=temperature,
                             top_p=top_p, n=n, stop=list(stop or []), seed=seed + i) for i, p in enumerate(prompts)]
    outs = engine.generate(prompts, params)
    ks = sorted({k for k in (ks or [1, n]) if 1 <= k <= n})
    first = majority = 0
    pass_sums = dict.fromkeys(ks, 0.0)
    details = []
    for item, samples in zip(items, outs):
        gold = extract(item.answer) if extractor == "exact" else item.answer
        answers = [extract(s.text) for s in samples]
        correct = [a is not None and a == gold for a in answers]
        vote = majority_vote(answers)
        first += correct[0]
        majority += vote is not None and vote == gold
        for k in ks:
            pass_sums[k] += pass_at_k(n, sum(correct), k)
        details.append({"gold": gold, "answers": answers, "texts": [s.text for s in samples], "vote": vote})
    m = len(items)
    out = {"accuracy": first / m, **{f"pass@{k}": v / m for k, v in pass_sums.items()},
           f"maj@{n}": majority / m, "n": m, "samples": n}
    out["items"] = details
    return out
