"""Per-family figures for the tiny random models of tests/families.py: `python tests/family_report.py [FAMILY...]`.

For each family, a 10-turn greedy chat run twice side by side (reuse and --no-reuse, alternating turn by
turn), saved after every turn; then the session is resumed by a new engine and store. Prints a Markdown
table: turn-10 prefilled tokens and time to first token with and without reuse, tokens loaded and
prefilled by the resumed turn, cache bytes per token in memory (plus the fixed recurrent state and
its checkpoints) and on disk. These models are tiny (4 layers, hidden 64): the token counts are what
matters; times only show the shape.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bound import engine_with_store, new_chat  # noqa: E402
from families import FAMILIES, SLIDING, make_family, window_cache  # noqa: E402

from kvchat.config import Sampling  # noqa: E402
from kvchat.chat.chat import Chat  # noqa: E402
from kvchat.chat.engine import Engine, TurnEnd  # noqa: E402
from kvchat.chat.saving import Persister, open_chat  # noqa: E402
from kvchat.weights.memory import human  # noqa: E402
from kvchat.weights.model import fingerprint  # noqa: E402
from kvchat.store.sessions import Store  # noqa: E402

GREEDY = Sampling(temperature=0, max_new_tokens=16)
SYSTEM = "You are a helpful assistant. Answer in one short sentence, and be kind to cats and dogs."
TOPICS = ["the sea", "a cat", "Paris", "numbers", "a dog", "the fox", "a story", "the capital", "friends", "today"]


def turn(chat, text):
    chat.sampling = GREEDY
    return [e for e in chat.send(text) if isinstance(e, TurnEnd)][0].stats


def measure(name: str) -> dict:
    loaded = make_family(name, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as root:
        engine, store = engine_with_store(loaded, Path(root), window_cache=window_cache(loaded))
        baseline = Engine(loaded, reuse=False, window_cache=window_cache(loaded))
        persister = Persister(store, session="report")
        chat, plain = new_chat(engine, store, SYSTEM, GREEDY), Chat.start(baseline, SYSTEM, sampling=GREEDY)
        for topic in TOPICS:
            text = f"Tell me something about {topic}, please, in a few words."
            with_reuse = turn(chat, text)
            without = turn(plain, text)
            persister.after_turn(chat)
        tokens = chat.cache.tokens
        state = engine.layout.state_bytes(tokens)
        row = {
            "family": name, "tokens": tokens,
            "prefilled": with_reuse.prefilled, "prefilled_no_reuse": without.prefilled,
            "ttft_ms": with_reuse.ttft_ms, "ttft_ms_no_reuse": without.ttft_ms,
            "fallback": with_reuse.fallback,
            "memory_per_token": engine.layout.bytes_per_token(loaded.dtype), "state": state,
            "checkpoints": len(chat.cache.checkpoints),
            "disk_per_token": store.kv_bytes() / tokens,
        }
        store.close()
        store2 = Store(Path(root))
        engine2 = Engine(loaded, window_cache=window_cache(loaded))
        store2.bind(engine2.layout, fingerprint(loaded), loaded.name)
        # (the old report's engine2 had no prefix source: the resumed chat is given none either)
        opened = open_chat(engine2, store2, "report", sampling=GREEDY, prefixes=False)
        resumed = turn(opened.chat, "And one more thing about the moon?")
        row.update(loaded=opened.loaded_tokens, resume_prefilled=resumed.prefilled, resume_ttft_ms=resumed.ttft_ms)
        store2.close()
    return row


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    print("| family | tokens | turn 10 prefilled (reuse / no reuse) | turn 10 TTFT ms (reuse / no reuse) | "
          "resume loaded / prefilled | KV per token in memory | fixed state (x checkpoints) | on disk per token |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names or list(FAMILIES) + [f"{name}:window" for name in SLIDING]:
        r = measure(name)
        print(f"| {r['family']} | {r['tokens']} | {r['prefilled']} / {r['prefilled_no_reuse']} | "
              f"{r['ttft_ms']:.1f} / {r['ttft_ms_no_reuse']:.1f} | {r['loaded']} / {r['resume_prefilled']} | "
              f"{human(r['memory_per_token'])} | {human(r['state'])} (x {r['checkpoints']}) | "
              f"{human(r['disk_per_token'])} |" + (f" fallback: {r['fallback']}" if r["fallback"] else ""),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
