"""Issue 21, items 8, 9, 11 and 13: store files that parse but have the wrong shape, damaged or unreadable
sessions, and folders or FIFOs where files belong are one line (or are used as damage), never a traceback."""

import io
import json
import os
import tempfile
from pathlib import Path

import pytest

from kvchat.ui.cli import main


def run(monkeypatch, capsys, argv):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8"))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def saved_store(monkeypatch, capsys, model_dir, sessions):
    """A store with session 's' (two turns) and a shared prefix."""
    for message in ("Hello!", "And then?"):
        code, _, err = run(monkeypatch, capsys, ["--model", str(model_dir), "--temperature", "0", "--max-new-tokens",
                                                 "4", "--sessions-dir", str(sessions), "--session", "s", "-p",
                                                 message])
        assert code == 0, err
    return next((sessions / ".kv" / "prefixes").glob("*.json"))


CATALOG = (["sessions", "list"], ["sessions", "show", "s"], ["cache"], ["cache", "prune"])


@pytest.mark.parametrize("field,value", [("last_used", "x"), ("token_ids", 5), ("chunks", 5), ("state", [1]),
                                         (None, [])])
def test_a_prefix_entry_of_the_wrong_shape_is_damage(monkeypatch, capsys, tiny_model_dir, tmp_path, field, value):
    """Regression: a prefix file holding [] broke every new conversation's turn; "last_used": "x" broke
    `kvchat cache`. A wrong shape is a damaged entry: skipped, never used, and a new chat still answers."""
    sessions = tmp_path / "sessions"
    prefix = saved_store(monkeypatch, capsys, tiny_model_dir, sessions)
    entry = json.loads(prefix.read_text())
    prefix.write_text(json.dumps(value if field is None else {**entry, field: value}))
    for argv in [a + ["--sessions-dir", str(sessions)] for a in CATALOG] + \
            [["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--sessions-dir", str(sessions), "-p", "Hi"]]:
        code, out, err = run(monkeypatch, capsys, argv)
        assert code == 0 and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize("field,value", [("updated", "yesterday"), ("created", []), ("states", 5), ("chunks", 5),
                                         ("tail", 5), ("messages", 5), ("turns", "2"), ("settings", 7)])
def test_a_session_manifest_of_the_wrong_shape_is_one_line_and_can_be_removed(monkeypatch, capsys, tiny_model_dir,
                                                                              tmp_path, field, value):
    """Regression: "updated": "yesterday" broke `sessions list`, "states": 5 `cache` and `cache prune`, and `sessions
    rm` refused a session whose manifest it could not read. Every catalog command answers; rm removes it."""
    sessions = tmp_path / "sessions"
    saved_store(monkeypatch, capsys, tiny_model_dir, sessions)
    manifest = sessions / "s.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), field: value}))
    (sessions / ".kv" / "previous" / "s.json").unlink()  # no save to recover from
    for argv in CATALOG:
        code, out, err = run(monkeypatch, capsys, argv + ["--sessions-dir", str(sessions)])
        assert "Traceback" not in err and err.count("\n") <= 1, (argv, err)
        assert code == 0 or (argv[1:] == ["show", "s"] and "cannot be read" in err), (argv, err)
    code, out, err = run(monkeypatch, capsys, ["sessions", "rm", "s"] + ["--sessions-dir", str(sessions)])
    assert code == 0 and out == "removed session 's'\n", err
    assert not manifest.exists()
    code, out, _ = run(monkeypatch, capsys, ["sessions", "list", "--sessions-dir", str(sessions)])
    assert "no sessions" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as a user that permissions stop needs root to switch to")
def test_an_unreadable_manifest_is_refused_and_never_replaced(tiny):
    """Regression: mode 000 on NAME.json (read by a user permissions stop) was taken for damage: kvchat resumed
    the previous save and its next save replaced the manifest, losing a turn. Unreadable is refused, untouched."""
    from bound import engine_with_store, new_chat
    from corruption_loop import _as_user, _hand_over

    from kvchat.chat.saving import Persister, open_chat
    from kvchat.store.sessions import StoreError

    top = tempfile.TemporaryDirectory()  # (pytest's own temporary folders are closed to other users)
    tmp_path = Path(top.name)
    engine, store = engine_with_store(tiny, tmp_path / "sessions")
    chat = new_chat(engine, store, "Be brief.")
    for message in ("Hello!", "And then?"):
        list(chat.send(message))
        Persister(store, "s").after_turn(chat)
    store.close()
    manifest = tmp_path / "sessions" / "s.json"
    before = manifest.read_bytes()
    _hand_over(tmp_path / "sessions", 65534)
    os.chmod(tmp_path, 0o755)
    os.chmod(manifest, 0)
    with _as_user(65534):
        with pytest.raises(StoreError, match=r"s\.json cannot be read \(Permission denied\); it was left as it is"):
            open_chat(engine, store, "s")
        store.close()
    assert manifest.read_bytes() == before
    top.cleanup()


def test_folders_and_fifos_where_files_belong_are_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Regression: NAME.json replaced by a folder (`sessions rm`) and store.lock as a folder or FIFO (`cache prune`,
    `sessions rm`) were tracebacks."""
    sessions = tmp_path / "sessions"
    saved_store(monkeypatch, capsys, tiny_model_dir, sessions)
    lock = sessions / ".kv" / "store.lock"
    for make in (lock.mkdir, lambda: os.mkfifo(lock)):
        lock.unlink(missing_ok=True)
        make()
        for argv in (["cache", "prune"], ["sessions", "rm", "s"]):
            code, _, err = run(monkeypatch, capsys, argv + ["--sessions-dir", str(sessions)])
            assert code == 1 and err.startswith("kvchat: error:") and err.count("\n") == 1, (argv, err)
        lock.rmdir() if lock.is_dir() else lock.unlink()
    (sessions / "s.json").unlink()
    (sessions / "s.json").mkdir()
    code, _, err = run(monkeypatch, capsys, ["sessions", "rm", "s", "--sessions-dir", str(sessions)])
    assert code == 1 and "is not a file" in err and err.count("\n") == 1, err
    assert (sessions / "s.json").is_dir()


def test_a_configured_store_path_and_bidi_overrides_reach_the_terminal_visible(monkeypatch, capsys, tiny_model_dir,
                                                                              tmp_path):
    """Regression (issue 21, item 14): a sessions_dir from config.toml was printed raw by `sessions list` and
    `cache`, and U+202E (right-to-left override) in a transcript reached the terminal in `sessions show`."""
    (tmp_path / "config.toml").write_text('sessions_dir = "s\\u001b]0;owned\\u0007x"\n')
    monkeypatch.chdir(tmp_path)
    for argv in (["sessions", "list"], ["cache"]):
        code, out, err = run(monkeypatch, capsys, argv)
        assert code == 0 and "\x1b" not in out + err and "\x07" not in out + err and "^[]0;owned^G" in out, argv
    sessions = tmp_path / "plain"
    saved_store(monkeypatch, capsys, tiny_model_dir, sessions)
    manifest = json.loads((sessions / "s.json").read_text())
    manifest["messages"][1]["content"] = "pay \u202eexe.txt"
    manifest.pop("transcript_crc")
    (sessions / "s.json").write_text(json.dumps(manifest))
    code, out, _ = run(monkeypatch, capsys, ["sessions", "show", "s", "--sessions-dir", str(sessions)])
    assert code == 0 and "\u202e" not in out and "pay <U+202E>exe.txt" in out


def test_a_write_that_fails_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    """Regression (issue 21, item 3): a failed save left its partial .tmp file, eating the last free space."""
    import errno

    from kvchat.store import kvfile

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        kvfile.atomic_write(tmp_path / "s.json", b"{}" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_where_a_sessions_file_belongs_never_stops_its_saves(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Regression (issue 21, item 12): a tail path that was a folder made every save fail, naming no file. The
    session's text is saved whatever folder is in the way, and the one line about its KV names the folder."""
    import shutil

    sessions = tmp_path / "sessions"
    saved_store(monkeypatch, capsys, tiny_model_dir, sessions)
    chat = ["--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "4", "--session", "s", "-p"]
    tails = sessions / ".kv" / "tails"
    trial = tmp_path / "trial"  # the same turn in a copy: which tail file it writes (greedy, so the same)
    shutil.copytree(sessions, trial)
    assert run(monkeypatch, capsys, chat + ["Third?", "--sessions-dir", str(trial)])[0] == 0
    new = next((trial / ".kv" / "tails").glob("s-*.safetensors")).name
    for path in (tails / new, sessions / ".kv" / "previous" / "s.json"):
        path.unlink(missing_ok=True)
        path.mkdir()  # the tail the save writes, the place where it keeps the save before
    code, out, err = run(monkeypatch, capsys, chat + ["Third?", "--sessions-dir", str(sessions)])
    assert code == 0 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"its text is saved, its KV is not (.kv/tails/{new}: Is a directory)" in err
    assert json.loads((sessions / "s.json").read_text())["turns"] == 3
    assert out == json.loads((trial / "s.json").read_text())["messages"][-1]["content"] + "\n"
