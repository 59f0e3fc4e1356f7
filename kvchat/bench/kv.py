"""kvchat bench --kv: what each KV form costs and what it changes, side by side in one run.

For each form (`auto`, the float types, q8, q4): the cache's bytes per token in memory and a saved session's on
disk (the tensors of its chunks and tails), prefill and decode speed at each context (the levers' prompts: a
text to read, then a question, greedy), greedy agreement with `auto` over those prompts (tokens before the first
difference), and perplexity over a fixed public-domain text shipped with kvchat (texts/public_domain.txt, about
2,000 tokens with the default model's tokenizer), read through a cache in that form so that every token attends
to the earlier ones as the form keeps them. Nothing here prints.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kvchat.bench.levers import answer_all, prompts, speed_table
from kvchat.cache import layers
from kvchat.cache.kv_forms import KVForm
from kvchat.chat.engine import Engine
from kvchat.weights.model import LoadedModel

Progress = Callable[[str, int, int], None]
FORMS = ("auto", "float16", "bfloat16", "q8", "q8/q4", "q4")
TEXT = Path(__file__).with_name("texts") / "public_domain.txt"


@dataclass(frozen=True)
class KVPlan:
    contexts: tuple[int, ...] = (512, 2048)
    prompts: int = 20
    new_tokens: int = 64
    text_tokens: int | None = None  # None: the whole text
    chunk: int = 256  # tokens per forward pass when reading the text

    @classmethod
    def quick(cls) -> "KVPlan":
        return cls(contexts=(128,), prompts=2, new_tokens=8, text_tokens=256, chunk=64)


@torch.inference_mode()
def perplexity(engine: Engine, ids: list[int], chunk: int) -> float:
    """exp(mean negative log-likelihood) of each token of `ids` after the ones before it, read `chunk` tokens a
    pass through a cache in the engine's form."""
    cache = layers.new_cache(engine.model, engine.window_cache, engine.kv_form)
    kwarg = {layers.cache_kwarg(engine.model): cache}
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start:start + chunk + 1]  # (the next chunk's first token is this one's last target)
        inputs = torch.tensor([piece[:-1]], device=engine.device)
        positions = torch.arange(start, start + len(piece) - 1, device=engine.device)[None]
        logits = engine.model(input_ids=inputs, position_ids=positions, use_cache=True, **kwarg).logits[0]
        targets = torch.tensor(piece[1:], device=engine.device)
        total += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        count += len(piece) - 1
    return math.exp(total / max(1, count))


def disk_bytes_per_token(engine: Engine, messages: list[dict[str, str]], new_tokens: int) -> float:
    """Tensor bytes per token of a session saved after one turn (its chunks and tail; file headers left out)."""
    from kvchat.chat.chat import Chat
    from kvchat.chat.saving import Persister
    from kvchat.config import Sampling
    from kvchat.store.sessions import Store
    from kvchat.weights.model import fingerprint

    with tempfile.TemporaryDirectory() as root:
        store = Store(Path(root)).bind(engine.layout, fingerprint(engine.loaded), engine.loaded.name)
        chat = Chat(engine, sampling=Sampling(temperature=0, max_new_tokens=new_tokens))
        list(chat.send(messages[-1]["content"]))
        Persister(store, "bench").after_turn(chat)
        store.close()
        files = [*(Path(root) / ".kv" / "chunks").glob("*.safetensors"),
                 *(Path(root) / ".kv" / "tails").glob("*.safetensors")]
        payload = sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in files)
        return payload / max(1, chat.cache.tokens)


def run(loaded: LoadedModel, plan: KVPlan, progress: Progress) -> dict[str, Any]:
    """Every form at every context; speeds are medians over the prompts."""
    text_ids = loaded.tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    text_ids = text_ids[:plan.text_tokens] if plan.text_tokens else text_ids
    rows, forms, reference = [], {}, {}
    for name in FORMS:
        engine = Engine(loaded, kv_form=KVForm(name), warm_up=False)
        engine.stop_ids = frozenset()  # equal work in every form: end-of-turn does not stop a reply
        progress(f"kv: {name}, perplexity", 0, 1)
        ppl = perplexity(engine, text_ids, plan.chunk)
        memory = []
        for context in plan.contexts:
            found = answer_all(engine, context, plan.prompts, plan.new_tokens, reference, name == FORMS[0],
                               lambda done, of: progress(f"kv: {name} at {context} tokens", done, of))
            memory += [end.stats.kv_bytes / max(1, end.stats.reused + end.stats.prefilled + plan.new_tokens - 1)
                       for end in found.ends]
            rows.append({"form": name, "context": context, "decode_tok_s": statistics.median(found.decode),
                         "prefill_tok_s": statistics.median(found.prefill), "agree": found.agree,
                         "all_agree": sum(a == plan.new_tokens for a in found.agree)})
        progress(f"kv: {name}, a saved session", 0, 1)
        disk = disk_bytes_per_token(engine, prompts(engine, plan.contexts[0], 1)[0], plan.new_tokens)
        forms[name] = {"memory_per_token": statistics.median(memory), "disk_per_token": disk, "perplexity": ppl}
        del engine
    base = {row["context"]: row for row in rows if row["form"] == FORMS[0]}
    for row in rows:
        row["decode_x"] = row["decode_tok_s"] / base[row["context"]]["decode_tok_s"]
        row["prefill_x"] = row["prefill_tok_s"] / base[row["context"]]["prefill_tok_s"]
    for figures in forms.values():
        figures["memory_x"] = figures["memory_per_token"] / forms[FORMS[0]]["memory_per_token"]
        figures["disk_x"] = figures["disk_per_token"] / forms[FORMS[0]]["disk_per_token"]
        figures["perplexity_x"] = figures["perplexity"] / forms[FORMS[0]]["perplexity"]
    return {"plan": {"contexts": list(plan.contexts), "prompts": plan.prompts, "new_tokens": plan.new_tokens,
                     "text_tokens": len(text_ids)}, "rows": rows, "forms": forms}


def markdown(results: dict[str, Any]) -> str:
    """The forms as two Markdown tables: what each costs, and its speed and agreement at each context."""
    plan = results["plan"]
    lines = [f"| KV form | memory B/token | vs auto | disk B/token | vs auto | perplexity ({plan['text_tokens']:,} "
             "tokens) | vs auto |", "|---|---|---|---|---|---|---|"]
    for name, f in results["forms"].items():
        lines.append(f"| {name} | {f['memory_per_token']:,.0f} | {f['memory_x']:.3f}x | {f['disk_per_token']:,.0f} | "
                     f"{f['disk_x']:.3f}x | {f['perplexity']:.3f} | {100 * (f['perplexity_x'] - 1):+.2f}% |")
    return "\n".join([*lines, "", *speed_table(results, "KV form", "form", "auto", " with auto")])
