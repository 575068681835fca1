"""Streaming detokenization with stop strings: tokens in, text pieces out, never a partial character.

`TextStream(tokenizer, stop)` receives token ids one at a time (`push(id) -> (text, stopped)`).
Byte-level BPE tokens can split a UTF-8 character, so bytes go through an incremental UTF-8
decoder that holds back an incomplete character until its last byte arrives. Text that could be
the start of a stop string is held back too, until it either completes the stop string (generation
stops; the stop string and everything after it are dropped, as in the OpenAI API) or cannot.
`finish()` returns what is still held (an unfinished character becomes U+FFFD).

This module knows nothing of models or sampling.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet emitted (may begin a stop string)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _hold_length(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token: (new text safe to emit, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        self._held += self._utf8.decode(self.tok.decode_bytes([token_id]))
        return self._emit()

    def _emit(self) -> tuple[str, bool]:
        hits = [(i, s) for s in self.stop if (i := self._held.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out, self._held, self.stopped = self._held[:cut], "", True
            self.text += out
            return out, True
        keep = self._hold_length()
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        self.text += out
        return out, False

    def finish(self) -> str:
        """Flush at the end of generation (held stop-string prefixes are real text then)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        out, self._held = self._held, ""
        self.text += out
        return out
