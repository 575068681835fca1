"""Multiple-choice tasks from local files: MMLU, HellaSwag and ARC formats, zero/few-shot prompts,
scored by continuation log-likelihood.

Files are CSV, JSONL or Parquet that the user provides (nothing is downloaded). Formats and the
prompts follow lm-evaluation-harness's default tasks:
- mmlu: columns question, A, B, C, D, answer (a letter or 0-3; a `choices` list column also works;
  a header-less CSV as in the original release is read positionally), optional subject. Prompt
  "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", choices " A".." D", few-shot header
  "The following are multiple choice questions (with answers) about {subject}.\\n\\n".
- hellaswag: activity_label, ctx_a, ctx_b (or ctx), endings, label. Query
  "{activity_label}: {ctx_a} {ctx_b.capitalize()}" cleaned of WikiHow "[title]" markup, choices
  " {ending}".
- arc: question (a string, or {"stem", "choices"} as in the original JSONL), choices
  {"text": [...], "label": [...]}, answerKey (a letter or 1-4). Prompt "Question: {q}\\nAnswer:",
  choices " {text}".
- mc: the generic form: context (or question), choices (list), gold (index).

Metrics per question (lm-eval-harness definitions): `acc` picks the choice with the highest total
log-likelihood; `acc_norm` divides it by the choice's length in characters (without the " "
delimiter, as the harness counts); we also report `acc_token` (mean per token) and `acc_byte` (per
UTF-8 byte of the same text). Every context starts with the
tokenizer's end-of-text token (how lmforge models see a document start). Context and continuation
are encoded as the harness does: trailing spaces of the context move into the continuation, the pair
is encoded as one string and split at the context's token count.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import ConfigError, DataError, LMForgeError
from lmforge.eval.loglik import score_continuations
from lmforge.io import read_jsonl

LETTERS = "ABCDEFGHIJ"


@dataclass
class MCItem:
    context: str  # the zero-shot prompt (without few-shot examples)
    choices: list[str]  # continuations, each starting with its delimiter (e.g. " A")
    gold: int
    subject: str = ""
    meta: dict = field(default_factory=dict)


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .csv / .jsonl / .json / .parquet file as dicts (a header-less CSV gets keys 0, 1, ..)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: task file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        try:
            return read_jsonl(path, what="task file")
        except LMForgeError as e:
            raise DataError(str(e)) from None
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [])
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            return []
        head = [h.strip() for h in rows[0]]
        if {"question", "context", "prompt"} & set(head):
            return [dict(zip(head, r)) for r in rows[1:]]
        return [dict(enumerate(r)) for r in rows]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported task file type {suffix!r} (expected .csv, .jsonl, .json, .parquet)")


def _need(row: dict, key, path, i):
    if key not in row:
        raise DataError(f"{path}: row {i} has no field {key!r} (fields: {sorted(map(str, row))})")
    return row[key]


def _mmlu(row, path, i) -> MCItem:
    if 0 in row:  # header-less original CSV: question, A, B, C, D, answer
        q, opts, ans, subject = row[0], [row[k] for k in range(1, 5)], row[5], ""
    else:
        q = _need(row, "question", path, i)
        opts = list(row["choices"]) if "choices" in row else [_need(row, k, path, i) for k in "ABCD"]
        ans, subject = _need(row, "answer", path, i), row.get("subject", "")
    gold = _gold(ans, len(opts), path, i)
    prompt = q.strip() + "".join(f"\n{LETTERS[k]}. {o}" for k, o in enumerate(opts)) + "\nAnswer:"
    return MCItem(prompt, [f" {LETTERS[k]}" for k in range(len(opts))], gold, str(subject).replace("_", " "))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row, path, i) -> MCItem:
    if "ctx_a" in row:
        ctx = row["ctx_a"] + " " + str(row.get("ctx_b", "")).capitalize()
    else:
        ctx = _need(row, "ctx", path, i)
    query = _hellaswag_clean(f"{row.get('activity_label', '')}: {ctx}")
    endings = [_hellaswag_clean(e) for e in _need(row, "endings", path, i)]
    return MCItem(query, [" " + e for e in endings], _gold(_need(row, "label", path, i), len(endings), path, i))


def _arc(row, path, i) -> MCItem:
    q = _need(row, "question", path, i)
    choices = row.get("choices")
    if isinstance(q, dict):  # original ARC JSONL: {"stem": ..., "choices": [{"text", "label"}]}
        choices = {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}
        q = q["stem"]
    if not isinstance(choices, dict) or "text" not in choices:
        raise DataError(f"{path}: row {i}: 'choices' must be {{'text': [...], 'label': [...]}}")
    labels = [str(x) for x in choices.get("label", LETTERS[:len(choices["text"])])]
    key = str(_need(row, "answerKey", path, i))
    if key not in labels:
        raise DataError(f"{path}: row {i}: answerKey {key!r} is not one of the labels {labels}")
    return MCItem(f"Question: {q}\nAnswer:", [" " + t for t in choices["text"]], labels.index(key))


def _generic(row, path, i) -> MCItem:
    ctx = row.get("context", row.get("question"))
    if ctx is None:
        raise DataError(f"{path}: row {i} has no 'context' or 'question' field")
    choices = _need(row, "choices", path, i)
    if isinstance(choices, str):
        choices = json.loads(choices)
    return MCItem(ctx, [" " + str(c) for c in choices], _gold(_need(row, "gold", path, i), len(choices), path, i))


def _gold(ans, n, path, i) -> int:
    s = str(ans).strip()
    if len(s) == 1 and s.upper() in LETTERS[:n]:
        return LETTERS.index(s.upper())
    if s.isdigit() and int(s) < n:
        return int(s)
    raise DataError(f"{path}: row {i}: answer {ans!r} is not a letter A-{LETTERS[n - 1]} or an index 0-{n - 1}")


FORMATS = {"mmlu": _mmlu, "hellaswag": _hellaswag, "arc": _arc, "mc": _generic}


def load_mc(path: str | Path, fmt: str) -> list[MCItem]:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown multiple-choice format {fmt!r} (expected one of {sorted(FORMATS)})")
    items = [FORMATS[fmt](row, path, i) for i, row in enumerate(read_records(path))]
    if not items:
        raise DataError(f"{path}: no rows")
    return items


def fewshot_prompt(item: MCItem, shots: list[MCItem], fmt: str) -> str:
    """The prompt with `shots` solved examples in front (each: its prompt + gold choice + blank line)."""
    head = ""
    if fmt == "mmlu":
        subject = f" about {item.subject}" if item.subject else ""
        head = f"The following are multiple choice questions (with answers){subject}.\n\n"
    return head + "".join(f"{s.context}{s.choices[s.gold]}\n\n" for s in shots) + item.context


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval-harness splits them, context after EOT."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    encode = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    whole, ctx = encode(context + continuation), encode(context)
    if whole[:len(ctx)] != ctx:  # the merge crossed the boundary: fall back to separate encoding
        return [tokenizer.eot_id] + ctx, encode(continuation)
    return [tokenizer.eot_id] + ctx, whole[len(ctx):]


def _without_delimiter(choice: str) -> str:
    """The choice as the harness measures it for acc_norm: without the leading target delimiter."""
    return choice[1:] if choice.startswith(" ") else choice


def evaluate_mc(model, tokenizer, items: list[MCItem], *, fmt: str = "mc", num_fewshot: int = 0,
                fewshot_items: list[MCItem] | None = None, seed: int = 1234, batch_size: int = 32,
                strategy: str = "auto", limit: int | None = None) -> dict:
    """Accuracy of `model` on `items` under the four normalisations (see the module docstring).
    Few-shot examples come from `fewshot_items` (a dev split) or else from the other items, drawn
    with a seeded generator. Returns the metrics and, under "items", each question's scores."""
    items = items[:limit] if limit else items
    pool = fewshot_items if fewshot_items is not None else items
    if num_fewshot and len(pool) <= num_fewshot - (fewshot_items is not None):
        raise ConfigError(f"num_fewshot = {num_fewshot} needs more examples than the {len(pool)} available")
    rng = random.Random(seed)
    requests, spans = [], []
    for item in items:
        shots = []
        if num_fewshot:
            candidates = [s for s in pool if s is not item] if fewshot_items is None else pool
            shots = rng.sample(candidates, num_fewshot)
        prompt = fewshot_prompt(item, shots, fmt)
        spans.append((len(requests), len(item.choices)))
        requests += [encode_pair(tokenizer, prompt, c) for c in item.choices]
    scores = score_continuations(model, requests, batch_size=batch_size, strategy=strategy)
    names = ("acc", "acc_norm", "acc_token", "acc_byte")
    correct = dict.fromkeys(names, 0)
    details = []
    for item, (start, n) in zip(items, spans):
        sc = scores[start:start + n]
        ll = [s.logprob for s in sc]
        texts = [_without_delimiter(c) for c in item.choices]
        norms = {"acc": ll, "acc_norm": [x / max(1, len(c)) for x, c in zip(ll, texts)],
                 "acc_token": [s.logprob / s.n_tokens for s in sc],
                 "acc_byte": [x / max(1, len(c.encode("utf-8"))) for x, c in zip(ll, texts)]}
        picks = {name: max(range(n), key=v.__getitem__) for name, v in norms.items()}
        for name in names:
            correct[name] += picks[name] == item.gold
        details.append({"gold": item.gold, "loglikelihoods": ll, "pred": picks["acc"], "pred_norm": picks["acc_norm"]})
    out = {name: correct[name] / len(items) for name in names}
    out.update(n=len(items), num_fewshot=num_fewshot, items=details)
    return out
