"""End to end in a real terminal: tmux runs kvchat on the default model; keys go in, the screen is read back."""

import shutil
import subprocess
import sys
import time

import pytest

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"),
]


def tmux(*args):
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_for(session, text, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared; screen:\n{screen}")


def test_chat_in_a_real_terminal(tmp_path):
    session = f"kvchat-test-{time.time_ns()}"
    done = tmp_path / "exit-code"
    command = (f"{sys.executable} -m kvchat --temperature 0 --max-new-tokens 40 --sessions-dir {tmp_path / 's'}; "
               f"echo $? > {done}; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", command)
    try:
        wait_for(session, "you>")
        wait_for(session, "cache 0/8192")  # the toolbar
        tmux("send-keys", "-t", session, "What is the capital of France?", "Enter")
        wait_for(session, "Paris")
        tmux("send-keys", "-t", session, "And of Germany?", "Enter")
        screen = wait_for(session, "Berlin")
        assert "reused" in screen.splitlines()[-1] or "reused" in screen
        tmux("send-keys", "-t", session, "/stats", "Enter")
        screen = wait_for(session, "time saved by reuse")
        reused = [line for line in screen.splitlines() if line.startswith("prompt tokens reused")][0]
        assert int(reused.split()[3].rstrip(",")) > 0
        tmux("send-keys", "-t", session, "/quit", "Enter")
        deadline = time.time() + 20
        while not done.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert done.read_text().strip() == "0"
        assert "Traceback" not in tmux("capture-pane", "-p", "-t", session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
