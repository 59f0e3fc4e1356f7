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


def can_export(cache: Cache) -> bool:
    """Whether every layer still holds the KV of every token (so it can be saved and restored exactly)."""
    return all(
        type(layer) is DynamicLayer
        or (type(layer) is DynamicSlidingWindowLayer and _layer_length(layer) < layer.sliding_window)
        for layer in cache.layers
    )


def export(cache: Cache, start: int, end: int) -> dict[str, torch.Tensor]:
    """Tokens [start, end) of every layer as CPU tensors named 'L.keys'/'L.values', each [kv_heads, n, head_dim].

    The cache's own dtype is kept, so a restore is bit-exact.
    """
    assert can_export(cache), "export() called on a cache that has discarded tokens"
    tensors = {}
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[0] == 1, "kvchat caches hold one sequence"
        tensors[f"{i}.keys"] = layer.keys[0, :, start:end, :].to("cpu").contiguous()
        tensors[f"{i}.values"] = layer.values[0, :, start:end, :].to("cpu").contiguous()
    return tensors


def _layer_devices(model: Any, default: torch.device) -> list[torch.device]:
    """Where each decoder layer runs (they differ when accelerate spread the model over several GPUs)."""
    try:
        return [next(block.parameters()).device for block in model.get_decoder().layers]
    except (AttributeError, StopIteration):
        return [default] * len(new_cache(model).layers)


def restore(model: Any, pieces: list[dict[str, torch.Tensor]], device: torch.device) -> Cache:
    """A cache for `model` holding the concatenation of exported `pieces` (in order), each layer on its device."""
    cache = new_cache(model)
    devices = _layer_devices(model, device)
    for i, layer in enumerate(cache.layers):
        target = devices[i] if i < len(devices) else device
        keys = torch.cat([piece[f"{i}.keys"] for piece in pieces], dim=1)  # [kv_heads, n, head_dim]
        values = torch.cat([piece[f"{i}.values"] for piece in pieces], dim=1)
        layer.update(keys.unsqueeze(0).to(target), values.unsqueeze(0).to(target))
    return cache


def expected_shapes(model: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's cache, to check a stored piece against."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim
