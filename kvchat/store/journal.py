"""A session's turn journal: the reply in progress, each piece written before it reaches the terminal, so that a
process killed between printing a reply and saving it loses nothing its user saw. Never imports torch.

NAME.journal, beside NAME.json: one JSON header line (the transcript before the turn, unless it is the manifest's,
the messages the turn adds to it, and the `updated` time of the manifest it follows), then one line per piece
of the reply; each line is `[crc32, value]`, so damage is
found: a damaged header voids the journal, a damaged piece ends the reply there. It is written without fsync: it
outlives the process, not the machine. The session's next successful save removes it; a resume that finds one
following the manifest it reads takes the reply from it (as far as it was printed).
"""

from __future__ import annotations

import json
import os
import secrets
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvchat.store import kvfile
from kvchat.store.manifests import parse_messages

VERSION = 1
MAX_BYTES = 64 * 1024 * 1024  # a journal larger than this is not one kvchat wrote


@dataclass
class JournalTurn:
    """A turn as journaled: the transcript before it, the transcript it is made of (ending with the user's
    message, or with the reply it continues), which of their messages the model sees, and the reply text
    printed so far."""

    follows: float | None  # the `updated` time of the manifest the turn came after; None: there was none
    before: list[dict[str, Any]]
    before_first_kept: int
    messages: list[dict[str, Any]]
    first_kept: int
    continuing: bool
    text: str = ""
    pieces: list[str] = field(default_factory=list, repr=False)
    before_saved: bool = False  # `before` is the manifest's transcript: the header does not repeat it

    def header(self) -> bytes:
        """The header line: what the turn adds to the transcript before it, not the whole of it again (a turn's
        start costs the same at turn 50 as at turn 1 when the last save holds the transcript)."""
        kept = 0
        for old, new in zip(self.before, self.messages):
            if old is not new and old != new:
                break
            kept += 1
        return _line({"kvchat_journal": VERSION, "follows": self.follows,
                      "before": None if self.before_saved else self.before,
                      "before_first_kept": self.before_first_kept, "kept": kept, "added": self.messages[kept:],
                      "first_kept": self.first_kept, "continuing": self.continuing})

    @classmethod
    def parse(cls, data: bytes, saved: list[dict[str, Any]] | None) -> "JournalTurn":
        """The turn in a journal file's bytes, given the manifest's transcript (`saved`, None without one);
        ValueError when it is not one. A last line cut short (the process was killed while writing it) is left
        out."""
        lines = data.split(b"\n")
        if len(lines) < 2:
            raise ValueError("the journal has no header")
        head = _value(lines[0])
        if not isinstance(head, dict) or head.get("kvchat_journal") != VERSION:
            raise ValueError("the journal has no header")
        follows, first_kept, before_kept = head.get("follows"), head.get("first_kept"), head.get("before_first_kept")
        if head.get("before") is None and saved is None:
            raise ValueError("the journal follows a transcript that is not there")
        before = saved if head.get("before") is None else parse_messages(head.get("before"))
        kept = head.get("kept")
        if type(kept) is not int or not 0 <= kept <= len(before):
            raise ValueError("the journal's header is damaged")
        messages = [*before[:kept], *parse_messages(head.get("added"))]
        if not (follows is None or type(follows) in (int, float)) or type(first_kept) is not int or \
                not 0 <= first_kept <= len(messages) or type(before_kept) is not int or \
                not 0 <= before_kept <= len(before) or type(head.get("continuing")) is not bool:
            raise ValueError("the journal's header is damaged")
        continuing = head["continuing"]
        if not messages or messages[-1]["role"] != ("assistant" if continuing else "user"):
            raise ValueError("the journal's transcript does not end as its turn needs")
        pieces = []
        for line in lines[1:-1]:  # the last is empty when the last line was written whole
            try:
                piece = _value(line)
            except ValueError:
                break  # damaged from here on: the reply as far as it is intact
            if not isinstance(piece, str):
                break
            pieces.append(piece)
        return cls(follows, before, before_kept, messages, first_kept, continuing, "".join(pieces), pieces)

    def transcript(self) -> tuple[list[dict[str, Any]], int]:
        """The transcript as shown when the journal ends, and its first message the model sees: with the reply as
        far as it was printed (without token ids: it is read again), or as before the turn when none was."""
        if not self.text:
            return self.before, self.before_first_kept
        if self.continuing:
            last = self.messages[-1]
            return [*self.messages[:-1], {"role": "assistant", "content": last["content"] + self.text}], \
                self.first_kept
        return [*self.messages, {"role": "assistant", "content": self.text}], self.first_kept


class Journal:
    """The journal of one running turn, open for appending its reply's pieces."""

    def __init__(self, path: Path, turn: JournalTurn):
        """Replace the journal at `path` (atomically: the one before stays whole until this one has its header)
        with `turn`'s."""
        self.path = path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")  # (see catalog.LEFTOVER)
        self._fd: int | None = kvfile.open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        try:
            self._write(turn.header())
            os.replace(tmp, path)  # (no fsync: a journal is for a process that dies, not a machine)
        except BaseException:
            self.close()
            tmp.unlink(missing_ok=True)
            raise

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "the journal is closed"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def add(self, text: str) -> None:
        """Append a piece of the reply (before it is shown)."""
        if text:
            self._write(_line(text))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _line(value: Any) -> bytes:
    body = json.dumps(value)
    return (json.dumps([zlib.crc32(body.encode()), value]) + "\n").encode()


def _value(line: bytes) -> Any:
    """The value of a journal line; ValueError when the line is damaged."""
    try:
        crc, value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, TypeError) as exc:
        raise ValueError("a damaged journal line") from exc
    if crc != zlib.crc32(json.dumps(value).encode()):
        raise ValueError("a journal line fails its checksum")
    return value


def read_journal(path: Path, saved: list[dict[str, Any]] | None) -> JournalTurn | None:
    """The journaled turn at `path` (see `JournalTurn.parse` for `saved`); None when there is none, or none that
    can be read (never used then)."""
    try:
        fd = kvfile.open_regular(path)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        return None
    try:
        return JournalTurn.parse(data, saved)
    except (ValueError, UnicodeDecodeError):
        return None
