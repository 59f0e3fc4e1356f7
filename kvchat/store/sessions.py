"""Sessions: a catalog (`catalog.py`, torch-free) whose KV a bound model reads and writes (`blobs.py`).

`Store` is what a chat opens and saves through; the catalog commands (list, show, remove, prune, the cap) need
only a `Catalog`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvchat.store.blobs import Blobs
from kvchat.store.catalog import Catalog, StoreError, check_name, os_reason
from kvchat.store.journal import Journal, JournalTurn, read_journal
from kvchat.store.kvfile import FORMAT
from kvchat.store.manifests import SessionManifest, transcript_crc

if TYPE_CHECKING:
    from kvchat.cache.chat_cache import ChatCache
    from kvchat.cache.layers import Layout

__all__ = ["Opened", "Store", "StoreError", "check_name", "transcript_crc"]


@dataclass
class Opened:
    """A session as opened: its transcript and sampling settings, and a one-line notice when its KV could not be
    used (else the cache given to `open_session` holds it)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    first_kept: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # sampling settings as saved (checked where used)
    notice: str | None = None
    loaded_tokens: int = 0
    existed: bool = False


class Store(Catalog):
    """The catalog at `root`, plus the KV of one model once `bind(layout, fingerprint, model)` names it."""

    def __init__(self, root: Path, max_bytes: int = 0, chunk_tokens: int | None = None):
        super().__init__(root, max_bytes, chunk_tokens)
        self.blobs: Blobs | None = None
        self.model = ""  # the model's name, written in manifests for `sessions list`
        self._follows: dict[str, float | None] = {}  # each open session's manifest as last read or written: when
        self._saved: dict[str, list[dict[str, Any]] | None] = {}  # and its transcript

    def bind(self, layout: Layout, fingerprint: str, model: str = "") -> "Store":
        """Read and write the KV of the model with this cache `layout` and weights `fingerprint` (named `model`).

        Window-only sliding layers store other tensors than whole ones: a model run that way is another model.
        A model with state layers stores whole snapshots (counts and flags too), which older saves lack.
        """
        if layout.windows:
            fingerprint = f"{fingerprint}+windows"
        if layout.has_state:
            fingerprint = f"{fingerprint}+whole-state"
        if layout.kv_form != "auto":  # KV of another form is another model's to the store
            fingerprint = f"{fingerprint}+kv-{layout.kv_form}"
        self.blobs, self.model = Blobs(self, layout, fingerprint), model
        return self

    @property
    def fingerprint(self) -> str | None:
        return self.blobs.fingerprint if self.blobs else None

    def _bound(self) -> Blobs:
        assert self.blobs is not None, "bind the store to a model before reading or writing KV"
        return self.blobs

    def save_prefix(self, ids: list[int], cache: ChatCache) -> bool:
        """See `Blobs.save_prefix`."""
        return self._bound().save_prefix(ids, cache)

    def longest_prefix(self, target: list[int], cache: ChatCache) -> int:
        """See `Blobs.longest_prefix`; 0 before the store is bound."""
        return self.blobs.longest_prefix(target, cache) if self.blobs else 0

    def open_session(self, name: str, cache: ChatCache | None = None) -> Opened:
        """Lock and read a session: its transcript and settings, and its KV into `cache` when that is intact (and
        a cache is given). A reply its journal holds beyond the manifest (printed, then the process died before
        the save) is added to the transcript, with a notice. A session that does not exist opens empty
        (`existed` False)."""
        self.lock(name)
        manifest = self.read_manifest(name)
        intact = manifest is not None and not manifest.recovered
        self._follows[name] = manifest.updated if intact else None
        self._saved[name] = list(manifest.messages) if intact else None
        turn = read_journal(self.journal_path(name), self._saved[name])
        if turn is not None and (turn.follows != self._follows[name] or
                                 turn.transcript()[0] == (manifest.messages if manifest else [])):
            turn = None  # its turn was saved, or it holds nothing the manifest does not: nothing to take from it
        if manifest is None and turn is None:
            return Opened()
        opened = Opened(existed=True)
        if manifest is not None:
            opened.messages, opened.first_kept, opened.settings = manifest.messages, manifest.first_kept, \
                manifest.settings
            opened.notice = self._load_kv(manifest, cache, opened)
        if turn is not None:
            opened.messages, opened.first_kept = turn.transcript()
            recovered = f"session '{name}': kvchat stopped before saving what it had shown; recovered that from " \
                        "the session's journal (a reply as far as it was printed)"
            opened.notice = f"{recovered}; {opened.notice.removeprefix(f'session {name!r}: ')}" if opened.notice \
                else recovered
        return opened

    def _load_kv(self, manifest: SessionManifest, cache: ChatCache | None, opened: Opened) -> str | None:
        """Load the KV `manifest` lists into `cache` when it is intact; why not, in one line, when it is not."""
        name = manifest.name
        if manifest.recovered:
            return (f"session '{name}': its last save is damaged ({manifest.recovered}); recovered the save before "
                    f"it ({manifest.turns} turns), rebuilding its cache from the text")
        made_by = (manifest.format, manifest.fingerprint, manifest.chunk_tokens)
        if made_by != (FORMAT, self.fingerprint, self.chunk_tokens):
            return f"session '{name}' was saved with another model or format; rebuilding its cache from the text"
        if not manifest.token_ids or cache is None:
            return None
        wrong = self._bound().load_session(manifest, cache)
        if wrong is not None:
            return f"session '{name}': KV not usable ({wrong}); rebuilding its cache from the text"
        opened.loaded_tokens = len(manifest.token_ids)
        return None

    def save_session(self, name: str, messages: list[dict[str, Any]], first_kept: int, cache: ChatCache | None,
                     settings: dict[str, Any]) -> str | None:
        """Save the session: what is new of `cache`'s KV (full chunks, the partial tail, state checkpoints), then
        one manifest with the text (the transcript `messages`, `first_kept`, the sampling `settings`) and the KV
        it lists. The text is the source of truth and the KV a cache: when the KV cannot be written (a full
        disk) the manifest still saves the text, listing the last save's KV, and a one-line notice is returned
        (a resume re-reads what is missing). StoreError when the text itself cannot be written."""
        self.lock(name)
        with self.store_lock(exclusive=False):
            previous = self.read_manifest(name)
            now = time.time()
            text = SessionManifest(
                name=name, messages=messages, first_kept=first_kept, settings=settings, model=self.model,
                fingerprint=self.fingerprint, format=FORMAT, chunk_tokens=self.chunk_tokens,
                created=(previous.created if previous and previous.created is not None else now), updated=now,
                turns=sum(1 for m in messages if m["role"] == "user"))
            if previous is not None and not previous.recovered and cache is not None and \
                    (previous.format, previous.fingerprint, previous.chunk_tokens) == \
                    (FORMAT, self.fingerprint, self.chunk_tokens):  # until the new KV is listed, the last save's
                text = replace(text, token_ids=previous.token_ids, chunks=previous.chunks,
                               tail_key=previous.tail_key, states=previous.states)
            notice = None
            if cache is not None:
                try:
                    kv = self._bound().write_session(name, cache)
                    text = replace(text, token_ids=kv.token_ids, chunks=kv.chunks, tail_key=kv.tail_key,
                                   states=kv.states)
                except OSError as exc:  # (a failed write leaves no partial file: its space is free again)
                    notice = (f"session '{name}': its text is saved, its KV is not ({os_reason(exc, self.root)}); "
                              "resuming it re-reads what is missing")
            try:
                self.write_manifest(text, previous)
                self._follows[name], self._saved[name] = text.updated, list(messages)
            except OSError as exc:
                turns = f"{previous.turns} turn{'' if previous.turns == 1 else 's'}" if previous else ""
                kept = f"the save before ({turns}) is intact" if previous else "nothing of it was saved"
                raise StoreError(f"cannot save session '{name}' in {self.root}: {os_reason(exc, self.root)}; "
                                 f"{kept}") from None
            try:
                self.journal_path(name).unlink(missing_ok=True)  # its turn is saved
            except OSError:
                pass  # (not a file) it follows an older save: never used
            return notice

    def start_journal(self, name: str, turn: Any) -> Journal:
        """Journal a turn of session `name` (open in this store); `turn` has the fields of a `JournalTurn` but
        `follows` and `text` (a chat's `TurnStart`). Raises OSError."""
        saved = self._saved.get(name)
        return Journal(self.journal_path(name), JournalTurn(
            self._follows.get(name), turn.before, turn.before_first_kept, turn.messages, turn.first_kept,
            turn.continuing, before_saved=saved is not None and turn.before == saved))
