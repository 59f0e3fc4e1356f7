"""The REPL's commands on saved sessions: /save, /fork, /load, /sessions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from kvchat.errors import KvchatError
from kvchat.store.catalog import check_name
from kvchat.ui.terminal import plural, visible

if TYPE_CHECKING:
    from kvchat.chat.chat import Chat
    from kvchat.chat.saving import Persister


class SessionHost(Protocol):
    """What the session commands need of the REPL they serve."""

    chat: Chat
    persister: Persister | None
    engine: Any

    def note(self, text: str) -> None: ...
    def say(self, text: str) -> None: ...
    def take(self, chat: Chat) -> None: ...
    def show_recent(self) -> None: ...


class SessionCommands:
    """The slash commands that read or write the store, for one REPL (whose chat they save, fork or replace)."""

    def __init__(self, repl: SessionHost):
        self.repl = repl

    def _needs_store(self) -> Persister:
        if self.repl.persister is None:
            raise KvchatError("sessions are not available here")
        return self.repl.persister

    def _switch(self, name: str) -> None:
        persister = self._needs_store()
        if persister.session and persister.session != name:
            persister.store.unlock(persister.session)
        persister.session = name

    def cmd_save(self, arg: str) -> None:
        from kvchat.chat.saving import save_chat

        persister = self._needs_store()
        name, overwrite = (arg[:-1], True) if arg.endswith("!") else (arg, False)
        name = name or persister.session
        if not name:
            raise KvchatError("no session yet: /save NAME")
        check_name(name)
        if name != persister.session and not overwrite and persister.store.read_manifest(name) is not None:
            raise KvchatError(f"a session named '{name}' already exists; /save {name}! replaces it")
        notice = save_chat(persister.store, name, self.repl.chat)
        self._switch(name)
        self.repl.note(notice or f"saved as '{name}' ({self.repl.chat.cache.tokens} tokens of KV); autosaving from "
                       "now on")

    def cmd_fork(self, arg: str) -> None:
        from kvchat.chat.saving import save_chat

        persister = self._needs_store()
        if not arg:
            raise KvchatError("/fork needs a name for the new session")
        if persister.store.read_manifest(check_name(arg)) is not None:
            raise KvchatError(f"a session named '{arg}' already exists")
        parent = persister.session
        notice = save_chat(persister.store, arg, self.repl.chat)
        self._switch(arg)
        if notice:
            self.repl.note(notice)
        self.repl.note(f"forked{' from ' + repr(parent) if parent else ''} to '{arg}' (stored KV shared); now in '{arg}'")

    def cmd_load(self, arg: str) -> None:
        from kvchat.chat.saving import open_chat

        persister = self._needs_store()
        if not arg:
            raise KvchatError("/load needs a session name")
        if persister.store.read_manifest(check_name(arg)) is None:
            raise KvchatError(f"no session named '{arg}'")
        opened = open_chat(self.repl.engine, persister.store, arg, sampling=self.repl.chat.sampling,  # with its own settings
                           prefixes=self.repl.chat.prefixes is not None)
        if opened.notice:
            self.repl.note(opened.notice)
        self._switch(arg)
        self.repl.take(opened.chat)
        turns = sum(1 for m in self.repl.conv.messages if m["role"] == "user")
        self.repl.note(f"loaded '{arg}': {plural(turns, 'turn')}, {opened.loaded_tokens} tokens of KV restored")
        self.repl.show_recent()

    def cmd_sessions(self, _arg: str) -> None:
        rows = self._needs_store().store.list_sessions()
        if not rows:
            self.repl.note("no saved sessions")
        for row in rows:
            mark = "*" if row["name"] == self.repl.persister.session else " "
            self.repl.say(f"{mark} {visible(row['name']):24} {row['turns']:>4} turns {row['tokens']:>7} tokens")

