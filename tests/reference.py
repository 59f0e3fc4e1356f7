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

