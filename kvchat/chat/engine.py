"""The engine: render the conversation, reuse the cached token prefix, prefill only the rest, decode.

It never prints; `send` yields events that the REPL and CLI render.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from kvchat.cache import compiled
from kvchat.cache import layers
from kvchat.config import Sampling
from kvchat.chat.conversation import Conversation, check_message
from kvchat.chat.detokenize import IncrementalDecoder, decode
from kvchat.errors import InputError, KvchatError
from kvchat.weights.model import LoadedModel
from kvchat.chat.prompt import Renderer, common_prefix
from kvchat.chat.sampling import make_generator, next_token

# Special tokens that end an assistant turn in common chat templates, besides the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class Token:
    """A piece of the reply as it is generated."""

    text: str
    token_id: int


@dataclass
class Prefill:
    """Progress of the prompt's prefill, after each forward pass: `done` of `total` tokens this turn."""

    done: int
    total: int
    elapsed_s: float  # since the prefill began


@dataclass
class TurnStats:
    """What one turn cost, and how much of it the cache saved."""

    reused: int  # prompt tokens whose KV was already in the cache
    prefilled: int  # prompt tokens run through the model this turn
    generated: int  # reply tokens sampled
    ttft_ms: float  # from the message arriving to the first reply token
    decode_tok_s: float  # reply tokens per second after the first
    kv_bytes: int  # size of the cache after the turn
    prefill_ms: float = 0.0
    loaded: int = 0  # of the reused tokens, how many were loaded from the on-disk store this turn
    stop: str = "eos"  # "eos" or "length" (max_new_tokens)
    dropped: int = 0  # oldest turns dropped from the model's view this turn to make room
    fallback: str | None = None  # why the cache could not be reused, when it could not
    compiled: int = 0  # of the tokens fed one at a time, how many went through the compiled step
    compile_failure: str | None = None  # why the compiled step stopped, on the turn it did


    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TurnEnd:
    """The reply is complete."""

    reply: str
    stats: TurnStats
    token_ids: list[int]  # the reply's tokens as sampled (the stop token excluded)


def turn_notices(stats: TurnStats, max_context: int | None) -> list[str]:
    """One-line notes about a turn the user should know of: turns dropped, reuse refused."""
    notes = []
    if stats.dropped:
        notes.append(f"dropped the {stats.dropped} oldest turn{'s' if stats.dropped > 1 else ''} "
                     f"from the model's view to fit the {max_context}-token context (the transcript keeps them)")
    if stats.fallback:
        notes.append(stats.fallback)
    if stats.compile_failure:
        notes.append(f"the compiled decode step failed ({stats.compile_failure}); decoding without it")
    return notes


def stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """EOS ids from the tokenizer and generation config, plus end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    vocab = loaded.tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return frozenset(ids)


# Given the token ids of a prompt, the longest stored prefix of them as (tokens, cache), or None.
PrefixSource = Callable[[list[int]], "tuple[int, Any] | None"]


class Engine:
    """Runs turns of a `Conversation` on one loaded model."""

    def __init__(self, loaded: LoadedModel, prefill_chunk: int = 512, reuse: bool = True,
                 prefix_source: PrefixSource | None = None, max_context: int | None = None,
                 window_cache: str = layers.WINDOWS_FULL, compile: str | None = None, warm_up: bool = True):
        assert prefill_chunk > 0, "prefill_chunk must be positive"
        model_context = model_max_context(loaded.model)
        if max_context is not None and model_context and max_context > model_context:
            raise KvchatError(f"max_context {max_context} exceeds the model's context of {model_context} tokens")
        self.max_context = max_context or model_context
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.prefill_chunk = prefill_chunk
        self.reuse = reuse
        self.prefix_source = prefix_source
        self.stop_ids = stop_token_ids(loaded)
        self._cache_kwarg = layers.cache_kwarg(self.model)
        self._takes_positions = layers.takes_positions(self.model)
        self.stepwise = layers.stepwise_continuation(self.model)
        self.window_cache = window_cache  # how sliding-window layers are kept (layers.WINDOWS_FULL or WINDOWS_ONLY)
        self.renderer = Renderer(self.tokenizer)
        try:  # what the cache keeps per token and as state: one probe forward pass
            self.layout = layers.layout(self.model, self.device, self.window_cache)
        except layers.Unsupported as exc:
            raise KvchatError(f"kvchat cannot keep the cache of model '{loaded.name}': {exc}") from None
        # The compiled one-token step (see kvchat.cache.compiled; `compile` defaults to the loaded model's setting),
        # compiled in the background unless `warm_up` is False (then on the first token that can use it).
        wanted = compiled.wanted(compile or loaded.compile, self.device)
        self.step = compiled.step_for(self.model, self.device) if wanted else None
        self.compiled_tokens = 0
        self._failure_told = False
        if self.step is not None and warm_up:
            self.step.warm_up(background=True)

    # -- rendering ---------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation as the chat template renders it, ready for the assistant's reply (or,
        without `generation_prompt`, ending where the reply's header would begin); see `prompt.Renderer`."""
        return self.renderer.render(messages, generation_prompt)

    def system_prefix_ids(self, system: str | None) -> list[int]:
        """The tokens every conversation with this system prompt starts with (whatever the first message is)."""
        return self.renderer.system_prefix_ids(system)

    # -- model calls -------------------------------------------------------------------------

    def _forward(self, conv: Conversation, ids: torch.Tensor) -> torch.Tensor:
        """Run `ids` [1, n] through the model on top of the cache; return the last position's logits [vocab].

        Their positions are given (the tokens held, on): some models count from 0 on every pass otherwise (Bamba).
        """
        start = len(conv.token_ids)
        positions = {"position_ids": torch.arange(start, start + ids.shape[1], device=self.device)[None]} \
            if self._takes_positions else {}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **positions,
                         **{self._cache_kwarg: conv.cache})
        return out.logits[0, -1]

    def _feed(self, conv: Conversation, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the model and record them as cached once the pass completes; return the last logits.

        While the pass runs the conversation is marked dirty: an interruption leaves layers at mixed positions,
        which `_restore_invariant` repairs.
        """
        conv.dirty = True
        logits = self.step(conv.cache, ids[0]) if self.step is not None and len(ids) == 1 else None
        if logits is None:
            with self.step.exclusive() if self.step is not None else nullcontext():
                logits = self._forward(conv, torch.tensor([ids], device=self.device))
        else:
            self.compiled_tokens += 1
        conv.token_ids.extend(ids)
        conv.dirty = False
        return logits

    def _prefill(self, conv: Conversation, ids: list[int],
                 marks: dict[int, bool] | None = None) -> Iterator[Prefill]:
        """Feed `ids` in chunks, yielding a `Prefill` after each; return the last logits. A cache with recurrent state is snapshotted after each
        absolute position in `marks` (chunks end there; the value says whether the snapshot is pinned), so that
        a later turn can come back to it.

        Models whose multi-token pass does not continue a recurrent state exactly get the tokens one at a
        time once there is a state to continue.
        """
        assert ids, "nothing to prefill"
        stateful = layers.has_state(conv.cache)
        start, end = len(conv.token_ids), len(conv.token_ids) + len(ids)
        marks = marks or {}
        stops = sorted({m for m in marks if start < m < end} | {end}) if stateful else [end]
        logits = None
        position = start
        began = time.perf_counter()
        for stop in stops:
            while position < stop:
                size = self.prefill_chunk
                if stateful and self.stepwise:
                    size = stop - position if position == 0 else 1
                step = min(size, stop - position)
                logits = self._feed(conv, ids[position - start:position - start + step])
                position += step
                yield Prefill(position - start, len(ids), time.perf_counter() - began)
            if stop != end:
                conv.checkpoint(pin=marks[stop])
        return logits

    def _sync_cache(self, conv: Conversation, target: list[int]) -> tuple[int, str | None, int]:
        """Cut the cache back to its longest prefix shared with `target` (always leaving >= 1 token to feed).

        An empty cache is first seeded from the store's longest matching prefix, if there is one.
        Returns how many tokens are kept, why reuse was refused when it was, and how many came from disk.
        """
        fallback, loaded = None, 0
        if conv.refusal is not None:  # an earlier cut (an /undo) found the cache wrong and forgot it
            fallback, conv.refusal = f"{conv.refusal}; prefilling all", None
        shared = common_prefix(conv.token_ids, target) if self.reuse else 0
        if shared == len(target) and conv.prompt_logits is not None and conv.prompt_logits[0] == len(target):
            keep = shared  # the whole prompt is cached and so are its next-token logits (a retry)
        else:
            keep = min(shared, len(target) - 1)
        if conv.cache is not None and keep < len(conv.token_ids):
            reason = layers.unsupported(conv.cache)
            kept = conv.cut_to(keep)
            if kept == 0 and keep > 0:
                reason = reason or conv.refusal or f"no recurrent-state checkpoint at or before token {keep}"
                fallback, conv.refusal = f"{reason}; prefilling all", None
            keep = kept
        if keep == 0 and self.reuse and self.prefix_source is not None:
            found = self.prefix_source(target)
            if found is not None:
                loaded, conv.cache = found
                conv.token_ids = list(target[:loaded])
                conv.checkpoint()  # a stored state: a later cut can come back to it
                keep = min(loaded, len(target) - 1)
                if keep < loaded:
                    conv.truncate(keep)
        if conv.cache is None:
            conv.cache = layers.new_cache(self.model, self.window_cache)
        conv.check()
        loaded, conv.restored = max(loaded, conv.restored), 0
        return keep, fallback, min(loaded, keep)

    def _generator(self, conv: Conversation, sampling: Sampling) -> torch.Generator | None:
        """The conversation's seeded generator (made on its first sampled turn, or when the seed changes)."""
        if sampling.seed is None or sampling.temperature == 0:
            return None
        if conv.rng is None or conv.rng_seed != sampling.seed:
            conv.rng, conv.rng_seed = make_generator(sampling, self.device), sampling.seed
        return conv.rng

    def _marks(self, conv: Conversation, target: list[int]) -> dict[int, bool]:
        """Where a prompt's prefill snapshots recurrent state, besides its end: after the system prompt (a context
        drop comes back there), before the new user message (an /undo comes back there), and before the reply's
        header (templates that rewrite the header of a past reply, such as an empty think block, come back there)."""
        if not layers.has_state(conv.cache):
            return {}
        view, marks = conv.view(), {}
        for part in (None, view[:-1], view):
            try:
                ids = self.system_prefix_ids(conv.system) if part is None else \
                    self.render(part, generation_prompt=False) if part else []
            except KvchatError:
                continue  # a template that refuses a partial conversation: one checkpoint fewer
            if ids and target[:len(ids)] == ids:
                marks.setdefault(len(ids), part is None)  # the system prompt's stays while the chat goes on
        return marks

    def _restore_invariant(self, conv: Conversation) -> None:
        """After an interrupted forward pass, drop any KV recorded past `token_ids` (or the whole cache)."""
        if conv.cache is not None and (conv.dirty or layers.miscount(conv.cache, len(conv.token_ids))):
            conv.cut_to(len(conv.token_ids))
        conv.dirty = False
        conv.check()

    # -- a turn ------------------------------------------------------------------------------

    def send(self, conv: Conversation, text: str, sampling: Sampling) -> Iterator[Prefill | Token | TurnEnd]:
        """Add a user message and generate the reply, yielding `Prefill` progress, `Token`s and then one `TurnEnd`.

        Raises InputError (or KvchatError for a template that rejects the conversation) at once, with the
        conversation untouched. The message enters the conversation only when the reply starts; a turn cut off
        before its first token (Ctrl-C, an error, a generator closed or never iterated) leaves no trace.
        Interrupted later, the partial reply is kept, and the cache holds exactly `token_ids`.
        """
        check_message(text)
        return self._turn(conv, conv.messages + [{"role": "user", "content": text}], sampling)

    def retry(self, conv: Conversation, sampling: Sampling) -> Iterator[Prefill | Token | TurnEnd]:
        """Generate the last reply again (its prompt is entirely cached, so nothing is prefilled); the old reply
        stays until the new one starts."""
        if not conv.messages or conv.messages[-1]["role"] != "assistant":
            raise InputError("there is no reply to retry")
        return self._turn(conv, conv.messages[:-1], sampling)

    def _turn(self, conv: Conversation, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[Prefill | Token | TurnEnd]:
        """Fit `messages` (the conversation as it will be, ending with the user's) now; reply as iterated."""
        assert messages and messages[-1]["role"] == "user", "a turn needs a user message last"
        started = time.perf_counter()
        target, first_kept, dropped = self.fit(conv, sampling, messages)
        return self._reply(conv, sampling, target, dropped, started, messages, first_kept)

    def fit(self, conv: Conversation, sampling: Sampling,
            messages: list[dict[str, str]] | None = None) -> tuple[list[int], int, int]:
        """Render the view of `messages` (default: the conversation's), dropping the oldest exchanges while it
        leaves no room for a reply. Changes nothing.

        When it must drop, it drops down to three quarters of the room, so that the next turns do not
        each drop (and re-prefill) again. Returns the prompt's token ids, the index of the first message
        kept, and the number of turns dropped. Raises InputError when even the last message alone does not fit.
        """
        plan = Conversation(messages=conv.messages if messages is None else messages, first_kept=conv.first_kept)
        room = self.max_context - sampling.max_new_tokens if self.max_context else None
        target = self.render(plan.view())
        if room is None or len(target) <= room:
            return target, plan.first_kept, 0
        if room <= 0:
            raise InputError(f"max_new_tokens={sampling.max_new_tokens} leaves no room in a context of "
                             f"{self.max_context} tokens")
        # Dropping k exchanges starts the view at users[k]; the prompt shrinks as k grows, so the fewest drops
        # that reach three quarters of the room are found by bisection (a few renders, not one per turn).
        users = [i for i, m in enumerate(plan.messages) if m["role"] == "user" and i >= plan.first_kept]
        renders: dict[int, list[int]] = {0: target}

        def prompt(k: int) -> list[int]:
            if k not in renders:
                renders[k] = self.render(Conversation(messages=plan.messages, first_kept=users[k]).view())
            return renders[k]

        low, high = 1, len(users) - 1  # the last message always stays
        dropped = high
        while low <= high:
            middle = (low + high) // 2
            if len(prompt(middle)) <= room * 3 // 4:
                dropped, high = middle, middle - 1
            else:
                low = middle + 1
        if dropped:
            plan.first_kept, target = users[dropped], prompt(dropped)
        if len(target) > room:
            alone = self.render(plan.view()[:1] + plan.messages[-1:]) if plan.system else target
            raise InputError(
                f"the message is too long: with the system prompt it takes {len(alone)} tokens, and the context "
                f"of {self.max_context} holds {room} once {sampling.max_new_tokens} are kept for the reply")
        return target, plan.first_kept, dropped

    def undo(self, conv: Conversation) -> None:
        """Remove the last exchange (the last user message and the reply to it) and cut the cache to match."""
        users = [i for i, message in enumerate(conv.messages) if message["role"] == "user"]
        if not users:
            raise InputError("there is nothing to undo")
        del conv.messages[users[-1]:]
        conv.first_kept = min(conv.first_kept, len(conv.messages))
        self.trim(conv)

    def trim(self, conv: Conversation) -> None:
        """Cut the cache back to what the conversation as it stands still begins with (when it can be cut)."""
        if conv.cache is None:
            return
        if any(message["role"] == "user" for message in conv.view()):
            stands = self.render(conv.view())
        else:
            stands = self.system_prefix_ids(conv.system)
        keep = common_prefix(conv.token_ids, stands)
        if keep < len(conv.token_ids):
            conv.cut_to(keep)

    def extend(self, conv: Conversation, sampling: Sampling) -> Iterator[Prefill | Token | TurnEnd]:
        """Continue the last reply from where it stopped (cut at max_new_tokens, or interrupted), up to
        `max_new_tokens` more; the cache holds the reply, so only its last token is fed. The `TurnEnd` carries
        the whole reply as it now is. Raises InputError when there is no reply or no room left."""
        reply = conv.messages[-1] if conv.messages else {}
        if reply.get("role") != "assistant" or not reply.get("token_ids"):
            raise InputError("there is no reply to continue")
        if decode(self.tokenizer, reply["token_ids"]) != reply.get("content"):
            raise InputError("the last reply's text is not the model's own tokens; it cannot be continued")
        started = time.perf_counter()
        target = self.render(conv.view()[:-1]) + list(reply["token_ids"])
        room = self.max_context - len(target) if self.max_context else sampling.max_new_tokens
        if room <= 0:
            raise InputError(f"the context of {self.max_context} tokens is full; /undo or start over")
        return self._reply(conv, sampling, target, 0, started, conv.messages, conv.first_kept,
                           extending=reply, limit=min(room, sampling.max_new_tokens))

    def _reply(self, conv: Conversation, sampling: Sampling, target: list[int], dropped: int,
               started: float, messages: list[dict[str, Any]], first_kept: int, extending: dict | None = None,
               limit: int | None = None) -> Iterator[Prefill | Token | TurnEnd]:
        """Prefill what `target` adds to the cache and decode; the reply becomes a new message, or, with
        `extending`, goes on in that (last) message."""
        decoder = IncrementalDecoder(self.tokenizer, extending["token_ids"] if extending else ())
        kept = len(decoder.ids)
        compiled_before = self.compiled_tokens
        finished = False
        before = (list(conv.messages), conv.first_kept)
        try:
            conv.messages[:], conv.first_kept = messages, first_kept
            with torch.inference_mode():
                reused, fallback, loaded = self._sync_cache(conv, target)
                if reused == len(target):
                    logits = conv.prompt_logits[1]
                elif extending is not None:
                    logits = yield from self._prefill(conv, target[reused:])
                else:
                    logits = yield from self._prefill(conv, target[reused:], self._marks(conv, target))
                    conv.prompt_logits = (len(target), logits)
                    conv.checkpoint(logits)
                prefill_done = time.perf_counter()
                generator = self._generator(conv, sampling)
                stop = "length"
                first_token_at = None
                limit = limit or sampling.max_new_tokens  # fit() kept room for all of it in the context
                for step in range(limit):
                    token = next_token(logits, sampling, generator)  # [1]
                    token_id = int(token)
                    if token_id in self.stop_ids:
                        stop = "eos"
                        break
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    delta = decoder.push(token_id)
                    if delta:
                        yield Token(delta, token_id)
                    if step + 1 == limit:
                        break  # the last token is fed with the next turn's prompt, via the prefix diff
                    logits = self._feed(conv, [token_id])
                tail = decoder.flush()
                if tail:
                    yield Token(tail, decoder.ids[-1])
            ended = time.perf_counter()
            finished = True
        finally:
            reply = decoder.text()
            if extending is not None:
                extending["content"], extending["token_ids"] = reply, list(decoder.ids)
            elif decoder.ids or finished:
                conv.messages.append({"role": "assistant", "content": reply, "token_ids": list(decoder.ids)})
            else:  # cut off before any reply: the turn never happened
                conv.messages[:], conv.first_kept = before
            self._restore_invariant(conv)
            conv.checkpoint()  # where this reply ends: the next turn, or an /undo of it, comes back here
        generated = len(decoder.ids) - kept
        first = first_token_at or ended
        stats = TurnStats(
            reused=reused,
            prefilled=len(target) - reused,
            generated=generated,
            ttft_ms=(first - started) * 1000,
            decode_tok_s=(generated - 1) / (ended - first) if generated > 1 and ended > first else 0.0,
            kv_bytes=layers.nbytes(conv.cache),
            prefill_ms=(prefill_done - started) * 1000,
            loaded=loaded,
            stop=stop,
            fallback=fallback,
            dropped=dropped,
            compiled=self.compiled_tokens - compiled_before,
            compile_failure=self._new_failure(),
        )
        yield TurnEnd(reply, stats, list(decoder.ids))

    def _new_failure(self) -> str | None:
        """Why the compiled step failed, the first time it is asked after it did."""
        if self.step is None or self.step.failure is None or self._failure_told:
            return None
        self._failure_told = True
        return self.step.failure


def model_max_context(model: Any) -> int | None:
    """The model's maximum positions, when its config says."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)
