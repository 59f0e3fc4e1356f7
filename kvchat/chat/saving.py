"""Chats to and from the store: open a saved session as a chat, save one, autosave after each turn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from kvchat.chat.chat import Chat, Event, TurnStart
from kvchat.chat.conversation import Conversation
from kvchat.chat.engine import Engine, Token
from kvchat.config import Sampling, adopt_sampling
from kvchat.store.sessions import Store, StoreError


@dataclass
class Resumed:
    """A session opened as a chat, and a one-line notice when its KV could not be used."""

    chat: Chat
    notice: str | None = None
    loaded_tokens: int = 0
    existed: bool = False


def open_chat(engine: Engine, store: Store, name: str, system: str | None = None, sampling: Sampling | None = None,
              given: frozenset[str] = frozenset(), prefixes: bool = True) -> Resumed:
    """Session `name` as a chat on `engine` (its KV loaded when intact), or a new chat with `system` when there is
    no such session. A resumed chat samples with the session's settings, except those `given` on the command line
    (taken from `sampling`)."""
    cache = engine.new_cache()
    opened = store.open_session(name, cache)
    conversation = Conversation(opened.messages, opened.first_kept) if opened.existed else Conversation.start(system)
    sampling = adopt_sampling(sampling or Sampling(), opened.settings, given)
    chat = Chat(engine, conversation, cache, sampling, store.longest_prefix if prefixes else None)
    return Resumed(chat, opened.notice, opened.loaded_tokens, opened.existed)


def save_chat(store: Store, name: str, chat: Chat) -> str | None:
    """Save `chat` as session `name`: its transcript, its KV and its sampling settings; a one-line notice when
    the text was saved and the KV could not be (see `Store.save_session`)."""
    return store.save_session(name, chat.conversation.messages, chat.conversation.first_kept, chat.cache,
                       dataclasses.asdict(chat.sampling))


@dataclass
class Persister:
    """After each turn: autosave the named session (if any) and store the conversation's system prefix."""

    store: Store
    session: str | None = None
    prefixes_saved: set[Any] = field(default_factory=set)

    def after_turn(self, chat: Chat) -> str | None:
        """Raises StoreError when the session cannot be written; a prefix that cannot be stored is only skipped.
        Returns a one-line notice when the session's text was saved and its KV was not."""
        if chat.cache.tokens:
            try:
                self._save_system_prefix(chat)
            except OSError:
                pass  # a shared prefix is an optimisation; the session save below reports disk problems
        if self.session:
            try:
                return save_chat(self.store, self.session, chat)
            except OSError as exc:
                raise StoreError(f"cannot save session '{self.session}' in {self.store.root}: "
                                 f"{exc.strerror or exc}; the session on disk is as it was") from None
        return None

    def journaled(self, events: Iterable[Event]) -> Iterator[Event]:
        """A turn's `events` as they come, each piece of its reply first written to the session's journal (when
        a session is named), so that what is shown is never lost if the process dies before the turn's save.
        A journal that cannot be written is skipped: the save after the turn reports disk problems."""
        journal = None
        try:
            for event in events:
                try:
                    if isinstance(event, TurnStart) and self.session:
                        journal = self.store.start_journal(self.session, event)
                    elif isinstance(event, Token) and journal is not None:
                        journal.add(event.text)
                except OSError:
                    if journal is not None:
                        journal.close()
                    journal = None
                yield event
        finally:
            if journal is not None:
                journal.close()
            close = getattr(events, "close", None)
            if close is not None:
                close()  # the turn records what it got now, not when it is collected

    def _save_system_prefix(self, chat: Chat) -> None:
        prefix = chat.engine.system_prefix_ids(chat.conversation.system)
        key = tuple(prefix)
        if key in self.prefixes_saved or len(prefix) > chat.cache.tokens or list(chat.cache.ids[:len(prefix)]) != prefix:
            return
        if chat.cache.has_state and chat.cache.checkpoint_at(len(prefix)) is None:
            return  # the state after exactly the prefix is needed: its checkpoint, when one was kept
        self.store.save_prefix(prefix, chat.cache)
        self.prefixes_saved.add(key)
