"""The interactive chat loop: the only module that does interactive terminal I/O."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from prompt_toolkit import PromptSession

from kvchat.config import Settings
from kvchat.conversation import Conversation
from kvchat.engine import Engine, Token, TurnEnd
from kvchat.errors import KvchatError

HELP = """Commands:
  /help     this list
  /reset    start the conversation over (keeps the system prompt)
  /quit     leave (Ctrl-D works too)
Ctrl-C stops a reply, or clears the line at the prompt."""


class Repl:
    """Reads messages at a prompt and streams the replies; Ctrl-C interrupts, Ctrl-D or /quit exits."""

    def __init__(self, engine: Engine, conv: Conversation, settings: Settings,
                 session: PromptSession | None = None, out: TextIO | None = None):
        self.engine = engine
        self.conv = conv
        self.settings = settings
        self.sampling = settings.sampling
        self.session = session or PromptSession()
        self.out = out or sys.stdout
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
        name = line.split(maxsplit=1)[0]
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.conv.messages = [m for m in self.conv.messages if m["role"] == "system"]
            self.say("Conversation reset.")
        else:
            self.say(f"Unknown command {name}; /help lists them.")
        return None

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
