"""Random damage to random store files: `python tests/corruption_loop.py [ROUNDS]` (the suite runs a short form).

A store with two saved sessions (three turns each, so each has a previous save) and a shared prefix is
copied afresh for every round; one file in it is truncated, bit-flipped, zeroed, deleted, swapped with
another file of the store, replaced by a directory, a FIFO, or a symlink to a file outside the store.
Then both sessions are opened and sent one more message by a new engine. Checked every round: no
exception but a one-line StoreError, every reply equal to a cache-free greedy run (no wrong KV used),
the file outside the store untouched, and each transcript intact unless its manifest was the file hit
(then the previous save, or one clear error).
"""

from __future__ import annotations

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

from kvchat import store as store_module  # noqa: E402
from kvchat.config import Sampling  # noqa: E402
from kvchat.conversation import Conversation  # noqa: E402
from kvchat.engine import Engine, TurnEnd  # noqa: E402
from kvchat.model import fingerprint  # noqa: E402
from kvchat.store import Persister, Store, StoreError  # noqa: E402

GREEDY = Sampling(temperature=0, max_new_tokens=6)
DAMAGES = ("truncate", "flip", "zero", "delete", "swap", "directory", "fifo", "symlink-out")


def _build(root: Path, loaded) -> dict[str, list]:
    engine = Engine(loaded)
    store = Store(root).bind(engine, fingerprint(loaded))
    engine.prefix_source = store.longest_prefix
    transcripts = {}
    for name, topic in (("s", "cats"), ("t", "dogs")):
        conv = Conversation.start("You are a helpful assistant.")
        for i in range(3):
            list(engine.send(conv, f"Tell me about {topic}, part {i}.", GREEDY))
            Persister(store, name).after_turn(conv)
        transcripts[name] = [dict(m) for m in conv.messages]
    store.close()
    return transcripts


def _damage(path: Path, how: str, files: list[Path], outside: Path, rng: random.Random) -> None:
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


def run_rounds(rounds: int, seed: int = 0) -> dict[str, int]:
    """Damage a fresh copy of the store `rounds` times; returns counts. Raises AssertionError on any failure."""
    chunk_tokens, store_module.CHUNK_TOKENS = store_module.CHUNK_TOKENS, 16  # several chunks and a tail each
    try:
        return _rounds(rounds, seed)
    finally:
        store_module.CHUNK_TOKENS = chunk_tokens


def _rounds(rounds: int, seed: int) -> dict[str, int]:
    import signal

    rng = random.Random(seed)
    loaded = make_loaded(torch.float64)
    figures = {"rounds": 0, "intact": 0, "older": 0, "recovered": 0, "refused": 0, "rebuilt": 0}
    with tempfile.TemporaryDirectory() as tmp:
        pristine = Path(tmp) / "pristine"
        transcripts = _build(pristine, loaded)
        outside = Path(tmp) / "outside.txt"
        outside.write_text("not the store's")
        for _ in range(rounds):
            root = Path(tmp) / "round"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(pristine, root, symlinks=True)
            files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
            target, how = rng.choice(files), rng.choice(DAMAGES)
            _damage(target, how, files, outside, rng)
            engine = Engine(loaded)
            store = Store(root).bind(engine, fingerprint(loaded))
            engine.prefix_source = store.longest_prefix
            signal.alarm(60)  # a FIFO must never make kvchat wait
            try:
                for name in ("s", "t"):
                    try:
                        opened = store.open_session(name)
                    except StoreError as exc:
                        assert "\n" not in str(exc)
                        assert target.name == f"{name}.json" or how == "swap", f"{name} refused for {how} {target}"
                        figures["refused"] += 1
                        continue
                    conv = opened.conversation
                    if conv.messages == transcripts[name]:
                        figures["intact"] += 1
                    elif how == "swap" and conv.messages == transcripts[name][:len(conv.messages)]:
                        figures["older"] += 1  # swapped with its own previous save: older, never foreign
                    else:
                        assert opened.notice and "recovered" in opened.notice, f"{name} changed by {how} {target}"
                        figures["recovered"] += 1
                    figures["rebuilt"] += opened.notice is not None
                    end = [e for e in engine.send(conv, "And then?", GREEDY) if isinstance(e, TurnEnd)][0]
                    want = greedy_without_cache(loaded.model, engine.render(conv.view()[:-1]), 6, engine.stop_ids)
                    assert end.token_ids == want, f"wrong reply after {how} of {target.relative_to(root)}"
                    try:
                        Persister(store, name).after_turn(conv)
                    except StoreError as exc:
                        assert "\n" not in str(exc)
            finally:
                signal.alarm(0)
                store.close()
            assert outside.read_text() == "not the store's"
            figures["rounds"] += 1
    return figures


def main(argv: list[str]) -> int:
    figures = run_rounds(int(argv[0]) if argv else 100)
    print(f"{figures['rounds']} damaged stores: no traceback, no wrong reply, nothing outside touched; sessions "
          f"intact {figures['intact']}, recovered from the previous save {figures['recovered']}, an older save "
          f"of its own swapped in {figures['older']}, refused in one "
          f"line {figures['refused']}; {figures['rebuilt']} opens rebuilt their cache from the text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
