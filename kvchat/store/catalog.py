"""The sessions directory as a catalog: names, paths, locks, manifests, listing, removing, pruning and the size
cap. Never imports torch (`kvchat sessions` and `kvchat cache` answer at once); the KV tensors are `blobs.py`'s.

Layout under the sessions directory:

    NAME.json                      a session: messages (the text), token ids, the chunks that hold its KV
    NAME.lock                      held (flock) by the one process that has the session open
    NAME.journal                   the reply in progress, until the session's next save (see journal.py)
    .kv/chunks/KEY.safetensors     KV of `chunk_tokens` tokens (or a prefix's last, shorter piece)
    .kv/tails/NAME-KEY.safetensors KV of a session's last, partial chunk (rewritten as the session grows)
    .kv/prefixes/KEY.json          a shared prefix (a system prompt): token ids and chunk list
    .kv/states/KEY.safetensors     recurrent/conv state after a shared prefix's tokens (models with state layers)
    .kv/states/NAME-KEY.safetensors  a session's state checkpoints (rewritten as it grows, like tails)
    .kv/previous/NAME.json         a session's save before its last one, to recover from a damaged manifest

Every path is built from a validated session name or a key kvchat computed, never from text read from a file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kvchat.config import dir_problem, private_dir
from kvchat.errors import KvchatError, one_line
from kvchat.store import kvfile, manifests
from kvchat.store.manifests import PrefixEntry, References, SessionManifest, is_key, kv_references

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LEFTOVER = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.(json|journal)\.\d+\.[0-9a-f]{12}\.tmp")  # atomic writes
NAME_RULE = "1-64 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"


class StoreError(KvchatError):
    """A session or store problem the user should see."""


def check_name(name: str) -> str:
    """Return `name` if it is a plain session name; refuse paths, '..', empty or overlong names."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = repr(name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "…")
        raise StoreError(f"invalid session name {shown}: use {NAME_RULE}")
    return name


def read_json(path: Path) -> Any:
    """A JSON file of the store, read without following links or blocking on a FIFO."""
    return json.loads(kvfile.read_bytes(path).decode("utf-8"))


def os_reason(exc: OSError, root: Path) -> str:
    """What went wrong, with the store file it happened to (relative to the store's `root`) when one is known."""
    reason = exc.strerror or str(exc)
    where = exc.filename2 or exc.filename
    if where is None:
        return reason
    path = Path(os.fsdecode(where))
    try:
        path = path.relative_to(root)
    except ValueError:
        pass
    return f"{path}: {reason}"


@dataclass
class StoreCounters:
    """Bytes and files written, for tests and the closing figures."""

    bytes_written: int = 0
    files_written: int = 0

    def add(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        self.files_written += 1


class SessionLocks:
    """Which sessions this process has open: one flock on NAME.lock each, so a second process gets a clear error
    instead of two processes writing one session."""

    def __init__(self, root: Path):
        self.root = root
        self._held: dict[str, int] = {}

    def lock(self, name: str) -> None:
        """Take the session's lock for this process; a second process gets a clear error.

        The lock file goes when the lock is let go (`unlock`); a process that locked a file just removed
        sees that its path no longer names that file and takes the lock again, on the file there now."""
        check_name(name)
        if name in self._held:
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
        self._held[name] = fd
        try:  # who holds it, for the other process's message; the lock itself is the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass  # a full disk: the session is still locked

    def _lock_file(self, name: str) -> int:
        """Open and flock NAME.lock; its descriptor, or a clear error."""
        path = self.root / f"{name}.lock"
        try:
            private_dir(self.root)
            fd = kvfile.open_regular(path, os.O_RDWR | os.O_CREAT)
        except kvfile.NotRegular:
            raise StoreError(f"session '{name}': its lock file {path} is not a regular file; remove it") from None
        except OSError as exc:  # a read-only or full store, a lock file made unreadable
            raise StoreError(f"cannot lock session '{name}' with {path}: {exc.strerror or exc}") from None
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
        fd = self._held.pop(name, None)
        if fd is not None:
            try:
                (self.root / f"{name}.lock").unlink(missing_ok=True)
            except OSError:
                pass  # a read-only store: the file stays, the lock still goes
            os.close(fd)  # closing releases the flock

    def close(self) -> None:
        for name in list(self._held):
            self.unlock(name)


class Catalog:
    """The sessions directory at `root`; `max_bytes` caps the KV on disk (0: no cap), enforced by evicting shared
    prefixes least recently used first. `chunk_tokens` is the store format's chunk size (tests make it small);
    KV saved with another size is not used."""

    def __init__(self, root: Path, max_bytes: int = 0, chunk_tokens: int | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.chunk_tokens = chunk_tokens or manifests.CHUNK_TOKENS
        self.chunks = self.root / ".kv" / "chunks"
        self.tails = self.root / ".kv" / "tails"
        self.prefixes = self.root / ".kv" / "prefixes"
        self.states = self.root / ".kv" / "states"
        self.previous = self.root / ".kv" / "previous"
        self.counters = StoreCounters()
        self.locks = SessionLocks(self.root)

    # -- paths (from validated names and computed keys only) ---------------------------------------

    def manifest_path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.json"

    def journal_path(self, name: str) -> Path:
        """Where a session's running turn is journaled (see `journal.py`)."""
        return self.root / f"{check_name(name)}.journal"

    def previous_path(self, name: str) -> Path:
        """Where a session's previous manifest is kept, to recover from a damaged one."""
        return self.previous / f"{check_name(name)}.json"

    def chunk_path(self, key: str) -> Path:
        assert is_key(key), "chunk paths come from computed keys"
        return self.chunks / f"{key}.safetensors"

    def tail_path(self, name: str, key: str) -> Path:
        """Session `name`'s tail file for the tokens `key` hashes."""
        assert is_key(key), "tail paths come from computed keys"
        return self.tails / f"{check_name(name)}-{key[:16]}.safetensors"

    def state_path(self, key: str, owner: str | None = None) -> Path:
        """A shared prefix's state file, or one of session `owner`'s."""
        assert is_key(key), "state paths come from computed keys"
        return self.states / (f"{check_name(owner)}-{key[:16]}.safetensors" if owner else f"{key}.safetensors")

    def prefix_path(self, key: str) -> Path:
        assert is_key(key), "prefix paths come from computed keys"
        return self.prefixes / f"{key}.json"

    def check_dirs(self) -> None:
        """Refuse, in one line, a store whose directories (the root or any below it) are symbolic links, not
        directories, or another user's: kvchat never reads, writes or deletes through a link, so a store planted
        in a directory someone else wrote (a cloned repository, an unpacked archive) cannot reach outside it.
        Directories that pass are this user's, and private once kvchat has written (`ensure_dirs`), so nobody
        else can swap them for links afterwards."""
        for path in (self.root, self.root / ".kv", self.chunks, self.tails, self.prefixes, self.states,
                     self.previous):
            problem = dir_problem(path)
            if problem is not None:
                raise StoreError(f"{path} {problem}; kvchat does not follow links in its store nor use other "
                                 "users' folders there (point sessions_dir at a real directory of your own)")

    def ensure_dirs(self) -> None:
        """Make the store's directories, private to this user (0700; looser existing ones are tightened)."""
        self.check_dirs()
        for path in (self.root, self.root / ".kv", self.chunks, self.tails, self.prefixes, self.states):
            private_dir(path)

    @contextmanager
    def store_lock(self, exclusive: bool) -> Iterator[None]:
        """Saves hold the store shared, prune and the size cap exclusive: a prune never deletes what a save
        has written and not yet listed (or its temporary files)."""
        self.ensure_dirs()
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

    # -- session locks (see SessionLocks) ----------------------------------------------------

    def lock(self, name: str) -> None:
        self.check_dirs()
        self.locks.lock(name)

    def unlock(self, name: str) -> None:
        self.locks.unlock(name)

    def close(self) -> None:
        """Let go of every session this process holds."""
        self.locks.close()

    # -- manifests ---------------------------------------------------------------------------

    def read_manifest(self, name: str) -> SessionManifest | None:
        """A session's manifest, checked (see `SessionManifest.parse`); None when it does not exist.

        A damaged one is replaced, in what is returned, by the previous save when that one is intact (its
        `recovered` then says why); when neither is, a StoreError (nothing is touched).
        """
        self.check_dirs()
        path = self.manifest_path(name)
        try:
            return SessionManifest.parse(read_json(path), name)
        except FileNotFoundError:
            if not self.previous_path(name).exists():
                return None
            reason = "its manifest is missing"
        except PermissionError as exc:  # unreadable is not damaged: a save would replace what we cannot read
            raise StoreError(f"session '{name}': {path} cannot be read ({exc.strerror}); it was left as it "
                             "is") from None
        except (OSError, ValueError) as exc:
            reason = one_line(exc)
        try:
            previous = SessionManifest.parse(read_json(self.previous_path(name)), name)
        except (OSError, ValueError):
            raise StoreError(f"session '{name}' cannot be read ({path.name}: {reason}); it was left as it "
                             "is") from None
        previous.recovered = reason
        return previous

    def write_manifest(self, manifest: SessionManifest, previous: SessionManifest | None) -> None:
        """Replace a session's manifest (atomically), keeping the one it replaces (`previous`, when intact) for
        recovery, then remove the session's own KV files that only `previous` listed."""
        name = manifest.name
        if previous is not None and not previous.recovered:  # keep the last good save: a hard link, no copy
            try:
                self._keep_previous(name)
            except OSError:
                pass  # (a full disk, a folder in its place) the text comes first; the next save tries again
        self.counters.add(kvfile.atomic_write(self.manifest_path(name), json.dumps(manifest.to_json()).encode()))
        for path in self.own_kv_files(previous) - self.own_kv_files(manifest):
            try:
                path.unlink(missing_ok=True)  # this session's own copies (a fork keeps its own links)
            except OSError:
                pass  # something else where a file of ours was (a folder): left as it is, it never matches a key

    def _keep_previous(self, name: str) -> None:
        private_dir(self.previous)
        keep = self.previous / f".{name}.{os.getpid()}.link.tmp"
        keep.unlink(missing_ok=True)
        try:
            os.link(self.manifest_path(name), keep)
            os.replace(keep, self.previous_path(name))
        except OSError:  # no hard links here: a copy
            keep.unlink(missing_ok=True)
            kvfile.atomic_write(self.previous_path(name), kvfile.read_bytes(self.manifest_path(name)))

    def own_kv_files(self, manifest: SessionManifest | None) -> set[Path]:
        """The tail and state files that belong to a session (paths from validated keys only)."""
        if manifest is None:
            return set()
        files = {self.state_path(entry.key, manifest.name) for entry in manifest.states}
        if is_key(manifest.tail_key):
            files.add(self.tail_path(manifest.name, manifest.tail_key))
        return files

    # -- shared prefix entries ---------------------------------------------------------------

    def prefix_entries(self) -> list[tuple[Path, PrefixEntry]]:
        """Every readable shared prefix entry (damaged ones are skipped, never used)."""
        self.check_dirs()
        entries = []
        for path in sorted(self.prefixes.glob("*.json")) if self.prefixes.is_dir() else []:
            if not is_key(path.stem):
                continue
            try:
                entries.append((path, PrefixEntry.parse(read_json(path), path.stem)))
            except (OSError, ValueError):
                continue
        return entries

    def write_prefix(self, entry: PrefixEntry) -> None:
        self.counters.add(kvfile.atomic_write(self.prefix_path(entry.key), json.dumps(entry.to_json()).encode()))

    def touch(self, entry: PrefixEntry, now: float) -> None:
        """Mark a prefix entry as used at `now` (for least-recently-used eviction); best effort."""
        entry.last_used = now
        try:
            kvfile.atomic_write(self.prefix_path(entry.key), json.dumps(entry.to_json()).encode())
        except OSError:
            pass  # a read-only store still serves its prefixes

    # -- list, show, remove ------------------------------------------------------------------

    def list_sessions(self) -> list[dict[str, Any]]:
        """One row per session: name, turns, tokens, bytes on disk (shared chunks counted in full), last used."""
        self.check_dirs()
        rows = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            try:
                manifest = SessionManifest.parse(read_json(path), path.stem)
            except (OSError, ValueError):
                rows.append({"name": path.stem, "turns": "?", "tokens": "?", "bytes": path.lstat().st_size,
                             "updated": path.lstat().st_mtime, "damaged": True})
                continue
            files = {self.chunk_path(key) for key in manifest.chunks if is_key(key)}
            if NAME_PATTERN.fullmatch(path.stem):
                files |= self.own_kv_files(manifest)
            size = path.stat().st_size + sum(f.stat().st_size for f in files if f.exists())
            rows.append({"name": path.stem, "turns": manifest.turns, "tokens": len(manifest.token_ids),
                         "bytes": size, "updated": manifest.updated or path.stat().st_mtime,
                         "model": manifest.model})
        return rows

    def remove_session(self, name: str) -> None:
        """Delete a session's manifest, tail, states and previous save, damaged or not (its chunks go at the next
        prune if nothing else uses them). A manifest that is not a regular file is left, with one line."""
        try:
            manifest = self.read_manifest(name)
        except StoreError:  # damaged beyond recovery, or unreadable: removed all the same
            manifest = None
        path = self.manifest_path(name)
        others = (self.previous_path(name), self.journal_path(name))
        if manifest is None and not any(map(os.path.lexists, (path, *others))):
            raise StoreError(f"no session named '{name}' in {self.root}")
        self.lock(name)
        try:
            with self.store_lock(exclusive=False):
                for kv in self.own_kv_files(manifest):
                    kv.unlink(missing_ok=True)
                for found in (self.journal_path(name), self.previous_path(name), path):
                    if os.path.lexists(found) and stat.S_IFMT(os.lstat(found).st_mode) not in (stat.S_IFREG, stat.S_IFLNK):
                        raise StoreError(f"session '{name}': {found} is not a file; kvchat removes only files "
                                         "(remove it yourself)")
                    found.unlink(missing_ok=True)
        finally:
            self.unlock(name)  # removes the lock file while still held: no other process owns it yet

    # -- the store as a whole ----------------------------------------------------------------

    def _referenced(self) -> References:
        """The KV files some session, previous save or prefix entry may use."""
        refs = References()
        for path in [*self.root.glob("*.json"), *self.previous.glob("*.json")]:
            try:
                kv_references(read_json(path), path.stem if NAME_PATTERN.fullmatch(path.stem) else None, refs)
            except (OSError, ValueError):
                continue
        for path in self.prefixes.glob("*.json"):
            try:
                kv_references(read_json(path), None, refs)
            except (OSError, ValueError):
                continue
        return refs

    def prune(self) -> tuple[int, int]:
        """Delete chunks, tails and leftovers that nothing uses; returns (files removed, bytes freed)."""
        self.check_dirs()
        if not self.chunks.parent.is_dir():
            return 0, 0
        with self.store_lock(exclusive=True):
            return self._prune()

    def _prune(self) -> tuple[int, int]:
        refs = self._referenced()
        tails = {self.tail_path(name, key).name for name, key in refs.tails}
        states = {self.state_path(key, name).name for name, key in refs.session_states}
        states |= {self.state_path(key).name for key in refs.shared_states}
        candidates = [p for p in self.chunks.glob("*.safetensors") if p.stem not in refs.chunks]
        candidates += [p for p in self.tails.glob("*.safetensors") if p.name not in tails]
        candidates += [p for p in self.states.glob("*.safetensors") if p.name not in states]
        candidates += self._leftovers()
        removed = freed = 0
        for path in candidates:
            freed += path.lstat().st_size
            path.unlink(missing_ok=True)
            removed += 1
        return removed, freed

    def _leftovers(self) -> list[Path]:
        """Temporary files a killed or failed write left behind: in the sessions directory itself, only those
        named as kvchat names a manifest's (other programs' files there are never touched)."""
        return list(self.chunks.parent.glob("*/.*.tmp")) + \
            [path for path in self.root.glob(".*.tmp") if LEFTOVER.fullmatch(path.name)]

    def _kv_files(self) -> tuple[list[Path], list[Path], list[Path]]:
        """All chunk, session tail and state files."""
        return tuple(list(folder.glob("*.safetensors")) if folder.is_dir() else []  # type: ignore[return-value]
                     for folder in (self.chunks, self.tails, self.states))

    def kv_bytes(self) -> int:
        """Bytes of KV and recurrent state on disk (chunks, tails, states)."""
        return sum(path.stat().st_size for files in self._kv_files() for path in files)

    def summary(self) -> dict[str, Any]:
        """Sizes and counts for `kvchat cache`."""
        self.check_dirs()
        chunk_files, tail_files, _ = self._kv_files()
        prefixes = [{"key": entry.key, "tokens": len(entry.token_ids), "last_used": entry.last_used}
                    for _, entry in self.prefix_entries()]
        used_chunks = self._referenced().chunks if self.chunks.parent.is_dir() else set()
        return {
            "root": str(self.root), "chunks": len(chunk_files), "tails": len(tail_files),
            "bytes": self.kv_bytes(), "sessions": len(self.list_sessions()),
            "prefixes": sorted(prefixes, key=lambda p: -p["last_used"]),
            "unused_chunks": sum(1 for p in chunk_files if p.stem not in used_chunks),
            "leftovers": len(self._leftovers()) if self.chunks.parent.is_dir() else 0,
        }

    def enforce_cap(self, keep: str | None = None) -> None:
        """Evict least recently used prefix entries (and their unused chunks) while the store is over its cap,
        never the entry `keep` (the one just saved)."""
        if self.max_bytes <= 0:
            return
        with self.store_lock(exclusive=True):
            readable = {path: entry.last_used for path, entry in self.prefix_entries()}
            # A damaged entry is of no use: evicted first.
            entries = sorted((p for p in self.prefixes.glob("*.json") if p.stem != keep),
                             key=lambda p: readable.get(p, 0.0))
            while self.kv_bytes() > self.max_bytes and entries:
                entries.pop(0).unlink(missing_ok=True)
                self._prune()
