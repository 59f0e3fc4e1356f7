"""kill -9 at random moments of a scripted session with autosave: `python tests/kill_loop.py MODEL_DIR [KILLS]`.

Each round starts `kvchat --session crash --lines` on the model with a few messages and kills it (SIGKILL)
after a random delay: while loading, prefilling, decoding, or saving. After every kill the session must
open (no stale lock, no damaged transcript), hold whole exchanges only, every turn whose save had completed
must still be there, and so must every reply as far as its text reached stdout (the round's stdout is the
start of its replies as saved, each followed by a newline). The test suite runs a short form
(tests/test_crash.py).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESSAGES = ["Tell me about the sea.", "And about cats?", "What is the capital of France?", "Numbers: 1 2 3."]


def run_kills(model_dir: Path, sessions: Path, kills: int, seed: int = 0) -> dict:
    """Kill `kills` runs at random moments; returns figures. Raises AssertionError on any loss or damage."""
    from kvchat.chat.engine import Engine
    from kvchat.chat.saving import open_chat
    from kvchat.weights.model import fingerprint, load_model
    from kvchat.store.sessions import Store

    rng = random.Random(seed)
    loaded = load_model(str(model_dir), "cpu", "float32")
    env = {**os.environ, "KVCHAT_HOME": str(sessions.parent / "home")}
    command = [sys.executable, "-m", "kvchat", "--model", str(model_dir), "--temperature", "0",
               "--max-new-tokens", "8", "--sessions-dir", str(sessions), "--session", "crash", "--lines"]
    figures = {"kills": 0, "turns": 0, "notices": 0, "printed": 0, "cut_replies": 0}
    saved: list[dict] = []
    for _ in range(kills):
        with tempfile.TemporaryFile() as stdout:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
            proc.stdin.write("\n".join(MESSAGES).encode())
            proc.stdin.close()
            time.sleep(rng.uniform(1.0, 8.0))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stdout.seek(0)
            printed = stdout.read().decode("utf-8", errors="replace")
        figures["kills"] += 1
        engine = Engine(loaded)
        store = Store(sessions).bind(engine.layout, fingerprint(loaded), loaded.name)
        opened = open_chat(engine, store, "crash")  # raises on a stale lock or an unreadable session
        messages = opened.chat.messages
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2), f"a half exchange was saved: {roles}"
        changed = [(i, saved[i], messages[i] if i < len(messages) else None) for i in range(len(saved))
                   if i >= len(messages) or messages[i] != saved[i]]
        assert not changed, f"saved turns were lost or changed (round {figures['kills']}): {changed[:2]}"
        replies = [m["content"] for m in messages[len(saved):] if m["role"] == "assistant"]
        shown = "".join(reply + "\n" for reply in replies)
        assert shown.startswith(printed), f"printed text is missing from the transcript: {printed!r} vs {shown!r}"
        figures["printed"] += printed.count("\n")
        figures["cut_replies"] += bool(replies) and not printed.endswith("\n") and shown.startswith(printed)
        saved = [dict(m) for m in messages]
        figures["notices"] += opened.notice is not None
        store.close()
    figures["turns"] = len(saved) // 2
    return figures


def main(argv: list[str]) -> int:
    model_dir = Path(argv[0])
    kills = int(argv[1]) if len(argv) > 1 else 40
    with tempfile.TemporaryDirectory() as root:
        figures = run_kills(model_dir, Path(root) / "sessions", kills)
    print(f"{figures['kills']} kills: every one left the session loadable and every printed reply in it; "
          f"{figures['turns']} turns kept, {figures['printed']} replies printed whole, {figures['cut_replies']} "
          f"kept as far as they were printed; {figures['notices']} resumes had a notice")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
