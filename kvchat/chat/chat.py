"""A chat: one conversation on one engine, with its cache, its sampling settings and its seeded generator.

Turns run on the engine; a reply enters the transcript here once it exists (complete, or cut off after its first
token), never before: a turn that fails or is interrupted before replying leaves the transcript as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from kvchat.cache.chat_cache import ChatCache
from kvchat.chat.conversation import Conversation
from kvchat.chat.detokenize import decode
from kvchat.chat.engine import Engine, Plan, Prefill, PrefixSource, Reply, Token, TurnEnd
from kvchat.chat.sampling import make_generator
from kvchat.config import Sampling



@dataclass
class TurnStart:
    """A turn begins: the transcript before it (`before`, `before_first_kept`), the transcript it is made of
    (ending with the user's message, or with the reply it continues, then `continuing`) and the first message
    the model sees. Its reply is what the `Token`s add."""

    before: list[dict[str, Any]]
    before_first_kept: int
    messages: list[dict[str, Any]]
    first_kept: int
    continuing: bool


Event = TurnStart | Prefill | Token | TurnEnd


class Chat:
    """A conversation, the cache that mirrors a prefix of its rendering, and how its replies are sampled.

    `sampling` is the one place the chat's sampling settings live (a saved session keeps a copy). `prefixes`
    seeds an empty cache from stored prefixes (the store's; None: never)."""

    def __init__(self, engine: Engine, conversation: Conversation | None = None, cache: ChatCache | None = None,
                 sampling: Sampling | None = None, prefixes: PrefixSource | None = None):
        self.engine = engine
        self.conversation = conversation if conversation is not None else Conversation.start()
        self.cache = cache if cache is not None else engine.new_cache()
        self.sampling = sampling if sampling is not None else Sampling()
        self.prefixes = prefixes
        self._rng: torch.Generator | None = None
        self._rng_seed: int | None = None

    @classmethod
    def start(cls, engine: Engine, system: str | None = None, **kwargs: Any) -> "Chat":
        """A new chat, with a system prompt when `system` is given."""
        return cls(engine, Conversation.start(system), **kwargs)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.conversation.messages

    @property
    def system(self) -> str | None:
        return self.conversation.system

    # -- turns -------------------------------------------------------------------------------

    def send(self, text: str) -> Iterator[Event]:
        """Answer the user message `text`: a `TurnStart`, `Prefill` progress, `Token`s, then one `TurnEnd`.
        Raises InputError (or KvchatError) at once for a message that cannot be sent, with nothing changed."""
        return self._run(self.engine.plan_send(self.conversation, text, self.sampling))

    def retry(self) -> Iterator[Event]:
        """Make the last reply again; the old one stays until the new one starts."""
        return self._run(self.engine.plan_retry(self.conversation, self.sampling))

    def extend(self) -> Iterator[Event]:
        """Continue the last reply; the `TurnEnd` carries the whole reply as it now is."""
        return self._run(self.engine.plan_extend(self.conversation, self.sampling))

    def _run(self, plan: Plan) -> Iterator[Event]:
        reply = Reply(list(plan.extending or ()))
        events = self.engine.run(self.cache, plan, self.sampling, self._generator(), reply, self.prefixes)
        return self._recording(plan, reply, events)

    def _recording(self, plan: Plan, reply: Reply, events: Iterator[Event]) -> Iterator[Event]:
        """The turn's events; the reply is recorded before its `TurnEnd` is passed on, or when the turn is cut
        off (an error, Ctrl-C, the iteration closed) with a reply begun."""
        recorded = False
        try:
            yield TurnStart(list(self.conversation.messages), self.conversation.first_kept, list(plan.messages),
                            plan.first_kept, plan.extending is not None)
            for event in events:
                if isinstance(event, TurnEnd):
                    self._record(plan, reply)
                    recorded = True
                yield event
        finally:
            if not recorded:
                self._record(plan, reply)

    def _record(self, plan: Plan, reply: Reply) -> None:
        if plan.extending is not None:
            self.conversation.continue_reply(decode(self.engine.tokenizer, reply.ids), reply.ids)
        elif reply.ids or reply.finished:
            self.conversation.record(plan.messages, plan.first_kept, decode(self.engine.tokenizer, reply.ids),
                                     reply.ids)
        self.cache.checkpoint()  # where this reply ends: the next turn, or an /undo of it, comes back here

    def _generator(self) -> torch.Generator | None:
        """The chat's seeded generator (made on its first sampled turn, or when the seed changes): a /retry draws
        anew, and the whole chat is reproducible from its seed."""
        if self.sampling.seed is None or self.sampling.temperature == 0:
            return None
        if self._rng is None or self._rng_seed != self.sampling.seed:
            self._rng, self._rng_seed = make_generator(self.sampling, self.engine.device), self.sampling.seed
        return self._rng

    # -- edits -------------------------------------------------------------------------------

    def undo(self) -> None:
        """Remove the last exchange and cut the cache to match."""
        self.conversation.undo()
        self.engine.trim(self.conversation, self.cache)

    def reset(self) -> None:
        """Start over, keeping the system prompt (and its cached tokens)."""
        self.conversation.reset()
        self.engine.trim(self.conversation, self.cache)

    def set_system(self, text: str | None) -> None:
        """Set or remove the system prompt; the cache keeps what the conversation still begins with."""
        self.conversation.set_system(text)
        self.engine.trim(self.conversation, self.cache)
