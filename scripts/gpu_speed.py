"""Speed of kvchat's cache path on a GPU, with random-weight Llama-shaped models (run by scripts/gpu-check.sh).

For each shape: prefill tokens/s (512-token chunks into kvchat's cache), decode tokens/s eager through kvchat's
cache (one host sync per token, as a streamed reply has), decode tokens/s of kvchat's compiled one-token step
(kvchat/cache/compiled.py: torch.compile on a static view of the same cache, a CUDA graph on CUDA) with its compile
time and how many of its greedy tokens agree with the eager ones, the time to save the cache of the context to
safetensors and restore it onto the GPU (through pinned memory, as the store does), and the bandwidth limit on
decode (weight bytes over the measured device copy bandwidth). `--device cpu --shapes tiny` tries it anywhere.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvchat.cache import layers

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (256, 4, 8, 2, 688, 32000),
    "1B": (2048, 16, 32, 8, 8192, 128256),
    "8B": (4096, 32, 32, 8, 14336, 128256),
}


def build(shape: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random weights: speed needs no training
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def prefill(model, cache, ids: torch.Tensor):
    for start in range(0, ids.shape[1], 512):
        out = model(input_ids=ids[:, start:start + 512], use_cache=True, logits_to_keep=1,
                    **{layers.cache_kwarg(model): cache})
    return out.logits[0, -1]


@torch.inference_mode()
def eager(model, device: torch.device, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, object, list[int]]:
    cache = layers.new_cache(model)
    sync(device)
    started = time.perf_counter()
    logits = prefill(model, cache, ids)
    sync(device)
    prefill_tok_s = ids.shape[1] / (time.perf_counter() - started)
    tokens = [int(logits.argmax())]
    started = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), use_cache=True, logits_to_keep=1,
                    **{layers.cache_kwarg(model): cache})
        tokens.append(int(out.logits[0, -1].argmax()))  # the host sync a streamed token needs
    return prefill_tok_s, new_tokens / (time.perf_counter() - started), cache, tokens


@torch.inference_mode()
def compiled(model, device: torch.device, ids: torch.Tensor, new_tokens: int,
             reference: list[int]) -> tuple[float | str, float, int]:
    """kvchat's compiled step: decode tokens/s (or why it failed), compile seconds, tokens agreeing with eager."""
    from kvchat.cache.compiled import CompiledStep

    step = CompiledStep(model, device)
    started = time.perf_counter()
    step.warm_up(background=False)
    sync(device)
    compile_s = time.perf_counter() - started
    if step.failure or step.refused:
        return f"not compiled: {step.failure or step.refused}"[:160], compile_s, 0
    cache = layers.new_cache(model)
    tokens = [int(prefill(model, cache, ids).argmax())]
    for warm in range(2):  # the capacity's first CUDA graph is recorded on the first calls
        step(cache, tokens[-1])
    cache = layers.new_cache(model)
    tokens = [int(prefill(model, cache, ids).argmax())]
    sync(device)
    started = time.perf_counter()
    for _ in range(new_tokens):
        logits = step(cache, tokens[-1])
        if logits is None:
            return f"step failed: {step.failure}"[:160], compile_s, 0
        tokens.append(int(logits.argmax()))
    tok_s = new_tokens / (time.perf_counter() - started)
    agree = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), len(tokens))
    return tok_s, compile_s, agree


def resume(model, cache, device: torch.device) -> tuple[float, float]:
    from safetensors.torch import load, save

    tokens = layers.length(cache)
    started = time.perf_counter()
    data = save(layers.export(cache, 0, tokens))
    saved = time.perf_counter() - started
    started = time.perf_counter()
    restored = layers.restore(model, [load(data)], device)
    sync(device)
    assert layers.length(restored) == tokens, "the restored cache lost tokens"
    return saved * 1000, (time.perf_counter() - started) * 1000


def bandwidth(device: torch.device) -> float:
    """Device memory bandwidth in GB/s (bytes read plus written by a 1 GiB copy; 256 MiB on a CPU)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 28)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync(device)
    started = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    sync(device)
    return 2 * 5 * size / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="1B,8B")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    limit = bandwidth(device)
    print(f"device copy bandwidth: {limit:.0f} GB/s")
    print("| shape | weights | prefill tok/s | decode eager tok/s | decode compiled tok/s | compile | "
          f"greedy tokens agreeing | bandwidth limit tok/s | save {args.context} tokens | restore |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        model = build(shape, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=device)
        prefill_tok_s, decode, cache, reference = eager(model, device, ids, args.new_tokens)
        save_ms, restore_ms = resume(model, cache, device)
        del cache
        fast, compile_s, agree = compiled(model, device, ids, args.new_tokens, reference)
        fast_text = f"{fast:.1f}" if isinstance(fast, float) else fast
        print(f"| {shape} | {weight_bytes / 1e9:.1f} GB | {prefill_tok_s:,.0f} | {decode:.1f} | {fast_text} | "
              f"{compile_s:.0f} s | {agree}/{args.new_tokens + 1} | {limit * 1e9 / weight_bytes:.0f} | "
              f"{save_ms:.0f} ms | {restore_ms:.0f} ms |", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
