"""An engine bound to a store, as `kvchat chat` wires them: stored prefixes seed an empty cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine
from kvchat.config import Sampling
from kvchat.store.sessions import Store
from kvchat.weights.model import LoadedModel, fingerprint


def engine_with_store(loaded: LoadedModel, root: Path, store_kwargs: dict[str, Any] | None = None,
                      **engine_kwargs: Any) -> tuple[Engine, Store]:
    """A new engine on `loaded` and the store at `root`, bound to the engine's model."""
    store = Store(root, **(store_kwargs or {}))
    engine = Engine(loaded, **engine_kwargs)
    store.bind(engine.layout, fingerprint(loaded), loaded.name)
    return engine, store


def new_chat(engine: Engine, store: Store | None, system: str | None = None,
             sampling: Sampling | None = None) -> Chat:
    """A new chat on `engine` whose empty cache is seeded from `store`'s prefixes (as `kvchat chat` starts one)."""
    return Chat.start(engine, system, sampling=sampling, prefixes=store.longest_prefix if store else None)
