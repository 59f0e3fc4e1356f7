"""What every benchmark shares: the plan of sizes, generated messages, medians, a saved session to resume."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine
from kvchat.chat.saving import Persister
from kvchat.config import Sampling
from kvchat.store.sessions import Store
from kvchat.weights.model import LoadedModel

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class BenchPlan:
    """Sizes of every scenario."""

    prompt_tokens: int = 512
    new_tokens: int = 128
    turns: int = 20
    message_tokens: int = 50
    reply_tokens: int = 32
    resume_tokens: int = 2000
    repeat: int = 3
    history_tokens: tuple[int, ...] = (1000, 8000, 32000)  # turn cost: conversations this long
    compile: str = "off"  # the decode step of every engine measured (the `compile` setting)

    @classmethod
    def quick(cls) -> "BenchPlan":
        return cls(prompt_tokens=64, new_tokens=16, turns=4, message_tokens=24, reply_tokens=8,
                   resume_tokens=200, repeat=2, history_tokens=(300, 1200))


WORDS = ("river mountain quiet garden copper lantern orbit velvet harbor signal meadow thunder "
         "paper engine silver compass canyon ember island marble voyage winter echo falcon").split()


def message(turn: int, approx_tokens: int) -> str:
    """A varied user message of about `approx_tokens` tokens."""
    words = [WORDS[(turn * 7 + i * 3) % len(WORDS)] for i in range(max(1, approx_tokens - 12))]
    return f"Question {turn + 1}: tell me something about " + " ".join(words) + "."


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def fixed_length(engine: Engine) -> Engine:
    """Replies of exactly max_new_tokens: the benchmark compares equal work, so end-of-turn is ignored."""
    engine.stop_ids = frozenset()
    return engine


def build_session(loaded: LoadedModel, root: Path, fp: str, plan: BenchPlan,
                   progress: Progress) -> tuple[Chat, list[dict[str, float]]]:
    """Chat until the conversation holds `resume_tokens`, autosaving the session 'bench' after every turn.

    Returns the chat and, per turn, the autosave's time and bytes written.
    """
    engine = fixed_length(Engine(loaded, compile=plan.compile))
    store = Store(root).bind(engine.layout, fp, loaded.name)
    persister = Persister(store, "bench")
    chat = Chat(engine, sampling=Sampling(temperature=0, max_new_tokens=plan.reply_tokens))
    autosaves = []
    while chat.cache.tokens < plan.resume_tokens:
        progress("resume: building the session", min(chat.cache.tokens, plan.resume_tokens), plan.resume_tokens)
        for _ in chat.send(message(len(autosaves), max(plan.message_tokens, 60))):
            pass
        written, started = store.counters.bytes_written, time.perf_counter()
        persister.after_turn(chat)
        autosaves.append({"turn": len(autosaves) + 1, "tokens": chat.cache.tokens,
                          "ms": (time.perf_counter() - started) * 1000,
                          "bytes": store.counters.bytes_written - written})
    store.close()
    return chat, autosaves
