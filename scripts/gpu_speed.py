"""Speed of kvchat's cache path on a GPU, with random-weight Llama-shaped models (run by scripts/gpu-check.sh).

For each shape: prefill tokens/s (512-token chunks into kvchat's cache), decode tokens/s eager through kvchat's
cache (one host sync per token, as a streamed reply has), decode tokens/s of a compiled one-token step on
transformers' StaticCache (torch.compile mode="reduce-overhead": CUDA graphs, as gpt-fast does), the time to
save the cache of the context to safetensors and restore it onto the GPU, and the bandwidth limit on decode
(weight bytes over the measured device copy bandwidth). `--device cpu --shapes tiny` tries it anywhere.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvchat import kv

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
def eager(model, device: torch.device, context: int, new_tokens: int) -> tuple[float, float, object]:
    cache = kv.new_cache(model)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    sync(device)
    started = time.perf_counter()
    for start in range(0, context, 512):
        out = model(input_ids=ids[:, start:start + 512], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = context / (time.perf_counter() - started)
    token = out.logits[0, -1].argmax()
    started = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        int(token)  # the host sync a streamed token needs
    return prefill, new_tokens / (time.perf_counter() - started), cache


@torch.inference_mode()
def compiled(model, device: torch.device, context: int, new_tokens: int) -> float | str:
    from transformers import StaticCache

    try:
        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens + 16)
        ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
              cache_position=torch.arange(context, device=device))
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        token = torch.zeros((1, 1), dtype=torch.long, device=device)
        position = torch.tensor([context], device=device)
        for warm in range(3):  # compile and record the graph
            step(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1,
                 cache_position=position + warm)
        sync(device)
        started = time.perf_counter()
        for i in range(new_tokens):
            out = step(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1,
                       cache_position=position + 3 + i)
            token = out.logits[:, -1].argmax(-1, keepdim=True).clone()
            int(token)
        return new_tokens / (time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - report the failure, keep measuring the rest
        return f"compile failed: {type(exc).__name__}: {str(exc)[:120]}"


def resume(model, cache, device: torch.device) -> tuple[float, float]:
    from safetensors.torch import load, save

    tokens = kv.length(cache)
    started = time.perf_counter()
    data = save(kv.export(cache, 0, tokens))
    saved = time.perf_counter() - started
    started = time.perf_counter()
    pieces = load(data)
    if device.type == "cuda":
        pieces = {name: tensor.pin_memory() for name, tensor in pieces.items()}
    restored = kv.restore(model, [pieces], device)
    sync(device)
    assert kv.length(restored) == tokens, "the restored cache lost tokens"
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
    print("| shape | weights | prefill tok/s | decode eager tok/s | decode compiled tok/s | bandwidth limit tok/s "
          f"| save {args.context} tokens | restore |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        model = build(shape, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        prefill, decode, cache = eager(model, device, args.context, args.new_tokens)
        save_ms, restore_ms = resume(model, cache, device)
        del cache
        fast = compiled(model, device, args.context, args.new_tokens)
        fast_text = f"{fast:.1f}" if isinstance(fast, float) else fast
        print(f"| {shape} | {weight_bytes / 1e9:.1f} GB | {prefill:,.0f} | {decode:.1f} | {fast_text} | "
              f"{limit * 1e9 / weight_bytes:.0f} | {save_ms:.0f} ms | {restore_ms:.0f} ms |", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
