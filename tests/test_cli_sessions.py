"""Sessions and the store through the command line."""

import io
import json

from kvchat.ui.cli import main
from kvchat.store.sessions import transcript_crc


def run(monkeypatch, capsys, argv, stdin=b""):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def chat(model_dir, sessions, *extra):
    return ["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "8",
            "--sessions-dir", str(sessions), *extra]


def test_session_resumes_across_runs_and_is_listed_shown_removed(monkeypatch, capsys, tiny_model_dir, tmp_path):
    sessions = tmp_path / "sessions"
    code, first, _ = run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", "trip", "-p", "Hello!"))
    assert code == 0
    code, _, err = run(monkeypatch, capsys,
                       chat(tiny_model_dir, sessions, "--session", "trip", "--stats", "-p", "What is the capital?"))
    assert code == 0
    record = json.loads(err.strip().splitlines()[-1])
    assert record["loaded"] > 0 and record["reused"] == record["loaded"]

    code, out, _ = run(monkeypatch, capsys, ["sessions", "list", "--sessions-dir", str(sessions)])
    assert code == 0 and out.startswith("trip") and "2 turns" in out
    code, out, _ = run(monkeypatch, capsys, ["sessions", "show", "trip", "--sessions-dir", str(sessions)])
    assert code == 0 and "[user]\nHello!" in out and "[user]\nWhat is the capital?" in out
    assert first.strip() in out

    code, out, _ = run(monkeypatch, capsys, ["cache", "--sessions-dir", str(sessions)])
    assert code == 0 and "shared prefixes: 1" in out and "sessions: 1" in out

    code, out, _ = run(monkeypatch, capsys, ["sessions", "rm", "trip", "--sessions-dir", str(sessions)])
    assert code == 0 and not (sessions / "trip.json").exists()
    code, out, _ = run(monkeypatch, capsys, ["cache", "prune", "--sessions-dir", str(sessions)])
    assert code == 0 and "removed" in out
    code, out, _ = run(monkeypatch, capsys, ["cache", "--sessions-dir", str(sessions)])
    assert "0 chunks unused" in out


def test_scripting_mode_autosaves_every_turn(monkeypatch, capsys, tiny_model_dir, tmp_path):
    sessions = tmp_path / "s"
    code, _, _ = run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", "pipe", "--lines"),
                     b"Hello!\nTell me a story.\n")
    assert code == 0
    manifest = json.loads((sessions / "pipe.json").read_text())
    assert manifest["turns"] == 2 and [m["role"] for m in manifest["messages"]] == ["user", "assistant"] * 2


def test_bad_session_name_is_one_line_and_writes_nothing(monkeypatch, capsys, tiny_model_dir, tmp_path):
    sessions = tmp_path / "s"
    code, out, err = run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", "../x", "-p", "hi"))
    # A usage error, like every bad flag value (issue 11: it exited 1 where others exit 2).
    assert code == 2 and out == "" and "invalid session name" in err and len(err.strip().splitlines()) == 1
    assert not sessions.exists() and not (tmp_path / "x.json").exists()
    code, _, err = run(monkeypatch, capsys, ["sessions", "rm", "../x", "--sessions-dir", str(sessions)])
    assert code == 2 and "invalid session name" in err
    code, _, err = run(monkeypatch, capsys, ["sessions", "show", "nope", "--sessions-dir", str(sessions)])
    assert code == 1 and "no session named 'nope'" in err


def test_sessions_dir_defaults_beside_the_config_file(monkeypatch, capsys, tiny_model_dir, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.toml").write_text(f'model = "{tiny_model_dir}"\ntemperature = 0\nmax_new_tokens = 4\n')
    code, _, _ = run(monkeypatch, capsys, ["--config", str(project / "config.toml"), "--session", "a", "-p", "hi"])
    assert code == 0 and (project / "sessions" / "a.json").is_file()


def test_second_process_on_a_session_gets_a_clear_error(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from kvchat.store.sessions import Store

    sessions = tmp_path / "s"
    holder = Store(sessions)
    holder.lock("busy")  # another kvchat process has the session open
    code, out, err = run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", "busy", "-p", "hi"))
    assert code == 1 and out == "" and "session 'busy' is open in another kvchat process" in err
    assert len(err.strip().splitlines()) == 1 and not (sessions / "busy.json").exists()
    holder.close()
    code, _, _ = run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", "busy", "-p", "hi"))
    assert code == 0 and (sessions / "busy.json").exists()


def test_escape_sequences_read_from_the_store_reach_the_terminal_visible(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Regression (issue 10): a stored transcript and session file names were printed raw (ESC, BEL, CSI)."""
    sessions = tmp_path / "sessions"
    assert run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", "x", "-p", "Hello!"))[0] == 0
    manifest = json.loads((sessions / "x.json").read_text())
    manifest["messages"][-1]["content"] = "\x1b]0;pwned\x07\x1b[2J\x9b31mred"
    manifest["messages"][-1].pop("token_ids")
    manifest["transcript_crc"] = transcript_crc(manifest["messages"])  # a hostile store has valid checksums
    (sessions / "x.json").write_text(json.dumps(manifest))
    (sessions / "evil\x1b[31m.json").write_text(json.dumps({**manifest, "name": "evil\x1b[31m"}))

    code, out, _ = run(monkeypatch, capsys, ["sessions", "show", "x", "--sessions-dir", str(sessions)])
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "^[]0;pwned^G^[[2J<U+009B>31mred" in out
    code, out, _ = run(monkeypatch, capsys, ["sessions", "list", "--sessions-dir", str(sessions)])
    assert code == 0 and "\x1b" not in out and "evil^[[31m" in out


def test_a_session_keeps_its_settings_and_flags_given_again_win(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Regression (issue 11): after resuming, max_new_tokens and the other settings were back to defaults."""
    sessions = tmp_path / "sessions"
    base = ["--model", str(tiny_model_dir), "--sessions-dir", str(sessions), "--session", "s"]
    assert run(monkeypatch, capsys, base + ["--temperature", "0", "--max-new-tokens", "3", "--top-k", "7",
                                            "-p", "Hello!"])[0] == 0
    kept = lambda: json.loads((sessions / "s.json").read_text())["settings"]  # noqa: E731
    assert kept() == {"temperature": 0.0, "top_p": 0.95, "top_k": 7, "seed": None, "max_new_tokens": 3}
    code, _, err = run(monkeypatch, capsys, base + ["--stats", "-p", "Again?"])  # no flags: the session's own
    assert code == 0 and json.loads(err.strip().splitlines()[-1])["generated"] <= 3
    assert kept()["max_new_tokens"] == 3 and kept()["temperature"] == 0.0
    assert run(monkeypatch, capsys, base + ["--max-new-tokens", "5", "-p", "More?"])[0] == 0  # a flag wins
    assert kept() == {"temperature": 0.0, "top_p": 0.95, "top_k": 7, "seed": None, "max_new_tokens": 5}
    manifest = json.loads((sessions / "s.json").read_text())  # a damaged value is ignored, not trusted
    manifest["settings"] = {"temperature": "hot", "max_new_tokens": -4, "top_k": 9, "evil": 1}
    (sessions / "s.json").write_text(json.dumps(manifest))
    assert run(monkeypatch, capsys, base + ["-p", "Still there?"])[0] == 0
    assert kept() == {"temperature": 0.7, "top_p": 0.95, "top_k": 9, "seed": None, "max_new_tokens": 512}


BLOCK_TORCH = """
import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "safetensors"):
            raise ImportError(f"{name} is blocked in this process")
        return None


sys.meta_path.insert(0, NoTorch())
from kvchat.ui.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_the_store_catalog_commands_work_where_torch_cannot_be_imported(monkeypatch, capsys, tiny_model_dir,
                                                                         tmp_path):
    """Issue 20: listing, showing, removing and pruning sessions, and the cache summary, never need torch: they
    run in a process where importing torch (or transformers, or safetensors) fails, on a store with real KV."""
    import subprocess
    import sys

    sessions = tmp_path / "sessions"
    for name, text in (("trip", "Hello!"), ("other", "Tell me a story.")):
        code, _, _ = run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", name, "-p", text))
        assert code == 0

    def blocked(*argv):
        done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *argv, "--sessions-dir", str(sessions)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
        return done.stdout

    assert "torch is blocked" in subprocess.run([sys.executable, "-c", BLOCK_TORCH, "--model", str(tiny_model_dir),
                                                 "-p", "hi"], capture_output=True, text=True, timeout=60).stderr
    listed = blocked("sessions", "list")
    assert "trip" in listed and "other" in listed and "1 turns" in listed
    assert "[user]\nHello!" in blocked("sessions", "show", "trip")
    assert "sessions: 2" in blocked("cache")
    chunks = sorted((sessions / ".kv").rglob("*.safetensors"))
    assert chunks
    blocked("sessions", "rm", "trip")
    assert not (sessions / "trip.json").exists() and (sessions / "other.json").exists()
    assert "removed" in blocked("cache", "prune")
    assert "sessions: 1" in blocked("cache")
    assert [p for p in chunks if p.exists()]  # what the other session uses stays


def test_a_save_that_fails_on_a_full_disk_never_stops_lines_and_its_turn_is_saved_later(monkeypatch, capsys,
                                                                                       tiny_model_dir, tmp_path):
    """Regression (issue 21, item 10): on a full disk the turn whose save failed was lost and --lines stopped
    sending the lines after it. The failure is one line naming the line; the next save writes that turn too."""
    import errno

    from kvchat.store import kvfile

    real, calls = kvfile.atomic_write, {"manifests": 0}

    def full_once(path, data):
        if path.name == "pipe.json":
            calls["manifests"] += 1
            if calls["manifests"] == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(kvfile, "atomic_write", full_once)
    sessions = tmp_path / "s"
    code, out, err = run(monkeypatch, capsys, chat(tiny_model_dir, sessions, "--session", "pipe", "--lines"),
                         b"Hello!\nTell me a story.\nThanks.\n")
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 2 and err.startswith("kvchat: line 1: cannot save session 'pipe'")
    assert err.endswith("kvchat: 1 of 3 lines failed (see above)\n")
    assert "No space left on device; nothing of it was saved; the next turn's save tries again" in err
    manifest = json.loads((sessions / "pipe.json").read_text())
    assert manifest["turns"] == 3
    assert out == "".join(m["content"] + "\n" for m in manifest["messages"] if m["role"] == "assistant")
