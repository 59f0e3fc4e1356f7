"""The KV adapter: growable layers behave like transformers' own, and truncation refuses what it cannot undo."""

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvchat import kv


def test_growable_layer_matches_dynamic_layer_through_growth_and_crops():
    torch.manual_seed(0)
    grow, plain = kv.GrowableLayer(), DynamicLayer()
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


def test_truncate_refuses_a_sliding_layer_past_its_window():
    cache = type("C", (), {})()
    layer = DynamicSlidingWindowLayer(sliding_window=8)
    layer.update(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4))
    cache.layers = [layer]
    assert kv.can_truncate(cache, 3)  # the window has not discarded anything yet
    layer.update(torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4))
    assert not kv.can_truncate(cache, 3) and not kv.can_export(cache)
