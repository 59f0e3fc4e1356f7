"""The KV files of one model in a catalog: a `ChatCache`'s chunks, tails and recurrent-state snapshots written and
read back, given the cache's `Layout`, dtype and the model's fingerprint; it sees no chat and no model object.

A chunk's KEY hashes the model fingerprint and every token id up to the chunk's end, so equal prefixes (forks, a
common system prompt, a resumed session) map to the same files and are stored once, and saving after a turn
writes only chunks that do not exist yet. Every KV file carries a CRC32 of its tensor bytes, the fingerprint,
the format version and its key; any mismatch makes the KV unusable, never wrong: the conversation is then
rebuilt from its text.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvchat.store import kvfile
from kvchat.store.catalog import Catalog
from kvchat.store.kvfile import FORMAT, ChunkKeys, DamagedKV, chunk_key
from kvchat.store.manifests import PrefixEntry, SessionManifest, StateEntry

if TYPE_CHECKING:
    import torch

    from kvchat.cache.chat_cache import ChatCache
    from kvchat.cache.layers import Layout


def _link_twin(path: Path, key: str) -> bool:
    """Make `path` (a session's NAME-KEY file) a hard link to another session's file of the same key in the same
    folder (a fork's); False when there is none or the filesystem has no hard links (then write a copy)."""
    twin = next(path.parent.glob(f"*-{key[:16]}.safetensors"), None)
    if twin is None:
        return False
    try:
        os.link(twin, path)
    except OSError:
        return False
    return True


@dataclass
class SessionKV:
    """Where a session's cache went: the token ids it holds, their full chunks, the tail, the state entries."""

    token_ids: list[int]
    chunks: list[str]
    tail_key: str | None
    states: list[StateEntry]


class Blobs:
    """The KV of the model with cache `layout` and weights `fingerprint`, in `catalog`'s files."""

    def __init__(self, catalog: Catalog, layout: Layout, fingerprint: str):
        self.catalog, self.layout, self.fingerprint = catalog, layout, fingerprint
        self.damaged: set[Path] = set()  # files found unusable: written again, not skipped, by the next save

    def _stored(self, path: Path) -> bool:
        """Whether `path` holds its KV already (and need not be written): a file there not found damaged."""
        return path not in self.damaged and kvfile.is_regular(path)

    def _damage(self, exc: DamagedKV) -> str:
        """Note the file at fault, if any, to be written again; the reason."""
        if exc.path is not None:
            self.damaged.add(exc.path)
        return str(exc)

    # -- single files ------------------------------------------------------------------------

    def _meta(self, key: str, start: int, n_tokens: int) -> dict[str, str]:
        return {"fingerprint": self.fingerprint, "key": key, "start": str(start), "n_tokens": str(n_tokens)}

    def write_kv(self, path: Path, cache: ChatCache, key: str, start: int, end: int) -> None:
        """The KV of token positions [start, end) of `cache` into `path` (named from `key`)."""
        data = kvfile.encode(cache.export(start, end), self._meta(key, start, end - start))
        self.catalog.counters.add(kvfile.atomic_write(path, data))
        self.damaged.discard(path)

    def read_kv(self, path: Path, key: str, start: int, n_tokens: int) -> dict[str, torch.Tensor]:
        """Map and check one KV file of this model (see kvfile.read); raises DamagedKV."""
        pieces = self.layout.stored_pieces(n_tokens)
        return kvfile.read(path, self._meta(key, start, n_tokens), {name: shape for name, (shape, _) in pieces.items()},
                           {name: dtype for name, (_, dtype) in pieces.items()})

    def write_state(self, ids: list[int], state: dict[str, torch.Tensor], logits: Any = None,
                    owner: str | None = None, pinned: bool = False) -> StateEntry:
        """Store the recurrent state after `ids` (and the next-token logits there, when given), once; its entry.

        A session's own copy is a hard link to an identical one of another session (a fork) where possible.
        """
        key = chunk_key(self.fingerprint, ids)
        path = self.catalog.state_path(key, owner)
        if not self._stored(path) and not (path not in self.damaged and owner and _link_twin(path, key)):
            tensors = self.layout.encode_state(state)
            if logits is not None:
                tensors["logits"] = logits.detach().to("cpu").contiguous()
            data = kvfile.encode(tensors, {**self._meta(key, 0, len(ids)), "kind": "state"})
            self.catalog.counters.add(kvfile.atomic_write(path, data))
            self.damaged.discard(path)
        return StateEntry(len(ids), key, pinned)

    def read_state(self, ids: list[int], entry: StateEntry, owner: str | None = None) -> tuple[dict[str, Any], Any]:
        """The state snapshot (and logits, or None) `entry` names, checked against `ids`, on the CPU; raises
        DamagedKV."""
        key = chunk_key(self.fingerprint, ids)
        if entry.key != key or entry.tokens != len(ids):
            raise DamagedKV("a state entry does not match the token ids")
        layout = self.layout
        shapes, dtypes = layout.state_shapes(len(ids)), dict(layout.state_dtypes)
        shapes["logits"], dtypes["logits"] = layout.logits_shape, layout.logits_dtype
        tensors = kvfile.read(self.catalog.state_path(key, owner), {**self._meta(key, 0, len(ids)), "kind": "state"},
                              shapes, dtypes, optional=frozenset({"logits"}))
        logits = tensors.pop("logits", None)
        return layout.decode_state(tensors), logits

    # -- runs of chunks ----------------------------------------------------------------------

    def save_chunks(self, ids: list[int], cache: ChatCache, upto: int) -> list[str]:
        """Write the full chunks of ids[:upto] that are not stored yet; return all their keys."""
        keys, hasher = [], ChunkKeys(self.fingerprint)
        for end in range(self.catalog.chunk_tokens, upto + 1, self.catalog.chunk_tokens):
            key = hasher.advance(ids, end)
            path = self.catalog.chunk_path(key)
            if not self._stored(path):
                self.write_kv(path, cache, key, end - self.catalog.chunk_tokens, end)
            keys.append(key)
        return keys

    def load_listed(self, ids: list[int], chunks: list[str]) -> list[dict[str, torch.Tensor]]:
        """Load the chunks that hold ids: full chunks, then at most one shorter last piece; raises DamagedKV."""
        pieces, hasher, start = [], ChunkKeys(self.fingerprint), 0
        for key in chunks:
            end = min(start + self.catalog.chunk_tokens, len(ids))
            if hasher.advance(ids, end) != key:
                raise DamagedKV("the manifest's chunk list does not match its token ids")
            pieces.append(self.read_kv(self.catalog.chunk_path(key), key, start, end - start))
            start = end
        if start != len(ids):
            raise DamagedKV("the manifest lists fewer chunks than tokens")
        return pieces

    # -- a session's cache -------------------------------------------------------------------

    def write_session(self, name: str, cache: ChatCache) -> SessionKV:
        """Write what `cache` holds that is not stored yet, as session `name`'s: new full chunks, the partial
        tail, the state checkpoints a resume needs. Nothing (no ids) when the cache cannot be exported exactly."""
        if not cache.can_export():
            return SessionKV([], [], None, [])  # the text alone is saved; a resume prefills it
        ids = list(cache.ids)
        full = len(ids) // self.catalog.chunk_tokens * self.catalog.chunk_tokens
        chunks, tail_key = self.save_chunks(ids, cache, full), None
        if full < len(ids):
            tail_key = chunk_key(self.fingerprint, ids)
            path = self.catalog.tail_path(name, tail_key)
            # (a fork's identical tail is linked, unless this one was found damaged)
            if not self._stored(path) and (path in self.damaged or not _link_twin(path, tail_key)):
                self.write_kv(path, cache, tail_key, full, len(ids))
        states = []
        if ids and cache.has_state:
            # What a resume needs: the pinned checkpoints (the system prompt's), the last turn's three (before
            # its message, before the reply header, the prompt's end with its logits), and the state at the end.
            earlier = [c for c in cache.checkpoints if c.tokens < len(ids)]
            keep = [c for c in earlier if c.pinned] + [c for c in earlier if not c.pinned][-3:]
            for point in sorted(keep, key=lambda c: c.tokens):
                states.append(self.write_state(ids[:point.tokens], point.state, point.logits, name, point.pinned))
            at_end = cache.checkpoint_at(len(ids))  # an empty reply
            states.append(self.write_state(ids, cache.export_state(), at_end and at_end.logits, name))
        return SessionKV(ids, chunks, tail_key, states)

    def load_session(self, manifest: SessionManifest, cache: ChatCache) -> str | None:
        """Make `cache` hold the session's KV, state and checkpoints; why not, when they are not intact."""
        from kvchat.cache.chat_cache import Checkpoint

        ids, name = manifest.token_ids, manifest.name
        stateful = self.layout.has_state
        try:
            pieces = self._session_pieces(manifest)
            entries = manifest.states if stateful else []
            if stateful and (not entries or entries[-1].tokens != len(ids)):
                raise DamagedKV("the manifest lists no state at the end of its tokens")
            state, _ = self.read_state(ids, entries[-1], name) if stateful else (None, None)
        except DamagedKV as exc:
            return self._damage(exc)
        checkpoints = []
        for entry in entries:  # earlier checkpoints: /undo and /retry come back to them
            if entry.tokens > len(ids):
                continue
            try:
                saved, logits = self.read_state(ids[:entry.tokens], entry, name)
            except DamagedKV as exc:
                self._damage(exc)
                continue  # a lost checkpoint costs a longer prefill later, never a wrong one
            checkpoints.append(Checkpoint(entry.tokens, saved, logits, pinned=entry.pinned))
        return cache.adopt(list(ids), pieces, state, checkpoints)

    def _session_pieces(self, manifest: SessionManifest) -> list[dict[str, torch.Tensor]]:
        ids = manifest.token_ids
        full = len(manifest.chunks) * self.catalog.chunk_tokens
        pieces = self.load_listed(ids[:full], manifest.chunks)
        if full < len(ids):
            if not manifest.tail_key:
                raise DamagedKV("the manifest lists fewer chunks than tokens")
            key = chunk_key(self.fingerprint, ids)
            if manifest.tail_key != key:
                raise DamagedKV("the tail does not match the token ids")
            pieces.append(self.read_kv(self.catalog.tail_path(manifest.name, key), key, full, len(ids) - full))
        return pieces

    # -- shared prefixes ---------------------------------------------------------------------

    def save_prefix(self, ids: list[int], cache: ChatCache) -> bool:
        """Store the KV of ids (a prefix of what `cache` holds) as a shared prefix entry; False if already stored,
        or when it cannot be (a cache with recurrent state needs a checkpoint after exactly `ids`). The size cap
        is enforced afterwards, never evicting this entry.
        """
        key = chunk_key(self.fingerprint, ids)
        with self.catalog.store_lock(exclusive=False):
            saved = self._save_prefix(ids, key, cache)
        if saved:
            self.catalog.enforce_cap(keep=key)
        return saved

    def _save_prefix(self, ids: list[int], key: str, cache: ChatCache) -> bool:
        point = cache.checkpoint_at(len(ids))
        if (self.catalog.prefix_path(key).exists() and not self.damaged) or not ids or not cache.can_export() or \
                (cache.has_state and point is None) or list(cache.ids[:len(ids)]) != list(ids):
            return False
        full = len(ids) // self.catalog.chunk_tokens * self.catalog.chunk_tokens
        chunks = self.save_chunks(ids, cache, full)
        if full < len(ids):
            path = self.catalog.chunk_path(key)
            if not self._stored(path):
                self.write_kv(path, cache, key, full, len(ids))
            chunks.append(key)
        state = self.write_state(ids, point.state) if cache.has_state else None
        self.catalog.write_prefix(PrefixEntry(key, list(ids), chunks, self.fingerprint, self.catalog.chunk_tokens, state,
                                              time.time(), FORMAT))
        return True

    def longest_prefix(self, target: list[int], cache: ChatCache) -> int:
        """Make `cache` hold the longest stored KV whose tokens begin `target`; how many tokens it holds (0, the
        cache untouched, when nothing matches).

        Looks at chunk boundaries (any session's or prefix's full chunks) and at exact prefix entries.
        For a model with recurrent state only points with a stored state count, and only those short of
        the whole of `target` (a state cannot be cut back to leave a token to feed).
        Damaged files are skipped, never used.
        """
        if not self.catalog.chunks.is_dir():
            return 0
        stateful = self.layout.has_state
        limit = len(target) - 1 if stateful else len(target)
        candidates = [(len(entry.token_ids), entry.chunks, entry.state, entry)
                      for _, entry in self.catalog.prefix_entries()
                      if entry.fingerprint == self.fingerprint and entry.chunk_tokens == self.catalog.chunk_tokens
                      and 0 < len(entry.token_ids) <= limit and target[:len(entry.token_ids)] == entry.token_ids
                      and (entry.state or not stateful)]
        candidates += self._chunk_boundaries(target, limit, stateful)
        for length, chunks, state_entry, entry in sorted(candidates, key=lambda c: -c[0]):
            ids = list(target[:length])
            try:
                pieces = self.load_listed(ids, chunks)
                state = self.read_state(ids, state_entry)[0] if stateful else None
            except DamagedKV as exc:
                self._damage(exc)
                continue  # never used; a shorter candidate may still be intact
            if cache.adopt(ids, pieces, state) is not None:
                continue  # not what its tokens say: never used
            if entry is not None:
                self.catalog.touch(entry, time.time())
            return length
        return 0

    def _chunk_boundaries(self, target: list[int], limit: int, stateful: bool) -> list[tuple[Any, ...]]:
        """Candidates at stored full-chunk boundaries of `target`, longest first: the longest alone, or with
        recurrent state every one where a state was stored."""
        hasher, keys = ChunkKeys(self.fingerprint), []
        for end in range(self.catalog.chunk_tokens, limit + 1, self.catalog.chunk_tokens):
            key = hasher.advance(target, end)
            if not self.catalog.chunk_path(key).exists():
                break
            keys.append(key)
        found = []
        for n in range(len(keys), 0, -1):
            length = n * self.catalog.chunk_tokens
            if not stateful:
                return [(length, keys[:n], None, None)]
            key = chunk_key(self.fingerprint, target[:length])
            if self.catalog.state_path(key).exists():
                found.append((length, keys[:n], StateEntry(length, key), None))
        return found
