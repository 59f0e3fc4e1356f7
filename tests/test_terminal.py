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


def screen_of(session):
    return tmux("capture-pane", "-p", "-t", session)


def wait_for(session, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        screen = screen_of(session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; screen:\n{screen}")


def start(tmp_path, *flags):
    session = f"kvchat-test-{time.time_ns()}"
    done = tmp_path / f"exit-code-{session}"
    command = (f"{sys.executable} -m kvchat --temperature 0 --sessions-dir {tmp_path / 's'} {' '.join(flags)}; "
               f"echo $? > {done}; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "40", command)
    return session, done


def quit_cleanly(session, done):
    tmux("send-keys", "-t", session, "/quit", "Enter")
    deadline = time.time() + 20
    while not done.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert done.read_text().strip() == "0"
    assert "Traceback" not in screen_of(session)


def test_chat_in_a_real_terminal(tmp_path):
    session, done = start(tmp_path, "--max-new-tokens", "40", "--session", "t")
    try:
        wait_for(session, "you>")  # at once: the model loads behind the prompt
        wait_for(session, "model ready (Enter)")  # the toolbar follows the loading
        tmux("send-keys", "-t", session, "Enter")
        wait_for(session, "cache 0/8192")  # the toolbar, once the model is taken
        tmux("send-keys", "-t", session, "What is the capital of France?", "Enter")
        wait_for(session, "Paris")
        tmux("send-keys", "-t", session, "And of Germany?", "Enter")
        wait_for(session, "Berlin")
        screen = wait_for(session, " · reused ")  # the toolbar, once the prompt is back after the reply
        assert "reused" in screen.splitlines()[-1]
        tmux("send-keys", "-t", session, "/stats", "Enter")
        screen = wait_for(session, "time saved by reuse")
        reused = [line for line in screen.splitlines() if line.startswith("prompt tokens reused")][0]
        assert int(reused.split()[3].rstrip(",")) > 0
        quit_cleanly(session, done)
        assert not (tmp_path / "s" / "t.lock").exists()  # a clean exit leaves no lock file
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_a_paste_shows_collapsed_with_progress_a_resume_shows_the_last_exchange_and_continue_goes_on(tmp_path):
    """Issue 11: a 200-line paste stays on screen collapsed, its prefill shows progress; a resumed session
    shows its last exchange; /continue extends a cut reply prefilling at most one token."""
    session, done = start(tmp_path, "--max-new-tokens", "8", "--session", "p")
    lines = "\n".join(f"Item {i}: pack the tent." for i in range(1, 201))
    try:
        wait_for(session, "you>")
        tmux("set-buffer", "-b", "paste", lines)
        tmux("paste-buffer", "-p", "-b", "paste", "-t", session)  # bracketed, as a terminal pastes
        wait_for(session, "Item 200")
        tmux("send-keys", "-t", session, "Enter")
        progress = wait_for(session, "reading the prompt", timeout=60)
        assert "tokens ·" in progress and "Ctrl-C stops" in progress
        screen = wait_for(session, "[cut at max_new_tokens=8")
        assert "Item 6: pack the tent." in screen and "[… 194 more lines;" in screen
        assert "Item 7:" not in screen and "Item 200" not in screen
        tmux("send-keys", "-t", session, "/continue", "Enter")
        wait_for(session, "prefilled 1 ")  # the toolbar after /continue
        quit_cleanly(session, done)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    session, done = start(tmp_path, "--session", "p")
    try:
        screen = wait_for(session, "you>")
        screen = wait_for(session, "resumed: 1 turn,")
        assert "[… 194 more lines;" in screen  # the last exchange, as it was shown
        quit_cleanly(session, done)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
