"""HTML → text: resiliparse (default, fast, main-content detection) or trafilatura (alternative).

Documents whose `meta["content_type"]` is `text/html` (set by the WARC and HTML readers) are
converted; other documents pass through unchanged. A page with no extractable text is dropped with
reason `empty`. Encoding detection happens when bytes are read (`readers.decode_html`), not here.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from lmforge.data.pipeline import Filter, register
from lmforge.data.sources import Document
from lmforge.errors import require


def html_to_text(html: str, engine: str = "resiliparse", main_content: bool = True) -> str:
    """Visible text of an HTML page; with main_content, navigation/boilerplate is removed."""
    if engine == "resiliparse":
        h2t = require("resiliparse.extract.html2text", "HTML extraction with resiliparse", extra="data",
                      package="resiliparse")
        return h2t.extract_plain_text(html, main_content=main_content, alt_texts=False,
                                      links=False, list_bullets=True, preserve_formatting=True).strip()
    if engine == "trafilatura":
        traf = require("trafilatura", "HTML extraction with trafilatura", extra="data")
        return (traf.extract(html, include_comments=False, favor_precision=main_content) or "").strip()
    raise ValueError(f"unknown extraction engine {engine!r}")


@register("extract")
class Extract(Filter):
    """Replace HTML documents' text with their extracted text."""

    @dataclasses.dataclass
    class Config:
        engine: Literal["resiliparse", "trafilatura"] = "resiliparse"
        main_content: bool = True

    def __init__(self, cfg=None, label=None):
        super().__init__(cfg, label)
        html_to_text("<p>x</p>", self.cfg.engine)  # fail at construction if the engine is missing

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.meta.get("content_type") != "text/html":
            return True
        text = html_to_text(doc.text, self.cfg.engine, self.cfg.main_content)
        if not text:
            return False, "empty"
        doc.text = text
        doc.meta["content_type"] = "text/plain"
        return True
