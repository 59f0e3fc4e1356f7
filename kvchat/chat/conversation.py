"""A conversation's transcript, and the check that a user message can be a chat turn. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvchat.errors import InputError

MAX_MESSAGE_CHARS = 1_000_000


@dataclass
class Conversation:
    """The transcript: messages as the user sees them (a reply keeps the token ids it was sampled as), and which
    of them the model still sees. It holds no cache: a chat keeps one beside it (`ChatCache`)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    # Index into `messages` of the first message the model still sees (older exchanges were dropped to fit
    # the context window; they stay in the transcript). The system message is always seen.
    first_kept: int = 0

    @classmethod
    def start(cls, system: str | None = None) -> "Conversation":
        """A new conversation, with a system message when `system` is given."""
        messages = [{"role": "system", "content": system}] if system else []
        return cls(messages=messages)

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def view(self) -> list[dict[str, Any]]:
        """The messages the model sees: the system prompt, then everything from `first_kept` on."""
        head = 1 if self.system is not None else 0
        return self.messages[:head] + self.messages[max(self.first_kept, head):]

    def set_system(self, text: str | None) -> None:
        """Set (or with None/empty, remove) the system prompt, keeping `first_kept` on the same message."""
        had = self.system is not None
        rest = self.messages[1:] if had else self.messages
        self.messages[:] = ([{"role": "system", "content": text}] if text else []) + rest
        if self.first_kept:
            self.first_kept = max(0, self.first_kept + bool(text) - had)

    def reset(self) -> None:
        """Start over: only the system prompt stays."""
        self.messages[:] = self.messages[:1] if self.system is not None else []
        self.first_kept = 0

    def undo(self) -> None:
        """Remove the last exchange (the last user message and everything after it)."""
        users = [i for i, message in enumerate(self.messages) if message["role"] == "user"]
        if not users:
            raise InputError("there is nothing to undo")
        del self.messages[users[-1]:]
        self.first_kept = min(self.first_kept, len(self.messages))

    def record(self, messages: list[dict[str, Any]], first_kept: int, reply: str, reply_ids: list[int]) -> None:
        """A turn that produced a reply (complete or interrupted): the conversation becomes `messages` (what the
        turn was made of, ending with the user's message) and the reply."""
        self.messages[:] = [*messages, {"role": "assistant", "content": reply, "token_ids": list(reply_ids)}]
        self.first_kept = first_kept

    def continue_reply(self, reply: str, reply_ids: list[int]) -> None:
        """The last reply, continued: its whole text and token ids as they now are."""
        assert self.messages and self.messages[-1]["role"] == "assistant", "there is no reply to continue"
        self.messages[-1] = {**self.messages[-1], "content": reply, "token_ids": list(reply_ids)}

    @property
    def dropped_turns(self) -> int:
        """User turns hidden from the model to fit the context."""
        return sum(1 for m in self.messages[:self.first_kept] if m["role"] == "user")


def check_message(text: str) -> None:
    """Refuse a user message that cannot be a chat turn: empty, whitespace, NUL bytes, absurdly long."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty message: nothing to send")
    if "\x00" in text:
        raise InputError("the message contains a NUL byte; binary input cannot be sent to the model")
    if len(text) > MAX_MESSAGE_CHARS:
        raise InputError(f"the message is {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
