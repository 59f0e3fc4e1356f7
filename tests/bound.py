"""An engine bound to a store, as `kvchat chat` wires them: stored prefixes seed an empty cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvchat.chat.engine import Engine
from kvchat.weights.model import LoadedModel, fingerprint
from kvchat.store.sessions import Store


def engine_with_store(loaded: LoadedModel, root: Path, store_kwargs: dict[str, Any] | None = None,
                      **engine_kwargs: Any) -> tuple[Engine, Store]:
    """A new engine on `loaded` and the store at `root`, bound together."""
    store = Store(root, **(store_kwargs or {}))
    engine = Engine(loaded, **engine_kwargs)
    store.bind(engine, fingerprint(loaded))
    engine.prefix_source = store.longest_prefix
    return engine, store
