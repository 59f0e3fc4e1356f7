"""A tiny random Llama model and a byte-level BPE tokenizer with a ChatML template, built in-process."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvchat.weights.model import LoadedModel

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Hello, how are you today? I am fine, thank you.",
    "Tell me a story about a cat and a dog who became friends.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "system user assistant You are a helpful assistant.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with ChatML special tokens and chat template."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


def make_model(vocab_size: int, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention and random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **{"tie_word_embeddings": False, **overrides},
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = 2
    return model.eval()


TEST_DEVICE = torch.device(os.environ.get("KVCHAT_TEST_DEVICE", "cpu"))  # scripts/gpu-check.sh sets cuda


def make_loaded(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> LoadedModel:
    tok = make_tokenizer()
    model = make_model(len(tok), dtype=dtype, seed=seed, **overrides).to(TEST_DEVICE)
    return LoadedModel(model=model, tokenizer=tok, name="tiny-llama", device=TEST_DEVICE, dtype=dtype)
