"""kvchat bench: what the KV cache buys, measured side by side in one process.

Each scenario runs its two sides alternately, several repetitions, and reports medians and ratios.
Nothing here prints; `run` reports progress through a callback and returns plain data.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from kvchat.cache import layers
from kvchat.weights import memory
from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.conversation import Conversation
from kvchat.chat.saving import open_chat
from kvchat.chat.engine import Engine, Token, TurnEnd
from kvchat.chat.prompt import common_prefix
from kvchat.bench.common import BenchPlan, Progress, build_session, fixed_length, median, message
from kvchat.weights.model import LoadedModel, fingerprint, precision
from kvchat.store.sessions import Store

@torch.inference_mode()
def cache_vs_recompute(loaded: LoadedModel, plan: BenchPlan, progress: Progress) -> dict[str, Any]:
    """Scenario 1: N tokens after a P-token prompt, with the KV cache and with a full recompute per token."""
    model, device = loaded.model, loaded.device
    torch.manual_seed(0)
    prompt = torch.randint(100, loaded.tokenizer.vocab_size - 1, (1, plan.prompt_tokens), device=device)
    cache_kwarg = layers.cache_kwarg(model)
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    outputs: dict[str, list[int]] = {}
    for rep in range(plan.repeat):
        for side in ("cached", "recompute"):
            progress("cache vs recompute", 2 * rep + (side == "recompute"), 2 * plan.repeat)
            ids, new = prompt, []
            started = time.perf_counter()
            if side == "cached":
                cache = layers.new_cache(model)
                logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache}).logits
                for _ in range(plan.new_tokens):
                    token = logits[0, -1].argmax(-1, keepdim=True)
                    new.append(int(token))
                    logits = model(input_ids=token.view(1, 1), use_cache=True, logits_to_keep=1,
                                   **{cache_kwarg: cache}).logits
            else:
                for _ in range(plan.new_tokens):
                    logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
                    token = logits[0, -1].argmax(-1, keepdim=True)
                    new.append(int(token))
                    ids = torch.cat([ids, token.view(1, 1)], dim=1)
            times[side].append(time.perf_counter() - started)
            outputs[side] = new
    cached, recompute = median(times["cached"]), median(times["recompute"])
    return {"prompt_tokens": plan.prompt_tokens, "new_tokens": plan.new_tokens,
            "cached_s": cached, "recompute_s": recompute, "speedup": recompute / cached if cached else 0.0,
            "same_tokens": outputs["cached"] == outputs["recompute"], "runs": times}


def turns(loaded: LoadedModel, plan: BenchPlan, progress: Progress) -> dict[str, Any]:
    """Scenario 2: time to first token at every turn of a scripted chat, with reuse and with --no-reuse."""
    sampling = Sampling(temperature=0, max_new_tokens=plan.reply_tokens)
    ttft: dict[str, list[list[float]]] = {"reuse": [[] for _ in range(plan.turns)],
                                          "no_reuse": [[] for _ in range(plan.turns)]}
    prefilled: dict[str, list[int]] = {"reuse": [], "no_reuse": []}
    same = True
    for rep in range(plan.repeat):
        reuse = fixed_length(Engine(loaded, compile=plan.compile))  # the other side shares its compiled step
        engines = {"reuse": reuse,
                   "no_reuse": fixed_length(Engine(loaded, reuse=False, step=reuse.step, compile=plan.compile))}
        chats = {side: Chat(engine, sampling=sampling) for side, engine in engines.items()}
        for turn in range(plan.turns):
            progress("turns", rep * plan.turns + turn, plan.repeat * plan.turns)
            replies = {}
            for side in engines:
                end = [e for e in chats[side].send(message(turn, plan.message_tokens))
                       if isinstance(e, TurnEnd)][0]
                ttft[side][turn].append(end.stats.ttft_ms)
                replies[side] = end.token_ids
                if rep == 0:
                    prefilled[side].append(end.stats.prefilled)
            same = same and replies["reuse"] == replies["no_reuse"]
    medians = {side: [median(values) for values in per_turn] for side, per_turn in ttft.items()}
    last = plan.turns - 1
    return {"turns": plan.turns, "ttft_ms": medians, "prefilled": prefilled, "same_replies": same,
            "last_turn": {"reuse_ms": medians["reuse"][last], "no_reuse_ms": medians["no_reuse"][last],
                          "speedup": medians["no_reuse"][last] / medians["reuse"][last]
                          if medians["reuse"][last] else 0.0},
            "context_tokens": sum(prefilled["no_reuse"][-1:])}


def resume(loaded: LoadedModel, plan: BenchPlan, progress: Progress, workdir: Path) -> dict[str, Any]:
    """Scenario 3: resume a saved session from the store against prefilling it from its text."""
    fp = fingerprint(loaded)
    saved, autosaves = build_session(loaded, workdir / "sessions", fp, plan, progress)
    question = "Summarize our conversation in one sentence."
    sampling = Sampling(temperature=0, max_new_tokens=8)
    times: dict[str, list[float]] = {"resume": [], "prefill": []}
    same = True
    for rep in range(plan.repeat):
        progress("resume", rep, plan.repeat)
        engine = Engine(loaded, compile=plan.compile)
        side_store = Store(workdir / "sessions").bind(engine.layout, fp, loaded.name)
        started = time.perf_counter()
        chat = open_chat(engine, side_store, "bench", prefixes=False).chat
        chat.sampling = sampling
        a = _first_token(chat.send(question), started, times["resume"])
        side_store.close()
        engine = Engine(loaded, compile=plan.compile)
        started = time.perf_counter()
        chat = Chat(engine, Conversation(messages=[dict(m) for m in saved.conversation.messages]), sampling=sampling)
        b = _first_token(chat.send(question), started, times["prefill"])
        same = same and a == b
    resumed, prefilled = median(times["resume"]), median(times["prefill"])
    disk = sum(p.stat().st_size for p in (workdir / "sessions" / ".kv").rglob("*.safetensors"))
    return {"tokens": saved.cache.tokens, "resume_ms": resumed, "prefill_ms": prefilled,
            "speedup": prefilled / resumed if resumed else 0.0, "same_tokens": same,
            "disk_bytes": disk, "runs": times, "autosaves": autosaves}


def _first_token(events, started: float, sink: list[float]) -> list[int]:
    first = None
    for event in events:
        if first is None and isinstance(event, (Token, TurnEnd)):  # the first token (or an empty reply's end)
            first = (time.perf_counter() - started) * 1000
        if isinstance(event, TurnEnd):
            sink.append(first)
            return event.token_ids
    raise AssertionError("a turn ended without a TurnEnd event")


REPLY = ("The river winds through the valley, past old mills and quiet farms, where herons wait in the "
         "shallows and the light falls slanting through willow leaves in late afternoon. ")


def _history(engine: Engine, tokens: int) -> list[dict[str, Any]]:
    """A conversation of at least `tokens` tokens, ending with a reply; replies carry their ids as generated."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant."}]
    while len(engine.render(messages)) < tokens:
        turn = len(messages) // 2
        messages.append({"role": "user", "content": message(turn, 50)})
        messages.append(_reply(engine, f"Answer {turn}: " + REPLY * 3))
    return messages


def _reply(engine: Engine, text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text,
            "token_ids": engine.tokenizer(text, add_special_tokens=False)["input_ids"]}


def turn_cost(loaded: LoadedModel, plan: BenchPlan, progress: Progress) -> dict[str, Any]:
    """Scenario 5: what a turn costs before its first forward pass (render, tokenize, fit the context, find the
    cached prefix) as the history grows; the whole conversation rendered each turn against remembered pieces.

    Each timed turn is a new reply and a new message on a history the previous turn rendered. "no limit"
    lets the whole history stay in view (the cost of rendering it); "model context" drops old turns to fit
    the model's context, as a chat does.
    """
    whole = Engine(loaded, compile=plan.compile)
    engines = {"whole": whole, "pieces": Engine(loaded, step=whole.step, compile=plan.compile)}
    engines["whole"].renderer.use_pieces = False
    context = engines["pieces"].max_context
    sampling = Sampling(temperature=0, max_new_tokens=plan.new_tokens)
    rows = []
    steps = len(plan.history_tokens) * plan.repeat * 2
    for size in plan.history_tokens:
        history = _history(engines["pieces"], size)
        tokens = len(engines["whole"].render(history))
        for limit, label in ((None, "no limit"), (context, "model context")):
            times: dict[str, list[float]] = {"whole": [], "pieces": []}
            targets: dict[str, list[int]] = {}
            for rep in range(plan.repeat):
                progress(f"turn cost: {tokens} tokens, {label}", len(rows) * plan.repeat + rep, steps)
                turn = [{"role": "user", "content": message(900 + rep, 50)},
                        _reply(engines["pieces"], f"Answer {rep} {label}: " + REPLY * 2),
                        {"role": "user", "content": message(950 + rep, 50)}]
                for side, engine in engines.items():
                    engine.max_context = limit
                    conv = Conversation(messages=history + turn[:2])
                    held = engine.render(history + turn[:1]) + turn[1]["token_ids"]  # what the last turn cached
                    started = time.perf_counter()
                    target, _, _ = engine.fit(conv, sampling, history + turn)
                    common_prefix(held, target)
                    times[side].append((time.perf_counter() - started) * 1000)
                    targets[side] = target
            rows.append({"history_tokens": tokens, "context": label, "prompt_tokens": len(targets["pieces"]),
                         "whole_ms": median(times["whole"]), "pieces_ms": median(times["pieces"]),
                         "same_tokens": targets["whole"] == targets["pieces"]})
    return {"rows": rows, "model_context": context, "whole_reason": engines["pieces"].renderer.whole_reason}


def sampling_cost(loaded: LoadedModel) -> dict[str, Any]:
    """Scenario 6: what choosing one token costs with the default sampling settings (top-k 50, top-p 0.95,
    temperature 0.7) on logits of the model's vocabulary size; median over 200 draws."""
    from kvchat.chat.sampling import next_token

    sampling = Sampling()
    torch.manual_seed(0)
    head = loaded.model.get_output_embeddings()  # (a packed one's `.weight` is made on each read)
    logits = torch.randn(getattr(head, "out_features", None) or head.weight.shape[0], device=loaded.device) * 4
    generator = torch.Generator(device=loaded.device).manual_seed(0)
    times = []
    for _ in range(200):
        started = time.perf_counter()
        int(next_token(logits, sampling, generator))  # the host sync a streamed token needs anyway
        times.append((time.perf_counter() - started) * 1000)
    return {"vocab": int(logits.shape[0]), "ms_per_token": median(times), "settings": asdict(sampling)}


def memory_figures(loaded: LoadedModel, resume_result: dict[str, Any] | None) -> dict[str, Any]:
    """Scenario 4: measured KV bytes per token against the formula, and on disk."""
    cache = layers.new_cache(loaded.model)
    n = 64
    with torch.inference_mode():
        loaded.model(input_ids=torch.arange(100, 100 + n, device=loaded.device)[None], use_cache=True,
                     **{layers.cache_kwarg(loaded.model): cache})
    shape = memory.model_shape(loaded, None, layers.layout(loaded.model, loaded.device))
    figures = {"formula_bytes_per_token": shape.bytes_per_token, "measured_bytes_per_token": layers.nbytes(cache) / n,
               "formula": f"2 x {shape.layers} x {shape.kv_heads} x {shape.head_dim} x {shape.dtype_bytes}"}
    if resume_result:
        figures["disk_bytes_per_token"] = resume_result["disk_bytes"] / resume_result["tokens"]
    return figures


def run(loaded: LoadedModel, plan: BenchPlan, progress: Progress, gguf: Path | None = None) -> dict[str, Any]:
    """All scenarios; returns the raw figures. With the model's `gguf` file and llama-cpp-python importable, a
    peer column: the same work on llama.cpp (see `kvchat.bench.peer`)."""
    results: dict[str, Any] = {
        "model": loaded.name, "device": str(loaded.device), "dtype": precision(loaded),
        "threads": torch.get_num_threads(), "plan": asdict(plan),
    }
    first = Engine(loaded, warm_up=False, compile=plan.compile)
    if first.step is not None:  # every engine on the model shares its compiled step: compiled once, before timing
        progress("compiling the decode step", 0, 1)
        results["compile_s"] = first.step.compile_now()
        results["dtype"] += first.step.label()
    results["cache_vs_recompute"] = cache_vs_recompute(loaded, plan, progress)
    results["turns"] = turns(loaded, plan, progress)
    with tempfile.TemporaryDirectory(prefix="kvchat-bench-") as workdir:
        results["resume"] = resume(loaded, plan, progress, Path(workdir))
    results["memory"] = memory_figures(loaded, results["resume"])
    results["turn_cost"] = turn_cost(loaded, plan, progress)
    results["sampling"] = sampling_cost(loaded)
    from kvchat.bench import peer

    reason = peer.unavailable() or (None if gguf else "no GGUF file for this model: no peer column")
    if reason:
        results["peer"] = reason
    else:
        peer_plan = peer.PeerPlan.quick() if plan.repeat < BenchPlan().repeat else peer.PeerPlan(repeat=plan.repeat)
        peer_plan = replace(peer_plan, compile=plan.compile)
        results["peer"] = peer.run(loaded, gguf, peer_plan, progress)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table, with a line on how they were made."""
    c, t, r, m = results["cache_vs_recompute"], results["turns"], results["resume"], results["memory"]
    rows = [
        ("1. cache vs recompute", f"{c['new_tokens']} tokens after a {c['prompt_tokens']}-token prompt",
         f"{c['cached_s']:.2f} s", f"{c['recompute_s']:.2f} s", f"{c['speedup']:.1f}x",
         "yes" if c["same_tokens"] else "NO"),
        ("2. turns: TTFT turn 1", "time to first token", f"{t['ttft_ms']['reuse'][0]:.0f} ms",
         f"{t['ttft_ms']['no_reuse'][0]:.0f} ms",
         f"{t['ttft_ms']['no_reuse'][0] / t['ttft_ms']['reuse'][0]:.1f}x", "yes" if t["same_replies"] else "NO"),
        (f"2. turns: TTFT turn {t['turns']}", f"context {t['context_tokens']} tokens",
         f"{t['last_turn']['reuse_ms']:.0f} ms", f"{t['last_turn']['no_reuse_ms']:.0f} ms",
         f"{t['last_turn']['speedup']:.1f}x", "yes" if t["same_replies"] else "NO"),
        ("3. resume", f"saved session of {r['tokens']} tokens", f"{r['resume_ms']:.0f} ms",
         f"{r['prefill_ms']:.0f} ms", f"{r['speedup']:.1f}x", "yes" if r["same_tokens"] else "NO"),
    ]
    lines = [
        f"kvchat bench · {results['model']} · {results['device']} · {results['dtype']} · "
        f"{results['threads']} threads · medians of {results['plan']['repeat']} runs",
        "",
        "| scenario | what | with the cache | without | speed-up | same tokens |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| memory | bytes per token |",
        "|---|---|",
        f"| formula ({m['formula']}) | {m['formula_bytes_per_token']:,} |",
        f"| measured in the cache | {m['measured_bytes_per_token']:,.0f} |",
    ]
    if "disk_bytes_per_token" in m:
        lines.append(f"| on disk (safetensors chunks, headers included) | {m['disk_bytes_per_token']:,.0f} |")
    saves = r["autosaves"]
    if len(saves) >= 2:
        lines += ["", "| autosave | tokens in the session | time | bytes written |", "|---|---|---|---|"]
        for save in (saves[1], saves[-1]):
            lines.append(f"| after turn {save['turn']} | {save['tokens']} | {save['ms']:.0f} ms | "
                         f"{memory.human(save['bytes'])} |")
    cost = results.get("turn_cost")
    if cost:
        lines += ["", "| turn cost before the first forward pass | prompt | whole render | remembered pieces | "
                      "speed-up | same tokens |", "|---|---|---|---|---|---|"]
        for row in cost["rows"]:
            context = ("no context limit" if row["context"] == "no limit" else
                       f"{cost['model_context']}-token context")
            lines.append(f"| {row['history_tokens']:,}-token history, {context} | {row['prompt_tokens']:,} tokens | "
                         f"{row['whole_ms']:.1f} ms | {row['pieces_ms']:.1f} ms | "
                         f"{row['whole_ms'] / row['pieces_ms'] if row['pieces_ms'] else 0:.1f}x | "
                         f"{'yes' if row['same_tokens'] else 'NO'} |")
        if cost["whole_reason"]:
            lines.append(f"This model's template is rendered whole: {cost['whole_reason']}.")
    if "sampling" in results:
        cost = results["sampling"]
        lines += ["", f"Sampling one token with the default settings (top-k {cost['settings']['top_k']}, top-p "
                      f"{cost['settings']['top_p']}) over a {cost['vocab']:,}-token vocabulary: "
                      f"{cost['ms_per_token']:.3f} ms"]
    lines += ["", "Turns, TTFT in ms (with / without reuse): " + ", ".join(
        f"{i + 1}: {a:.0f}/{b:.0f}" for i, (a, b) in enumerate(zip(t["ttft_ms"]["reuse"], t["ttft_ms"]["no_reuse"])))]
    if isinstance(results["peer"], dict):
        from kvchat.bench import peer

        lines += ["", peer.markdown(results["peer"])]
    else:
        lines.append(f"Peer: {results['peer']}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """A figure: TTFT per turn (both curves), and the cache-vs-recompute and resume bars."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, c, r = results["turns"], results["cache_vs_recompute"], results["resume"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    x = range(1, t["turns"] + 1)
    left.plot(x, t["ttft_ms"]["no_reuse"], "o-", color="#c44e52", label="--no-reuse (re-prefill all)")
    left.plot(x, t["ttft_ms"]["reuse"], "o-", color="#4c72b0", label="kvchat (prefix reuse)")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_xlabel("turn")
    left.set_ylabel("time to first token (ms)")
    left.set_title("Time to first token per turn")
    left.grid(alpha=0.3)
    left.legend()
    labels = [f"{c['new_tokens']} tokens\ncache / recompute", f"resume {r['tokens']} tok\nstore / prefill"]
    with_cache = [c["cached_s"], r["resume_ms"] / 1000]
    without = [c["recompute_s"], r["prefill_ms"] / 1000]
    positions = range(len(labels))
    right.bar([p - 0.2 for p in positions], with_cache, 0.4, color="#4c72b0", label="with the cache")
    right.bar([p + 0.2 for p in positions], without, 0.4, color="#c44e52", label="without")
    right.set_xticks(list(positions), labels)
    right.set_ylabel("seconds")
    right.set_yscale("log")
    right.set_title("Generation and resume")
    right.legend()
    fig.suptitle(f"kvchat bench · {results['model']} · {results['device']} {results['dtype']} · "
                 f"{results['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
