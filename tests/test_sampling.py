import torch

from kvchat.config import Sampling
from kvchat.chat.sampling import make_generator, next_token

LOGITS = torch.tensor([0.1, 2.0, 1.9, -3.0, 0.5])


def test_greedy_is_argmax():
    assert int(next_token(LOGITS, Sampling(temperature=0), None)) == 1


def test_top_k_one_is_greedy_whatever_the_temperature():
    sampling = Sampling(temperature=5.0, top_k=1, top_p=1.0, seed=3)
    gen = make_generator(sampling, torch.device("cpu"))
    assert {int(next_token(LOGITS, sampling, gen)) for _ in range(50)} == {1}


def test_top_p_keeps_only_the_nucleus():
    sampling = Sampling(temperature=1.0, top_k=0, top_p=0.5, seed=0)
    gen = make_generator(sampling, torch.device("cpu"))
    # Token 1 alone holds under half the mass; tokens 1 and 2 reach it. Nothing else may appear.
    assert {int(next_token(LOGITS, sampling, gen)) for _ in range(200)} == {1, 2}


def test_top_k_excludes_the_rest():
    sampling = Sampling(temperature=10.0, top_k=2, top_p=1.0, seed=0)
    gen = make_generator(sampling, torch.device("cpu"))
    assert {int(next_token(LOGITS, sampling, gen)) for _ in range(200)} == {1, 2}


def test_seed_makes_sampling_reproducible():
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=42)

    def draw():
        gen = make_generator(sampling, torch.device("cpu"))
        return [int(next_token(LOGITS, sampling, gen)) for _ in range(30)]

    assert draw() == draw()
    assert len(set(draw())) > 1


def test_a_tiny_temperature_is_greedy_not_a_crash():
    """Regression (issue 10): --temperature 1e-40 passed validation, then logits / T overflowed to NaN."""
    for temperature in (1e-40, 1e-300):
        sampling = Sampling(temperature=temperature, top_k=0, top_p=1.0, seed=1)
        gen = make_generator(sampling, torch.device("cpu"))
        assert {int(next_token(LOGITS, sampling, gen)) for _ in range(20)} == {1}


def reference_distribution(logits, sampling):
    """Top-k then top-p over the whole vocabulary, the slow way (what sampling did before issue 12)."""
    scores = (logits.float() - logits.float().max()) / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        scores = scores.masked_fill(scores < torch.topk(scores, sampling.top_k).values[-1], float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        sorted_scores = sorted_scores.masked_fill((probs.cumsum(dim=-1) - probs) >= sampling.top_p, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores)
    return scores.softmax(dim=-1)


def test_candidates_are_the_same_distribution_as_filtering_the_whole_vocabulary():
    """Issue 12: sampling sorted the whole 49k vocabulary per token; top-k first, then top-p on the k
    survivors, gives the same probabilities over a fraction of the work."""
    from kvchat.chat.sampling import candidates

    torch.manual_seed(0)
    for top_k, top_p, temperature in ((50, 0.95, 0.7), (0, 0.9, 1.0), (10, 1.0, 1.3), (0, 1.0, 0.5), (3, 0.5, 2.0)):
        logits = torch.randn(49152) * 4
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        ids, probs = candidates(logits, sampling)
        full = torch.zeros(49152).index_put_((ids,), probs)
        torch.testing.assert_close(full, reference_distribution(logits, sampling), atol=1e-6, rtol=1e-5)
        if top_k:
            assert len(ids) <= top_k
