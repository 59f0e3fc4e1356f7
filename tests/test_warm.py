"""Issue 23: one-shot and piped runs served by a warm process (torch and transformers already imported) give what
a fresh process gives (output, errors, exit status, files, signals), and the warm process serves no one else."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvchat.ui import warm

ARGS = ["--temperature", "0", "--max-new-tokens", "6"]


def kvchat(env, cwd, *argv, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvchat", *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          input=stdin, timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)


def sockets(home: Path) -> list[Path]:
    folder = home / "warm"
    return sorted(folder.glob("*.sock")) if folder.is_dir() else []


def servers(home: Path) -> list[int]:
    pids = []
    for lock in (home / "warm").glob("*.lock"):
        text = lock.read_text().strip()
        if text.isdigit() and Path(f"/proc/{text}").exists():
            pids.append(int(text))
    return pids


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def saved(path: Path) -> dict:
    """A saved session's file, but for when it was written."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("created", "updated")}


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """A home with a warm process, left by a first (cold) one-shot run; stopped at the end."""
    root = tmp_path_factory.mktemp("warm")
    home, cwd = root / "home", root / "work"
    cwd.mkdir()
    env = {**os.environ, "KVCHAT_HOME": str(home), "KVCHAT_WARM": "120", "PYTHONPATH": str(Path(__file__).parent.parent)}
    env.pop("KVCHAT_CONFIG", None)
    first = kvchat(env, cwd, "--model", str(tiny_model_dir), *ARGS, "-p", "Hello!")
    assert first.returncode == 0, first.stderr
    assert wait_for(lambda: sockets(home)), "no warm process came up after a one-shot run"
    yield env, home, cwd, first
    for pid in servers(home):
        os.kill(pid, signal.SIGTERM)


@pytest.mark.skipif(sys.platform != "linux", reason="warm runs are Linux only")
def test_runs_served_warm_give_what_a_fresh_process_gives(served, tiny_model_dir, tmp_path, monkeypatch, capsys):
    env, home, _, first = served
    model = str(tiny_model_dir)
    report = tmp_path / "report.json"
    cold_env = {**env, "KVCHAT_WARM": "0", "KVCHAT_HOME": str(tmp_path / "cold-home")}
    hot_cwd, cold_cwd = tmp_path / "hot", tmp_path / "cold"
    for folder in (hot_cwd, cold_cwd):  # a project's config in the client's folder: its sessions go there
        folder.mkdir()
        (folder / "config.toml").write_text('sessions_dir = "here"\n')

    def hot(*argv, stdin=None):
        report.unlink(missing_ok=True)
        done = kvchat({**env, "KVCHAT_WARM_REPORT": str(report)}, hot_cwd, *argv, stdin=stdin)
        assert report.is_file(), f"not served warm: {done.stderr}"
        served_by = json.loads(report.read_text())
        assert served_by["server"] in servers(home) and served_by["exit"] == done.returncode
        return done

    plain = hot("--model", model, *ARGS, "-p", "Hello!")  # as the fixture's first run, which was cold
    assert (plain.returncode, plain.stdout, plain.stderr) == (first.returncode, first.stdout, first.stderr)
    wrong = hot("--model", model, "--max-new-tokens", "0", "-p", "x")  # a user's error
    from kvchat.ui.cli import main

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8"))
    code = main(["--model", model, "--max-new-tokens", "0", "-p", "x"])
    out, err = capsys.readouterr()
    assert (wrong.returncode, wrong.stdout, wrong.stderr) == (code, out, err) and code == 2 and "max-new-tokens" in err
    for argv, stdin in ((("--model", model, *ARGS, "--session", "kept", "-p", "What is 2+2?"), None),
                        (("--model", model, *ARGS), "Hello!\nWhat is 2+2?\n")):  # a session; a piped run
        warm_run, cold_run = hot(*argv, stdin=stdin), kvchat(cold_env, cold_cwd, *argv, stdin=stdin)
        assert (warm_run.returncode, warm_run.stdout, warm_run.stderr) == \
            (cold_run.returncode, cold_run.stdout, cold_run.stderr), argv
        assert warm_run.returncode == 0 and warm_run.stdout.strip()
    kept = hot_cwd / "here" / "kept.json"
    assert saved(kept) == saved(cold_cwd / "here" / "kept.json")
    assert oct(kept.stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.skipif(sys.platform != "linux", reason="warm runs are Linux only")
def test_ctrl_c_reaches_the_run_and_a_killed_client_takes_its_run_along(served, tiny_model_dir, tmp_path):
    env, home, cwd, _ = served
    (server,) = servers(home)
    waiting = [sys.executable, "-m", "kvchat", "--model", str(tiny_model_dir), *ARGS]  # reads stdin to its end
    report = tmp_path / "report.json"
    client = subprocess.Popen(waiting, env={**env, "KVCHAT_WARM_REPORT": str(report)}, cwd=cwd,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: children_of(server)), "the run did not start in the warm process"
    (child,) = children_of(server)
    time.sleep(0.5)
    client.send_signal(signal.SIGINT)
    client.wait(timeout=60)  # (its stdin still open: the run was waiting for it)
    err = client.stderr.read()
    client.stdin.close()
    client.stdout.close()
    client.stderr.close()
    assert client.returncode == 130, err
    assert json.loads(report.read_text())["exit"] == 130
    assert wait_for(lambda: not Path(f"/proc/{child}").exists(), 10)
    client = subprocess.Popen(waiting, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    assert wait_for(lambda: children_of(server))
    (child,) = children_of(server)
    client.kill()
    client.wait()
    client.stdin.close()
    assert wait_for(lambda: not children_of(server), 10), "a run outlived its killed client"
    assert servers(home) == [server]  # and the warm process goes on serving


def test_another_environment_gets_a_warm_process_of_its_own_which_ends_when_its_socket_goes(served,
                                                                                          tiny_model_dir):
    env, home, cwd, _ = served
    before = sockets(home)
    other = kvchat({**env, "SOME_SETTING": "1"}, cwd, "--model", str(tiny_model_dir), *ARGS, "-p", "Hello!")
    assert other.returncode == 0
    assert warm.key({**env, "SOME_SETTING": "1"}) != warm.key(env)
    assert wait_for(lambda: len(sockets(home)) > len(before))
    (new,) = set(sockets(home)) - set(before)
    pid = int(new.with_suffix(".lock").read_text())
    new.unlink()  # how a warm process is stopped by hand
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                    Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", 10)


def test_the_warm_folder_and_socket_are_private_and_a_planted_link_is_not_followed(served, tiny_model_dir,
                                                                                  tmp_path):
    env, home, cwd, _ = served
    folder = home / "warm"
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    for path in folder.iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(0o600), path
    other_home, outside = tmp_path / "home", tmp_path / "outside"
    outside.mkdir()
    other_home.mkdir()
    (other_home / "warm").symlink_to(outside)
    run = kvchat({**env, "KVCHAT_HOME": str(other_home)}, cwd, "--model", str(tiny_model_dir), *ARGS, "-p", "Hi")
    assert run.returncode == 0, run.stderr  # answered by a process of its own, nothing left through the link
    time.sleep(1)
    assert list(outside.iterdir()) == []


def test_an_idle_warm_process_ends(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        listener.bind("k.sock")
        listener.listen(1)
        started = time.monotonic()
        warm._serve(listener, "k", 0.3, os.stat("k.sock").st_ino, os.open("k.sock.lock", os.O_CREAT | os.O_RDWR))
        assert 0.3 <= time.monotonic() - started < 5
    finally:
        os.chdir(here)
        listener.close()


def test_which_runs_go_warm(monkeypatch):
    from kvchat.ui import cli

    assert warm.SUBCOMMANDS == set(cli.COMMANDS) | {"warm"}  # (`kvchat warm` is the entry's own)
    monkeypatch.setattr(warm.sys, "platform", "linux")
    monkeypatch.setattr(warm.os, "isatty", lambda fd: True)  # a terminal: only -p runs go warm
    monkeypatch.setenv("KVCHAT_WARM", "on")
    assert warm.eligible(["-p", "hi"]) and warm.eligible(["--prompt=hi"]) and not warm.eligible([])
    assert not warm.eligible(["info", "-p", "x"]) and not warm.eligible(["-p", "x", "--help"])
    monkeypatch.setattr(warm.os, "isatty", lambda fd: False)  # piped
    assert warm.eligible([]) and not warm.eligible(["bench"])
    for off in ("0", "off", "no", "-5", "soon"):
        monkeypatch.setenv("KVCHAT_WARM", off)
        assert not warm.eligible(["-p", "hi"]) and warm.idle_seconds() is None
    monkeypatch.setenv("KVCHAT_WARM", "30")
    assert warm.idle_seconds() == 30.0


def test_the_key_changes_with_the_installed_code(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    before = warm.key({"A": "1"})
    assert warm.key({"A": "1", "PWD": "/elsewhere"}) == before  # (a volatile variable)
    time.sleep(0.01)
    (tmp_path / "newly_installed.py").write_text("")
    assert warm.key({"A": "1"}) != before


def test_kvchat_warm_lists_and_stops_the_warm_processes(served, monkeypatch, capsys):
    """(Last in this file: it stops the module's warm process.)"""
    env, home, _, _ = served
    (server,) = servers(home)
    monkeypatch.setenv("KVCHAT_HOME", str(home))
    monkeypatch.setenv("KVCHAT_WARM", "120")
    assert warm.command([]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"warm process {server}: ") and "MiB resident" in out and out.count("\n") == 1
    assert warm.command(["stop"]) == 0 and capsys.readouterr().out == "stopped 1 warm process\n"
    assert not Path(f"/proc/{server}").exists() or Path(f"/proc/{server}/stat").read_text().split()[2] == "Z"
    assert warm.command([]) == 0
    assert capsys.readouterr().out == "no warm process: the next one-shot or piped run leaves one\n"
    assert warm.command(["now"]) == 2 and "usage: kvchat warm [stop]" in capsys.readouterr().err
