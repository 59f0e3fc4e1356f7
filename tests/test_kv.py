"""The KV adapter: growable layers behave like transformers' own, and layer types it does not know are never reused."""

import torch
from transformers.cache_utils import (DummyLayer, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer,
                                      LinearAttentionAndFullAttentionLayer, LinearAttentionLayer)

from kvchat.cache import layers
from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, TurnEnd
from reference import greedy_without_cache


def test_growable_layer_matches_dynamic_layer_through_growth_and_crops():
    torch.manual_seed(0)
    grow, plain = layers.GrowableLayer(), DynamicLayer()
    for step, n in enumerate([100, 1, 1, 200, 7, 300, 1]):  # crosses the 256 start capacity and regrows
        k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
        got_k, got_v = grow.update(k, v)
        want_k, want_v = plain.update(k, v)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert grow.get_seq_length() == plain.get_seq_length()
        if step in (2, 4):
            grow.crop(-50)
            plain.crop(-50)
            assert torch.equal(grow.keys, plain.keys) and grow.get_seq_length() == plain.get_seq_length()


def test_growable_layer_keeps_keys_and_values_of_different_widths():
    """Multi-head latent attention caches keys and values of different head sizes."""
    layer = layers.GrowableLayer()
    for n in (3, 300, 1):  # the second update regrows the buffers
        keys, values = layer.update(torch.randn(1, 2, n, 24), torch.randn(1, 2, n, 16))
    assert keys.shape == (1, 2, 304, 24) and values.shape == (1, 2, 304, 16)
    layer.crop(-4)
    assert layer.keys.shape == (1, 2, 300, 24) and layer.values.shape == (1, 2, 300, 16)


class UnknownLayer(DynamicLayer):
    """A layer type kvchat has never heard of (a subclass may keep more than its base does)."""


def test_an_unknown_layer_type_makes_the_turn_fall_back_with_a_reason_never_reuse(tiny, monkeypatch):
    def cache_with_an_unknown_layer(model, windows=layers.WINDOWS_FULL, form=None):
        cache = DynamicCache(config=model.config)
        cache.layers = [layers.GrowableLayer(), UnknownLayer()]
        return cache

    monkeypatch.setattr(layers, "new_cache", cache_with_an_unknown_layer)
    engine = Engine(tiny)
    greedy = Sampling(temperature=0, max_new_tokens=6)
    chat = Chat.start(engine, "You are a helpful assistant.", sampling=greedy)
    list(chat.send("Hello, how are you today?"))
    assert "UnknownLayer" in layers.unsupported(chat.cache.model_cache)
    chat.messages[1]["content"] = "Edited."  # the next turn must cut the cache back
    history = chat.messages + [{"role": "user", "content": "What is the capital of France?"}]
    end = list(chat.send("What is the capital of France?"))[-1]
    assert isinstance(end, TurnEnd)
    assert end.stats.reused == 0 and "UnknownLayer" in end.stats.fallback
    assert end.token_ids == greedy_without_cache(tiny.model, engine.render(history), 6, engine.stop_ids)
    assert not layers.can_export(chat.cache.model_cache)
    assert chat.cache.trim(3) == 0 and not chat.cache.ids and chat.cache.nbytes == 0  # never cut: forgotten


def test_each_layer_type_declares_what_kvchat_may_do_and_an_unknown_one_may_do_nothing():
    unknown = layers.kind(UnknownLayer())
    assert not (unknown.known or unknown.can_cut or unknown.has_state or unknown.holds_nothing)
    declared = {name: layers.kind(layer) for name, layer in {
        "attention": layers.GrowableLayer(), "state": LinearAttentionLayer(),
        "both": LinearAttentionAndFullAttentionLayer(), "window": DynamicSlidingWindowLayer(sliding_window=4),
        "nothing": DummyLayer()}.items()}
    assert [name for name, k in declared.items() if k.can_cut] == ["attention", "both"]
    assert [name for name, k in declared.items() if k.has_state] == ["state", "both", "window"]
    assert [name for name, k in declared.items() if k.holds_nothing] == ["nothing"]
    assert all(k.known for k in declared.values())


def test_export_copies_so_later_cuts_and_updates_cannot_rewrite_it():
    """Regression (issue 10): with one KV head a slice of the live buffer is contiguous, and was exported as a view."""
    cache = DynamicCache()
    cache.layers = [layers.GrowableLayer()]
    cache.layers[0].update(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4))
    exported = layers.export(cache, 0, 8)
    kept = {name: tensor.clone() for name, tensor in exported.items()}
    cache.layers[0].crop(-4)
    cache.layers[0].update(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4))  # rewrites positions 4..7
    assert all(torch.equal(exported[name], kept[name]) for name in kept)
