"""Streaming text from token ids without decoding the whole reply at every step."""

from __future__ import annotations

from typing import Any


def decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of generated ids, as a reply's text is made (special tokens left out)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDecoder:
    """Turns token ids into text deltas; holds back a delta while it ends in a partial UTF-8 character."""

    def __init__(self, tokenizer: Any, ids: list[int] | tuple[int, ...] = ()):
        """`ids`: a text already shown, that the new tokens continue."""
        self._tokenizer = tokenizer
        self.ids: list[int] = list(ids)
        self._read = len(self.ids)  # ids before this have been emitted
        self._prefix = max(0, self._read - 4)  # start of the window decoded for context (word-joining spaces)

    def _decode(self, ids: list[int]) -> str:
        return decode(self._tokenizer, ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        seen = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(seen) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(seen):]

    def flush(self) -> str:
        """Text still held back at the end of the reply."""
        seen = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(seen):] if len(text) > len(seen) else ""

    def text(self) -> str:
        """The whole reply so far."""
        return self._decode(self.ids)
