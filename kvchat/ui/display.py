"""How the REPL draws what is not plain text: replies wrapped between words, the prefill progress line.

Only the REPL uses it; nothing here reads input.
"""

from __future__ import annotations

import contextlib
import os
import termios
import time
from typing import Any, Iterator, TextIO

from prompt_toolkit.utils import get_cwidth


class WrappingWriter:
    """Streams text to a terminal, breaking lines between words and measuring wide characters as two columns."""

    def __init__(self, out: TextIO, width: int | None):
        self.out, self.width = out, width
        self.column = 0
        self.pending = ""  # a word that may continue in the next piece
        self.spaces = ""  # blanks after the last word, dropped if the line breaks there
        self.wrapped = False  # the current line was started by a wrap, not by the text's own newline

    def write(self, text: str) -> None:
        if not self.width:
            self.out.write(text)
            self.out.flush()
            if text:
                self.column = 0 if text.endswith("\n") else self.column + len(text)
            return
        self.pending += text
        *complete, self.pending = self._split(self.pending)
        for piece in complete:
            self._emit(piece)
        self.out.flush()

    @staticmethod
    def _split(text: str) -> list[str]:
        """Words and separators (spaces, newlines) in order; the last item is the unfinished word (maybe '')."""
        pieces, word = [], ""
        for char in text:
            if char in " \n\t":
                if word:
                    pieces.append(word)
                pieces.append(char)
                word = ""
            else:
                word += char
        return pieces + [word]

    def _emit(self, piece: str) -> None:
        if piece == "\n":
            self.out.write(self.spaces.rstrip(" \t") + "\n")
            self.column, self.spaces, self.wrapped = 0, "", False
            return
        if piece in (" ", "\t"):
            self.spaces += piece  # written only if a word follows on the same line
            return
        width = sum(get_cwidth(c) for c in piece)
        if self.column and self.column + len(self.spaces) + width > self.width:
            self.out.write("\n")
            self.column, self.wrapped = 0, True
        elif self.column or not self.wrapped:  # between words, or indentation at the start of a real line
            self.out.write(self.spaces)
            self.column += len(self.spaces)
        self.spaces = ""
        while self.column + width > self.width:  # a word longer than the line: hard-break it
            head, used = "", 0
            for char in piece:
                if self.column + used + get_cwidth(char) > self.width:
                    break
                head += char
                used += get_cwidth(char)
            self.out.write(head + "\n")
            piece, width, self.column, self.wrapped = piece[len(head):], width - used, 0, True
        self.out.write(piece)
        self.column += width

    def finish(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = ""
        if self.column:
            self.out.write("\n")
        self.column, self.spaces = 0, ""
        self.out.flush()


def _terminal_console(out: TextIO, width: int | None, color: bool) -> Any:
    """A rich console that draws on `out` as on a terminal; without `color` (NO_COLOR) it moves the cursor
    but writes no colours."""
    from rich.console import Console

    return Console(file=out, force_terminal=True, width=width, highlight=False,
                   color_system="auto" if color else None)


class PrefillProgress:
    """While a turn has not produced its first token: after `delay` seconds, one transient line with the tokens
    of the prompt read so far, of how many, the rate, and how to stop (rich's progress bar)."""

    def __init__(self, out: TextIO, delay: float = 0.5, width: int | None = None, color: bool = True):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        began = time.monotonic()

        class Delayed(Progress):
            def get_renderables(self):
                if time.monotonic() - began >= delay:
                    yield from super().get_renderables()

        self._progress = Delayed(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("tokens · {task.fields[rate]} · "), TimeElapsedColumn(), TextColumn("· Ctrl-C stops"),
            console=_terminal_console(out, width, color), transient=True, refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)
        self._task = self._progress.add_task("reading the prompt", total=None, rate="")
        self._progress.start()
        self.running = True

    def update(self, done: int, total: int, elapsed_s: float) -> None:
        """After a forward pass of the prefill: `done` of `total` prompt tokens, in `elapsed_s`."""
        rate = f"{done / elapsed_s:,.0f} tok/s" if elapsed_s > 0 else ""
        self._progress.update(self._task, completed=done, total=total, rate=rate, refresh=True)

    def stop(self) -> None:
        """Remove the line (before the reply's first token is written)."""
        self._progress.stop()
        self.running = False


class LoadProgress:
    """A model's loading on stderr: in a terminal, one transient rich progress line (steps, elapsed time);
    elsewhere a line per phase. Called as the `progress` of `model.load_model`."""

    def __init__(self, stream: TextIO):
        self.stream, self.last = stream, None
        self._progress = self._task = None
        if stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16),
                                      TimeElapsedColumn(), console=Console(file=stream, highlight=False),
                                      transient=True, redirect_stdout=False, redirect_stderr=False)
            self._task = self._progress.add_task("loading", total=None)
            self._progress.start()

    def __call__(self, what: str, step: int, steps: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=what, completed=step, total=steps, refresh=True)
        elif what != self.last and steps > 1:  # scripts see the one-time conversion, not every load
            self.stream.write(f"kvchat: {what}\n")
            self.stream.flush()
        self.last = what

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


COLLAPSE_ROWS = 12  # a message taller than this (in terminal rows) is shown collapsed
SHOWN_ROWS = 6  # how many rows of it stay


def collapse(text: str, width: int) -> str:
    """`text` as it stays on screen once sent: whole when it is short, else its first rows and a marker
    saying how much more there is (the model gets all of it)."""
    width = max(width, 20)
    lines = text.split("\n")
    rows = [max(1, -(-sum(get_cwidth(c) for c in line) // width)) for line in lines]
    if sum(rows) <= COLLAPSE_ROWS:
        return text
    kept, used = [], 0
    for line, height in zip(lines, rows):
        if used + height > SHOWN_ROWS:
            if not kept:  # one very long line: its first rows
                kept.append(line[:SHOWN_ROWS * width])
            break
        kept.append(line)
        used += height
    more_lines = len(lines) - len(kept)
    shown = "\n".join(kept)
    more = (f"{more_lines:,} more line{'s' if more_lines != 1 else ''}" if more_lines else
            f"{len(text) - len(shown):,} more characters")
    return f"{shown}\n[… {more}; {len(text):,} characters sent]"


@contextlib.contextmanager
def quiet_input(stream: Any) -> Iterator[None]:
    """While a reply streams: keys typed ahead are not echoed into it (they wait, unread, for the next
    prompt), and Ctrl-C still interrupts. A no-op when `stream` is not a terminal."""
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (AttributeError, OSError, ValueError, termios.error):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)  # lflags: no echo, no line editing; ISIG stays (Ctrl-C)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class MarkdownStream:
    """A reply rendered as Markdown while it streams (rich): each finished block (up to a blank line outside a
    code fence) is printed for good; the block still being written is redrawn below it as it grows."""

    def __init__(self, out: TextIO, width: int | None, color: bool = True):
        from rich.live import Live

        self.console = _terminal_console(out, width, color)
        self._pending = ""
        self.status = ""  # a line under the reply while it streams (what the toolbar says between turns)
        # Redrawn 8 times a second by rich's thread, not once per token (a Markdown parse of the block
        # being written costs more as the block grows).
        self._live = Live(console=self.console, get_renderable=self._live_view, auto_refresh=True,
                          refresh_per_second=8, transient=True, redirect_stdout=False, redirect_stderr=False,
                          vertical_overflow="visible")
        self._started = False

    def _live_view(self) -> Any:
        from rich.console import Group
        from rich.markdown import Markdown
        from rich.text import Text

        reply = Markdown(self._pending)
        return Group(reply, Text(self.status, style="dim")) if self.status else reply

    def write(self, text: str) -> None:
        """Add reply text (already made safe with `terminal.visible`)."""
        from rich.markdown import Markdown

        self._pending += text
        done = _finished_blocks(self._pending)
        if not self._started:
            self._live.start()
            self._started = True
        if done:
            finished, self._pending = self._pending[:done], self._pending[done:]
            self._live.console.print(Markdown(finished))

    def finish(self) -> None:
        """Print what is left for good (idempotent)."""
        from rich.markdown import Markdown

        if self._started:
            self._live.stop()
            self._started = False
        if self._pending.strip():
            self.console.print(Markdown(self._pending))
        self._pending = ""


def _finished_blocks(text: str) -> int:
    """How much of `text` is whole Markdown blocks: up to its last blank line outside a code fence."""
    end, fenced, position = 0, False, 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        if not line.endswith("\n"):
            break
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and not line.strip():
            end = position
    return end
