"""Text that kvchat did not write (replies, transcripts, file names, error details), made safe for a terminal."""

from __future__ import annotations

import re

# C0 controls but newline and tab, DEL, the C1 controls (0x9b alone starts an escape sequence on many terminals),
# and the bidirectional embeddings, overrides and isolates, which reorder what follows them on the line (text that
# reads differently from what it holds, as in "Trojan Source").
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f\u202a-\u202e\u2066-\u2069]")


def _show(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)  # caret notation, as `cat -v`: ESC is ^[
    return "^?" if code == 0x7F else f"<U+{code:04X}>"


def visible(text: str) -> str:
    """`text` with every control character that could move the cursor, recolour or retitle the terminal shown
    as a visible sequence instead (newlines and tabs stay)."""
    return _CONTROL.sub(_show, str(text))


def wrap(text: str, width: int | None, indent: str = "  ") -> str:
    """`text` broken between words to fit `width` columns (None: as it is); continuation lines indented."""
    if not width or len(text) <= width:
        return text
    import textwrap

    return "\n".join(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False,
                                   break_on_hyphens=False) for line in text.split("\n"))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
