"""Intrinsic metrics over a corpus: loss (nats/token), perplexity and bits-per-byte, overall and per
domain.

Each document is scored on its own as [EOT] + tokens(text): the first token is predicted from the
document separator, as in training, and nothing leaks from the previous document. Documents longer
than the model's context are scored with sliding windows (loglik.rolling_logprobs), so every token
is counted exactly once with up to a context of history.

Bits-per-byte = total nats / (ln 2 · UTF-8 bytes of the texts), the same definition as the
trainer's validation metric (eval does not import train, per DESIGN.md's stage order): it does not
depend on the tokenizer, so models with different vocabularies compare. Tokenization uses `encode_ordinary` (a special-token string in a
document is ordinary text), so the token bytes add up to the text's bytes.

Per-domain breakdown groups documents by `Document.source` (the file they came from) or by a
metadata field (`group_by="meta.domain"` for a JSONL `domain` column).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lmforge.data.sources import Document
from lmforge.errors import ConfigError
from lmforge.eval.loglik import rolling_logprobs


def encode_document(tokenizer, text: str) -> list[int]:
    if tokenizer.eot_id is None:
        raise ConfigError("the tokenizer has no end-of-text token to start documents with")
    encode = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    return [tokenizer.eot_id] + list(encode(text))


def _group(doc: Document, group_by: str | None) -> str | None:
    if group_by is None:
        return None
    if group_by == "source":
        return str(doc.source)
    if group_by.startswith("meta."):
        return str(doc.meta.get(group_by[5:], ""))
    raise ConfigError(f"group_by must be 'source' or 'meta.<field>', got {group_by!r}")


def _summary(nats: float, tokens: int, n_bytes: int, documents: int) -> dict:
    loss = nats / tokens if tokens else float("nan")
    return {"documents": documents, "tokens": tokens, "bytes": n_bytes, "nats": nats, "loss": loss,
            "perplexity": math.exp(loss) if tokens else float("nan"),
            "bits_per_byte": nats / (math.log(2) * n_bytes) if n_bytes else float("nan")}


def evaluate_corpus(model, tokenizer, documents: Iterable[Document], *, stride: int | None = None,
                    batch_size: int = 8, max_documents: int | None = None, group_by: str | None = "source",
                    chunk_documents: int = 64) -> dict:
    """Loss / perplexity / bits-per-byte of `model` on `documents` (e.g. a `Corpus`), with a
    `by_group` breakdown (see the module docstring). Empty documents are skipped."""
    totals = {"nats": 0.0, "tokens": 0, "bytes": 0, "documents": 0}
    groups: dict[str, dict] = {}

    def flush(batch: list[tuple[Document, list[int]]]) -> None:
        lps = rolling_logprobs(model, [ids for _, ids in batch], stride=stride, batch_size=batch_size)
        for (doc, ids), lp in zip(batch, lps):
            n_bytes = len(doc.text.encode("utf-8"))
            for acc in [totals] + ([groups.setdefault(g, dict.fromkeys(totals, 0))]
                                   if (g := _group(doc, group_by)) is not None else []):
                acc["nats"] -= float(lp.sum())
                acc["tokens"] += len(ids) - 1
                acc["bytes"] += n_bytes
                acc["documents"] += 1

    batch: list[tuple[Document, list[int]]] = []
    seen = 0
    for doc in documents:
        if max_documents is not None and seen >= max_documents:
            break
        if not doc.text:
            continue
        seen += 1
        batch.append((doc, encode_document(tokenizer, doc.text)))
        if len(batch) >= chunk_documents:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if totals["documents"] == 0:
        raise ConfigError("the corpus has no non-empty documents to evaluate")
    out = _summary(totals["nats"], totals["tokens"], totals["bytes"], totals["documents"])
    out["by_group"] = {g: _summary(a["nats"], a["tokens"], a["bytes"], a["documents"])
                       for g, a in sorted(groups.items())}
    return out
