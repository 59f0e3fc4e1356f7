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


class GrowableLayer(DynamicLayer):
    """A full-attention layer that appends into spare capacity instead of concatenating.

    transformers' DynamicLayer runs torch.cat over the whole layer at every step, copying the
    entire cache per decoded token (about 100 MB per token at 2,000 tokens on the default model).
    Here keys/values are views [1, kv_heads, n, head_dim] into buffers that grow by half when full.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buf = self._value_buf = None
        self._n = 0

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        capacity = 0 if self._key_buf is None else self._key_buf.shape[-2]
        if needed <= capacity:
            return
        capacity = max(needed, capacity + capacity // 2, 256)
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        key_buf = like.new_empty(shape)
        value_buf = like.new_empty(shape)
        if self._n:
            key_buf[..., : self._n, :] = self.keys
            value_buf[..., : self._n, :] = self.values
        self._key_buf, self._value_buf = key_buf, value_buf

    def _expose(self) -> None:
        self.keys = self._key_buf[..., : self._n, :]
        self.values = self._value_buf[..., : self._n, :]

    def fill(self, keys: list[torch.Tensor], values: list[torch.Tensor], device: torch.device) -> None:
        """Take restored pieces, each [kv_heads, n_i, head_dim], as the layer's content, copying each once."""
        first = keys[0].unsqueeze(0)
        like = torch.empty((*first.shape[:-2], 0, first.shape[-1]), dtype=first.dtype, device=device)
        self.lazy_initialization(like, like)
        total = sum(piece.shape[-2] for piece in keys)
        self._reserve(like, total + max(256, total // 4))  # room for the next turns without regrowing
        start = 0
        for key_piece, value_piece in zip(keys, values):
            end = start + key_piece.shape[-2]
            self._key_buf[0, :, start:end].copy_(key_piece)
            self._value_buf[0, :, start:end].copy_(value_piece)
            start = end
        self._n = total
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._n + key_states.shape[-2]
        self._reserve(key_states, end)
        self._key_buf[..., self._n:end, :] = key_states
        self._value_buf[..., self._n:end, :] = value_states
        self._n = end
        self._expose()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove <= 0, "crop takes minus the number of tokens to drop"
        if self.is_initialized and tokens_to_remove:
            self._n = max(0, self._n + tokens_to_remove)
            self._expose()

    def reset(self) -> None:
        super().reset()
        self._key_buf = self._value_buf = None
        self._n = 0


_FULL_LAYERS = (DynamicLayer, GrowableLayer)


def new_cache(model: Any) -> Cache:
    """An empty cache laid out for `model`: growable full-attention layers, sliding-window ones where configured."""
    cache = DynamicCache(config=model.config)
    if cache.layers:
        cache.layers = [GrowableLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:  # no per-layer layout known: layers are created on first use
        cache.layer_class_to_replicate = GrowableLayer
    return cache


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
        if type(layer) in _FULL_LAYERS:
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
        type(layer) in _FULL_LAYERS
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
    """A cache for `model` holding the concatenation of exported `pieces` (in order), each layer on its device.

    Each layer's pieces are copied once, straight into a buffer with room to grow (no intermediate cat).
    """
    cache = new_cache(model)
    devices = _layer_devices(model, device)
    for i, layer in enumerate(cache.layers):
        target = devices[i] if i < len(devices) else device
        parts = {name: [piece[f"{i}.{name}"] for piece in pieces] for name in ("keys", "values")}  # [kv_heads, n, head_dim]
        if isinstance(layer, GrowableLayer):
            layer.fill(parts["keys"], parts["values"], target)
        else:
            keys, values = (torch.cat(parts[name], dim=1).unsqueeze(0).to(target) for name in ("keys", "values"))
            layer.update(keys, values)
    return cache


def expected_shapes(model: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's cache, to check a stored piece against."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim
