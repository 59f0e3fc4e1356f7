"""`kvchat models`: the models on this machine (the Hugging Face cache and kvchat's converted models), their
size on disk and what their KV cache costs per token, read from their config files (no model is loaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvchat.config import kvchat_home
from kvchat.weights.memory import KVShape

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kv_bytes_per_token(config_file: Path, dtype: str = "float32") -> int | None:
    """2 x layers x KV heads x head size x bytes: what each token's keys and values take with every layer
    keeping every token (sliding-window and recurrent layers keep less; `kvchat info` measures it exactly)."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config if isinstance(config, dict) else {}
    try:
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return KVShape(config_file.parent.name, layers, kv_heads, head_dim, context=0,
                   dtype_bytes=DTYPE_BYTES.get(dtype, 4)).bytes_per_token


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def local_models() -> list[dict[str, Any]]:
    """Every model a `--model` can name without a download: kvchat's converted ones and the Hugging Face cache."""
    rows = []
    converted = kvchat_home() / "models"
    for path in sorted(converted.iterdir()) if converted.is_dir() else []:
        if (path / "config.json").is_file():
            rows.append({"name": "default" if path.name == "SmolLM2-135M-Instruct" else str(path),
                         "what": f"converted by kvchat ({path.name})", "bytes": _size(path),
                         "kv_per_token": kv_bytes_per_token(path / "config.json")})
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            repos = scan_cache_dir(os.environ.get("HF_HUB_CACHE") or None).repos  # as set now
        except CacheNotFound:
            repos = frozenset()
    except ImportError:
        repos = frozenset()
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        snapshots = [rev.snapshot_path for rev in repo.revisions if (rev.snapshot_path / "config.json").exists()]
        rows.append({"name": repo.repo_id, "what": "Hugging Face cache", "bytes": repo.size_on_disk,
                     "kv_per_token": kv_bytes_per_token(snapshots[0] / "config.json") if snapshots else None})
    return rows
