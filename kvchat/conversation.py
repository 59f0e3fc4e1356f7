"""A conversation: its messages, the exact token ids in its KV cache, and that cache, kept together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvchat import kv


@dataclass
class Conversation:
    """Messages as the user sees them, plus the cache state that mirrors a prefix of their rendering.

    Invariant (checked by `check`): `token_ids` are exactly the tokens whose KV the cache holds.
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    cache: Any = None  # a transformers Cache, or None before the first forward pass
    # Index into `messages` of the first message the model still sees (older exchanges were dropped to fit
    # the context window; they stay in the transcript). The system message is always seen.
    first_kept: int = 0
    restored: int = 0  # tokens of the cache loaded from disk and not yet reported in a turn's stats
    # Next-token logits [vocab] after the first n cached tokens (the end of the last prompt), as (n, logits):
    # lets /retry regenerate without feeding any token again.
    prompt_logits: tuple[int, Any] | None = None

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

    def view(self) -> list[dict[str, str]]:
        """The messages the model sees: the system prompt, then everything from `first_kept` on."""
        head = 1 if self.system is not None else 0
        return self.messages[:head] + self.messages[max(self.first_kept, head):]

    @property
    def dropped_turns(self) -> int:
        """User turns hidden from the model to fit the context."""
        return sum(1 for m in self.messages[:self.first_kept] if m["role"] == "user")

    @property
    def cached_tokens(self) -> int:
        return len(self.token_ids)

    def check(self) -> None:
        """Assert that the cache holds exactly `token_ids`."""
        held = 0 if self.cache is None else kv.length(self.cache)
        assert held == len(self.token_ids), f"cache holds {held} tokens but {len(self.token_ids)} ids are recorded"

    def drop_cache(self) -> None:
        """Forget the cache (the next turn prefills everything)."""
        self.cache = None
        self.token_ids = []
        self.restored = 0
        self.prompt_logits = None

    def cut_to(self, n: int) -> bool:
        """Keep the KV of the first `n` tokens where the cache can be cut there exactly, else forget it all.

        Returns whether the first `n` tokens are still cached (never, for n == 0).
        """
        if n > 0 and self.cache is not None and kv.can_truncate(self.cache, n):
            self.truncate(n)
            return True
        self.drop_cache()
        return False

    def truncate(self, n: int) -> None:
        """Keep the first `n` cached tokens (the caller has checked `kv.can_truncate`)."""
        kv.truncate(self.cache, n)
        del self.token_ids[n:]
        if self.prompt_logits is not None and self.prompt_logits[0] > n:
            self.prompt_logits = None
