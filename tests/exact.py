"""The cache a conversation holds, compared with a fresh prefill of the token ids it says it holds."""

from __future__ import annotations

import copy
from typing import Any

import torch

from kvchat.cache import layers

# Buffers with spare capacity past the tokens held (kvchat's growable layer): their views `keys`/`values` are
# what the layer holds, and are compared.
CAPACITY = frozenset({"_key_buf", "_value_buf"})


def relative(mine: torch.Tensor, want: torch.Tensor) -> float:
    """max |mine - want| / max |want| in float64 (0 for two empty tensors)."""
    if want.numel() == 0:
        return 0.0
    a, b = mine.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def fresh_cache(engine: Any, ids: list[int]) -> Any:
    """A new cache laid out as the engine's, after one forward pass over `ids` from nothing."""
    cache = layers.new_cache(engine.model, engine.window_cache)
    with torch.inference_mode():
        engine.model(input_ids=torch.tensor([ids], device=engine.device), use_cache=True,
                     position_ids=torch.arange(len(ids), device=engine.device)[None],
                     **{layers.cache_kwarg(engine.model): cache})
    return cache


def differences(mine: Any, want: Any, where: str = "") -> list[tuple[str, float]]:
    """Every difference between two layer objects, attribute by attribute (tensors: relative difference of floating
    ones, exact equality of the rest; dicts entry by entry; anything else by equality), as (name, size)."""
    found = []
    names = set(vars(mine)) | set(vars(want))
    for name in sorted(names - CAPACITY):
        a, b = getattr(mine, name, "<absent>"), getattr(want, name, "<absent>")
        found += _compare(a, b, f"{where}{name}")
    return found


def _compare(a: Any, b: Any, name: str) -> list[tuple[str, float]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _compare(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{name}[{key}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}", float("inf"))]
        if a.is_floating_point():
            return [(name, relative(a, b))]
        return [] if torch.equal(a.cpu(), b.cpu()) else [(f"{name}: {a.tolist()} vs {b.tolist()}", float("inf"))]
    return [] if type(a) is type(b) and a == b else [(f"{name}: {a!r} vs {b!r}", float("inf"))]


def next_logits(engine: Any, cache: Any, start: int, token: int) -> torch.Tensor:
    """Logits after feeding `token` at position `start` on a copy of `cache` (the cache itself is left alone)."""
    copied = copy.deepcopy(cache)
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([[token]], device=engine.device), use_cache=True,
                            position_ids=torch.tensor([[start]], device=engine.device),
                            **{layers.cache_kwarg(engine.model): copied}).logits[0, -1]
