"""The engine: render a conversation into prompt ids, reuse the cache's shared prefix, prefill only the rest,
decode.

It turns (a cache, a planned prompt, sampling) into events (`Prefill`, `Token`, `TurnEnd`) and never prints; it
changes the cache only through the cache's own methods and never touches the transcript (`chat.Chat` records a
reply there once it exists).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from kvchat.cache import compiled, layers
from kvchat.cache.chat_cache import CacheSpec, ChatCache
from kvchat.cache.kv_forms import KVForm
from kvchat.config import Sampling
from kvchat.chat.conversation import Conversation, check_message
from kvchat.chat.detokenize import IncrementalDecoder, decode
from kvchat.errors import InputError, KvchatError
from kvchat.weights.direct import DirectStep
from kvchat.weights.direct import refusal as direct_refusal
from kvchat.weights.model import LoadedModel
from kvchat.chat.prompt import Renderer, common_prefix
from kvchat.chat.sampling import next_token

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
    direct: int = 0  # of the tokens fed one at a time, how many went through the direct step
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


# Given a prompt's token ids and an empty cache, make the cache hold the longest stored prefix of them; returns how
# many tokens it holds (0 when nothing matched).
PrefixSource = Callable[[list[int], ChatCache], int]


@dataclass
class Plan:
    """A turn, planned: the prompt to run and what the conversation becomes once it has a reply."""

    target: list[int]  # the prompt's token ids (for a continuation: ending with the reply so far)
    messages: list[dict[str, Any]]  # the conversation as the turn makes it (ending with the user's message)
    first_kept: int
    dropped: int = 0  # oldest turns dropped from the model's view to make room
    extending: list[int] | None = None  # the token ids of the reply being continued
    limit: int | None = None  # reply tokens at most (default: sampling.max_new_tokens)
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Reply:
    """The reply of a running turn as far as it got: the chat records it once the turn ends or is cut off."""

    ids: list[int] = field(default_factory=list)  # its tokens (with a continuation's earlier ones)
    finished: bool = False  # the turn ran to its end (a reply may then be empty)


class Engine:
    """Runs turns on one loaded model."""

    def __init__(self, loaded: LoadedModel, prefill_chunk: int = 512, reuse: bool = True, max_context: int | None = None,
                 window_cache: str = layers.WINDOWS_FULL, compile: str = "off", warm_up: bool = True,
                 step: compiled.CompiledStep | None = None, kv_form: KVForm = KVForm(), direct: bool = True):
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
        self.stop_ids = stop_token_ids(loaded)
        self._cache_kwarg = layers.cache_kwarg(self.model)
        self._takes_positions = layers.takes_positions(self.model)
        self.stepwise = layers.stepwise_continuation(self.model)
        self.window_cache = window_cache  # how sliding-window layers are kept (layers.WINDOWS_FULL or WINDOWS_ONLY)
        self.renderer = Renderer(self.tokenizer)
        try:  # what the cache keeps per token and as state: one probe forward pass
            self.spec = CacheSpec(self.model, self.device, self.window_cache, kv_form)
        except layers.Unsupported as exc:
            raise KvchatError(f"kvchat cannot keep the cache of model '{loaded.name}': {exc}") from None
        # The engine's compiled one-token step (see kvchat.cache.compiled; `compile`: "on", "off" or "auto" (CUDA);
        # `step`: one already made for this model, shared), compiled in the background unless `warm_up` is
        # False (then on the first token that can use it).
        # The direct one-token step (kvchat.weights.direct), for the models it covers, in every KV form; `direct`
        # False: never. Where it runs, it is the step: no compiled one is made.
        self.direct = DirectStep(self.model) if direct and direct_refusal(self.model) is None else None
        self.direct_tokens = 0
        wanted = compiled.wanted(compile, self.device) and self.direct is None
        if wanted and not kv_form.exact:  # the compiled step reads keys and values as computed, in place
            if compile == "on":
                raise KvchatError(f"the compiled decode step (--compile on) reads keys and values as computed; "
                                  f"with --kv-dtype {kv_form.name} use --compile off (or auto)")
            wanted = False
        self.kv_form = kv_form
        assert step is None or step.model is self.model, "a compiled step runs the model it was made for only"
        self.step = (step or compiled.CompiledStep(self.model, self.device)) if wanted else None
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

    @property
    def layout(self) -> layers.Layout:
        """What the model's cache keeps per token and as state."""
        return self.spec.layout

    def new_cache(self) -> ChatCache:
        """An empty cache for a conversation on this model."""
        return ChatCache(self.spec)

    # -- model calls -------------------------------------------------------------------------

    def _forward(self, model_cache: Any, start: int, ids: torch.Tensor) -> torch.Tensor:
        """Run `ids` [1, n] through the model on top of `model_cache`, which holds `start` tokens; return the last
        position's logits [vocab].

        Their positions are given (the tokens held, on): some models count from 0 on every pass otherwise (Bamba).
        """
        positions = {"position_ids": torch.arange(start, start + ids.shape[1], device=self.device)[None]} \
            if self._takes_positions else {}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **positions,
                         **{self._cache_kwarg: model_cache})
        return out.logits[0, -1]

    def _feed(self, cache: ChatCache, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the model into `cache` (through the compiled step when it takes a lone token); return
        the last logits. The cache records them only once the pass completes (see `ChatCache.feed`)."""
        def forward(model_cache: Any, start: int) -> torch.Tensor:
            if self.step is not None and len(ids) == 1:
                logits = self.step(model_cache, ids[0])
                if logits is not None:
                    self.compiled_tokens += 1
                    return logits
            if self.direct is not None and len(ids) == 1 and layers.direct_refusal(model_cache) is None:
                with layers.direct_step(model_cache) as stores:
                    logits = self.direct(ids[0], start, stores)
                self.direct_tokens += 1
                return logits
            with self.step.exclusive() if self.step is not None else nullcontext():
                return self._forward(model_cache, start, torch.tensor([ids], device=self.device))

        return cache.feed(ids, forward)

    def _prefill(self, cache: ChatCache, ids: list[int],
                 marks: dict[int, bool] | None = None) -> Iterator[Prefill]:
        """Feed `ids` in chunks, yielding a `Prefill` after each; return the last logits. A cache with recurrent
        state is snapshotted after each absolute position in `marks` (chunks end there; the value says whether the
        snapshot is pinned), so that a later turn can come back to it.

        Models whose multi-token pass does not continue a recurrent state exactly get the tokens one at a
        time once there is a state to continue.
        """
        assert ids, "nothing to prefill"
        stateful = cache.has_state
        start, end = cache.tokens, cache.tokens + len(ids)
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
                logits = self._feed(cache, ids[position - start:position - start + step])
                position += step
                yield Prefill(position - start, len(ids), time.perf_counter() - began)
            if stop != end:
                cache.checkpoint(pin=marks[stop])
        return logits

    def _sync_cache(self, cache: ChatCache, target: list[int],
                    prefixes: PrefixSource | None) -> tuple[int, str | None, int]:
        """Cut the cache back to its longest prefix shared with `target` (always leaving >= 1 token to feed).

        An empty cache is first seeded from the store's longest matching prefix (`prefixes`), if there is one.
        Returns how many tokens are kept, why reuse was refused when it was, and how many came from disk.
        """
        fallback, loaded = None, 0
        refusal = cache.take_refusal()
        if refusal is not None:  # an earlier cut (an /undo) found the cache wrong and forgot it
            fallback = f"{refusal}; prefilling all"
        shared = common_prefix(cache.ids, target) if self.reuse else 0
        if shared == len(target) and cache.logits_at(len(target)) is not None:
            keep = shared  # the whole prompt is cached and so are its next-token logits (a retry)
        else:
            keep = min(shared, len(target) - 1)
        if keep < cache.tokens:
            reason = cache.unsupported()
            kept = cache.trim(keep)
            if kept == 0 and keep > 0:
                reason = reason or cache.take_refusal() or f"no recurrent-state checkpoint at or before token {keep}"
                fallback = f"{reason}; prefilling all"
            keep = kept
        if keep == 0 and self.reuse and prefixes is not None:
            loaded = prefixes(target, cache)
            if loaded:
                keep = cache.trim(min(loaded, len(target) - 1))
        cache.check()
        loaded = max(loaded, cache.take_loaded())
        return keep, fallback, min(loaded, keep)

    def _marks(self, plan: Plan, cache: ChatCache) -> dict[int, bool]:
        """Where a prompt's prefill snapshots recurrent state, besides its end: after the system prompt (a context
        drop comes back there), before the new user message (an /undo comes back there), and before the reply's
        header (templates that rewrite the header of a past reply, such as an empty think block, come back there)."""
        if not cache.has_state:
            return {}
        planned = Conversation(messages=plan.messages, first_kept=plan.first_kept)
        view, marks = planned.view(), {}
        for part in (None, view[:-1], view):
            try:
                ids = self.system_prefix_ids(planned.system) if part is None else \
                    self.render(part, generation_prompt=False) if part else []
            except KvchatError:
                continue  # a template that refuses a partial conversation: one checkpoint fewer
            if ids and plan.target[:len(ids)] == ids:
                marks.setdefault(len(ids), part is None)  # the system prompt's stays while the chat goes on
        return marks

    # -- planning a turn -----------------------------------------------------------------------

    def plan_send(self, conv: Conversation, text: str, sampling: Sampling) -> Plan:
        """The turn that answers a new user message `text`. Raises InputError (or KvchatError for a template that
        rejects the conversation), changing nothing."""
        started = time.perf_counter()
        check_message(text)
        return self._plan(conv, conv.messages + [{"role": "user", "content": text}], sampling, started)

    def plan_retry(self, conv: Conversation, sampling: Sampling) -> Plan:
        """The turn that makes the last reply again (its prompt is entirely cached: nothing is prefilled)."""
        started = time.perf_counter()
        if not conv.messages or conv.messages[-1]["role"] != "assistant":
            raise InputError("there is no reply to retry")
        return self._plan(conv, conv.messages[:-1], sampling, started)

    def _plan(self, conv: Conversation, messages: list[dict[str, Any]], sampling: Sampling, started: float) -> Plan:
        assert messages and messages[-1]["role"] == "user", "a turn needs a user message last"
        target, first_kept, dropped = self.fit(conv, sampling, messages)
        return Plan(target, messages, first_kept, dropped, started=started)

    def plan_extend(self, conv: Conversation, sampling: Sampling) -> Plan:
        """The turn that continues the last reply from where it stopped (cut at max_new_tokens, or interrupted),
        up to `max_new_tokens` more; the cache holds the reply, so only its last token is fed. Raises InputError
        when there is no reply or no room left."""
        started = time.perf_counter()
        reply = conv.messages[-1] if conv.messages else {}
        if reply.get("role") != "assistant" or not reply.get("token_ids"):
            raise InputError("there is no reply to continue")
        if decode(self.tokenizer, reply["token_ids"]) != reply.get("content"):
            raise InputError("the last reply's text is not the model's own tokens; it cannot be continued")
        target = self.render(conv.view()[:-1]) + list(reply["token_ids"])
        room = self.max_context - len(target) if self.max_context else sampling.max_new_tokens
        if room <= 0:
            raise InputError(f"the context of {self.max_context} tokens is full; /undo or start over")
        return Plan(target, list(conv.messages), conv.first_kept, extending=list(reply["token_ids"]),
                    limit=min(room, sampling.max_new_tokens), started=started)

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

    def trim(self, conv: Conversation, cache: ChatCache) -> None:
        """Cut `cache` back to what the conversation as it stands still begins with (when it can be cut)."""
        if not cache.tokens:
            return
        if any(message["role"] == "user" for message in conv.view()):
            stands = self.render(conv.view())
        else:
            stands = self.system_prefix_ids(conv.system)
        keep = common_prefix(cache.ids, stands)
        if keep < cache.tokens:
            cache.trim(keep)

    # -- a turn ------------------------------------------------------------------------------

    def run(self, cache: ChatCache, plan: Plan, sampling: Sampling, generator: torch.Generator | None,
            reply: Reply, prefixes: PrefixSource | None = None) -> Iterator[Prefill | Token | TurnEnd]:
        """Prefill what `plan.target` adds to `cache` and decode, yielding `Prefill` progress, `Token`s and then one
        `TurnEnd`. `reply` follows the reply as it grows (the caller records it, even when the turn is cut off);
        the cache holds exactly its ids at every yield."""
        decoder = IncrementalDecoder(self.tokenizer, plan.extending or ())
        reply.ids = decoder.ids  # (the same list: it grows as tokens are sampled)
        kept, target = len(decoder.ids), plan.target
        compiled_before, direct_before = self.compiled_tokens, self.direct_tokens
        with torch.inference_mode():
            reused, fallback, loaded = self._sync_cache(cache, target, prefixes)
            if reused == len(target):
                logits = cache.logits_at(len(target))
            elif plan.extending is not None:
                logits = yield from self._prefill(cache, target[reused:])
            else:
                logits = yield from self._prefill(cache, target[reused:], self._marks(plan, cache))
                cache.checkpoint(logits)
            prefill_done = time.perf_counter()
            stop = "length"
            first_token_at = None
            limit = plan.limit or sampling.max_new_tokens  # fit() kept room for all of it in the context
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
                logits = self._feed(cache, [token_id])
            tail = decoder.flush()
            if tail:
                yield Token(tail, decoder.ids[-1])
        ended = time.perf_counter()
        reply.finished = True
        generated = len(decoder.ids) - kept
        first = first_token_at or ended
        stats = TurnStats(
            reused=reused,
            prefilled=len(target) - reused,
            generated=generated,
            ttft_ms=(first - plan.started) * 1000,
            decode_tok_s=(generated - 1) / (ended - first) if generated > 1 and ended > first else 0.0,
            kv_bytes=cache.nbytes,
            prefill_ms=(prefill_done - plan.started) * 1000,
            loaded=loaded,
            stop=stop,
            fallback=fallback,
            dropped=plan.dropped,
            compiled=self.compiled_tokens - compiled_before,
            direct=self.direct_tokens - direct_before,
            compile_failure=self._new_failure(),
        )
        yield TurnEnd(decoder.text(), stats, list(decoder.ids))

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
