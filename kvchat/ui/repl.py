"""The interactive chat loop: the only module that does interactive terminal I/O."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.formatted_text import HTML
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from kvchat.config import Settings, set_sampling
from kvchat.ui.display import MarkdownStream, PrefillProgress, WrappingWriter, collapse, quiet_input
from kvchat.errors import KvchatError, one_line
from kvchat.ui.session_commands import SessionCommands
from kvchat.ui.terminal import plural, visible, wrap

if TYPE_CHECKING:  # the engine (torch) is imported once there is a model: the prompt comes up first
    from kvchat.chat.chat import Chat
    from kvchat.chat.engine import Engine, TurnStats
    from kvchat.chat.saving import Persister

# name -> (its arguments, what it does); a command without arguments refuses any
COMMANDS = {
    "/help": ("", "this list"),
    "/system": ("TEXT", "set the system prompt (empty: remove it)"),
    "/reset": ("", "start over (keeps the system prompt and its cached KV; a saved session stays as it was)"),
    "/undo": ("", "remove the last exchange (cuts the cache back; nothing is prefilled again)"),
    "/retry": ("", "regenerate the last reply (the prompt is cached: nothing is prefilled)"),
    "/continue": ("", "go on with the last reply where it stopped (only its last token is prefilled)"),
    "/save": ("[NAME]", "save as a session (NAME! replaces an existing one); autosaved after every turn from then on"),
    "/load": ("NAME", "switch to a saved session"),
    "/sessions": ("", "list saved sessions"),
    "/history": ("[N]", "show the conversation (the last N exchanges)"),
    "/fork": ("NAME", "copy this conversation to a new session (sharing its stored KV) and switch to it"),
    "/stats": ("", "this session's figures, including the time reuse saved"),
    "/set": ("KEY=VALUE", "temperature, top_p, top_k, max_new_tokens, seed (kept with a saved session)"),
    "/quit": ("", "leave (Ctrl-D works too)"),
}
KEYS = """Keys: Enter sends · Alt-Enter (or Esc then Enter) adds a newline; pasted text keeps its newlines
      Ctrl-C stops a reply, or clears the line · Ctrl-D leaves · Ctrl-R searches history · Tab completes"""
SETTABLE = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
RESUME_EXCHANGES = 2  # exchanges shown when a session is resumed or loaded
MAX_HISTORY_CHARS = 10_000  # longer inputs (pastes) are sent but not kept in the input history


class _Kept:
    """Input history that keeps what was sent (a collapsed paste's whole text, not its collapsed form), and
    nothing longer than MAX_HISTORY_CHARS."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.sent: dict[str, str] = {}  # collapsed form -> whole text, for the entry being accepted

    def append_string(self, string: str) -> None:
        string = self.sent.pop(string, string)
        if len(string) <= MAX_HISTORY_CHARS:
            super().append_string(string)


class KeptFileHistory(_Kept, FileHistory):
    pass


class KeptMemoryHistory(_Kept, InMemoryHistory):
    pass


def help_text() -> str:
    usage = {name: f"{name} {args}".strip() for name, (args, _) in COMMANDS.items()}
    width = max(len(text) for text in usage.values())
    return "\n".join([f"  {usage[name]:<{width}}  {text}" for name, (_, text) in COMMANDS.items()] + [KEYS])


class ReplCompleter(Completer):
    """Completes slash commands, session names after /load, /save and /fork, and keys after /set."""

    def __init__(self, repl: "Repl"):
        self.repl = repl

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            for name in COMMANDS:
                if name.startswith(text):
                    yield Completion(name, start_position=-len(text))
            return
        command, _, arg = text.partition(" ")
        if command in ("/load", "/save", "/fork") and self.repl.persister is not None:
            options = [row["name"] for row in self.repl.persister.store.list_sessions()]
        elif command == "/set":
            options = [f"{key}=" for key in SETTABLE]
        else:
            return
        for option in options:
            if option.startswith(arg):
                yield Completion(option, start_position=-len(arg))


MIN_SAMPLE_TOKENS = 32  # prefills shorter than this say more about a turn's fixed cost than about tokens


@dataclass
class Totals:
    """Figures summed over the turns of one conversation (they start again on /load and /reset)."""

    turns: int = 0
    reused: int = 0
    prefilled: int = 0
    generated: int = 0
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    samples: list[tuple[int, float]] = field(default_factory=list)  # (tokens prefilled, ms) of each turn

    def add(self, stats: TurnStats) -> None:
        self.turns += 1
        if stats.prefilled:
            self.samples.append((stats.prefilled, stats.prefill_ms))
        self.reused += stats.reused
        self.prefilled += stats.prefilled
        self.generated += stats.generated
        self.prefill_ms += stats.prefill_ms
        if stats.decode_tok_s > 0:
            self.decode_s += (stats.generated - 1) / stats.decode_tok_s

    @property
    def prefill_ms_per_token(self) -> float:
        return self.prefill_ms / self.prefilled if self.prefilled else 0.0

    def marginal_ms_per_token(self) -> float:
        """What one more prompt token costs to prefill, measured: the slope of prefill time against tokens
        over this conversation's prefills of MIN_SAMPLE_TOKENS or more (a turn's fixed cost left out); with
        one such size only, the rate of the largest prefill."""
        points = [(n, ms) for n, ms in self.samples if n >= MIN_SAMPLE_TOKENS] or self.samples
        if not points:
            return 0.0
        sizes = {n for n, _ in points}
        if len(sizes) < 2:
            n, ms = max(points)
            return ms / n
        mean_n = sum(n for n, _ in points) / len(points)
        mean_ms = sum(ms for _, ms in points) / len(points)
        slope = sum((n - mean_n) * (ms - mean_ms) for n, ms in points) / sum((n - mean_n) ** 2 for n, _ in points)
        if slope > 0:
            return slope
        n, ms = max(points)
        return ms / n


    def report(self, cache_tokens: int, kv_bytes: int, kv_form: str = "auto") -> list[str]:
        """The lines of /stats, for a cache of `cache_tokens` tokens in `kv_bytes` bytes kept in `kv_form`."""
        t = self
        per_token = t.marginal_ms_per_token()
        saved_s = t.reused * per_token / 1000
        form = "as computed" if kv_form == "auto" else kv_form
        return [
            f"turns {t.turns} · cache {cache_tokens} tokens · KV {kv_bytes / 1e6:.1f} MB ({form})",
            f"prompt tokens reused {t.reused}, prefilled {t.prefilled}"
            + (f" ({100 * t.reused / (t.reused + t.prefilled):.0f}% from the cache)" if t.reused + t.prefilled else ""),
            f"generated {t.generated} tokens"
            + (f" at {(t.generated - t.turns) / t.decode_s:.1f} tok/s" if t.decode_s > 0 else ""),
            f"prefill rate {1000 / t.prefill_ms_per_token:.0f} tok/s" if t.prefill_ms_per_token else "prefill rate -",
            f"time saved by reuse ~{saved_s:.1f} s ({t.reused} tokens not prefilled again, at {per_token:.1f} ms "
            "per prompt token as measured in this conversation's prefills)" if per_token else
            f"time saved by reuse: not measured yet ({t.reused} tokens not prefilled again)",
        ]

class Pending:
    """What a chat needs that takes seconds to make (the model, its engine, the conversation), made in a
    background thread while the prompt is already up. `make(report)` returns (engine, conversation,
    persister, settings, notices); `report(what, step, steps)` is its progress."""

    def __init__(self, make: Callable[[Callable[[str, int, int], None]], tuple]):
        self.status = "loading the model"
        self.result: tuple | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(make,), name="kvchat-load", daemon=True)
        self._thread.start()

    def _run(self, make: Callable) -> None:
        try:
            self.result = make(self._report)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits, which raises it
            self.error = exc

    def _report(self, what: str, step: int, steps: int) -> None:
        self.status = f"{what} ({step}/{steps})" if steps > 1 else what

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> tuple:
        """The result, once made (Ctrl-C interrupts the wait, not the loading); raises what making it raised."""
        while self._thread.is_alive():
            self._thread.join(0.1)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the loading thread ended without a result"
        return self.result


def draw_reply(events, writer: WrappingWriter | MarkdownStream, progress: PrefillProgress | None, out: TextIO,
               color: bool, markdown: bool, status: Callable[[int, float], str]) -> TurnStats | None:
    """Draw a turn's events: the prefill progress line until the first token, then the reply (in the reply's
    colour when `color` and not `markdown`; a Markdown stream shows `status(tokens, rate)` below it). The turn's
    figures, or None when it did not end."""
    from kvchat.chat.engine import Prefill, Token, TurnEnd

    started, generated, began, ended = False, 0, time.perf_counter(), None
    for event in events:
        if isinstance(event, Prefill):
            if progress is not None:
                progress.update(event.done, event.total, event.elapsed_s)
            continue
        if not isinstance(event, (Token, TurnEnd)):
            continue  # (a turn's start)
        if not started:  # the first token: the progress line goes, the reply's colour starts
            started = True
            if progress is not None and progress.running:
                progress.stop()
            if color and not markdown:
                out.write("\x1b[36m")
        if isinstance(event, Token):
            if isinstance(writer, MarkdownStream):  # the toolbar's place while the reply streams
                generated += 1
                writer.status = status(generated, generated / max(time.perf_counter() - began, 1e-6))
            writer.write(visible(event.text))
        elif isinstance(event, TurnEnd):
            writer.finish()
            if color:
                out.write("\x1b[0m")
            ended = event.stats
    return ended


class Repl:
    """Reads messages at a prompt and streams the replies; Ctrl-C interrupts, Ctrl-D or /quit exits.

    With `pending` (and no chat yet) the prompt is up while the model loads; the first message or command that
    needs it waits for it."""

    def __init__(self, chat: Chat | None, settings: Settings, persister: Persister | None = None, input: Any = None, output: Any = None,
                 out: TextIO | None = None, history_path: str | None = None, width: int | None = None,
                 terminal: bool | None = None, pending: Pending | None = None):
        assert (chat is None) == (pending is not None), "a REPL needs a chat or a pending one"
        self.chat = chat
        self.settings = settings
        self.persister = persister
        self.pending = pending
        self.out = out or sys.stdout
        self.terminal = self.out.isatty() if terminal is None else terminal  # live progress and colour
        self.color = self.terminal and not os.environ.get("NO_COLOR")
        self.markdown = self.color and not settings.plain  # replies rendered as Markdown, else raw text
        if width is None and self.out.isatty():
            width = os.get_terminal_size(self.out.fileno()).columns
        self.progress_delay = 0.5  # seconds before a turn without a token shows its progress line
        self.width = width
        self.last: TurnStats | None = None
        self.totals = Totals()
        self.history = KeptFileHistory(history_path) if history_path else KeptMemoryHistory()
        self.sessions = SessionCommands(self)
        self._collapsed: tuple[str, str] | None = None  # (as shown, as typed) of a long message being sent
        self.session = PromptSession(
            multiline=True, key_bindings=self._keys(), completer=ReplCompleter(self),
            complete_while_typing=False, bottom_toolbar=self.toolbar, history=self.history,
            input=input, output=output, prompt_continuation=lambda width, line, soft: "." * (width - 1) + " ",
            refresh_interval=0.5 if pending is not None else 0,  # the toolbar follows the loading
        )

    @property
    def engine(self) -> Engine:
        return self.chat.engine

    @property
    def conv(self) -> Any:
        """The chat's transcript."""
        return self.chat.conversation

    # -- terminal ------------------------------------------------------------------------------

    def _keys(self) -> KeyBindings:
        keys = KeyBindings()

        @keys.add("enter")
        def _send(event):
            buffer = event.current_buffer
            shown = collapse(buffer.text, self.width or 80)
            if shown != buffer.text:  # a long paste stays on screen collapsed; the model gets all of it
                self._collapsed = (shown, buffer.text)
                self.history.sent[shown] = buffer.text
                buffer.text = shown
            buffer.validate_and_handle()

        @keys.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        return keys

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def say(self, text: str) -> None:
        """A line of kvchat's own; callers pass anything read from disk or the model through `visible`."""
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        """A line from kvchat itself (dim), set apart from the conversation."""
        self.say(self._paint(wrap(visible(text), self.width), "2"))  # notes carry names and errors read from disk

    def toolbar(self) -> HTML:
        """The live cache state under the prompt (the loading, while the model loads)."""
        if self.pending is not None:
            parts = ["model ready (Enter)" if self.pending.done else f"{self.pending.status}…"]
        else:
            kv_mb = self.chat.cache.nbytes / 1e6
            form = "" if self.engine.kv_form.exact else f" {self.engine.kv_form.name}"
            parts = [f"cache {self.chat.cache.tokens}/{self.engine.max_context or '?'}", f"KV{form} {kv_mb:.1f} MB"]
            if self.last is not None:
                parts += [f"reused {self.last.reused}", f"prefilled {self.last.prefilled}",
                          f"TTFT {self.last.ttft_ms:.0f} ms", f"{self.last.decode_tok_s:.1f} tok/s"]
            if self.persister is not None and self.persister.session:
                parts.append(f"session {self.persister.session}")
        return HTML(" " + " · ".join(parts).replace("&", "&amp;").replace("<", "&lt;"))

    # -- loop ----------------------------------------------------------------------------------

    def ready(self) -> None:
        """Wait for a pending model (a line says so while it takes), then take what it made."""
        if self.pending is None:
            return
        if not self.pending.done:
            self.note("[waiting for the model to load]")
        self.chat, self.persister, notices = self.pending.wait()
        self.pending = None
        for notice in notices:
            self.note(notice)
        self._banner()

    def _banner(self) -> None:
        from kvchat.weights.model import precision

        loaded = self.engine.loaded
        step = ", compiled decode step" if self.engine.step is not None else \
            ", direct decode step" if self.engine.direct is not None else ""
        self.note(f"kvchat · {loaded.name} on {loaded.device} ({precision(loaded)}{step}) · "
                  "/help for commands · Ctrl-D to quit")

    def run(self) -> int:
        """Loop until the user leaves; returns the exit code."""
        if self.pending is not None:
            self.note("kvchat · the model loads while you type · /help for commands · Ctrl-D to quit")
            return self._loop()
        self._banner()
        turns = sum(1 for m in self.conv.messages if m["role"] == "user")
        if turns:
            self.note(f"resumed: {plural(turns, 'turn')}, {self.chat.cache.tokens} tokens of KV loaded from disk")
            self.show_history(RESUME_EXCHANGES)
        return self._loop()

    def _loop(self) -> int:
        while True:
            try:
                line = self.session.prompt(HTML("<ansigreen><b>you&gt; </b></ansigreen>") if self.color else "you> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            if self._collapsed is not None:
                if line == self._collapsed[0]:
                    line = self._collapsed[1]
                self._collapsed = None
            if "\x00" in line:
                self.note("NUL bytes cannot be sent; input ignored.")
                continue
            if not line.strip():
                if self.pending is not None and self.pending.done:
                    self.ready()  # Enter on an empty line takes the model once it is loaded
                continue
            try:
                if line.startswith("/"):
                    if line.split()[0] not in ("/help", "/quit", "/exit"):
                        self.ready()
                    if self.command(line.strip()) == "quit":
                        return 0
                    continue
                self.ready()
                self.stream(lambda: self.chat.send(line))
            except KeyboardInterrupt:  # outside a reply (a save, a /load): nothing half-done is left behind
                self.note("[interrupted]")

    def command(self, line: str) -> str | None:
        """Run one slash command; returns 'quit' to end the loop. Errors become a short hint."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return "quit"
        handler = None
        if name[1:].isidentifier():  # the store's commands are SessionCommands'
            handler = getattr(self, "cmd_" + name[1:], None) or getattr(self.sessions, "cmd_" + name[1:], None)
        if name not in COMMANDS or handler is None:
            self.note(f"unknown command {name}; /help lists them")
            return None
        if arg and not COMMANDS[name][0]:
            self.note(f"{name} takes no argument; /help lists the commands")
            return None
        try:
            handler(arg)
        except KvchatError as exc:
            self.note(f"{exc}")
        except OSError as exc:  # a full or read-only disk, a file made unreadable: one line, the chat goes on
            self.note(f"{name} failed: {one_line(exc)}")
        return None

    def stream(self, start) -> None:
        """Run a turn from `start()`, streaming the reply; Ctrl-C stops it and keeps what was said."""
        writer = self._writer()
        progress = PrefillProgress(self.out, self.progress_delay, self.width, self.color) \
            if self.terminal else None
        try:
            with quiet_input(self.session.input) if self.terminal else contextlib.nullcontext():
                events = start()
                self._show(self.persister.journaled(events) if self.persister else events, writer, progress)
        except KeyboardInterrupt:
            self.last = None  # the toolbar shows no figures of a turn that did not end
            self._end(writer, progress)
            self.note("[interrupted]")
        except KvchatError as exc:
            self._end(writer, progress)
            self.note(f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - out of memory, a sampling failure: one line, the chat goes on
            self._end(writer, progress)
            self.note(f"error in this turn ({type(exc).__name__}: {one_line(exc)}); the conversation is as it was "
                      "before the failure")
        finally:
            self._end(writer, progress)
        if self.settings.stats and self.last is not None:
            s = self.last
            self.note(f"[reused {s.reused}, prefilled {s.prefilled}, generated {s.generated}, "
                      f"TTFT {s.ttft_ms:.0f} ms, {s.decode_tok_s:.1f} tok/s]")
        self.autosave()

    def _writer(self) -> WrappingWriter | MarkdownStream:
        return MarkdownStream(self.out, self.width, self.color) if self.markdown else WrappingWriter(self.out, self.width)

    def _show(self, events, writer: WrappingWriter | MarkdownStream, progress: PrefillProgress | None) -> None:
        from kvchat.chat.engine import turn_notices

        def status(generated: int, rate: float) -> str:
            return (f"{generated} tokens · {rate:.1f} tok/s · cache {self.chat.cache.tokens}/"
                    f"{self.engine.max_context or '?'} · Ctrl-C stops")

        stats = draw_reply(events, writer, progress, self.out, self.color, self.markdown, status)
        if stats is None:
            return
        self.last = stats
        self.totals.add(stats)
        for line in turn_notices(stats, self.engine.max_context):
            self.note(line)
        if stats.stop == "length":
            self.note(f"[cut at max_new_tokens={self.chat.sampling.max_new_tokens}: /continue goes on]")

    def _end(self, writer: WrappingWriter | MarkdownStream, progress: PrefillProgress | None) -> None:
        """Close what a turn drew: the progress line, the reply's last line and its colour (idempotent)."""
        if progress is not None and progress.running:
            progress.stop()
        writer.finish()
        if self.color:
            self.out.write("\x1b[0m")
            self.out.flush()

    def autosave(self) -> None:
        if self.persister is None:
            return
        try:
            notice = self.persister.after_turn(self.chat)
        except (KvchatError, OSError) as exc:
            self.note(f"could not save: {exc}")
            return
        if notice:
            self.note(notice)

    # -- commands --------------------------------------------------------------------------------

    def cmd_help(self, _arg: str) -> None:
        self.say(help_text())

    def cmd_system(self, arg: str) -> None:
        self.chat.set_system(arg or None)
        done = "system prompt set" if arg else "system prompt removed"
        view = self.conv.view()
        if any(m["role"] == "user" for m in view):  # the history after it is read again
            again = len(self.engine.render(view, generation_prompt=False)) - self.chat.cache.tokens
            done += f"; the next turn re-reads {again:,} tokens of the conversation" if again > 0 else ""
        self.note(done)
        self.autosave()  # kept with the session, like /undo and /set

    def cmd_reset(self, _arg: str) -> None:
        saved = self.persister.session if self.persister is not None else None
        if saved:  # the saved transcript stays as it is; the new conversation is not saved until /save
            self.persister.store.unlock(saved)
            self.persister.session = None
        self.chat.reset()
        self.last, self.totals = None, Totals()
        self.note(f"conversation reset ({self.chat.cache.tokens} tokens of system prompt kept in the cache)"
                  + (f"; session '{saved}' stays saved as it was, this new one is not saved (/save NAME)"
                     if saved else ""))

    def cmd_undo(self, _arg: str) -> None:
        self.chat.undo()
        self.note(f"last exchange removed; cache cut back to {self.chat.cache.tokens} tokens")
        self.autosave()

    def cmd_retry(self, _arg: str) -> None:
        if not self.conv.messages or self.conv.messages[-1]["role"] != "assistant":
            raise KvchatError("there is no reply to retry")
        self.stream(self.chat.retry)

    def cmd_continue(self, _arg: str) -> None:
        self.stream(self.chat.extend)

    def show_recent(self) -> None:
        """The last exchanges, as when a session is resumed."""
        self.show_history(RESUME_EXCHANGES)

    def take(self, chat: Chat) -> None:
        """Go on with `chat` (a loaded session): its figures start again."""
        self.chat, self.last, self.totals = chat, None, Totals()

    def cmd_history(self, arg: str) -> None:
        if arg and not (arg.isdigit() and int(arg) > 0):
            raise KvchatError("usage: /history [N] (the last N exchanges)")
        if not any(m["role"] == "user" for m in self.conv.messages):
            self.note("no exchanges yet")
        self.show_history(int(arg) if arg else None)

    def show_history(self, last: int | None) -> None:
        """The conversation's messages as they were shown (long messages collapsed), the last `last` exchanges
        or all; exchanges the model no longer sees (dropped to fit the context) are marked."""
        users = [i for i, m in enumerate(self.conv.messages) if m["role"] == "user"]
        if not users:
            return
        start = users[-last] if last is not None and last < len(users) else users[0]
        if start > users[0]:
            self.note(f"[{plural(users.index(start), 'earlier exchange')}: /history shows all]")
        for index, message in enumerate(self.conv.messages[start:], start):
            if index == self.conv.first_kept and index > users[0]:
                self.note("[the model sees the conversation from here on; older exchanges were dropped to fit]")
            text = visible(message.get("content") or "")
            if message["role"] == "user":
                self.say(f"{self._paint('you>', '1;32')} {collapse(text, (self.width or 80) - 5)}")
            elif message["role"] == "assistant":
                if self.color and not self.markdown:
                    self.out.write("\x1b[36m")
                writer = self._writer()
                writer.write(text)
                writer.finish()
                if self.color and not self.markdown:
                    self.out.write("\x1b[0m")

    def cmd_set(self, arg: str) -> None:
        key, sep, value = arg.partition("=")
        if not sep:
            raise KvchatError(f"usage: /set KEY=VALUE ({', '.join(SETTABLE)})")
        self.chat.sampling = set_sampling(self.chat.sampling, key.strip(), value.strip())
        self.note(f"{key.strip()} = {getattr(self.chat.sampling, key.strip())}")
        self.autosave()  # kept with the session

    def cmd_stats(self, _arg: str) -> None:
        self.say("\n".join(self.totals.report(self.chat.cache.tokens, self.chat.cache.nbytes,
                                               self.engine.kv_form.name)))
