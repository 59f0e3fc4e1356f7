"""Sessions and shared prefixes on disk: KV in safetensors chunks, text and token ids in small JSON manifests.

Layout under the sessions directory:

    NAME.json                      a session: messages (the text), token ids, the chunks that hold its KV
    NAME.lock                      held (flock) by the one process that has the session open
    .kv/chunks/KEY.safetensors     KV of CHUNK_TOKENS tokens (or a prefix's last, shorter piece)
    .kv/tails/NAME-KEY.safetensors KV of a session's last, partial chunk (rewritten as the session grows)
    .kv/prefixes/KEY.json          a shared prefix (a system prompt): token ids and chunk list
    .kv/states/KEY.safetensors     recurrent/conv state after a shared prefix's tokens (models with state layers)
    .kv/states/NAME-KEY.safetensors  a session's state checkpoints (rewritten as it grows, like tails)

A chunk's KEY hashes the model fingerprint and every token id up to the chunk's end, so equal
prefixes (forks, a common system prompt, a resumed session) map to the same files and are stored
once, and saving after a turn writes only chunks that do not exist yet. Every KV file carries a
CRC32 of its tensor bytes, the fingerprint, the format version and its key; any mismatch makes the
KV unusable, never wrong: the conversation is then rebuilt from its text.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from kvchat.store import kvfile
from kvchat.errors import KvchatError, one_line
from kvchat.store.kvfile import FORMAT, ChunkKeys, DamagedKV, atomic_write, chunk_key

if TYPE_CHECKING:
    import torch

    from kvchat.cache.chat_cache import ChatCache
    from kvchat.cache.layers import Layout

# Listing, showing, removing and pruning sessions never import torch (kvchat sessions/cache answer at once):
# the KV side imports the cache adapter when it first needs it.

CHUNK_TOKENS = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_PATTERN = re.compile(r"[0-9a-f]{40}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"


class StoreError(KvchatError):
    """A session or store problem the user should see."""


def check_name(name: str) -> str:
    """Return `name` if it is a plain session name; refuse paths, '..', empty or overlong names."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = repr(name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "…")
        raise StoreError(f"invalid session name {shown}: use {NAME_RULE}")
    return name


def transcript_crc(messages: list[dict[str, Any]]) -> str:
    """A checksum of a transcript as saved (its canonical JSON)."""
    return str(zlib.crc32(json.dumps(messages, sort_keys=True, ensure_ascii=True).encode()))


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def check_manifest(manifest: Any, name: str) -> dict[str, Any]:
    """A session manifest whose every field kvchat reads has the right type, belongs to `name`, and whose
    transcript matches its checksum; raises ValueError saying what is wrong."""
    if not isinstance(manifest, dict):
        raise ValueError("the manifest is not a JSON object")
    if manifest.get("name", name) != name:
        raise ValueError(f"it is the manifest of another session ({str(manifest.get('name'))[:40]!r})")
    messages = manifest.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            and ("token_ids" not in m or _ints(m["token_ids"])) for m in messages):
        raise ValueError("its transcript is not a list of messages")
    if "transcript_crc" in manifest and manifest["transcript_crc"] != transcript_crc(messages):
        raise ValueError("its transcript fails its checksum")
    if not _ints(manifest.get("token_ids", [])):
        raise ValueError("its token ids are not a list of token ids")
    if not (isinstance(manifest.get("chunks", []), list) and all(isinstance(k, str) for k in manifest.get("chunks", []))):
        raise ValueError("its chunk list is damaged")
    if not isinstance(manifest.get("tail"), (dict, type(None))) or \
            not isinstance(manifest.get("states") or [], list):
        raise ValueError("its KV listing is damaged")
    first_kept = manifest.get("first_kept", 0)
    if type(first_kept) is not int or not 0 <= first_kept <= len(messages):
        raise ValueError("its first kept message is out of range")
    if not isinstance(manifest.get("turns", 0), int):
        raise ValueError("its turn count is damaged")
    manifest.setdefault("turns", sum(1 for m in messages if m["role"] == "user"))
    return manifest


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


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the store, read without following links or blocking on a FIFO."""
    return json.loads(kvfile.read_bytes(path).decode("utf-8"))


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


@dataclass
class StoreCounters:
    """Bytes and files written, for tests and the closing figures."""

    bytes_written: int = 0
    files_written: int = 0

    def add(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        self.files_written += 1


class Store:
    """The sessions directory. Methods that read or write KV need `bind(layout, fingerprint, model)` first."""

    def __init__(self, root: Path, max_bytes: int = 0):
        self.root = Path(root)
        self.max_bytes = max_bytes  # 0: no cap on the size of shared prefixes
        self.chunks = self.root / ".kv" / "chunks"
        self.tails = self.root / ".kv" / "tails"
        self.prefixes = self.root / ".kv" / "prefixes"
        self.states = self.root / ".kv" / "states"
        self.counters = StoreCounters()
        self.layout: Layout | None = None
        self.model = ""  # the model's name, written in manifests for `sessions list`
        self.fingerprint: str | None = None
        self._locks: dict[str, int] = {}

    def bind(self, layout: Layout, fingerprint: str, model: str = "") -> "Store":
        """Read and write the KV of the model with this cache `layout` and weights `fingerprint` (named `model`).

        Window-only sliding layers store other tensors than whole ones: a model run that way is another model.
        A model with state layers stores whole snapshots (counts and flags too), which older saves lack.
        """
        if layout.windows:
            fingerprint = f"{fingerprint}+windows"
        if layout.has_state:
            fingerprint = f"{fingerprint}+whole-state"
        self.layout, self.fingerprint, self.model = layout, fingerprint, model
        return self

    @contextmanager
    def _store_lock(self, exclusive: bool) -> Iterator[None]:
        """Saves hold the store shared, prune and the size cap exclusive: a prune never deletes what a save
        has written and not yet listed (or its temporary files)."""
        self._ensure_dirs()
        path = self.root / ".kv" / "store.lock"
        try:
            fd = kvfile.open_regular(path, os.O_RDWR | os.O_CREAT)
        except kvfile.NotRegular:
            raise
        except OSError as exc:  # say which file: a lock made unreadable is fixed by removing it
            raise OSError(exc.errno, f"{exc.strerror or exc} (the store's lock file {path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _ensure_dirs(self) -> None:
        for path in (self.chunks, self.tails, self.prefixes, self.states):
            path.mkdir(parents=True, exist_ok=True)

    def manifest_path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.json"

    # -- KV files ----------------------------------------------------------------------------

    def _write_kv(self, path: Path, cache: ChatCache, key: str, start: int, end: int) -> None:
        data = kvfile.encode(cache.export(start, end), self._kv_meta(key, start, end - start))
        self.counters.add(atomic_write(path, data))

    def _kv_meta(self, key: str, start: int, n_tokens: int) -> dict[str, str]:
        return {"fingerprint": self.fingerprint, "key": key, "start": str(start), "n_tokens": str(n_tokens)}

    def _read_kv(self, path: Path, key: str, start: int, n_tokens: int) -> dict[str, torch.Tensor]:
        """Map and check one KV file of this model (see kvfile.read); raises DamagedKV."""
        layout = self.layout
        shapes = {name: layout.piece_shape(name, n_tokens) for name in layout.per_token}
        return kvfile.read(path, self._kv_meta(key, start, n_tokens), shapes, layout.kv_dtype)


    def _state_path(self, key: str, owner: str | None = None) -> Path:
        """A shared prefix's state file, or one of session `owner`'s (both named from a key we computed)."""
        return self.states / (f"{check_name(owner)}-{key[:16]}.safetensors" if owner else f"{key}.safetensors")

    def _write_state(self, ids: list[int], state: dict[str, torch.Tensor], logits: Any = None,
                     owner: str | None = None) -> dict[str, Any]:
        """Store the recurrent state after `ids` (and the next-token logits there, when given), once; its entry.

        A session's own copy is a hard link to an identical one of another session (a fork) where possible.
        """
        key = chunk_key(self.fingerprint, ids)
        path = self._state_path(key, owner)
        if not path.exists() and not (owner and _link_twin(path, key)):
            tensors = self.layout.encode_state(state)
            if logits is not None:
                tensors["logits"] = logits.detach().to("cpu").contiguous()
            data = kvfile.encode(tensors, {**self._kv_meta(key, 0, len(ids)), "kind": "state"})
            self.counters.add(atomic_write(path, data))
        return {"tokens": len(ids), "key": key}

    def _read_state(self, ids: list[int], entry: dict[str, Any],
                    owner: str | None = None) -> tuple[dict[str, Any], Any]:
        """The state snapshot (and logits, or None) an entry of `_write_state` names, checked against `ids`, on the
        CPU; raises DamagedKV."""
        key = chunk_key(self.fingerprint, ids)
        if entry.get("key") != key or entry.get("tokens") != len(ids):
            raise DamagedKV("a state entry does not match the token ids")
        layout = self.layout
        shapes, dtypes = layout.state_shapes(len(ids)), dict(layout.state_dtypes)
        shapes["logits"], dtypes["logits"] = layout.logits_shape, layout.logits_dtype
        tensors = kvfile.read(self._state_path(key, owner), {**self._kv_meta(key, 0, len(ids)), "kind": "state"},
                              shapes, dtypes, optional=frozenset({"logits"}))
        logits = tensors.pop("logits", None)
        return layout.decode_state(tensors), logits

    def _chunk_path(self, key: str) -> Path:
        return self.chunks / f"{key}.safetensors"

    def _save_chunks(self, ids: list[int], cache: ChatCache, upto: int) -> list[str]:
        """Write the full chunks of ids[:upto] that are not stored yet; return all their keys."""
        keys, hasher = [], ChunkKeys(self.fingerprint)
        for end in range(CHUNK_TOKENS, upto + 1, CHUNK_TOKENS):
            key = hasher.advance(ids, end)
            path = self._chunk_path(key)
            if not path.exists():
                self._write_kv(path, cache, key, end - CHUNK_TOKENS, end)
            keys.append(key)
        return keys

    # -- shared prefixes ---------------------------------------------------------------------

    def save_prefix(self, ids: list[int], cache: ChatCache) -> bool:
        """Store the KV of ids (a prefix of what `cache` holds) as a shared prefix entry; False if already stored,
        or when it cannot be (a cache with recurrent state needs a checkpoint after exactly `ids`). The size cap
        is enforced afterwards, never evicting this entry.
        """
        with self._store_lock(exclusive=False):
            saved = self._save_prefix(ids, cache)
        if saved:
            self._enforce_cap(keep=chunk_key(self.fingerprint, ids))
        return saved

    def _save_prefix(self, ids: list[int], cache: ChatCache) -> bool:
        self._ensure_dirs()
        key = chunk_key(self.fingerprint, ids)
        entry_path = self.prefixes / f"{key}.json"
        point = cache.checkpoint_at(len(ids))
        if entry_path.exists() or not ids or not cache.can_export() or (cache.has_state and point is None) or \
                list(cache.ids[:len(ids)]) != list(ids):
            return False
        full = len(ids) // CHUNK_TOKENS * CHUNK_TOKENS
        chunks = self._save_chunks(ids, cache, full)
        if full < len(ids):
            path = self._chunk_path(key)
            if not path.exists():
                self._write_kv(path, cache, key, full, len(ids))
            chunks.append(key)
        entry = {"format": FORMAT, "fingerprint": self.fingerprint, "chunk_tokens": CHUNK_TOKENS,
                 "token_ids": ids, "chunks": chunks,
                 "state": self._write_state(ids, point.state) if cache.has_state else None,
                 "last_used": time.time()}
        self.counters.add(atomic_write(entry_path, json.dumps(entry).encode()))
        return True

    def longest_prefix(self, target: list[int], cache: ChatCache) -> int:
        """Make `cache` hold the longest stored KV whose tokens begin `target`; how many tokens it holds (0, the
        cache untouched, when nothing matches).

        Looks at chunk boundaries (any session's or prefix's full chunks) and at exact prefix entries.
        For a model with recurrent state only points with a stored state count, and only those short of
        the whole of `target` (a state cannot be cut back to leave a token to feed).
        Damaged files are skipped, never used.
        """
        if self.fingerprint is None or not self.chunks.is_dir():
            return 0
        stateful = self.layout.has_state
        limit = len(target) - 1 if stateful else len(target)
        hasher, full_keys = ChunkKeys(self.fingerprint), []
        for end in range(CHUNK_TOKENS, limit + 1, CHUNK_TOKENS):
            key = hasher.advance(target, end)
            if not self._chunk_path(key).exists():
                break
            full_keys.append(key)
        entries = []
        for entry_path in self.prefixes.glob("*.json"):
            try:
                entry = _read_json(entry_path)
            except (OSError, ValueError):
                continue
            ids = entry.get("token_ids", [])
            if entry.get("fingerprint") == self.fingerprint and entry.get("chunk_tokens") == CHUNK_TOKENS \
                    and 0 < len(ids) <= limit and target[:len(ids)] == ids and (entry.get("state") or not stateful):
                entries.append((len(ids), ids, entry["chunks"], (entry_path, entry)))
        # Chunk boundaries, longest first; with recurrent state only those where a state was stored.
        for n in range(len(full_keys), 0, -1):
            if not stateful:
                entries.append((n * CHUNK_TOKENS, target, full_keys[:n], None))
                break
            key = chunk_key(self.fingerprint, target[:n * CHUNK_TOKENS])
            if self._state_path(key).exists():
                entries.append((n * CHUNK_TOKENS, target, full_keys[:n], None))
        for length, ids, chunks, entry in sorted(entries, key=lambda e: -e[0]):
            try:
                pieces = self._load_listed(ids[:length], chunks)
                state = None
                if stateful:
                    stored = entry[1]["state"] if entry is not None else \
                        {"tokens": length, "key": chunk_key(self.fingerprint, ids[:length])}
                    state, _ = self._read_state(ids[:length], stored)
            except DamagedKV:
                continue  # never used; a shorter candidate may still be intact
            if cache.adopt(list(ids[:length]), pieces, state) is not None:
                continue  # not what its tokens say: never used
            if entry is not None:
                self._touch(*entry)
            return length
        return 0

    @staticmethod
    def _touch(entry_path: Path, entry: dict[str, Any]) -> None:
        """Mark a prefix entry as just used (for least-recently-used eviction); best effort."""
        entry["last_used"] = time.time()
        try:
            atomic_write(entry_path, json.dumps(entry).encode())
        except OSError:
            pass  # a read-only store still serves its prefixes

    def _load_listed(self, ids: list[int], chunks: list[str]) -> list[dict[str, torch.Tensor]]:
        """Load the chunks that hold ids: full chunks, then at most one shorter last piece."""
        pieces, hasher, start = [], ChunkKeys(self.fingerprint), 0
        for key in chunks:
            end = min(start + CHUNK_TOKENS, len(ids))
            if hasher.advance(ids, end) != key:
                raise DamagedKV("the manifest's chunk list does not match its token ids")
            pieces.append(self._read_kv(self._chunk_path(key), key, start, end - start))
            start = end
        if start != len(ids):
            raise DamagedKV("the manifest lists fewer chunks than tokens")
        return pieces

    # -- sessions ----------------------------------------------------------------------------

    def lock(self, name: str) -> None:
        """Take the session's lock for this process; a second process gets a clear error.

        The lock file goes when the lock is let go (`unlock`); a process that locked a file just removed
        sees that its path no longer names that file and takes the lock again, on the file there now."""
        check_name(name)
        if name in self._locks:
            return
        for _ in range(5):
            fd = self._lock_file(name)
            try:
                if os.fstat(fd).st_ino == os.stat(self.root / f"{name}.lock", follow_symlinks=False).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # it was removed by the process that held it: lock the one there now
        else:
            raise StoreError(f"cannot lock session '{name}': its lock file keeps being replaced")
        self._locks[name] = fd
        try:  # who holds it, for the other process's message; the lock itself is the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass  # a full disk: the session is still locked

    def _lock_file(self, name: str) -> int:
        """Open and flock NAME.lock; its descriptor, or a clear error."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = kvfile.open_regular(self.root / f"{name}.lock", os.O_RDWR | os.O_CREAT)
        except kvfile.NotRegular:
            raise StoreError(f"session '{name}': its lock file {self.root / (name + '.lock')} is not a regular "
                             "file; remove it") from None
        except OSError as exc:  # a read-only or full store, a lock file made unreadable
            raise StoreError(f"cannot lock session '{name}' with {self.root / (name + '.lock')}: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StoreError(f"session '{name}' is open in another kvchat process (pid {holder})") from None
            raise
        return fd

    def unlock(self, name: str) -> None:
        """Let go of the session's lock and remove its file (while still held: nobody else owns it yet)."""
        fd = self._locks.pop(name, None)
        if fd is not None:
            try:
                (self.root / f"{name}.lock").unlink(missing_ok=True)
            except OSError:
                pass  # a read-only store: the file stays, the lock still goes
            os.close(fd)  # closing releases the flock

    def close(self) -> None:
        for name in list(self._locks):
            self.unlock(name)

    def _previous_path(self, name: str) -> Path:
        """Where a session's previous manifest is kept, to recover from a damaged one."""
        return self.root / ".kv" / "previous" / f"{check_name(name)}.json"

    def read_manifest(self, name: str) -> dict[str, Any] | None:
        """A session's manifest, checked (see `check_manifest`); None when it does not exist.

        A damaged one is replaced, in what is returned, by the previous save when that one is intact (its
        'recovered' key then says why); when neither is, a StoreError (nothing is touched).
        """
        path = self.manifest_path(name)
        try:
            return check_manifest(_read_json(path), name)
        except FileNotFoundError:
            if not self._previous_path(name).exists():
                return None
            reason = "its manifest is missing"
        except (OSError, ValueError) as exc:
            reason = one_line(exc)
        try:
            previous = check_manifest(_read_json(self._previous_path(name)), name)
        except (OSError, ValueError):
            raise StoreError(f"session '{name}' cannot be read ({path.name}: {reason}); it was left as it "
                             "is") from None
        previous["recovered"] = reason
        return previous

    def open_session(self, name: str, cache: ChatCache | None = None) -> Opened:
        """Lock and read a session: its transcript and settings, and its KV into `cache` when that is intact (and
        a cache is given). A session that does not exist opens empty (`existed` False)."""
        self.lock(name)
        manifest = self.read_manifest(name)
        if manifest is None:
            return Opened()
        opened = Opened(messages=manifest["messages"], first_kept=manifest.get("first_kept", 0), existed=True,
                        settings=manifest["settings"] if isinstance(manifest.get("settings"), dict) else {})
        if manifest.get("recovered"):
            opened.notice = (f"session '{name}': its last save is damaged ({manifest['recovered']}); recovered the "
                             f"save before it ({manifest['turns']} turns), rebuilding its cache from the text")
            return opened
        ids = manifest.get("token_ids", [])
        if (manifest.get("format"), manifest.get("fingerprint"), manifest.get("chunk_tokens", CHUNK_TOKENS)) != \
                (FORMAT, self.fingerprint, CHUNK_TOKENS):
            opened.notice = f"session '{name}' was saved with another model or format; rebuilding its cache from the text"
            return opened
        if not ids or cache is None:
            return opened
        wrong = self._load_into(name, manifest, cache)
        if wrong is not None:
            opened.notice = f"session '{name}': KV not usable ({wrong}); rebuilding its cache from the text"
            return opened
        opened.loaded_tokens = len(ids)
        return opened

    def _load_into(self, name: str, manifest: dict[str, Any], cache: ChatCache) -> str | None:
        """Make `cache` hold the session's KV, state and checkpoints; why not, when they are not intact."""
        from kvchat.cache.chat_cache import Checkpoint

        ids = manifest["token_ids"]
        stateful = self.layout.has_state
        try:
            pieces = self._load_session_kv(name, manifest)
            entries = [e for e in manifest.get("states") or [] if isinstance(e, dict)] if stateful else []
            if stateful and (not entries or entries[-1].get("tokens") != len(ids)):
                raise DamagedKV("the manifest lists no state at the end of its tokens")
            state, _ = self._read_state(ids, entries[-1], name) if stateful else (None, None)
        except DamagedKV as exc:
            return str(exc)
        checkpoints = []
        for entry in entries:  # earlier checkpoints: /undo and /retry come back to them
            n = entry.get("tokens")
            if not isinstance(n, int) or not 0 < n <= len(ids):
                continue
            try:
                saved, logits = self._read_state(ids[:n], entry, name)
            except DamagedKV:
                continue  # a lost checkpoint costs a longer prefill later, never a wrong one
            checkpoints.append(Checkpoint(n, saved, logits, pinned=entry.get("pinned") is True))
        return cache.adopt(list(ids), pieces, state, checkpoints)

    def _load_session_kv(self, name: str, manifest: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        ids = manifest["token_ids"]
        chunks = list(manifest.get("chunks", []))
        tail = manifest.get("tail")
        full = len(chunks) * CHUNK_TOKENS
        pieces = self._load_listed(ids[:full], chunks)
        if full < len(ids):
            if not tail:
                raise DamagedKV("the manifest lists fewer chunks than tokens")
            key = chunk_key(self.fingerprint, ids)
            if tail.get("key") != key:
                raise DamagedKV("the tail does not match the token ids")
            pieces.append(self._read_kv(self._tail_path(name, key), key, full, len(ids) - full))
        return pieces

    def save_session(self, name: str, messages: list[dict[str, Any]], first_kept: int, cache: ChatCache | None,
                     settings: dict[str, Any]) -> None:
        """Write what is new since the last save: new full chunks, the partial tail, the manifest (the transcript
        `messages`, `first_kept`, the sampling `settings`, and what `cache` holds when it can be saved exactly)."""
        self.lock(name)
        with self._store_lock(exclusive=False):
            self._save_session(name, messages, first_kept, cache, settings)

    def _save_session(self, name: str, messages: list[dict[str, Any]], first_kept: int, cache: ChatCache | None,
                      settings: dict[str, Any]) -> None:
        previous = self.read_manifest(name)
        exportable = cache is not None and cache.can_export()
        ids = list(cache.ids) if exportable else []  # else the text alone is saved; a resume prefills it
        full = len(ids) // CHUNK_TOKENS * CHUNK_TOKENS
        chunks = self._save_chunks(ids, cache, full) if exportable else []
        tail = None
        if full < len(ids):
            key = chunk_key(self.fingerprint, ids)
            tail = {"key": key, "file": f"{name}-{key[:16]}.safetensors"}
            path = self._tail_path(name, key)
            if not path.exists():
                self._write_tail(path, cache, key, full, len(ids))
        states = []
        if ids and cache.has_state:
            # What a resume needs: the pinned checkpoints (the system prompt's), the last turn's three (before
            # its message, before the reply header, the prompt's end with its logits), and the state at the end.
            earlier = [c for c in cache.checkpoints if c.tokens < len(ids)]
            keep = [c for c in earlier if c.pinned] + [c for c in earlier if not c.pinned][-3:]
            for point in sorted(keep, key=lambda c: c.tokens):
                states.append({**self._write_state(ids[:point.tokens], point.state, point.logits, name),
                               "pinned": point.pinned})
            at_end = cache.checkpoint_at(len(ids))  # an empty reply
            states.append(self._write_state(ids, cache.export_state(), at_end and at_end.logits, name))
        now = time.time()
        manifest = {
            "format": FORMAT, "name": name, "model": self.model, "fingerprint": self.fingerprint,
            "created": (previous or {}).get("created", now), "updated": now,
            "turns": sum(1 for m in messages if m["role"] == "user"),
            "messages": messages, "first_kept": first_kept, "token_ids": ids, "chunk_tokens": CHUNK_TOKENS,
            "chunks": chunks, "tail": tail, "states": states, "settings": settings,
        }
        manifest["transcript_crc"] = transcript_crc(messages)
        if previous is not None and not previous.get("recovered"):  # keep the last good save: a hard link, no copy
            self._previous_path(name).parent.mkdir(parents=True, exist_ok=True)
            keep = self._previous_path(name).with_name(f".{name}.{os.getpid()}.link.tmp")
            keep.unlink(missing_ok=True)
            try:
                os.link(self.manifest_path(name), keep)
                os.replace(keep, self._previous_path(name))
            except OSError:  # no hard links here: a copy
                atomic_write(self._previous_path(name), kvfile.read_bytes(self.manifest_path(name)))
        self.counters.add(atomic_write(self.manifest_path(name), json.dumps(manifest).encode()))
        old_tail = self._tail_file(name, previous)
        if old_tail is not None and old_tail != self._tail_file(name, manifest):
            old_tail.unlink(missing_ok=True)
        for path in self._state_files(name, previous) - self._state_files(name, manifest):
            path.unlink(missing_ok=True)  # this session's own copies (a fork keeps its own links)

    def _tail_path(self, name: str, key: str) -> Path:
        """Session `name`'s tail file for the tokens `key` hashes (never a name read from a manifest)."""
        return self.tails / f"{check_name(name)}-{key[:16]}.safetensors"

    def _tail_file(self, name: str, manifest: dict[str, Any] | None) -> Path | None:
        """The tail a session's manifest lists, as a path built from its validated key, or None."""
        tail = (manifest or {}).get("tail")
        key = tail.get("key") if isinstance(tail, dict) else None
        return self._tail_path(name, key) if isinstance(key, str) and KEY_PATTERN.fullmatch(key) else None

    def _state_files(self, name: str, manifest: dict[str, Any] | None) -> set[Path]:
        """The state files session `name`'s manifest lists (paths from validated keys only)."""
        return {self._state_path(str(entry["key"]), name) for entry in (manifest or {}).get("states") or []
                if isinstance(entry, dict) and KEY_PATTERN.fullmatch(str(entry.get("key")))}

    def _write_tail(self, path: Path, cache: Any, key: str, start: int, end: int) -> None:
        """A session's tail; a hard link to an identical tail of another session (a fork) instead of a copy."""
        if not _link_twin(path, key):
            self._write_kv(path, cache, key, start, end)

    def list_sessions(self) -> list[dict[str, Any]]:
        """One row per session: name, turns, tokens, bytes on disk (shared chunks counted in full), last used."""
        rows = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            try:
                manifest = check_manifest(_read_json(path), path.stem)
            except (OSError, ValueError):
                rows.append({"name": path.stem, "turns": "?", "tokens": "?", "bytes": path.lstat().st_size,
                             "updated": path.lstat().st_mtime, "damaged": True})
                continue
            files = [self._chunk_path(key) for key in manifest.get("chunks", []) if KEY_PATTERN.fullmatch(key)]
            if NAME_PATTERN.fullmatch(path.stem):
                files += [tail for tail in [self._tail_file(path.stem, manifest)] if tail is not None]
                files += self._state_files(path.stem, manifest)
            size = path.stat().st_size + sum(f.stat().st_size for f in files if f.exists())
            rows.append({"name": path.stem, "turns": manifest.get("turns", 0),
                         "tokens": len(manifest.get("token_ids", [])), "bytes": size,
                         "updated": manifest.get("updated", path.stat().st_mtime), "model": manifest.get("model")})
        return rows

    def remove_session(self, name: str) -> None:
        """Delete a session's manifest, tail and states (its chunks go at the next prune if nothing else uses them)."""
        manifest = self.read_manifest(name)
        if manifest is None:
            raise StoreError(f"no session named '{name}' in {self.root}")
        self.lock(name)
        with self._store_lock(exclusive=False):
            tail = self._tail_file(name, manifest)
            if tail is not None:
                tail.unlink(missing_ok=True)
            for path in self._state_files(name, manifest):
                path.unlink(missing_ok=True)
            self._previous_path(name).unlink(missing_ok=True)
            self.manifest_path(name).unlink(missing_ok=True)
        (self.root / f"{name}.lock").unlink(missing_ok=True)  # while still held: no other process owns it yet
        self.unlock(name)

    # -- the store as a whole ----------------------------------------------------------------

    def _referenced(self) -> tuple[set[str], set[str], set[str]]:
        """Chunk keys, tail files and state file names that some session or prefix entry uses."""
        chunks, tails, states = set(), set(), set()
        previous = self.root / ".kv" / "previous"
        for path in [*self.root.glob("*.json"), *previous.glob("*.json"), *self.prefixes.glob("*.json")]:
            try:
                manifest = _read_json(path)
            except (OSError, ValueError):
                continue
            if not isinstance(manifest, dict):
                continue
            chunks.update(manifest.get("chunks", []))
            session = path.parent in (self.root, previous) and NAME_PATTERN.fullmatch(path.stem)
            tail = self._tail_file(path.stem, manifest) if session else None
            if tail is not None:
                tails.add(tail.name)
            shared = manifest.get("state")
            if isinstance(shared, dict):
                states.add(f"{shared.get('key')}.safetensors")
            if session:
                states.update(p.name for p in self._state_files(path.stem, manifest))
        return chunks, tails, states

    def prune(self) -> tuple[int, int]:
        """Delete chunks, tails and leftovers that nothing uses; returns (files removed, bytes freed)."""
        if not self.chunks.parent.is_dir():
            return 0, 0
        with self._store_lock(exclusive=True):
            return self._prune()

    def _prune(self) -> tuple[int, int]:
        used_chunks, used_tails, used_states = self._referenced()
        removed = freed = 0
        candidates = [p for p in self.chunks.glob("*.safetensors") if p.stem not in used_chunks]
        candidates += [p for p in self.tails.glob("*.safetensors") if p.name not in used_tails]
        candidates += [p for p in self.states.glob("*.safetensors") if p.name not in used_states]
        candidates += self._leftovers()
        for path in candidates:
            freed += path.lstat().st_size
            path.unlink(missing_ok=True)
            removed += 1
        return removed, freed

    def _leftovers(self) -> list[Path]:
        """Temporary files a killed or failed write left behind."""
        return list(self.chunks.parent.glob("*/.*.tmp")) + list(self.root.glob(".*.tmp"))

    def _kv_files(self) -> tuple[list[Path], list[Path]]:
        """All chunk files and all session tail files."""
        return (list(self.chunks.glob("*.safetensors")) if self.chunks.is_dir() else [],
                list(self.tails.glob("*.safetensors")) if self.tails.is_dir() else [])

    def kv_bytes(self) -> int:
        """Bytes of KV and recurrent state on disk (chunks, tails, states)."""
        states = list(self.states.glob("*.safetensors")) if self.states.is_dir() else []
        return sum(path.stat().st_size for files in (*self._kv_files(), states) for path in files)

    def summary(self) -> dict[str, Any]:
        """Sizes and counts for `kvchat cache`."""
        chunk_files, tail_files = self._kv_files()
        prefixes = []
        for path in self.prefixes.glob("*.json") if self.prefixes.is_dir() else []:
            try:
                entry = _read_json(path)
            except (OSError, ValueError):
                continue
            prefixes.append({"key": path.stem, "tokens": len(entry.get("token_ids", [])),
                             "last_used": entry.get("last_used", 0)})
        used_chunks = self._referenced()[0] if self.chunks.parent.is_dir() else set()
        return {
            "root": str(self.root), "chunks": len(chunk_files), "tails": len(tail_files),
            "bytes": self.kv_bytes(), "sessions": len(self.list_sessions()),
            "prefixes": sorted(prefixes, key=lambda p: -p["last_used"]),
            "unused_chunks": sum(1 for p in chunk_files if p.stem not in used_chunks),
            "leftovers": len(self._leftovers()) if self.chunks.parent.is_dir() else 0,
        }

    def _enforce_cap(self, keep: str | None = None) -> None:
        """Evict least recently used prefix entries (and their unused chunks) while the store is over its cap,
        never the entry `keep` (the one just saved)."""
        if self.max_bytes <= 0:
            return

        def last_used(path: Path) -> float:
            try:
                value = _read_json(path).get("last_used", 0)
            except (OSError, ValueError, AttributeError):
                return 0.0  # a damaged entry is of no use: evicted first
            return value if isinstance(value, (int, float)) else 0.0

        with self._store_lock(exclusive=True):
            entries = sorted((p for p in self.prefixes.glob("*.json") if p.stem != keep), key=last_used)
            while self.kv_bytes() > self.max_bytes and entries:
                entries.pop(0).unlink(missing_ok=True)
                self._prune()
