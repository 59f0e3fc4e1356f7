"""The command-line surface: scripting mode, flags, config precedence and one-line errors."""

import io
import json

import pytest

from kvchat.ui.cli import main
from kvchat.config import Sampling, Settings, load_config


def feed_stdin(monkeypatch, data: bytes):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def run(monkeypatch, capsys, argv, stdin=b""):
    feed_stdin(monkeypatch, stdin)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def greedy(model_dir, *extra):
    return ["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "8", *extra]


def test_stdin_is_one_message_and_only_the_reply_goes_to_stdout(monkeypatch, capsys, tiny_model_dir):
    code, out, err = run(monkeypatch, capsys, greedy(tiny_model_dir), b"Hello, how are you?\n")
    assert code == 0
    code2, out2, _ = run(monkeypatch, capsys, greedy(tiny_model_dir, "-p", "Hello, how are you?"))
    assert code2 == 0
    assert out == out2 and out.endswith("\n") and out.count("\n") >= 1
    assert "Loading" not in out and "kvchat" not in out


def test_lines_mode_is_one_conversation_with_stats(monkeypatch, capsys, tiny_model_dir):
    stdin = b"Hello, how are you?\n\nWhat is the capital of France?\nThank you.\n"
    code, out, err = run(monkeypatch, capsys, greedy(tiny_model_dir, "--lines", "--stats"), stdin)
    assert code == 0
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(records) == 3  # the blank line is not a turn
    for record in records:
        assert {"reused", "prefilled", "generated", "ttft_ms", "decode_tok_s", "kv_bytes"} <= set(record)
    assert records[0]["reused"] == 0
    assert records[1]["reused"] > 0 and records[2]["reused"] > records[1]["reused"]
    assert len(out.splitlines()) >= 3


def test_no_reuse_prints_the_same_replies(monkeypatch, capsys, tiny_model_dir):
    stdin = b"Hello, how are you?\nWhat is the capital of France?\nTell me a story.\n"
    _, with_reuse, _ = run(monkeypatch, capsys, greedy(tiny_model_dir, "--lines"), stdin)
    _, without, err = run(monkeypatch, capsys, greedy(tiny_model_dir, "--lines", "--no-reuse", "--stats"), stdin)
    assert with_reuse == without
    assert all(json.loads(line)["reused"] == 0 for line in err.splitlines() if line.startswith("{"))


@pytest.mark.parametrize("stdin, message", [
    (b"", "stdin is empty"),
    (b"  \n \n", "stdin is empty"),
    (b"\xff\xfe\x00\x01binary", "NUL bytes"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
])
def test_bad_stdin_gets_one_clear_line(monkeypatch, capsys, tiny_model_dir, stdin, message):
    code, out, err = run(monkeypatch, capsys, greedy(tiny_model_dir), stdin)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [err.strip()] and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, named", [
    (["--temperature", "hot"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "2.5"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int3"], "--dtype"),
    (["--frobnicate"], "--frobnicate"),
])
def test_bad_flags_exit_2_with_one_line_naming_them(monkeypatch, capsys, argv, named):
    code, out, err = run(monkeypatch, capsys, argv + ["-p", "hi"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and named in err


def test_bad_config_values_exit_2_naming_the_key(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('temperature = "warm"\n')
    code, _, err = run(monkeypatch, capsys, ["--config", str(path), "-p", "hi"])
    assert code == 2 and "'temperature'" in err and len(err.strip().splitlines()) == 1
    path.write_text("colour = 3\n")
    code, _, err = run(monkeypatch, capsys, ["--config", str(path), "-p", "hi"])
    assert code == 2 and "unknown setting 'colour'" in err
    path.write_text("temperature = [\n")
    code, _, err = run(monkeypatch, capsys, ["--config", str(path), "-p", "hi"])
    assert code == 2 and "not valid TOML" in err and len(err.strip().splitlines()) == 1


def test_settings_precedence_defaults_then_file_then_flags(tmp_path):
    assert load_config(None) == Settings()
    path = tmp_path / "c.toml"
    path.write_text('temperature = 0.2\ntop_k = 7\nsystem = "Be terse."\nreuse = false\n')
    from_file = load_config(path)
    assert from_file.sampling == Sampling(temperature=0.2, top_k=7)
    assert from_file.system == "Be terse." and from_file.reuse is False
    flagged = load_config(path, {"temperature": "0", "top_k": None, "max_new_tokens": "9"})
    assert flagged.sampling == Sampling(temperature=0.0, top_k=7, max_new_tokens=9)


def test_project_config_file_is_valid_and_all_defaults():
    from pathlib import Path

    project_config = Path(__file__).parent.parent / "config.toml"
    assert load_config(project_config) == Settings()


def test_missing_model_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(monkeypatch, capsys, ["--model", "nobody/no-such-model", "-p", "hi"])
    assert code == 1 and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(monkeypatch, capsys, ["--model", "no such thing", "-p", "hi"])
    assert code == 2 and "is not 'default', a model directory, a .gguf file or a Hugging Face id" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(monkeypatch, capsys, ["--model", str(tmp_path / "empty"), "-p", "hi"])
    assert code == 1 and "not a model directory" in err
    (tmp_path / "notes.txt").write_text("my notes")  # issue 11: a file was called "not a model directory"
    code, _, err = run(monkeypatch, capsys, ["--model", str(tmp_path / "notes.txt"), "-p", "hi"])
    assert code == 2 and "notes.txt is a file, not a model" in err and len(err.strip().splitlines()) == 1


def test_a_long_error_in_a_terminal_wraps_between_words():
    """Regression (issue 11): long error lines wrapped mid-word in the terminal."""
    from kvchat.ui.terminal import wrap

    text = "kvchat: error: " + " ".join(["extraordinarily"] * 12)
    wrapped = wrap(text, 40)
    assert all(len(line) <= 40 for line in wrapped.splitlines()) and len(wrapped.splitlines()) > 1
    assert wrapped.replace("\n  ", " ") == text and wrap(text, None) == text


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, bytes(range(256)) * 20, b"GGUF\x03\x00\x00\x00" + b"\x01" * 40],
                         ids=["empty", "zeros", "random", "truncated-header"])
def test_a_damaged_gguf_file_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path, content):
    """Regression (issue 10): a bad .gguf gave a 25-line traceback; every other bad model path gives one line."""
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    code, out, err = run(monkeypatch, capsys, ["--model", str(path), "-p", "hi"])
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "not a usable GGUF file" in err


def test_a_failed_turn_in_lines_mode_is_reported_and_the_script_goes_on(monkeypatch, capsys, tiny_model_dir):
    import kvchat.chat.engine as engine_module

    real, calls = engine_module.next_token, {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "next_token", failing_once)
    code, out, err = run(monkeypatch, capsys, greedy(tiny_model_dir, "--lines"), b"Hello!\nHow are you?\n")
    assert code == 1 and len(out.splitlines()) == 1
    assert "line 1: RuntimeError: out of memory; skipped" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["sessions", "list"], ["cache"], ["sessions", "rm", "x"],
                                  ["models"]])
def test_commands_that_load_no_model_never_import_torch(tmp_path, argv):
    """Regression (issue 11): every command imported torch and transformers first (3 s before --help)."""
    import subprocess
    import sys

    probe = ("import sys; from kvchat.ui.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, *argv, *(["--sessions-dir", str(tmp_path)]
                                                                    if argv[0] in ("sessions", "cache") else [])],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "IMPORTED []" in done.stdout, done.stdout + done.stderr


def test_a_hub_model_with_the_hub_out_of_reach_is_one_line(tmp_path):
    """Issue 11: `--model org/name` downloads when the Hub is there; when it cannot be reached, one line (the
    test points the Hub at a closed local port: nothing leaves this machine)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2",
               KVCHAT_HOME=str(tmp_path / "home"))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "kvchat", "--model", "nobody/no-such-model", "-p", "hi"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "cannot download 'nobody/no-such-model': the Hugging Face Hub cannot be reached" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_hub_model_not_cached_is_downloaded_with_its_progress_counted(monkeypatch, tiny_model_dir, tmp_path):
    """The download path, with huggingface_hub's snapshot_download stood in for (no network in tests): the
    cache is asked first, then the files are fetched with their count on kvchat's progress line."""
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from kvchat.weights.model import load_model

    calls, seen = [], []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False, tqdm_class=None):
        calls.append((repo_id, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        files = sorted(tiny_model_dir.iterdir())
        bar = tqdm_class(total=len(files))
        target = tmp_path / "snapshot"
        target.mkdir(exist_ok=True)
        for path in files:
            shutil.copy(path, target / path.name)
            bar.update(1)
        return str(target)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_model("someone/tiny-chat", "cpu", "float32", progress=lambda *step: seen.append(step))
    assert loaded.name == "someone/tiny-chat" and calls == [("someone/tiny-chat", True), ("someone/tiny-chat", False)]
    files = len(list(tiny_model_dir.iterdir()))
    assert ("downloading someone/tiny-chat from the Hugging Face Hub", files, files) in seen


def test_models_lists_the_hugging_face_cache_and_converted_models_with_size_and_kv_per_token(
        monkeypatch, capsys, tmp_path, tiny_model_dir):
    """Issue 11: `kvchat models` lists what is local, with size and KV bytes per token."""
    import shutil

    from kvchat.weights import memory

    hub = tmp_path / "hub" / "models--someone--tiny-chat"
    commit = "0" * 40
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(commit)
    snapshot = hub / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in tiny_model_dir.iterdir():
        blob = hub / "blobs" / f"{abs(hash(path.name)):x}"
        blob.parent.mkdir(exist_ok=True)
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(blob)
    converted = tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", converted / "config.json")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "home"))
    code, out, _ = run(monkeypatch, capsys, ["models"])
    per_token = 2 * 2 * 2 * 16 * 4  # tiny.py: 2 layers, 2 KV heads of 64 / 4 = 16, float32
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("default ") and "converted by kvchat" in lines[0]
    assert lines[1].startswith("someone/tiny-chat ") and "Hugging Face cache" in lines[1]
    assert all(f"{memory.human(per_token)}/token" in line for line in lines)
