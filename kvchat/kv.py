"""The KV adapter: the only module that touches transformers' cache internals.

A transformers `Cache` holds one layer object per decoder layer; full-attention layers keep
keys/values shaped [batch, kv_heads, seq, head_dim]. Everything else in kvchat sees a cache
only through these functions, so a transformers upgrade touches this file alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


def new_cache(model: Any) -> Cache:
    """An empty cache laid out for `model` (sliding-window layers where its config has them)."""
    return DynamicCache(config=model.config)


def cache_kwarg(model: Any) -> str:
    """The name under which this transformers version's forward takes the cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layer_length(layer: Any) -> int:
    if not getattr(layer, "is_initialized", False):
        return 0
    return layer.get_seq_length()


def length(cache: Cache) -> int:
    """Tokens the cache holds (the first layer's count; all layers agree outside an interrupted forward)."""
    return max((_layer_length(layer) for layer in cache.layers), default=0)


def layer_lengths(cache: Cache) -> list[int]:
    """Tokens held by each layer; they differ only while a forward pass is cut short."""
    return [_layer_length(layer) for layer in cache.layers]


def can_truncate(cache: Cache, n: int) -> bool:
    """Whether dropping every token after the first `n` leaves exactly the KV of those `n` tokens.

    Full-attention layers always can. A sliding-window layer can only while it has not yet
    discarded anything (fewer tokens than its window); linear-attention (recurrent) state never can.
    """
    for layer in cache.layers:
        held = _layer_length(layer)
        if held <= n:
            continue
        if type(layer) is DynamicLayer:
            continue
        if type(layer) is DynamicSlidingWindowLayer and held < layer.sliding_window:
            continue
        return False
    return True


def truncate(cache: Cache, n: int) -> None:
    """Keep only the first `n` tokens in every layer; the caller has checked `can_truncate`."""
    assert can_truncate(cache, n), "truncate() called on a cache that cannot be cut exactly"
    for layer in cache.layers:
        extra = _layer_length(layer) - n
        if extra > 0:
            layer.crop(-extra)


def nbytes(cache: Cache) -> int:
    """Bytes held by all key/value tensors of the cache."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
