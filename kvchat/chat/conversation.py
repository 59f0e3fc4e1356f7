"""A conversation: its messages, the exact token ids in its KV cache, and that cache, kept together.

The cache adapter (and with it torch) is imported by the methods that touch a cache, so that commands which
only read sessions start at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvchat.errors import InputError

MAX_MESSAGE_CHARS = 1_000_000
MAX_CHECKPOINTS = 8  # recurrent-state snapshots kept in memory: pinned ones (the system prompt's) and the latest


@dataclass(eq=False)
class Checkpoint:
    """The conv/recurrent state after the first `tokens` cached tokens (a copy, on the cache's device).

    `logits` [vocab] are the next-token logits at that point when they were kept (the end of a prompt).
    """

    tokens: int
    state: dict[str, Any]
    logits: Any = None
    pinned: bool = False  # never evicted for newer ones (the end of the system prompt)


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
    # Recurrent-state snapshots by position, oldest first, for caches whose state layers cannot be cut back.
    checkpoints: list[Checkpoint] = field(default_factory=list)
    # True while a forward pass is running: the cache may then hold more than `token_ids` (or, in state
    # layers, a mix of positions) until the pass completes and its tokens are recorded.
    dirty: bool = False
    # The seeded sampling generator, made once per conversation and seed: a /retry draws anew, and the
    # whole conversation is reproducible from its seed.
    rng: Any = None
    rng_seed: int | None = None
    # Sampling settings kept with the conversation (a saved session resumes with them), as plain values.
    settings: dict[str, Any] = field(default_factory=dict)
    # Why the cache was last forgotten instead of cut (a restored checkpoint that did not hold what it should),
    # until the next turn reports it.
    refusal: str | None = None

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

    def set_system(self, text: str | None) -> None:
        """Set (or with None/empty, remove) the system prompt, keeping `first_kept` on the same message."""
        had = self.system is not None
        rest = self.messages[1:] if had else self.messages
        self.messages[:] = ([{"role": "system", "content": text}] if text else []) + rest
        if self.first_kept:
            self.first_kept = max(0, self.first_kept + bool(text) - had)

    def reset(self) -> None:
        """Start over: only the system prompt stays (its cached KV is the caller's to trim)."""
        self.messages[:] = self.messages[:1] if self.system is not None else []
        self.first_kept = 0

    @property
    def dropped_turns(self) -> int:
        """User turns hidden from the model to fit the context."""
        return sum(1 for m in self.messages[:self.first_kept] if m["role"] == "user")

    @property
    def cached_tokens(self) -> int:
        return len(self.token_ids)

    def check(self) -> None:
        """Assert that the cache holds exactly `token_ids`: every token count its layers keep agrees."""
        from kvchat.cache import layers

        assert not self.dirty, "a forward pass was cut short and its cache not restored"
        if self.cache is not None:
            wrong = layers.miscount(self.cache, len(self.token_ids))
            assert wrong is None, wrong

    def drop_cache(self) -> None:
        """Forget the cache (the next turn prefills everything)."""
        self.cache = None
        self.token_ids = []
        self.restored = 0
        self.prompt_logits = None
        self.checkpoints = []
        self.dirty = False

    def checkpoint(self, logits: Any = None, pin: bool = False) -> None:
        """Snapshot the recurrent state at the current position (a no-op for caches without one).

        Beyond MAX_CHECKPOINTS the oldest unpinned snapshot goes.
        """
        from kvchat.cache import layers

        if self.cache is None or self.dirty or not self.token_ids or not layers.has_state(self.cache) or \
                layers.unsupported(self.cache) is not None:  # (such a cache is never cut back: no use for a snapshot)
            return
        n = len(self.token_ids)
        same = next((c for c in self.checkpoints if c.tokens == n), None)
        if same is not None:  # the same tokens, so the same state (an empty reply ends where its prompt did)
            same.logits = same.logits if logits is None else logits
            same.pinned = same.pinned or pin
            return
        self.checkpoints.append(Checkpoint(n, layers.export_state(self.cache, device=None), logits, pin))
        self.checkpoints.sort(key=lambda c: c.tokens)
        unpinned = [i for i, c in enumerate(self.checkpoints) if not c.pinned]
        if len(self.checkpoints) > MAX_CHECKPOINTS and unpinned:
            del self.checkpoints[unpinned[0]]

    def cut_to(self, n: int) -> int:
        """Cut the cache back to at most its first `n` tokens, exactly; returns how many are kept.

        Attention layers are cut at `n`. A cache with recurrent state goes back to its latest checkpoint
        at or before `n` (its state cannot be cut). With no such point, or layers kvchat does not know,
        the cache is forgotten and 0 is returned; so it is when the cut cache's token counts do not all come
        to the kept length (`refusal` then says why).
        """
        from kvchat.cache import layers

        if self.cache is None or n <= 0 or layers.unsupported(self.cache) is not None:
            self.drop_cache()
            return 0
        if layers.has_state(self.cache):
            if n >= len(self.token_ids) and not self.dirty:
                return len(self.token_ids)
            usable = [c for c in self.checkpoints if c.tokens <= min(n, len(self.token_ids))]
            if not usable:
                self.drop_cache()
                return 0
            point = usable[-1]
            layers.import_state(self.cache, point.state)
            n = point.tokens
            self.checkpoints = [c for c in self.checkpoints if c.tokens <= n]
            if point.logits is not None:
                self.prompt_logits = (n, point.logits)
        self.dirty = False
        self.truncate(n)
        wrong = layers.miscount(self.cache, n)
        if wrong is not None:  # never continue from a cache that is not what the tokens say
            self.drop_cache()
            self.refusal = wrong
            return 0
        return n

    def truncate(self, n: int) -> None:
        """Keep the first `n` tokens of the attention layers and ids (state layers are `cut_to`'s business)."""
        from kvchat.cache import layers

        layers.truncate(self.cache, n)
        del self.token_ids[n:]
        if self.prompt_logits is not None and self.prompt_logits[0] > n:
            self.prompt_logits = None


def check_message(text: str) -> None:
    """Refuse a user message that cannot be a chat turn: empty, whitespace, NUL bytes, absurdly long."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty message: nothing to send")
    if "\x00" in text:
        raise InputError("the message contains a NUL byte; binary input cannot be sent to the model")
    if len(text) > MAX_MESSAGE_CHARS:
        raise InputError(f"the message is {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}")
