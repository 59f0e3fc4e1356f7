"""kvchat bench's peer column: the same work on llama.cpp (llama-cpp-python), with the same GGUF file and
threads, side by side in one process (each scenario alternates the two sides). Nothing here prints.

Scenarios, each on the same token ids for both sides: prefill and decode at a 512- and a 2,048-token prompt;
time to first token at the last turn of a scripted chat where each side reuses its cached prefix (llama.cpp's
`Llama.generate` keeps the longest common prefix of its last prompt); resuming a saved session of about 2,000
tokens (kvchat: its store; llama.cpp: a saved state read back from a file with `load_state`).
"""

from __future__ import annotations

import importlib.util
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvchat.bench import levers
from kvchat.bench.common import BenchPlan, Progress, build_session, median, message
from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.saving import open_chat
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.weights.model import LoadedModel, fingerprint
from kvchat.store.sessions import Store



@dataclass(frozen=True)
class PeerPlan:
    contexts: tuple[int, ...] = (512, 2048)
    new_tokens: int = 64
    turns: int = 10
    reply_tokens: int = 32
    resume_tokens: int = 2000
    repeat: int = 3
    compile: str = "off"  # the decode step of kvchat's engines (the `compile` setting)

    @classmethod
    def quick(cls) -> "PeerPlan":
        return cls(contexts=(64,), new_tokens=8, turns=3, reply_tokens=4, resume_tokens=150, repeat=1)


def unavailable() -> str | None:
    """Why there is no peer column here, or None when llama-cpp-python is importable."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not importable here (pip install llama-cpp-python builds it): no peer column"
    return None


def llama(gguf: Path, threads: int) -> Any:
    """llama.cpp's model of `gguf` with `threads` threads, as every scenario here uses it."""
    import llama_cpp

    return llama_cpp.Llama(str(gguf), n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def _peer_reply(llm: Any, ids: list[int], new_tokens: int, reset: bool = True) -> tuple[list[int], float, float]:
    """Greedy `new_tokens` after prompt `ids` on llama.cpp (its prefix cache kept when `reset`, as a chat does);
    returns the tokens, the time to the first and the decode rate after it."""
    started = time.perf_counter()
    tokens: list[int] = []
    first = 0.0
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=reset):
        if not tokens:
            first = time.perf_counter()
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    ended = time.perf_counter()
    return tokens, (first - started) * 1000, (len(tokens) - 1) / (ended - first) if ended > first else 0.0


def _kvchat_reply(chat: Chat, text: str, new_tokens: int) -> TurnEnd:
    chat.sampling = Sampling(temperature=0, max_new_tokens=new_tokens)
    return [e for e in chat.send(text)
            if isinstance(e, TurnEnd)][-1]


def speeds(engine: Engine, llm: Any, contexts: tuple[int, ...], new_tokens: int, repeat: int,
           progress: Progress) -> list[dict[str, Any]]:
    """Prefill and decode tokens/s at a prompt of about each of `contexts` tokens on both sides (the same ids),
    `repeat` times each, alternating; medians, and whether the first 8 greedy tokens agreed every time."""
    rows: list[dict[str, Any]] = []
    for context in contexts:
        text = levers.prompts(engine, context, 1)[0][-1]["content"]
        ids = engine.render([{"role": "user", "content": text}])
        figures: dict[str, list[float]] = {"kvchat_prefill": [], "kvchat_decode": [], "peer_prefill": [],
                                           "peer_decode": []}
        same = True
        for rep in range(repeat):
            progress(f"peer: prompt of {len(ids)} tokens", rep, repeat)
            end = _kvchat_reply(Chat(engine), text, new_tokens)
            figures["kvchat_prefill"].append(len(ids) / (end.stats.prefill_ms / 1000))
            figures["kvchat_decode"].append(end.stats.decode_tok_s)
            llm.reset()
            started = time.perf_counter()
            llm.eval(ids)
            figures["peer_prefill"].append(len(ids) / (time.perf_counter() - started))
            tokens, _, rate = _peer_reply(llm, [], new_tokens, reset=False)
            figures["peer_decode"].append(rate)
            same = same and tokens[:8] == end.token_ids[:8]
        rows.append({"prompt_tokens": len(ids), **{k: median(v) for k, v in figures.items()},
                     "first_8_tokens_agree": same})
    return rows


def run(loaded: LoadedModel, gguf: Path, plan: PeerPlan, progress: Progress) -> dict[str, Any]:
    """Every scenario on both sides; medians of `plan.repeat` runs."""

    threads = torch.get_num_threads()
    llm = llama(gguf, threads)
    engine = Engine(loaded, compile=plan.compile)
    engine.stop_ids = frozenset()  # equal work: replies of exactly the asked length on both sides
    rows = speeds(engine, llm, plan.contexts, plan.new_tokens, plan.repeat, progress)

    ttft: dict[str, list[float]] = {"kvchat": [], "peer": []}
    for rep in range(plan.repeat):
        chat, history = Chat(engine), []
        llm.reset()
        for turn in range(plan.turns):
            progress("peer: turns", rep * plan.turns + turn, plan.repeat * plan.turns)
            question = message(turn, 50)
            end = _kvchat_reply(chat, question, plan.reply_tokens)
            history.append({"role": "user", "content": question})
            tokens, first_ms, _ = _peer_reply(llm, engine.render(history), plan.reply_tokens)
            history.append({"role": "assistant", "content": engine.tokenizer.decode(tokens)})
            if turn == plan.turns - 1:
                ttft["kvchat"].append(end.stats.ttft_ms)
                ttft["peer"].append(first_ms)

    resume = _resume(loaded, llm, engine, plan, progress)
    return {"gguf": gguf.name, "threads": threads, "rows": rows, "turns": plan.turns,
            "last_turn_ttft_ms": {side: median(v) for side, v in ttft.items()}, "resume": resume}


def _resume(loaded: LoadedModel, llm: Any, engine: Engine, plan: PeerPlan, progress: Progress) -> dict[str, Any]:
    """A saved session of about `plan.resume_tokens` tokens, resumed with a new question up to its first reply
    token, on both sides (model loading not counted on either)."""
    question = "Summarize our conversation in one sentence."
    sampling = Sampling(temperature=0, max_new_tokens=1)
    times: dict[str, list[float]] = {"kvchat": [], "peer": []}
    fp = fingerprint(loaded)
    with tempfile.TemporaryDirectory(prefix="kvchat-peer-") as workdir:
        root, state_file = Path(workdir) / "sessions", Path(workdir) / "llama-state.bin"
        saved, _ = build_session(loaded, root, fp, BenchPlan(resume_tokens=plan.resume_tokens,
                                                               reply_tokens=plan.reply_tokens), progress)
        llm.reset()
        llm.eval(list(saved.cache.ids))  # the same history, cached on llama.cpp's side, saved as a state file
        state_file.write_bytes(pickle.dumps(llm.save_state()))
        follow = engine.render(saved.conversation.messages + [{"role": "user", "content": question}])
        for rep in range(plan.repeat):
            progress("peer: resume", rep, plan.repeat)
            ours = Engine(loaded, compile=plan.compile)
            store = Store(root).bind(ours.layout, fp, loaded.name)
            started = time.perf_counter()
            chat = open_chat(ours, store, "bench", prefixes=False).chat
            chat.sampling = sampling
            for event in chat.send(question):
                if isinstance(event, TurnEnd):
                    times["kvchat"].append((time.perf_counter() - started) * 1000)
            store.close()
            llm.reset()
            started = time.perf_counter()
            llm.load_state(pickle.loads(state_file.read_bytes()))
            _peer_reply(llm, follow, 1)
            times["peer"].append((time.perf_counter() - started) * 1000)
    return {"tokens": saved.cache.tokens, **{f"{side}_ms": median(values) for side, values in times.items()}}


def markdown(results: dict[str, Any]) -> str:
    """The side-by-side table; the last column is kvchat's speed over llama.cpp's (above 1: kvchat is faster)."""
    lines = [f"Peer: llama.cpp (llama-cpp-python) on {results['gguf']}, {results['threads']} threads, in the same run",
             "", "| measure | kvchat | llama.cpp | kvchat's speed / llama.cpp's |", "|---|---|---|---|"]
    for row in results["rows"]:
        for what in ("decode", "prefill"):
            ours, theirs = row[f"kvchat_{what}"], row[f"peer_{what}"]
            lines.append(f"| {what} tok/s, {row['prompt_tokens']}-token prompt | {ours:.1f} | {theirs:.1f} | "
                         f"{ours / theirs if theirs else 0:.2f}x |")
    ttft = results["last_turn_ttft_ms"]
    lines.append(f"| TTFT at turn {results['turns']} (ms, lower is better) | {ttft['kvchat']:.0f} | {ttft['peer']:.0f} | "
                 f"{ttft['peer'] / ttft['kvchat'] if ttft['kvchat'] else 0:.2f}x |")
    resume = results["resume"]
    lines.append(f"| resume a {resume['tokens']}-token session to its first new token (ms) | {resume['kvchat_ms']:.0f} | "
                 f"{resume['peer_ms']:.0f} | {resume['peer_ms'] / resume['kvchat_ms'] if resume['kvchat_ms'] else 0:.2f}x |")
    return "\n".join(lines)
