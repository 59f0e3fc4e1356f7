"""What the KV cache costs in memory: the per-token formula, well-known architectures, and a start-up guard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KVShape:
    """The dimensions that set a model's KV cache size."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    dtype_bytes: float = 2  # what one key or value costs (a fraction for quantized forms)
    attention_heads: int | None = None  # the query heads: what a multi-head (no GQA) cache would store
    measured_per_token: int | None = None  # per-token bytes as the running model keeps them, when not uniform
    state_bytes: int = 0  # fixed conv/recurrent state of a conversation (one checkpoint is a copy of it)
    state_layers: int = 0
    window_layers: int = 0  # sliding-window layers kept window-only (their window counts as state)
    sliding_layers: int = 0  # attention layers with a window, kept whole by kvchat
    window: int | None = None

    @property
    def uniform(self) -> bool:
        """Whether every attention layer keeps keys and values of kv_heads x head_dim (the formula holds)."""
        return self.measured_per_token is None

    @property
    def bytes_per_token(self) -> int:
        """2 (keys and values) x layers x kv_heads x head_dim x bytes per value (or as measured)."""
        if self.measured_per_token is not None:
            return self.measured_per_token
        return round(2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes)

    def full_context_bytes(self, checkpoints: int = 0) -> int:
        """The cache at the full context, plus `checkpoints` copies of the recurrent state."""
        return self.bytes_per_token * self.context + self.state_bytes * (1 + checkpoints)

    @property
    def mha_bytes_per_token(self) -> int:
        """The same with one KV head per query head, as estimates that ignore grouped-query attention assume."""
        return round(2 * self.layers * (self.attention_heads or self.kv_heads) * self.head_dim * self.dtype_bytes)


# Published configurations (bfloat16 KV), for comparison with the loaded model.
WELL_KNOWN = [
    KVShape("Llama-2-7B (multi-head)", 32, 32, 128, 4096, attention_heads=32),
    KVShape("Llama-3.1-8B", 32, 8, 128, 131072, attention_heads=32),
    KVShape("Mistral-7B-v0.3", 32, 8, 128, 32768, attention_heads=32),
    KVShape("Qwen2.5-7B", 28, 4, 128, 32768, attention_heads=28),
    KVShape("Llama-3-70B", 80, 8, 128, 8192, attention_heads=64),
]


def model_shape(loaded: Any, context: int | None, layout: Any) -> KVShape:
    """The cache dimensions of a loaded model, from what a probe forward pass kept (`kv.Layout`) and its config."""
    config = loaded.model.config.get_text_config(decoder=True)
    dtype_bytes = layout.value_bytes(loaded.dtype)  # in the KV form the cache keeps
    widths = {dims for name, dims in layout.per_token.items() if not name.endswith(".indexer_keys")}
    kv_layers = {int(name.split(".")[0]) for name in layout.per_token}
    uniform = len(widths) == 1 and all(not name.endswith(".indexer_keys") for name in layout.per_token)
    kv_heads, head_dim = next(iter(widths)) if widths else (0, 0)
    types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    return KVShape(
        name=loaded.name,
        layers=len(kv_layers),
        kv_heads=kv_heads,
        head_dim=head_dim,
        context=context or getattr(config, "max_position_embeddings", None) or 0,
        dtype_bytes=dtype_bytes,
        attention_heads=getattr(config, "num_attention_heads", None),
        measured_per_token=None if uniform else layout.bytes_per_token(loaded.dtype),
        state_bytes=layout.state_bytes(),
        state_layers=len({name.split(".")[0] for name in layout.state}),
        window_layers=len({name.split(".")[0] for name in layout.windows}),
        sliding_layers=sum(1 for i, t in enumerate(types)
                           if i in kv_layers and t in ("sliding_attention", "chunked_attention")),
        window=window,
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`, when it can be known."""
    if device.type == "cuda":
        import torch

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


def memory_warning(shape: KVShape, free: int | None, checkpoints: int = 0) -> str | None:
    """A one-line warning when the KV cache at the full context (and `checkpoints` state copies) would not fit
    in `free` bytes."""
    need = shape.full_context_bytes(checkpoints)
    if free is None or need <= free or not shape.bytes_per_token:
        return None
    fits = max(0, int(free * 0.9) - shape.state_bytes * (1 + checkpoints)) // shape.bytes_per_token
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


def info_lines(shape: KVShape, device: torch.device, dtype: torch.dtype, checkpoints: int = 0,
               weights: str = "full") -> list[str]:
    """The `kvchat info` report."""
    lines = [f"model: {shape.name}", f"device: {device}, dtype: {str(dtype).replace('torch.', '')}"
             + ("" if weights == "full" else f", {weights} weights")]
    if shape.uniform and shape.layers:
        lines += [
            f"layers with KV: {shape.layers}, attention heads: {shape.attention_heads}, KV heads: {shape.kv_heads}, "
            f"head dim: {shape.head_dim}",
            f"KV bytes per token: 2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} head dim x "
            f"{shape.dtype_bytes} bytes = {shape.bytes_per_token:,} B ({human(shape.bytes_per_token)})",
        ]
    elif not shape.layers:
        lines.append("KV bytes per token: 0 (no layer keeps every token: the cache does not grow with the conversation)")
    else:
        lines.append(f"KV bytes per token: {shape.bytes_per_token:,} B ({human(shape.bytes_per_token)}) over "
                     f"{shape.layers} layers with KV (widths differ per layer or between keys and values; measured)")
    lines.append(f"KV cache at the full context of {shape.context} tokens: {human(shape.bytes_per_token * shape.context)}")
    if shape.sliding_layers and shape.layers:
        per_layer = shape.bytes_per_token / shape.layers
        window_only = per_layer * ((shape.layers - shape.sliding_layers) * shape.context
                                   + shape.sliding_layers * min(shape.window or 0, shape.context))
        lines.append(f"{shape.sliding_layers} of those layers attend within a window of {shape.window} tokens; kvchat "
                     "keeps every token in them (the mask applies the window) so that they can be cut back and saved "
                     f"exactly; a window-only cache (--window-cache window) would hold {human(window_only)} at the full context")
    if shape.state_layers or shape.window_layers:
        kinds = " and ".join(k for k, n in (("recurrent/conv state", shape.state_layers),
                                             ("window-only sliding layers", shape.window_layers)) if n)
        layers = shape.state_layers + shape.window_layers
        lines.append(f"{kinds}: {human(shape.state_bytes)} in {layers} layers, fixed whatever "
                     f"the length; each checkpoint is a copy ({human(shape.state_bytes)}), up to {checkpoints} kept "
                     f"in memory: {human(shape.state_bytes * (1 + checkpoints))} in all")
    lines += [
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
