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


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token id from `logits` [vocab]; returns a 1-element long tensor on the logits' device."""
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.float()
    scores = (scores - scores.max()) / sampling.temperature  # relative to the best: no overflow to inf
    if 0 < sampling.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best one always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)
