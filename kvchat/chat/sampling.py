"""Choosing the next token: a pure function of the last position's logits and the sampling settings."""

from __future__ import annotations

import torch

from kvchat.config import Sampling


# Temperatures below this sample the best token anyway; dividing by them overflows float32 (inf / inf = NaN).
GREEDY_BELOW = 1e-4


def make_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A seeded generator for reproducible sampling, or None to use torch's global RNG."""
    if sampling.seed is None or sampling.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def candidates(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens sampling may pick from `logits` [vocab] and their probabilities, as ([n] ids, [n] probs), the
    best first: top-k first (a partial selection, not a sort of the vocabulary), then top-p on the survivors.
    With top-k off, top-p sorts the whole vocabulary."""
    scores = logits.float()
    scores = (scores - scores.max()) / sampling.temperature  # relative to the best: no overflow to inf
    if 0 < sampling.top_k < scores.shape[-1]:
        scores, ids = torch.topk(scores, sampling.top_k)  # sorted, best first
    elif sampling.top_p < 1.0:
        scores, ids = torch.sort(scores, descending=True)
    else:
        return torch.arange(scores.shape[-1], device=scores.device), scores.softmax(dim=-1)
    probs = scores.softmax(dim=-1)
    if sampling.top_p < 1.0:
        # Drop a token when the tokens ranked above it already reach top_p; the best one always stays.
        kept = int(((probs.cumsum(dim=-1) - probs) < sampling.top_p).sum())
        ids, probs = ids[:kept], scores[:kept].softmax(dim=-1)
    return ids, probs


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token id from `logits` [vocab]; returns a 1-element long tensor on the logits' device."""
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    ids, probs = candidates(logits, sampling)
    return ids[torch.multinomial(probs, 1, generator=generator)]
