"""kvchat bench --levers: decode and prefill speed of each way to hold the weights, and whether greedy replies
stay the same as float32's.

Each lever is the same model loaded another way (float32, packed 4-bit and int8 blocks, bfloat16). Every lever answers the
same prompts (a context of documentation text cut to 512 or 2,048 tokens, then a question) with a fixed
number of greedy tokens; agreement counts how many of them match float32's before the first difference.
Nothing here prints.
"""

from __future__ import annotations

import pydoc
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.weights.model import LoadedModel, precision

Progress = Callable[[str, int, int], None]
Loader = Callable[[str, str], LoadedModel]  # (weights, dtype) -> the model loaded that way

# (name, weights, dtype, compile, direct step)
LEVERS = (("float32", "full", "float32", "off", False),
          ("packed blocks, transformers' step", "int8", "float32", "off", False),
          ("packed blocks, direct step", "int8", "float32", "off", True),
          ("packed blocks, compiled step", "int8", "float32", "on", False),
          ("bfloat16", "full", "bfloat16", "off", False))
QUESTIONS = (
    "What is the main idea of the text above?", "Summarize the text above in two sentences.",
    "Write a haiku about the sea.", "List three uses of a hash map.", "Explain recursion to a child.",
    "What year did the Second World War end?", "Give me a recipe for pancakes.", "What is a prime number?",
    "Translate 'good morning' into French and Spanish.", "Why is the sky blue?",
    "Name three planets of the solar system.", "Write a short poem about autumn.",
    "What does a compiler do?", "How do I make a cup of tea?", "What is the capital of Japan?",
    "Explain what a function is in programming.", "Tell me a joke about cats.", "What is photosynthesis?",
    "Give two tips for learning a language.", "Describe a rainy day in one paragraph.",
)
SOURCES = ("json", "collections", "os", "string", "textwrap", "argparse", "pathlib", "re", "functools",
           "itertools", "logging", "csv", "shutil", "subprocess", "datetime", "random", "statistics", "heapq")


@dataclass(frozen=True)
class LeverPlan:
    contexts: tuple[int, ...] = (512, 2048)
    prompts: int = 20
    new_tokens: int = 64

    @classmethod
    def quick(cls) -> "LeverPlan":
        return cls(contexts=(128,), prompts=2, new_tokens=8)


def corpus() -> str:
    """English text that every Python installation has: the documentation of some standard modules."""
    import importlib

    return "\n\n".join(pydoc.getdoc(importlib.import_module(name)) for name in SOURCES)


def prompts(engine: Engine, context: int, count: int) -> list[list[dict[str, str]]]:
    """`count` conversations of about `context` tokens: a text to read, then a question."""
    tokenizer, text = engine.tokenizer, corpus()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    made = []
    for number in range(count):
        question = QUESTIONS[number % len(QUESTIONS)]
        start = (number * 997) % max(1, len(ids) - context)
        frame = len(engine.render([{"role": "user", "content": "Read this:\n\n" + question}]))
        passage = tokenizer.decode(ids[start:start + max(16, context - frame)])
        made.append([{"role": "user", "content": f"Read this:\n{passage}\n\n{question}"}])
    return made


def answer(engine: Engine, messages: list[dict[str, str]], new_tokens: int) -> TurnEnd:
    """Exactly `new_tokens` greedy tokens (end-of-turn tokens do not stop it) in reply to `messages`."""
    chat = Chat(engine, sampling=Sampling(temperature=0, max_new_tokens=new_tokens))
    return [e for e in chat.send(messages[-1]["content"])
            if isinstance(e, TurnEnd)][-1]


def agreement(reference: list[int], other: list[int]) -> int:
    """How many tokens agree before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))


@dataclass
class Answers:
    """A setting's greedy answers to the prompts of one context: speeds, agreement with the reference, the ends."""

    decode: list[float]
    prefill: list[float]
    agree: list[int]
    ends: list[TurnEnd]


def answer_all(engine: Engine, context: int, count: int, new_tokens: int, reference: dict[tuple[int, int], list[int]],
               is_reference: bool, report: Callable[[int, int], None]) -> Answers:
    """Greedy answers to `count` prompts of about `context` tokens; their agreement with `reference` (which they
    fill when `is_reference`). `report(done, of)` is the progress."""
    conversations = prompts(engine, context, count)
    found = Answers([], [], [], [])
    for number, messages in enumerate(conversations):
        report(number, len(conversations))
        end = answer(engine, messages, new_tokens)
        found.decode.append(end.stats.decode_tok_s)
        found.prefill.append(end.stats.prefilled / (end.stats.prefill_ms / 1000))
        if is_reference:
            reference[(context, number)] = end.token_ids
        found.agree.append(agreement(reference[(context, number)], end.token_ids))
        found.ends.append(end)
    return found


def run(load: Loader, plan: LeverPlan, progress: Progress) -> dict[str, Any]:
    """Every lever at every context; speeds are medians over the prompts."""
    rows, reference = [], {}
    for name, weights, dtype, compile, direct in LEVERS:
        loaded = load(weights, dtype)
        engine = Engine(loaded, compile=compile, warm_up=False, direct=direct)
        compile_s = None
        if engine.step is not None:
            progress(f"levers: compiling {name}", 0, 1)
            compile_s = engine.step.compile_now()
        engine.stop_ids = frozenset()  # equal work on every lever: end-of-turn does not stop a reply
        for context in plan.contexts:
            found = answer_all(engine, context, plan.prompts, plan.new_tokens, reference, name == LEVERS[0][0],
                               lambda done, of: progress(f"levers: {name} at {context} tokens", done, of))
            label = precision(loaded) + (engine.step.label() if engine.step is not None else "") + \
                (", direct step" if engine.direct is not None else ", direct step refused" if direct else "")
            rows.append({"lever": name, "precision": label, "context": context, "compile_s": compile_s,
                         "decode_tok_s": statistics.median(found.decode),
                         "prefill_tok_s": statistics.median(found.prefill), "agree": found.agree,
                         "all_agree": sum(a == plan.new_tokens for a in found.agree)})
        del engine, loaded
    base = {row["context"]: row for row in rows if row["lever"] == LEVERS[0][0]}
    for row in rows:
        row["decode_x"] = row["decode_tok_s"] / base[row["context"]]["decode_tok_s"]
        row["prefill_x"] = row["prefill_tok_s"] / base[row["context"]]["prefill_tok_s"]
    return {"plan": {"contexts": list(plan.contexts), "prompts": plan.prompts, "new_tokens": plan.new_tokens},
            "rows": rows}


def speed_table(results: dict[str, Any], what: str, label: str, base: str, agree: str) -> list[str]:
    """The rows of `results` as Markdown lines: `what` heads the column of each row's `label`, speeds are against
    `base`, and `agree` ends the agreement column's heading."""
    plan = results["plan"]
    lines = [f"| {what} | context | decode tok/s | vs {base} | prefill tok/s | vs {base} | prompts whose "
             f"{plan['new_tokens']} greedy tokens all agree{agree} | median agreeing tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row[label]} | {row['context']:,} | {row['decode_tok_s']:.1f} | "
                     f"{row['decode_x']:.2f}x | {row['prefill_tok_s']:.0f} | {row['prefill_x']:.2f}x | "
                     f"{row['all_agree']}/{plan['prompts']} | {statistics.median(row['agree']):.0f} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The levers as a Markdown table."""
    return "\n".join(speed_table(results, "lever", "precision", "float32", ""))
