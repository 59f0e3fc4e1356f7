"""Issue 21, item 6: leaving while the model still loads, and conversions left half-way."""

import os
import pty
import select
import shutil
import subprocess
import sys
import time

import pytest

from kvchat.errors import KvchatError
from kvchat.weights.model import conversion_folder


def read_until(fd, want, timeout):
    seen, end = b"", time.monotonic() + timeout
    while want not in seen and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


@pytest.mark.parametrize("leave", [b"/quit\r", b"\x04"])
def test_quit_or_ctrl_d_while_the_model_loads_leaves_at_once_and_cleanly(tiny_model_dir, tmp_path, leave):
    """Regression: /quit or Ctrl-D while the model was loading aborted the process ("terminate called without
    an active exception", SIGABRT). The load here never ends (its weights file is a FIFO nobody writes)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "KVCHAT_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "kvchat", "--model", str(model), "--sessions-dir",
                             str(tmp_path / "sessions"), "--session", "s"], stdin=secondary, stdout=secondary,
                            stderr=secondary, env=env, cwd=tmp_path, start_new_session=True)
    os.close(secondary)
    try:
        assert b"starting" in read_until(primary, b"starting", 60)
        time.sleep(1.0)  # the prompt is up, the model loading behind it
        os.write(primary, leave)
        code = proc.wait(timeout=30)
        rest = read_until(primary, b"\x00never", 1)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
    assert code == 0, rest
    assert b"terminate called" not in rest and b"Traceback" not in rest
    assert not (tmp_path / "sessions" / "s.lock").exists() or _unlocked(tmp_path / "sessions" / "s.lock")


def _unlocked(path):
    import fcntl

    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
    return True


def test_a_conversion_left_half_way_is_removed_by_the_next_one(tmp_path):
    """Regression: each stopped start left a 517 MB models/.convert-* folder, one more per attempt."""
    models = tmp_path / "models"
    (models / ".convert-abc123").mkdir(parents=True)
    (models / ".convert-abc123" / "model.safetensors").write_bytes(b"x" * 1000)
    (models / "SmolLM2-135M-Instruct").mkdir()  # a converted model stays
    outside = tmp_path / "outside"
    outside.mkdir()
    (models / ".convert-link").symlink_to(outside)  # never followed
    with conversion_folder(models) as staging:
        assert staging.is_dir() and staging.parent == models
        assert sorted(p.name for p in models.iterdir()) == sorted(
            [".convert.lock", ".convert-link", "SmolLM2-135M-Instruct", staging.name])
    assert not staging.exists() and outside.is_dir()
    assert oct(models.stat().st_mode & 0o777) == oct(0o700)


def test_a_home_where_models_cannot_be_converted_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KvchatError, match=r"cannot write converted models in .*: Not a directory \(set KVCHAT_HOME"):
        with conversion_folder(tmp_path / "file" / "models"):
            pass
