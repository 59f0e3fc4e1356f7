"""Random damage to random store files: `python tests/corruption_loop.py [ROUNDS]` (the suite runs a short form).

A store with two saved sessions (three turns each, so each has a previous save) and a shared prefix is
copied afresh for every round; one file in it (lock files included) is truncated, bit-flipped, zeroed, deleted, swapped with
another file of the store, replaced by a directory, a FIFO, or a symlink to a file outside the store, or
made unreadable (permission 000). Run as root, the rounds read the store as a non-root user (nobody; the
store is handed to that user and the process takes its effective uid while kvchat works), since
permission bits do not stop root.
Then both sessions are opened and sent one more message by a new engine. Checked every round: no
exception but a one-line StoreError, every reply equal to a cache-free greedy run (no wrong KV used),
the file outside the store untouched, and each transcript intact unless its manifest was the file hit
(then the previous save, or one clear error) or its lock file cannot be opened (one clear error naming it;
the transcript is untouched).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference import greedy_without_cache  # noqa: E402
from tiny import make_loaded  # noqa: E402

from kvchat.store import manifests as store_module  # noqa: E402
from kvchat.config import Sampling  # noqa: E402
from kvchat.chat.chat import Chat  # noqa: E402
from kvchat.chat.engine import Engine, TurnEnd  # noqa: E402
from kvchat.chat.saving import Persister, open_chat  # noqa: E402
from kvchat.weights.model import fingerprint  # noqa: E402
from kvchat.store.sessions import Store, StoreError  # noqa: E402

GREEDY = Sampling(temperature=0, max_new_tokens=6)
DAMAGES = ("truncate", "flip", "zero", "delete", "swap", "directory", "fifo", "symlink-out", "unreadable")
NOBODY = 65534  # the user a root run reads the store as


def _build(root: Path, loaded) -> dict[str, list]:
    engine = Engine(loaded)
    store = Store(root).bind(engine.layout, fingerprint(loaded), loaded.name)
    transcripts = {}
    for name, topic in (("s", "cats"), ("t", "dogs")):
        chat = Chat.start(engine, "You are a helpful assistant.", sampling=GREEDY, prefixes=store.longest_prefix)
        for i in range(3):
            list(chat.send(f"Tell me about {topic}, part {i}."))
            Persister(store, name).after_turn(chat)
        transcripts[name] = [dict(m) for m in chat.messages]
    store.close()
    return transcripts


def _damage(path: Path, how: str, files: list[Path], outside: Path, rng: random.Random) -> None:
    if how == "unreadable":
        path.chmod(0)
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


def _rounds(rounds: int, seed: int, damages: tuple[str, ...]) -> dict[str, int]:
    import signal

    user = NOBODY if os.geteuid() == 0 else None
    rng = random.Random(seed)
    loaded = make_loaded(torch.float64)
    figures = {"rounds": 0, "intact": 0, "older": 0, "recovered": 0, "refused": 0, "rebuilt": 0,
               "as_user": os.geteuid() if user is None else user}
    fp = fingerprint(loaded)
    with tempfile.TemporaryDirectory() as tmp:
        pristine = Path(tmp) / "pristine"
        transcripts = _build(pristine, loaded)
        outside = Path(tmp) / "outside.txt"
        outside.write_text("not the store's")
        for _ in range(rounds):
            root = Path(tmp) / "round"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(pristine, root, symlinks=True)
            files = sorted(p for p in root.rglob("*") if p.is_file())
            target, how = rng.choice(files), rng.choice(damages)
            _damage(target, how, files, outside, rng)
            if user is not None:
                _hand_over(root, user)
                os.chown(tmp, user, user)
            engine = Engine(loaded)
            signal.alarm(60)  # a FIFO must never make kvchat wait
            try:
                with _as_user(user):
                    store = Store(root).bind(engine.layout, fp, loaded.name)
                    try:
                        for name in ("s", "t"):
                            _continue_session(store, engine, name, transcripts[name], (target, how, root), figures)
                    finally:
                        store.close()
            finally:
                signal.alarm(0)
            assert outside.read_text() == "not the store's"
            figures["rounds"] += 1
    return figures


def _continue_session(store: Store, engine: Engine, name: str, transcript: list, damage: tuple,
                      figures: dict[str, int]) -> None:
    """Open session `name` of a damaged store and send it one more message; count how it came back."""
    target, how, root = damage
    try:
        opened = open_chat(engine, store, name)  # (the chat's empty cache is seeded from the store's prefixes)
    except StoreError as exc:
        assert "\n" not in str(exc)
        locked_out = target.name in (f"{name}.lock", "store.lock") and "lock" in str(exc)
        assert target.name == f"{name}.json" or how == "swap" or locked_out, f"{name} refused for {how} {target}"
        figures["refused"] += 1
        return
    chat = opened.chat
    if chat.messages == transcript:
        figures["intact"] += 1
    elif how == "swap" and chat.messages == transcript[:len(chat.messages)]:
        figures["older"] += 1  # swapped with its own previous save: older, never foreign
    else:
        assert opened.notice and "recovered" in opened.notice, f"{name} changed by {how} {target}"
        figures["recovered"] += 1
    figures["rebuilt"] += opened.notice is not None
    chat.sampling = GREEDY
    end = [e for e in chat.send("And then?") if isinstance(e, TurnEnd)][0]
    want = greedy_without_cache(engine.model, engine.render(chat.conversation.view()[:-1]), 6, engine.stop_ids)
    assert end.token_ids == want, f"wrong reply after {how} of {target.relative_to(root)}"
    try:
        Persister(store, name).after_turn(chat)
    except StoreError as exc:
        assert "\n" not in str(exc)


def main(argv: list[str]) -> int:
    figures = run_rounds(int(argv[0]) if argv else 100)
    print(f"{figures['rounds']} damaged stores: no traceback, no wrong reply, nothing outside touched; sessions "
          f"intact {figures['intact']}, recovered from the previous save {figures['recovered']}, an older save "
          f"of its own swapped in {figures['older']}, refused in one "
          f"line {figures['refused']}; {figures['rebuilt']} opens rebuilt their cache from the text; read as "
          f"uid {figures['as_user']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
