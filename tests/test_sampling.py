import torch

from kvchat.config import Sampling
from kvchat.sampling import make_generator, next_token

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
