"""kill -9 at random moments of a scripted session with autosave: `python tests/kill_loop.py MODEL_DIR [KILLS]`.

Each round starts `kvchat --session crash --lines` on the model with a few messages and kills it (SIGKILL)
after a random delay: while loading, prefilling, decoding, or saving. After every kill the session must
open (no stale lock, no damaged transcript), hold whole exchanges only, and every turn whose save had
completed must still be there. The test suite runs a short form (tests/test_crash.py).
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
    figures = {"kills": 0, "turns": 0, "notices": 0}
    saved_turns = 0
    for _ in range(kills):
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
        proc.stdin.write("\n".join(MESSAGES).encode())
        proc.stdin.close()
        time.sleep(rng.uniform(1.0, 8.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        figures["kills"] += 1
        engine = Engine(loaded)
        store = Store(sessions).bind(engine.layout, fingerprint(loaded), loaded.name)
        opened = open_chat(engine, store, "crash")  # raises on a stale lock or an unreadable session
        messages = opened.chat.messages
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2), f"a half exchange was saved: {roles}"
        turns = len(roles) // 2
        assert turns >= saved_turns, f"{saved_turns - turns} saved turns were lost"
        saved_turns = turns
        figures["notices"] += opened.notice is not None
        store.close()
    figures["turns"] = saved_turns
    return figures


def main(argv: list[str]) -> int:
    model_dir = Path(argv[0])
    kills = int(argv[1]) if len(argv) > 1 else 40
    with tempfile.TemporaryDirectory() as root:
        figures = run_kills(model_dir, Path(root) / "sessions", kills)
    print(f"{figures['kills']} kills: every one left the session loadable; {figures['turns']} turns kept, "
          f"{figures['notices']} resumes rebuilt their cache from the text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
