"""A reference generator with no KV cache at all: every step recomputes the whole sequence."""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_without_cache(model, prompt_ids: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    """Greedy reply token ids from a full forward pass over prompt + reply so far, at every step."""
    ids = list(prompt_ids)
    reply: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token in stop_ids:
            break
        reply.append(token)
        ids.append(token)
    return reply


@torch.inference_mode()
def greedy_after_prefill(engine, prompt: list[int], max_new_tokens: int, kv_form=None) -> list[int]:
    """Greedy reply token ids from a cache laid out as the engine's (keys and values in `kv_form`, by default
    the engine's) filled by one pass over the whole prompt, then transformers' own one-token passes."""
    from kvchat.cache import layers

    cache = layers.new_cache(engine.model, engine.window_cache, kv_form or engine.kv_form)
    kwarg = {layers.cache_kwarg(engine.model): cache}
    logits = engine.model(input_ids=torch.tensor([prompt], device=engine.device),
                          position_ids=torch.arange(len(prompt), device=engine.device)[None],
                          use_cache=True, **kwarg).logits[0, -1]
    reply: list[int] = []
    for position in range(len(prompt), len(prompt) + max_new_tokens):
        token = int(logits.argmax())
        if token in engine.stop_ids:
            break
        reply.append(token)
        logits = engine.model(input_ids=torch.tensor([[token]], device=engine.device),
                              position_ids=torch.tensor([[position]], device=engine.device),
                              use_cache=True, **kwarg).logits[0, -1]
    return reply
