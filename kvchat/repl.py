"""The interactive chat loop: the only module that does interactive terminal I/O."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from prompt_toolkit import PromptSession

from kvchat.config import Settings
from kvchat.conversation import Conversation
from kvchat.engine import Engine, Token, TurnEnd
from kvchat.errors import KvchatError
from kvchat.store import Persister, check_name

HELP = """Commands:
  /help     this list
  /reset    start the conversation over (keeps the system prompt)
  /save [NAME]  save the conversation as a session (then autosaved after every turn)
  /load NAME    switch to a saved session
  /sessions     list saved sessions
  /quit     leave (Ctrl-D works too)
Ctrl-C stops a reply, or clears the line at the prompt."""


class Repl:
    """Reads messages at a prompt and streams the replies; Ctrl-C interrupts, Ctrl-D or /quit exits."""

    def __init__(self, engine: Engine, conv: Conversation, settings: Settings,
                 persister: Persister | None = None, session: PromptSession | None = None,
                 out: TextIO | None = None):
        self.engine = engine
        self.conv = conv
        self.settings = settings
        self.sampling = settings.sampling
        self.session = session or PromptSession()
        self.out = out or sys.stdout
        self.persister = persister
        self.last_stats: Any = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> int:
        """Loop until the user leaves; returns the exit code."""
        self.say(f"kvchat: {self.engine.loaded.name} on {self.engine.device} ({self.engine.loaded.dtype}). "
                 "/help for commands, Ctrl-D to quit.")
        while True:
            try:
                line = self.session.prompt("> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            if not line.strip():
                continue
            if line.startswith("/"):
                if self.command(line.strip()) == "quit":
                    return 0
                continue
            self.reply(line)

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return "quit"
        try:
            self.run_command(name, arg)
        except KvchatError as exc:
            self.say(f"error: {exc}")
        return None

    def run_command(self, name: str, arg: str) -> None:
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.conv.messages = [m for m in self.conv.messages if m["role"] == "system"]
            self.say("Conversation reset.")
        elif name == "/save":
            self.save(arg)
        elif name == "/load":
            self.load(arg)
        elif name == "/sessions":
            self.list_sessions()
        else:
            self.say(f"Unknown command {name}; /help lists them.")

    def _store(self):
        if self.persister is None:
            raise KvchatError("sessions are not available here")
        return self.persister.store

    def save(self, name: str) -> None:
        store = self._store()
        name = name or self.persister.session
        if not name:
            raise KvchatError("no session yet: /save NAME")
        check_name(name)
        store.save_session(name, self.conv)
        if self.persister.session and self.persister.session != name:
            store.unlock(self.persister.session)
        self.persister.session = name
        self.say(f"Saved as '{name}' ({self.conv.cached_tokens} tokens of KV); autosaving from now on.")

    def load(self, name: str) -> None:
        store = self._store()
        if not name:
            raise KvchatError("/load needs a session name")
        if store.read_manifest(check_name(name)) is None:
            raise KvchatError(f"no session named '{name}'")
        opened = store.open_session(name)
        if opened.notice:
            self.say(opened.notice)
        if self.persister.session and self.persister.session != name:
            store.unlock(self.persister.session)
        self.persister.session, self.conv = name, opened.conversation
        turns = sum(1 for m in self.conv.messages if m["role"] == "user")
        self.say(f"Loaded '{name}': {turns} turns, {opened.loaded_tokens} tokens of KV restored.")

    def list_sessions(self) -> None:
        rows = self._store().list_sessions()
        if not rows:
            self.say("No saved sessions.")
        for row in rows:
            mark = "*" if self.persister and row["name"] == self.persister.session else " "
            self.say(f"{mark} {row['name']:24} {row['turns']:>4} turns {row['tokens']:>7} tokens")

    def reply(self, text: str) -> None:
        """Send one message and stream the reply; Ctrl-C stops it and keeps what was said."""
        try:
            for event in self.engine.send(self.conv, text, self.sampling):
                if isinstance(event, Token):
                    self.out.write(event.text)
                    self.out.flush()
                elif isinstance(event, TurnEnd):
                    self.last_stats = event.stats
                    self.say("")
                    if self.settings.stats:
                        s = event.stats
                        self.say(f"[reused {s.reused}, prefilled {s.prefilled}, generated {s.generated}, "
                                 f"ttft {s.ttft_ms:.0f} ms, {s.decode_tok_s:.1f} tok/s]")
        except KeyboardInterrupt:
            self.say("\n[interrupted]")
        except KvchatError as exc:
            self.say(f"error: {exc}")
        if self.persister is not None:
            try:
                self.persister.after_turn(self.conv)
            except KvchatError as exc:
                self.say(f"error: {exc}")
