"""Random damage to a store: `python tests/corruption_loop.py [ROUNDS]` (200 by default; the suite runs a short form).

A store with two saved sessions (three turns each, so each has a previous save), a shared prefix, and for session
't' a fourth turn whose reply was printed but not saved (its journal: a process killed before the save) is copied
afresh for every round. Then one of these happens to it:

- a file (lock files and the journal included) is truncated, bit-flipped, zeroed, deleted, swapped with another
  file of the store, replaced by a directory, a FIFO or a symlink to a file outside the store, made unreadable
  (permission 000), or rewritten as well-formed JSON of the wrong shape (a field of the wrong type, or another
  value altogether; for a KV file its safetensors header);
- a directory of the store (the sessions directory itself or any below it) is replaced by a symbolic link to a
  copy of it elsewhere, or given to another user;
- the disk fills: after a random number of bytes every store write fails with ENOSPC, until the round gives
  the room back.

Run as root, the rounds work as a non-root user (nobody; the store is handed to that user and the process takes
its effective uid while kvchat works), since permission bits do not stop root. Then both sessions are opened
and sent one more message by a new engine, the reply going through the turn journal as the UI's does. Checked
every round: no exception but a one-line StoreError, every reply equal to a cache-free greedy run (no wrong KV
used), a sentinel tree beside the store (and the moved copy of a linked directory) byte for byte as it was, each
transcript intact unless its own files were hit (then the previous save, the saved turns without the journal's,
or one clear error), and, once the disk has room again, every turn whose reply was printed in the transcript.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import stat
import struct
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference import greedy_without_cache  # noqa: E402
from tiny import make_loaded  # noqa: E402

from kvchat.store import journal, kvfile  # noqa: E402
from kvchat.store import manifests as store_module  # noqa: E402
from kvchat.config import Sampling  # noqa: E402
from kvchat.chat.chat import Chat  # noqa: E402
from kvchat.chat.engine import Engine, Token, TurnEnd  # noqa: E402
from kvchat.chat.saving import Persister, open_chat  # noqa: E402
from kvchat.weights.model import fingerprint  # noqa: E402
from kvchat.store.sessions import Store, StoreError  # noqa: E402

GREEDY = Sampling(temperature=0, max_new_tokens=6)
FILE_DAMAGES = ("truncate", "flip", "zero", "delete", "swap", "directory", "fifo", "symlink-out", "unreadable",
                "wrong-shape")
DIR_DAMAGES = ("dir-link", "dir-foreign")
DAMAGES = FILE_DAMAGES + DIR_DAMAGES + ("full-disk",)
WRONG = [[], {}, 5, -1, "x", None, True, 1e308, [[]], {"a": []}]
NOBODY = 65534  # the user a root run reads the store as


def _build(root: Path, loaded) -> tuple[dict[str, list], dict[str, list]]:
    """The pristine store; the transcripts each session opens with, and those saved (without a journaled turn)."""
    engine = Engine(loaded)
    store = Store(root).bind(engine.layout, fingerprint(loaded), loaded.name)
    transcripts, saved = {}, {}
    for name, topic in (("s", "cats"), ("t", "dogs")):
        chat = Chat.start(engine, "You are a helpful assistant.", sampling=GREEDY, prefixes=store.longest_prefix)
        persister = Persister(store, name)
        for i in range(3):
            list(persister.journaled(chat.send(f"Tell me about {topic}, part {i}.")))
            persister.after_turn(chat)
        saved[name] = transcripts[name] = [dict(m) for m in chat.messages]
    question = "And what else?"  # t: printed as far as three tokens, then the process died before its save
    chat = open_chat(engine, store, "t").chat
    chat.sampling = GREEDY
    events, printed = Persister(store, "t").journaled(chat.send(question)), ""
    for event in events:
        printed += getattr(event, "text", "")
        if isinstance(event, Token) and len(printed) >= 3:
            break
    events.close()
    transcripts["t"] = saved["t"] + [{"role": "user", "content": question}, {"role": "assistant", "content": printed}]
    store.close()
    return transcripts, saved


def _wrong_shape(path: Path, rng: random.Random) -> None:
    """Rewrite `path` as well-formed JSON of the wrong shape: a field of the wrong type, or another value."""
    data = path.read_bytes()
    if path.suffix == ".safetensors" and len(data) >= 8:
        size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + size])
        key = rng.choice(sorted(header))
        if isinstance(header[key], dict) and header[key] and rng.random() < 0.8:
            header[key][rng.choice(sorted(header[key]))] = rng.choice(WRONG)
        else:
            header[key] = rng.choice(WRONG)
        body = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + size:])
        return
    if path.suffix == ".journal":
        from kvchat.store.journal import _line

        lines = data.split(b"\n")
        crc_value = json.loads(lines[0])[1]
        crc_value[rng.choice(sorted(crc_value))] = rng.choice(WRONG)
        path.write_bytes(b"".join([_line(crc_value), *[line + b"\n" for line in lines[1:-1]]]))
        return
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if isinstance(value, dict) and value and rng.random() < 0.8:
        value[rng.choice(sorted(value))] = rng.choice(WRONG)
    else:
        value = rng.choice(WRONG)
    path.write_text(json.dumps(value))


def _damage(path: Path, how: str, files: list[Path], outside: Path, rng: random.Random) -> None:
    if how == "unreadable":
        path.chmod(0)
        return
    if how == "wrong-shape":
        _wrong_shape(path, rng)
        return
    if how in ("truncate", "flip", "zero") and path.stat().st_size:
        data = bytearray(path.read_bytes())
        if how == "truncate":
            data = data[: rng.randrange(len(data))]
        elif how == "flip":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            start = rng.randrange(len(data))
            data[start:start + 64] = bytes(len(data[start:start + 64]))
        path.write_bytes(bytes(data))
        return
    if how == "swap":
        other = rng.choice([f for f in files if f != path])
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
        return
    path.unlink()
    if how == "directory":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "symlink-out":
        path.symlink_to(outside)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file, folder and link under `root` (itself included) with what it holds, where it points, its mode
    and owner."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        what = f"{stat.S_IMODE(info.st_mode):o}:{info.st_uid}"
        if path.is_symlink():
            what += " -> " + os.readlink(path)
        elif path.is_file():
            what += " " + hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(root))] = what
    return found


def run_rounds(rounds: int, seed: int = 0, damages: tuple[str, ...] = DAMAGES) -> dict[str, int]:
    """Damage a fresh copy of the store `rounds` times; returns counts. Raises AssertionError on any failure."""
    chunk_tokens, store_module.CHUNK_TOKENS = store_module.CHUNK_TOKENS, 16  # several chunks and a tail each
    try:
        return _rounds(rounds, seed, damages)
    finally:
        store_module.CHUNK_TOKENS = chunk_tokens


@contextlib.contextmanager
def _as_user(uid: int | None):
    """Run the block with effective uid and gid `uid` (None: as is); always back to root after."""
    if uid is None:
        yield
        return
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _hand_over(top: Path, uid: int) -> None:
    for path in [top, *top.rglob("*")]:
        os.chown(path, uid, uid, follow_symlinks=False)


class FullDisk:
    """Store writes fail with ENOSPC once `budget` bytes are written (a write that does not fit writes nothing, as
    kvchat's atomic writes promise), until `room()`."""

    def __init__(self, budget: int):
        self.budget, self.full = budget, False
        self.real_atomic, self.real_journal = kvfile.atomic_write, journal.Journal._write

    def _spend(self, size: int) -> None:
        if self.budget is not None and size > self.budget:
            self.budget, self.full = 0, True
            raise OSError(errno.ENOSPC, "No space left on device")
        if self.budget is not None:
            self.budget -= size

    def __enter__(self) -> "FullDisk":
        disk = self

        def atomic_write(path, data):
            disk._spend(len(data))
            return disk.real_atomic(path, data)

        def journal_write(self_, data):
            disk._spend(len(data))
            return disk.real_journal(self_, data)

        kvfile.atomic_write, journal.Journal._write = atomic_write, journal_write
        return self

    def room(self) -> None:
        self.budget = None

    def __exit__(self, *exc) -> None:
        kvfile.atomic_write, journal.Journal._write = self.real_atomic, self.real_journal


def _rounds(rounds: int, seed: int, damages: tuple[str, ...]) -> dict[str, int]:
    import signal

    user = NOBODY if os.geteuid() == 0 else None
    if user is None:
        damages = tuple(d for d in damages if d != "dir-foreign") or ("truncate",)  # (only root can give a folder away)
    rng = random.Random(seed)
    loaded = make_loaded(torch.float64)
    figures = {"rounds": 0, "intact": 0, "older": 0, "recovered": 0, "refused": 0, "rebuilt": 0, "full_disk": 0,
               "disk_full_hit": 0, "as_user": os.geteuid() if user is None else user}
    fp = fingerprint(loaded)
    with tempfile.TemporaryDirectory() as tmp:
        pristine = Path(tmp) / "pristine"
        transcripts, saved = _build(pristine, loaded)
        sentinel = Path(tmp) / "sentinel"  # beside the store: never read, written or deleted
        (sentinel / "deep").mkdir(parents=True)
        (sentinel / "weights.safetensors").write_bytes(os.urandom(4096))
        (sentinel / "deep" / "notes.json").write_text('{"mine": true}')
        outside = sentinel / "outside.txt"
        outside.write_text("not the store's")
        for _ in range(rounds):
            root = Path(tmp) / "round"
            moved = Path(tmp) / "moved"
            for old in (root, moved):
                if old.is_symlink():
                    old.unlink()
                shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(pristine, root, symlinks=True)
            files = sorted(p for p in root.rglob("*") if p.is_file())
            folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
            how = rng.choice(damages)
            target = rng.choice(folders if how in DIR_DAMAGES else files)
            if how in FILE_DAMAGES:
                _damage(target, how, files, outside, rng)
            if user is not None:
                _hand_over(root, user)
                _hand_over(sentinel, user)
                os.chown(tmp, user, user)
            if how == "dir-link":  # the real folder moved beside the store, a link in its place
                target.rename(moved)
                target.symlink_to(moved)
                if user is not None:
                    os.chown(target, user, user, follow_symlinks=False)
            elif how == "dir-foreign":
                os.chown(target, 0, 0)
            before = tree_digest(sentinel), tree_digest(moved) if moved.exists() else None
            disk = FullDisk(rng.randrange(60_000)) if how == "full-disk" else contextlib.nullcontext()
            engine = Engine(loaded)
            signal.alarm(60)  # a FIFO must never make kvchat wait
            try:
                with _as_user(user), disk:
                    store = Store(root).bind(engine.layout, fp, loaded.name)
                    try:
                        for name in ("s", "t"):
                            _continue_session(store, engine, name, transcripts[name], saved[name],
                                              (target, how, root), figures, disk)
                    finally:
                        store.close()
            finally:
                signal.alarm(0)
            assert (tree_digest(sentinel), tree_digest(moved) if moved.exists() else None) == before, \
                f"outside the store changed after {how} of {target}"
            figures["rounds"] += 1
            figures["full_disk"] += how == "full-disk"
            figures["disk_full_hit"] += how == "full-disk" and disk.full
    return figures


def _continue_session(store: Store, engine: Engine, name: str, transcript: list, saved: list, damage: tuple,
                      figures: dict[str, int], disk) -> None:
    """Open session `name` of a damaged store and send it one more message; count how it came back."""
    target, how, root = damage
    try:
        opened = open_chat(engine, store, name)  # (the chat's empty cache is seeded from the store's prefixes)
    except StoreError as exc:
        assert "\n" not in str(exc)
        locked_out = target.name in (f"{name}.lock", "store.lock") and "lock" in str(exc)
        assert target.name == f"{name}.json" or how in ("swap", *DIR_DAMAGES) or locked_out, \
            f"{name} refused for {how} {target}: {exc}"
        figures["refused"] += 1
        return
    assert how not in DIR_DAMAGES, f"{name} opened through a {how} at {target}"
    chat = opened.chat
    journaled = len(transcript) > len(saved)
    if chat.messages == transcript:
        figures["intact"] += 1
    elif how == "swap" and chat.messages == transcript[:len(chat.messages)]:
        figures["older"] += 1  # swapped with its own previous save: older, never foreign
    elif journaled and (chat.messages == saved or (
            chat.messages[:-1] == transcript[:-1]
            and transcript[-1]["content"].startswith(chat.messages[-1]["content"]))):
        assert target.parent == root and target.name in (f"{name}.journal", f"{name}.json") or how == "swap", \
            f"{name}'s printed turn lost after {how} of {target}"
        figures["older"] += 1  # its journal hit: the saved turns, or the reply as far as it is intact
    else:
        assert opened.notice and "recovered" in opened.notice, f"{name} changed by {how} {target}"
        figures["recovered"] += 1
    figures["rebuilt"] += opened.notice is not None
    chat.sampling = GREEDY
    persister = Persister(store, name)
    end = [e for e in persister.journaled(chat.send("And then?")) if isinstance(e, TurnEnd)][0]
    want = greedy_without_cache(engine.model, engine.render(chat.conversation.view()[:-1]), 6, engine.stop_ids)
    assert end.token_ids == want, f"wrong reply after {how} of {target.relative_to(root)}"
    try:
        persister.after_turn(chat)
    except StoreError as exc:
        assert "\n" not in str(exc)
    if isinstance(disk, FullDisk):  # the disk has room again: the next save holds every printed turn
        disk.room()
        persister.after_turn(chat)
        manifest = store.read_manifest(name)
        assert manifest is not None and manifest.messages == chat.messages, f"{name}: a printed turn is not saved"


def main(argv: list[str]) -> int:
    figures = run_rounds(int(argv[0]) if argv else 200)
    print(f"{figures['rounds']} damaged stores: no traceback, no wrong reply, nothing outside touched; sessions "
          f"intact {figures['intact']}, recovered from the previous save {figures['recovered']}, an older save "
          f"of its own (or its saved turns without a damaged journal) {figures['older']}, refused in one "
          f"line {figures['refused']}; {figures['rebuilt']} opens had a notice; {figures['full_disk']} full "
          f"disks ({figures['disk_full_hit']} felt), every printed turn saved once there was room; read as "
          f"uid {figures['as_user']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
