import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_loaded  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
# No warm process behind the `kvchat` runs tests start (tests/test_warm.py turns it on where it is tested).
os.environ["KVCHAT_WARM"] = "0"
# One compile cache for the whole run (kvchat's own default is under $KVCHAT_HOME, which each test points elsewhere):
# tests that compile the same tiny model share what inductor built.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvchat-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)  # (not left in /tmp)


@pytest.fixture(scope="session")
def tiny():
    """A tiny float64 Llama (float64 keeps greedy ties from flipping between cached and fresh runs)."""
    return make_loaded(torch.float64)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny model and tokenizer saved as a model directory, for `--model PATH`."""
    loaded = make_loaded(torch.float32)
    path = tmp_path_factory.mktemp("tiny-model")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def small_chunks(monkeypatch):
    """16-token store chunks (the default of every store made in the test), so a short test conversation spans
    several chunks plus a tail."""
    from kvchat.store import manifests

    monkeypatch.setattr(manifests, "CHUNK_TOKENS", 16)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, request):
    """Point kvchat's user directory and config lookup at a temp dir (the real-model tests keep the model cache)."""
    if "real_model" not in request.keywords:
        monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVCHAT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
