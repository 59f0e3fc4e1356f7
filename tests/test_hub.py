"""Issue 21, item 7: a Hugging Face cache snapshot with some of a model's files is not trusted forever."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from kvchat.weights.model import missing_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def snapshot(root, model_dir, drop=(), index=None):
    """A Hugging Face cache holding org/tiny at COMMIT: the files of `model_dir` but those in `drop`."""
    repo = root / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, folder)
    for name in drop:
        (folder / name).unlink()
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def chat(hub, tmp_path, **env):
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-m", "kvchat", "--model", "org/tiny", "--max-new-tokens", "2",
                           "--sessions-dir", str(tmp_path / "sessions"), "-p", "hi"], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


def test_what_a_model_folder_lacks_is_named(tiny_model_dir, tmp_path):
    whole = snapshot(tmp_path / "a", tiny_model_dir)
    assert missing_files(whole) == []
    assert missing_files(snapshot(tmp_path / "b", tiny_model_dir, drop=["model.safetensors"])) == ["model.safetensors"]
    assert missing_files(snapshot(tmp_path / "c", tiny_model_dir, drop=["config.json", "tokenizer.json",
                                                                         "tokenizer_config.json"])) == \
        ["config.json", "tokenizer.json"]
    sharded = snapshot(tmp_path / "d", tiny_model_dir, index={"weight_map": {"a": "model.safetensors",
                                                                             "b": "model-00002.safetensors"}})
    assert missing_files(sharded) == ["model-00002.safetensors"]
    (sharded / "model.safetensors.index.json").write_text("[]")
    assert missing_files(sharded) == ["a readable model.safetensors.index.json"]


@pytest.mark.parametrize("offline", [True, False])
def test_a_partial_snapshot_is_completed_online_and_one_line_offline(tiny_model_dir, tmp_path, offline):
    """Regression: a cached snapshot with config and tokenizer but no weights made every run fail with "no file
    named model.safetensors", never downloading the rest. Offline: one line saying what is missing. Online it is
    downloaded (here the Hub cannot be reached: one line saying so, and what the copy lacks)."""
    hub = tmp_path / "hub"
    snapshot(hub, tiny_model_dir, drop=["model.safetensors"])
    env = {"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
                                                   "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    done = chat(hub, tmp_path, **env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "its copy in the Hugging Face cache is incomplete (no model.safetensors)" in done.stderr
    assert ("HF_HUB_OFFLINE is set: unset it to download the rest" if offline
            else "the rest could not be downloaded (the Hugging Face Hub cannot be reached") in done.stderr


def test_a_whole_snapshot_is_used_offline(tiny_model_dir, tmp_path):
    hub = tmp_path / "hub"
    snapshot(hub, tiny_model_dir)
    done = chat(hub, tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 0 and done.stdout, done.stderr
