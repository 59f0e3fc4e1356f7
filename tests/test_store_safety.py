"""Issue 21: nothing outside the store is ever touched, whatever a directory someone else wrote holds, and the
store's files are private to their user."""

import hashlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from kvchat.ui.cli import main

LEVELS = ["sessions", "sessions/.kv", "sessions/.kv/chunks", "sessions/.kv/tails", "sessions/.kv/prefixes",
          "sessions/.kv/states", "sessions/.kv/previous"]


def run(monkeypatch, capsys, argv):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8"))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and link under `root` with a hash of what it holds (or where it points)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path.relative_to(root))] = "dir"
    return found


def chat_args(model_dir, *extra):
    return ["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "4", *extra]


def test_a_planted_symlinked_chunk_folder_deletes_and_writes_nothing_outside(monkeypatch, capsys, tiny_model_dir,
                                                                              tmp_path):
    """The issue's repro: a directory someone else wrote (a cloned repository) holds config.toml with a 1 MB cap
    and a store whose chunk folder is a link to a victim folder; before the fix, `kvchat -p hello` there deleted
    the victim's file and wrote a KV chunk into it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "weights.safetensors").write_bytes(b"\0" * 2 * 1024 * 1024)
    evil = tmp_path / "evil"
    (evil / "sessions" / ".kv" / "prefixes").mkdir(parents=True)
    (evil / "sessions" / ".kv" / "chunks").symlink_to("../../../victim")
    (evil / "sessions" / ".kv" / "prefixes" / ("a" * 40 + ".json")).write_text(json.dumps(
        {"token_ids": [1, 2, 3], "chunks": [], "last_used": 0}))
    (evil / "config.toml").write_text("cache_max_mb = 1\n")
    before = tree_digest(victim)
    monkeypatch.chdir(evil)

    for argv in (chat_args(tiny_model_dir, "-p", "hello"), chat_args(tiny_model_dir, "--session", "s", "-p", "hi"),
                 ["cache", "prune"], ["cache"], ["sessions", "list"], ["sessions", "rm", "s"]):
        code, out, err = run(monkeypatch, capsys, argv)
        assert code == 1, argv
        assert err.count("\n") == 1 and "is a symbolic link; kvchat does not follow links in its store" in err, argv
        assert "Traceback" not in err and out == ""
        assert tree_digest(victim) == before, argv


@pytest.mark.parametrize("level", LEVELS)
def test_a_store_directory_that_is_a_link_is_refused_at_every_level(monkeypatch, capsys, tiny_model_dir, tmp_path,
                                                                    level):
    """A real store (a session, a shared prefix, a previous save) whose directory at `level` is swapped for a link
    to a copy outside: every command refuses in one line, the outside copy is left exactly as it was, and once
    the link is replaced by the real folder the session resumes as saved."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.toml").write_text("cache_max_mb = 1\n")
    monkeypatch.chdir(project)
    for message in ("Hello!", "And then?"):
        code, _, err = run(monkeypatch, capsys, chat_args(tiny_model_dir, "--session", "s", "-p", message))
        assert code == 0, err
    real, outside = project / level, tmp_path / "outside"
    assert real.is_dir()
    real.rename(outside)
    real.symlink_to(outside)
    before = tree_digest(outside)

    for argv in (chat_args(tiny_model_dir, "--session", "s", "-p", "More?"), chat_args(tiny_model_dir, "-p", "Hi"),
                 ["sessions", "list"], ["sessions", "show", "s"], ["sessions", "rm", "s"], ["cache"],
                 ["cache", "prune"]):
        code, out, err = run(monkeypatch, capsys, argv)
        assert code == 1 and "is a symbolic link" in err and err.count("\n") == 1, (argv, err)
        assert tree_digest(outside) == before, argv

    real.unlink()
    outside.rename(real)
    code, out, _ = run(monkeypatch, capsys, ["sessions", "show", "s"])
    assert code == 0 and "[user]\nHello!" in out and "[user]\nAnd then?" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's needs root")
@pytest.mark.parametrize("level", ["sessions", "sessions/.kv/chunks"])
def test_a_store_directory_of_another_user_is_refused(monkeypatch, capsys, tiny_model_dir, tmp_path, level):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    (project / "config.toml").write_text("")
    code, _, err = run(monkeypatch, capsys, chat_args(tiny_model_dir, "--session", "s", "-p", "Hello!"))
    assert code == 0, err
    os.chown(project / level, 65534, 65534)
    before = tree_digest(project / "sessions")
    for argv in (chat_args(tiny_model_dir, "--session", "s", "-p", "More?"), ["cache", "prune"], ["sessions", "list"]):
        code, _, err = run(monkeypatch, capsys, argv)
        assert code == 1 and "belongs to another user (uid 65534)" in err and err.count("\n") == 1, (argv, err)
    assert tree_digest(project / "sessions") == before


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_every_file_and_folder_of_the_store_is_private(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Made under umask 022 (files would be 0644): the store's folders are 0700 and its files 0600, including the
    manifests, KV chunks, tails, prefix entries, locks and the previous save; a store made before, with looser
    modes, is tightened at its next write."""
    old_umask = os.umask(0o022)
    try:
        sessions = tmp_path / "sessions"
        (sessions / ".kv" / "chunks").mkdir(parents=True, mode=0o755)
        os.chmod(sessions, 0o755)
        for message in ("Hello!", "Tell me more, at some length please.", "Thanks."):
            code, _, err = run(monkeypatch, capsys,
                               chat_args(tiny_model_dir, "--sessions-dir", str(sessions), "--session", "s", "-p",
                                         message))
            assert code == 0, err
    finally:
        os.umask(old_umask)
    found = modes(sessions)
    kinds = {Path(name).parts[1] if name.startswith(".kv/") else name for name in found}
    assert {"s.json", "chunks", "prefixes", "tails", "previous"} <= kinds | {Path(n).name for n in found}
    loose = {name: oct(mode) for name, mode in found.items()
             if mode != (0o700 if (sessions / name).is_dir() else 0o600)}
    assert loose == {}, loose


def test_kvchat_home_and_the_input_history_are_private(tmp_path, monkeypatch):
    """$KVCHAT_HOME (converted models, packed weights, the input history) is made 0700, a looser one is tightened;
    the history file is 0600 (a looser one tightened); a history path that is a link is not used (the history is
    then kept in memory) and what it points to is left alone."""
    from kvchat.config import kvchat_home, private_home
    from kvchat.ui.cli import private_history

    old_umask = os.umask(0o022)
    try:
        home = private_home()
        assert home == kvchat_home() and stat.S_IMODE(home.stat().st_mode) == 0o700
        os.chmod(home, 0o755)
        private_home()
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        history = private_history(home / "history")
        assert history == str(home / "history") and stat.S_IMODE(os.stat(history).st_mode) == 0o600
        os.chmod(history, 0o644)
        private_history(home / "history")
        assert stat.S_IMODE(os.stat(history).st_mode) == 0o600
        target = tmp_path / "elsewhere"
        target.write_text("mine")
        os.chmod(target, 0o644)
        (home / "linked").symlink_to(target)
        assert private_history(home / "linked") is None
        assert target.read_text() == "mine" and stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)


def test_prune_in_a_shared_folder_removes_only_kvchats_own_leftovers(monkeypatch, capsys, tmp_path):
    """A sessions directory may be a folder other programs use too (a config can name any folder of yours):
    prune removes a manifest write kvchat left behind, never another program's temporary files there."""
    sessions = tmp_path / "shared"
    (sessions / ".kv").mkdir(parents=True)
    theirs = [".editor.swp.tmp", ".notes.json.tmp", ".s.json.12.tmp", ".s.json.12.0123456789ab.tmp.keep"]
    for name in theirs:
        (sessions / name).write_text("theirs")
    (sessions / ".s.json.4242.0123456789ab.tmp").write_text("{")  # as kvfile.atomic_write names a manifest's
    code, out, err = run(monkeypatch, capsys, ["cache", "prune", "--sessions-dir", str(sessions)])
    assert code == 0, err
    assert sorted(p.name for p in sessions.iterdir() if p.name != ".kv") == sorted(theirs)


HOME_LEVELS = ["home", "home/packed", "home/sessions"]


def home_chat(monkeypatch, capsys, model_dir, message):
    """A chat that writes in every folder of $KVCHAT_HOME it can: the store (no config: sessions in the home),
    the packed weights, the digests."""
    return run(monkeypatch, capsys, chat_args(model_dir, "--weights", "int8", "--session", "s", "-p", message))


def test_every_file_and_folder_kvchat_home_gets_is_private(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Under umask 022: $KVCHAT_HOME and all it holds after a chat (sessions, packed weights, digests)
    are 0700 folders and 0600 files."""
    old_umask = os.umask(0o022)
    try:
        code, _, err = home_chat(monkeypatch, capsys, tiny_model_dir, "Hello!")
        assert code == 0, err
    finally:
        os.umask(old_umask)
    home = tmp_path / "home"
    found = modes(home)
    assert {"packed", "sessions", "sessions/s.json"} <= set(found), sorted(found)
    loose = {name: oct(mode) for name, mode in found.items()
             if mode != (0o700 if (home / name).is_dir() else 0o600)}
    assert loose == {}, loose


@pytest.mark.parametrize("level", HOME_LEVELS)
def test_a_kvchat_home_folder_that_is_a_link_is_refused(monkeypatch, capsys, tiny_model_dir, tmp_path, level):
    """$KVCHAT_HOME, or a folder in it, swapped for a link to a copy elsewhere: one line, the copy untouched."""
    code, _, err = home_chat(monkeypatch, capsys, tiny_model_dir, "Hello!")
    assert code == 0, err
    real, outside = tmp_path / level, tmp_path / "outside"
    real.rename(outside)
    real.symlink_to(outside)
    before = tree_digest(outside)
    code, out, err = home_chat(monkeypatch, capsys, tiny_model_dir, "More?")
    assert code == 1 and "is a symbolic link" in err and err.count("\n") == 1, err
    assert tree_digest(outside) == before


def test_the_models_folder_of_kvchat_home_is_checked_before_a_conversion(tmp_path):
    from kvchat.errors import KvchatError
    from kvchat.weights.model import default_model_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(outside)
    with pytest.raises(KvchatError, match="is a symbolic link; kvchat does not follow links in its home's models"):
        default_model_dir(lambda *_: None)
    assert list(outside.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's needs root")
@pytest.mark.parametrize("level", ["home", "home/packed"])
def test_a_kvchat_home_folder_of_another_user_is_refused(monkeypatch, capsys, tiny_model_dir, tmp_path, level):
    code, _, err = home_chat(monkeypatch, capsys, tiny_model_dir, "Hello!")
    assert code == 0, err
    os.chown(tmp_path / level, 65534, 65534)
    before = tree_digest(tmp_path / "home")
    code, _, err = home_chat(monkeypatch, capsys, tiny_model_dir, "More?")
    assert code == 1 and "belongs to another user (uid 65534)" in err and err.count("\n") == 1, err
    assert tree_digest(tmp_path / "home") == before
