"""What the KV cache costs in memory: the per-token formula, well-known architectures, and a start-up guard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVShape:
    """The dimensions that set a model's KV cache size."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    dtype_bytes: int = 2
    attention_heads: int | None = None  # the query heads: what a multi-head (no GQA) cache would store

    @property
    def bytes_per_token(self) -> int:
        """2 (keys and values) x layers x kv_heads x head_dim x bytes per value."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def mha_bytes_per_token(self) -> int:
        """The same with one KV head per query head, as estimates that ignore grouped-query attention assume."""
        return 2 * self.layers * (self.attention_heads or self.kv_heads) * self.head_dim * self.dtype_bytes


# Published configurations (bfloat16 KV), for comparison with the loaded model.
WELL_KNOWN = [
    KVShape("Llama-2-7B (multi-head)", 32, 32, 128, 4096, attention_heads=32),
    KVShape("Llama-3.1-8B", 32, 8, 128, 131072, attention_heads=32),
    KVShape("Mistral-7B-v0.3", 32, 8, 128, 32768, attention_heads=32),
    KVShape("Qwen2.5-7B", 28, 4, 128, 32768, attention_heads=28),
    KVShape("Llama-3-70B", 80, 8, 128, 8192, attention_heads=64),
]


def model_shape(loaded: Any, context: int | None) -> KVShape:
    """The KV dimensions of a loaded model, from its config and dtype."""
    config = loaded.model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    return KVShape(
        name=loaded.name,
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        context=context or getattr(config, "max_position_embeddings", 0),
        dtype_bytes=torch.empty((), dtype=loaded.dtype).element_size(),
        attention_heads=heads,
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`, when it can be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def memory_warning(shape: KVShape, free: int | None) -> str | None:
    """A one-line warning when the KV cache at the full context would not fit in `free` bytes."""
    need = shape.bytes_per_token * shape.context
    if free is None or need <= free:
        return None
    fits = int(free * 0.9) // shape.bytes_per_token
    return (f"the KV cache at the full {shape.context}-token context needs {human(need)} "
            f"({shape.bytes_per_token:,} B/token), but only {human(free)} is free; "
            f"set max_context to {fits} or less (--max-context {fits})")


def human(n: float) -> str:
    """Bytes as KiB/MiB/GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def info_lines(shape: KVShape, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The `kvchat info` report."""
    lines = [
        f"model: {shape.name}",
        f"device: {device}, dtype: {str(dtype).replace('torch.', '')}",
        f"layers: {shape.layers}, attention heads: {shape.attention_heads}, KV heads: {shape.kv_heads}, "
        f"head dim: {shape.head_dim}",
        f"KV bytes per token: 2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} head dim x "
        f"{shape.dtype_bytes} bytes = {shape.bytes_per_token:,} B ({human(shape.bytes_per_token)})",
        f"KV cache at the full context of {shape.context} tokens: {human(shape.bytes_per_token * shape.context)}",
        "",
        "Well-known architectures (bfloat16 KV):",
        f"  {'model':26} {'layers':>6} {'KV heads':>8} {'head dim':>8} {'per token':>11} {'if multi-head':>13} "
        f"{'at context':>18}",
    ]
    for known in WELL_KNOWN:
        lines.append(
            f"  {known.name:26} {known.layers:>6} {known.kv_heads:>8} {known.head_dim:>8} "
            f"{human(known.bytes_per_token):>11} {human(known.mha_bytes_per_token):>13} "
            f"{human(known.bytes_per_token * known.context):>10} @ {known.context // 1024}k")
    llama70 = WELL_KNOWN[-1]
    lines.append(
        f"Llama-3-70B keeps 8 KV heads for its 64 query heads (grouped-query attention): "
        f"{human(llama70.bytes_per_token)} per token instead of the {human(llama70.mha_bytes_per_token)} "
        f"a multi-head cache would need, {llama70.mha_bytes_per_token // llama70.bytes_per_token}x less.")
    return lines
