"""Every architecture keeps the promise: exact reuse, only the new message prefilled, exact resume from disk.

Tiny random models of each family (tests/families.py): sliding-window attention (window of 12 tokens,
filled in the first turn), linear attention, Mamba, short convolutions, KV sharing, latent attention,
sparse-attention indexers. Every reply is checked against a cache-free greedy run of the same prompt.
"""

import pytest
import torch

from kvchat import kv
from kvchat import store as store_module
from kvchat.config import Sampling
from kvchat.conversation import Conversation
from kvchat.engine import Engine, TurnEnd, common_prefix
from kvchat.model import fingerprint
from kvchat.store import Persister, Store
from families import FAMILIES, make_family
from reference import greedy_without_cache

GREEDY = Sampling(temperature=0, max_new_tokens=8)
SYSTEM = "You are a helpful assistant."
MESSAGES = [
    "Hello, how are you today?",
    "What is the capital of France?",
    "Tell me a story about a cat.",
    "Numbers: 1 2 3 4 5.",
    "The quick brown fox jumps over the lazy dog.",
    "Tell me a story about a dog.",
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_TOKENS", 16)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return make_family(request.param)


def engine_with_store(loaded, root, **engine_kwargs):
    store = Store(root)
    engine = Engine(loaded, **engine_kwargs)
    store.bind(engine, fingerprint(loaded))
    engine.prefix_source = store.longest_prefix
    return engine, store


def send(engine, conv, text):
    """One turn; checks its reply against a cache-free greedy run of the prompt the model saw, returns its stats."""
    end = [e for e in engine.send(conv, text, GREEDY) if isinstance(e, TurnEnd)][0]
    prompt = engine.render(conv.view()[:-1])  # the view after any drop, without the new reply
    want = greedy_without_cache(engine.model, prompt, GREEDY.max_new_tokens, engine.stop_ids)
    assert end.token_ids == want, f"reply to {text!r} differs from a fresh prefill"
    assert end.stats.fallback is None, end.stats.fallback
    conv.check()
    return end.stats


def assert_only_new_message(engine, conv, cached_before, stats):
    """Reuse stopped no earlier than it had to: at the cached prefix, or (recurrent state, after a template
    re-tokenized the last reply differently) at the last prompt's end at worst."""
    target = engine.render(conv.view()[:-1])
    shared = common_prefix(cached_before, target)
    assert stats.reused + stats.prefilled == len(target)
    if shared == len(cached_before) or not kv.has_state(conv.cache):
        assert stats.reused == min(shared, len(target) - 1), "prefilled more than the new message"
    else:
        previous_prompt = engine.render(conv.view()[:-3])
        assert stats.reused >= len(previous_prompt) - 8


def test_multi_turn_reuse_resume_undo_retry_are_exact(family, tmp_path):
    engine, store = engine_with_store(family, tmp_path)
    persister = Persister(store, session="chat")
    conv = Conversation.start(SYSTEM)
    for text in MESSAGES[:4]:
        before = list(conv.token_ids)
        stats = send(engine, conv, text)
        persister.after_turn(conv)
        if before:
            assert_only_new_message(engine, conv, before, stats)

    # Resume in a new engine and store (as a new process would): everything cached comes from disk.
    store.close()
    engine2, store2 = engine_with_store(family, tmp_path)
    opened = store2.open_session("chat")
    assert opened.notice is None and opened.loaded_tokens == len(conv.token_ids)
    resumed = opened.conversation
    stats = send(engine2, resumed, MESSAGES[4])
    assert stats.loaded == stats.reused
    assert_only_new_message(engine2, resumed, conv.token_ids, stats)

    # /retry prefills nothing; /undo then a new message prefills only that message.
    retry = [e for e in engine2.retry(resumed, GREEDY) if isinstance(e, TurnEnd)][0]
    assert retry.stats.prefilled == 0 and retry.stats.fallback is None
    engine2.undo(resumed)
    cached = list(resumed.token_ids)
    stats = send(engine2, resumed, MESSAGES[5])
    assert_only_new_message(engine2, resumed, cached, stats)
    new_tokens = len(family.tokenizer(MESSAGES[5], add_special_tokens=False)["input_ids"])
    assert stats.prefilled <= new_tokens + 12

    # An edited earlier message: exact; reuse stops at or before the edit (for recurrent state, at the latest
    # checkpoint kept before it, at worst the end of the system message).
    resumed.messages[3]["content"] = "Edited."
    stats = send(engine2, resumed, MESSAGES[0])
    assert 0 < stats.reused <= len(engine2.render(resumed.messages[:3]))


def test_a_resumed_session_prefills_only_the_new_message(family, tmp_path):
    engine, store = engine_with_store(family, tmp_path)
    conv = Conversation.start(SYSTEM)
    persister = Persister(store, session="s")
    for text in MESSAGES[:2]:
        send(engine, conv, text)
        persister.after_turn(conv)
    store.close()
    engine2, store2 = engine_with_store(family, tmp_path)
    opened = store2.open_session("s")
    assert opened.notice is None and opened.loaded_tokens == len(conv.token_ids)
    resumed = opened.conversation
    stats = send(engine2, resumed, MESSAGES[2])
    assert stats.loaded == stats.reused > 0
    assert_only_new_message(engine2, resumed, conv.token_ids, stats)


def test_a_context_drop_reuses_the_system_prompt(family):
    engine = Engine(family, max_context=120)
    conv = Conversation.start(SYSTEM)
    drops = 0
    for text in MESSAGES:
        stats = send(engine, conv, text)
        drops += stats.dropped
        if stats.dropped:
            assert stats.reused >= len(engine.system_prefix_ids(SYSTEM))
    assert drops > 0


def test_a_new_conversation_starts_from_the_stored_system_prompt(family, tmp_path):
    engine, store = engine_with_store(family, tmp_path)
    conv = Conversation.start(SYSTEM)
    send(engine, conv, MESSAGES[0])
    Persister(store).after_turn(conv)
    fresh = Conversation.start(SYSTEM)
    stats = send(engine, fresh, MESSAGES[1])
    assert stats.loaded == stats.reused == len(engine.system_prefix_ids(SYSTEM))
