"""The KV adapter: the only module that touches transformers' cache internals.

A transformers `Cache` holds one layer object per decoder layer. kvchat asks each layer what it can do: its
`LayerKind` declares it (can cut, has state, holds nothing), and a layer type it does not know answers no to
everything (the turn then prefills from scratch):

- AttentionKind: keys/values [batch, kv_heads, seq, head_dim] per token (keys and values may differ in width,
  as in multi-head latent attention); cut back to any length, export/import the KV of tokens [a, b).
  Sliding-window and chunked layers are kept whole by default (WINDOWS_FULL): the attention mask applies
  the window, so they can be cut and saved like full attention (at the memory cost of full attention).
- StateKind: a fixed-size conv/recurrent state (Mamba, linear attention, short convolutions) that cannot be
  cut back; it is snapshotted, and a snapshot restored, at the positions a chat returns to. A snapshot holds
  everything the layer keeps (found by asking the layer: its tensors, counters and flags, see `state_items`);
  a layer keeping anything kvchat cannot copy exactly is refused.
- WindowKind: with WINDOWS_ONLY, a sliding-window layer keeps only its last window-1 tokens (transformers' own
  layer) and is handled like a state: snapshotted and restored, never cut.
- AttentionAndStateKind: both in one layer (Falcon-H1).
- EmptyKind: layers that hold nothing (KV-sharing consumers, MLP-only layers).

With a KV form other than `auto` (kv_forms), the per-token tensors live in Encoded* layers: EncodedLayer (full
and whole sliding attention, latent attention), EncodedIndexedLayer (with a sparse-attention indexer's keys) and
EncodedHybridLayer (Falcon-H1's attention beside its state).

Every token count a layer keeps must equal the tokens the conversation holds (`miscount`), after every cut,
restore and resume.

Everything else in kvchat sees a cache only through these functions, so a transformers upgrade
touches this file alone.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers.cache_utils import (Cache, DummyLayer, DynamicCache, DynamicIndexedLayer, DynamicLayer,
                                      DynamicSlidingWindowLayer, LinearAttentionAndFullAttentionLayer,
                                      LinearAttentionLayer)

from kvchat.cache.kv_forms import KVForm, block_size


class GrowableLayer(DynamicLayer):
    """An attention layer that appends into spare capacity instead of concatenating.

    transformers' DynamicLayer runs torch.cat over the whole layer at every step, copying the
    entire cache per decoded token (about 100 MB per token at 2,000 tokens on the default model).
    Here keys/values are views [1, kv_heads, n, head_dim] into buffers that grow by half when full.
    It also stands in for sliding-window layers: it keeps every token and the mask applies the window.

    Inside `one_step` the layer is static: the forward pass sees views of the buffers whose length is a dynamic
    dimension to torch.compile and writes the new token at a position held in a tensor, so a compiled step has
    no Python number that changes from token to token. On the CPU the views end at the new token; on CUDA they
    are the whole buffers (a CUDA graph replays fixed shapes) and the mask hides the slots past the token.
    Spare slots are zeros (never uninitialized memory: a NaN there would reach the output through the masked
    attention).
    """

    static = False
    _position: torch.Tensor | None = None  # [1] the slot the static step writes, on the layer's device
    _static_keys: torch.Tensor | None = None  # [1, kv_heads, length, dim]: what a static step attends over
    _static_values: torch.Tensor | None = None

    @property
    def is_compileable(self) -> bool:  # transformers builds a full mask for a one-token pass over a static cache
        return self.static

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buf = self._value_buf = None
        self._n = 0

    def _reserve(self, keys_like: torch.Tensor, values_like: torch.Tensor, needed: int) -> None:
        capacity = 0 if self._key_buf is None else self._key_buf.shape[-2]
        if needed <= capacity:
            return
        capacity = max(needed, capacity + capacity // 2, 256)
        # Keys and values are sized apart: multi-head latent attention caches them in different widths.
        key_buf = keys_like.new_zeros((*keys_like.shape[:-2], capacity, keys_like.shape[-1]))
        value_buf = values_like.new_zeros((*values_like.shape[:-2], capacity, values_like.shape[-1]))
        if self._n:
            key_buf[..., : self._n, :] = self.keys
            value_buf[..., : self._n, :] = self.values
        self._key_buf, self._value_buf = key_buf, value_buf

    def _expose(self) -> None:
        self.keys = self._key_buf[..., : self._n, :]
        self.values = self._value_buf[..., : self._n, :]

    def fill(self, keys: list[torch.Tensor], values: list[torch.Tensor], device: torch.device,
             pinned: list[torch.Tensor] | None = None) -> None:
        """Take restored pieces, each [kv_heads, n_i, dim], as the layer's content, copying each once.

        To a GPU the pieces go through page-locked memory (gathered there, then one asynchronous copy per tensor);
        those staging buffers are appended to `pinned`, and must outlive the copies (see `restore`)."""
        empty = [torch.empty((*p[0].shape[:-2], 0, p[0].shape[-1]), dtype=p[0].dtype, device=device).unsqueeze(0)
                 for p in (keys, values)]
        self.lazy_initialization(*empty)
        total = sum(piece.shape[-2] for piece in keys)
        self._reserve(*empty, total + max(256, total // 4))  # room for the next turns without regrowing
        if pinned is not None and device.type == "cuda" and all(p.device.type == "cpu" for p in keys + values):
            for pieces, buf in ((keys, self._key_buf), (values, self._value_buf)):
                staging = torch.empty((*pieces[0].shape[:-2], total, pieces[0].shape[-1]), dtype=pieces[0].dtype,
                                      pin_memory=True)
                torch.cat(pieces, dim=-2, out=staging)
                buf[0, :, :total].copy_(staging, non_blocking=True)
                pinned.append(staging)
        else:
            start = 0
            for key_piece, value_piece in zip(keys, values):
                end = start + key_piece.shape[-2]
                self._key_buf[0, :, start:end].copy_(key_piece)
                self._value_buf[0, :, start:end].copy_(value_piece)
                start = end
        self._n = total
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static:  # key_states [1, kv_heads, 1, dim] -> the static views [1, kv_heads, length, dim]
            self._static_keys.index_copy_(2, self._position, key_states)
            self._static_values.index_copy_(2, self._position, value_states)
            return self._static_keys, self._static_values
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._n + key_states.shape[-2]
        self._reserve(key_states, value_states, end)
        self._key_buf[..., self._n:end, :] = key_states
        self._value_buf[..., self._n:end, :] = value_states
        self._n = end
        self._expose()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self._static_keys.shape[-2], 0
        return super().get_mask_sizes(query_length)

    def get_seq_length(self) -> Any:
        if self.static:
            return self._position[0]  # a tensor: the mask's query offset, without a number to specialize on
        return super().get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove <= 0, "crop takes minus the number of tokens to drop"
        if self.is_initialized and tokens_to_remove:
            self._n = max(0, self._n + tokens_to_remove)
            self._expose()

    def reset(self) -> None:
        super().reset()
        self._key_buf = self._value_buf = None
        self._n = 0


class EncodedRows:
    """The rows of one per-token tensor (keys [1, kv_heads, n, width], values, or indexer keys [1, n, width]) kept
    in a `KVForm`: one buffer per part of the form, tokens along dimension -2, growing by half when full. Each
    row is encoded on its own as it arrives."""

    def __init__(self, form: KVForm, like: torch.Tensor):
        self.form = form
        self.width, self.dtype, self.device = like.shape[-1], like.dtype, like.device
        self._lead = tuple(like.shape[:-2])
        self._parts: dict[str, torch.Tensor] = {}
        self.n = 0

    @property
    def capacity(self) -> int:
        return next(iter(self._parts.values())).shape[-2] if self._parts else 0

    def reserve(self, needed: int) -> None:
        """Make room for `needed` tokens (spare slots are zeros)."""
        if needed <= self.capacity:
            return
        capacity = max(needed, self.capacity + self.capacity // 2, 256)
        parts = {}
        for part, (shape, dtype) in self.form.stored_shapes((*self._lead, capacity, self.width)).items():
            buffer = torch.zeros(shape, dtype=dtype or self.form.float_dtype(self.dtype), device=self.device)
            if self.n:
                buffer[..., : self.n, :] = self._parts[part][..., : self.n, :]
            parts[part] = buffer
        self._parts = parts

    def append(self, rows: torch.Tensor) -> None:
        """Encode `rows` [..., s, width] as the next s tokens."""
        end = self.n + rows.shape[-2]
        self.reserve(end)
        for part, encoded in self.form.encode(rows).items():
            self._parts[part][..., self.n:end, :] = encoded
        self.n = end

    def decoded(self, dtype: torch.dtype) -> torch.Tensor:
        """All the tokens held, decoded to `dtype`."""
        return self.form.decode({part: buf[..., : self.n, :] for part, buf in self._parts.items()}, dtype, self.width)

    def view(self) -> torch.Tensor:
        """The first part of the tokens held (its token count is what transformers reads of a layer)."""
        return next(iter(self._parts.values()))[..., : self.n, :] if self._parts else \
            torch.empty((*self._lead, 0, self.width), dtype=self.dtype, device=self.device)

    def cut(self, n: int) -> None:
        self.n = min(self.n, max(0, n))

    def export(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """Tokens [start, end) of each part as CPU copies, without the batch dimension."""
        return {part: buf[0][..., start:end, :].to("cpu", copy=True).contiguous() for part, buf in self._parts.items()}

    def fill(self, pieces: dict[str, list[torch.Tensor]]) -> None:
        """Take restored parts (part -> pieces in order, as `export` made them) as the whole content."""
        total = sum(piece.shape[-2] for piece in next(iter(pieces.values())))
        self.n = 0
        self.reserve(total + max(256, total // 4))  # room for the next turns without regrowing
        for part, parts in pieces.items():
            start = 0
            for piece in parts:
                end = start + piece.shape[-2]
                self._parts[part][0][..., start:end, :].copy_(piece)
                start = end
        self.n = total

    def held_bytes(self) -> int:
        return sum(buf[..., : self.n, :].numel() * buf.element_size() for buf in self._parts.values())


class EncodedLayer(DynamicLayer):
    """An attention layer that keeps keys and values in a `KVForm` (a float type, or quantized blocks) instead of
    as computed. Each token's rows are encoded as they arrive; every update returns the decoded keys and values
    of all the tokens held (the new ones included), made afresh and not kept, so the layer's memory is its encoded
    buffers. `keys`/`values` are views of the encoded buffers (their token count is what transformers reads of
    them). It never runs as a static step."""

    def __init__(self, form: KVForm):
        super().__init__()
        self.form = form
        self.rows: dict[str, EncodedRows] = {}  # 'keys', 'values' (and 'indexer_keys') -> its rows

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.rows = {"keys": EncodedRows(self.form.keys, key_states),
                     "values": EncodedRows(self.form.values, value_states)}
        self._expose()

    def _expose(self) -> None:
        self.keys, self.values = self.rows["keys"].view(), self.rows["values"].view()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.rows["keys"].append(key_states)
        self.rows["values"].append(value_states)
        self._expose()
        return self.rows["keys"].decoded(key_states.dtype), self.rows["values"].decoded(value_states.dtype)

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove <= 0, "crop takes minus the number of tokens to drop"
        if self.is_initialized and tokens_to_remove:
            for rows in self.rows.values():
                rows.cut(rows.n + tokens_to_remove)
            self._expose()

    def export(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """Tokens [start, end) as CPU copies of the encoded parts: 'keys.q', 'keys.scale', ... [kv_heads, n, w]
        (and 'indexer_keys.q' ... [n, w])."""
        return {f"{name}.{part}": piece for name, rows in self.rows.items()
                for part, piece in rows.export(start, end).items()}

    def fill_encoded(self, pieces: dict[str, list[torch.Tensor]], device: torch.device, compute: torch.dtype,
                     shapes: dict[str, tuple[int, ...]]) -> None:
        """Take restored parts ('keys.q' -> pieces, in order, as `export` made them) as the layer's content; the
        computed tensors are `shapes` per token ('keys' -> (kv_heads, width); 'indexer_keys' -> (width,)), in
        `compute`."""
        like = {name: torch.empty((1, *shape[:-1], 0, shape[-1]), dtype=compute, device=device)
                for name, shape in shapes.items()}
        self.lazy_initialization(like["keys"], like["values"])
        for name, rows in self._new_rows(like).items():
            rows.fill({key.split(".", 1)[1]: parts for key, parts in pieces.items() if key.split(".", 1)[0] == name})
        self._expose()

    def _new_rows(self, like: dict[str, torch.Tensor]) -> dict[str, EncodedRows]:
        return self.rows

    def held_bytes(self) -> int:
        """Bytes of the encoded keys and values of the tokens held."""
        return sum(rows.held_bytes() for rows in self.rows.values())

    def reset(self) -> None:
        super().reset()
        self.rows = {}


class EncodedIndexedLayer(EncodedLayer):
    """An `EncodedLayer` that also keeps a sparse-attention indexer's keys [1, n, width] (DeepSeek-V3.2), in the
    same form, as transformers' DynamicIndexedLayer does as computed."""

    def __init__(self, form: KVForm):
        super().__init__(form)
        self.indexer_keys: torch.Tensor | None = None
        self.indexer_position_ids: torch.Tensor | None = None  # (kvchat refuses a cache that sets them)
        self.is_indexer_initialized = False

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        if not self.is_indexer_initialized:
            self.rows["indexer_keys"] = EncodedRows(self.form.keys, indexer_key_states)
            self.is_indexer_initialized = True
        rows = self.rows["indexer_keys"]
        rows.append(indexer_key_states)
        self.indexer_keys = rows.view()
        return rows.decoded(indexer_key_states.dtype)

    def _expose(self) -> None:
        super()._expose()
        if self.is_indexer_initialized:
            self.indexer_keys = self.rows["indexer_keys"].view()

    def _new_rows(self, like: dict[str, torch.Tensor]) -> dict[str, EncodedRows]:
        if "indexer_keys" in like:
            self.rows["indexer_keys"] = EncodedRows(self.form.keys, like["indexer_keys"])
            self.is_indexer_initialized = True
        return self.rows

    def reset(self) -> None:
        super().reset()
        self.indexer_keys = self.indexer_position_ids = None
        self.is_indexer_initialized = False


class EncodedHybridLayer(LinearAttentionAndFullAttentionLayer):
    """Falcon-H1's layer (a recurrent state and attention in one) whose attention keeps its keys and values in a
    `KVForm`, in an `EncodedLayer` (`kv`); the state is kept as computed. `keys`/`values` mirror `kv`'s."""

    def __init__(self, form: KVForm, number_of_states: int = 1, **kwargs):
        super().__init__(number_of_states=number_of_states)
        self.form = form
        self.kv = EncodedLayer(form)

    def _mirror(self) -> None:
        self.keys, self.values, self.is_initialized = self.kv.keys, self.kv.values, self.kv.is_initialized

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        decoded = self.kv.update(key_states, value_states)
        self._mirror()
        return decoded

    def crop_attention(self, tokens_to_remove: int) -> None:
        """Drop the attention's last tokens (the state cannot be cut: it is restored from a snapshot)."""
        self.kv.crop(tokens_to_remove)
        self._mirror()

    def export(self, start: int, end: int) -> dict[str, torch.Tensor]:
        return self.kv.export(start, end)

    def fill_encoded(self, *args, **kwargs) -> None:
        self.kv.fill_encoded(*args, **kwargs)
        self._mirror()

    def held_bytes(self) -> int:
        return self.kv.held_bytes()

    def reset(self) -> None:
        super().reset()
        self.kv.reset()
        self._mirror()


# Layers whose per-token tensors are kept in a KV form (each has `form`, `export`, `fill_encoded`, `held_bytes`).
ENCODED = (EncodedLayer, EncodedHybridLayer)


class LayerKind:
    """What kvchat can do with one type of transformers cache layer, declared. This base is the kind of a type
    kvchat does not know, and answers no to everything: a cache holding one is never cut, snapshotted or saved."""

    known = False
    can_cut = False  # keeps every token's keys/values: cut back to any length, saved per token
    has_state = False  # keeps a fixed-size state: snapshotted at checkpoints and restored, never cut
    holds_nothing = False  # keeps nothing at all (a KV-sharing consumer, an MLP-only layer)
    not_state: frozenset[str] = frozenset()  # attributes its snapshot leaves to `can_cut`'s per-token handling

    def counts(self, layer: Any) -> list[int]:
        """The token counts the layer keeps (they must all equal the tokens the cache holds)."""
        return []

    def cut(self, layer: Any, n: int) -> None:
        """Keep the first `n` tokens of what the layer keeps per token (a kind that cannot cut keeps all)."""


class AttentionKind(LayerKind):
    """Keys/values per token (full attention, whole sliding windows, latent attention, indexer keys)."""

    known = can_cut = True

    def counts(self, layer: Any) -> list[int]:
        found = [int(DynamicLayer.get_seq_length(layer))]
        if getattr(layer, "is_indexer_initialized", False):
            found.append(layer.indexer_keys.shape[1])
        return found

    def cut(self, layer: Any, n: int) -> None:
        extra = DynamicLayer.get_seq_length(layer) - n
        if extra > 0:
            layer.crop(-extra)


class StateKind(LayerKind):
    """A conv/recurrent state (Mamba, linear attention, short convolutions) and the count of tokens it took in."""

    known = has_state = True

    def counts(self, layer: Any) -> list[int]:
        return [int(LinearAttentionLayer.get_seq_length(layer))]


class AttentionAndStateKind(AttentionKind):
    """Both in one layer (Falcon-H1): keys/values cut per token, the state snapshotted."""

    has_state = True
    not_state = frozenset({"keys", "values", "is_initialized"})

    def counts(self, layer: Any) -> list[int]:
        return super().counts(layer) + [int(LinearAttentionLayer.get_seq_length(layer))]

    def cut(self, layer: Any, n: int) -> None:
        extra = DynamicLayer.get_seq_length(layer) - n
        if extra > 0:
            DynamicLayer.crop(layer, -extra)  # (its own crop would cut the state too, which it cannot)


class EncodedAttentionAndStateKind(AttentionAndStateKind):
    """Falcon-H1's layer with its keys and values kept in a KV form (EncodedHybridLayer)."""

    not_state = AttentionAndStateKind.not_state | {"kv", "form"}

    def cut(self, layer: Any, n: int) -> None:
        extra = DynamicLayer.get_seq_length(layer) - n
        if extra > 0:
            layer.crop_attention(-extra)


class WindowKind(LayerKind):
    """transformers' window-only sliding layer (WINDOWS_ONLY): its last window-1 tokens and the count of all it
    took in, snapshotted like a state."""

    known = has_state = True

    def counts(self, layer: Any) -> list[int]:
        return [int(layer.get_seq_length())]


class EmptyKind(LayerKind):
    known = holds_nothing = True


UNKNOWN = LayerKind()
# What each layer type kvchat knows can do. Exact types only: a subclass may keep more state than its base.
_KINDS: dict[type, LayerKind] = {
    GrowableLayer: AttentionKind(),
    EncodedLayer: AttentionKind(),
    EncodedIndexedLayer: AttentionKind(),
    EncodedHybridLayer: EncodedAttentionAndStateKind(),
    DynamicLayer: AttentionKind(),
    DynamicIndexedLayer: AttentionKind(),  # sparse-attention indexer keys are cut and saved with the KV
    DynamicSlidingWindowLayer: WindowKind(),
    LinearAttentionLayer: StateKind(),
    LinearAttentionAndFullAttentionLayer: AttentionAndStateKind(),
    DummyLayer: EmptyKind(),
}

# Model types whose forward pass starts a multi-token chunk from a zero recurrent state (or pads its
# conv with zeros) instead of continuing the cached one: exact only when continued one token at a time.
_STEPWISE_MODEL_TYPES = frozenset({"mamba", "falcon_mamba", "jamba", "zamba"})


# How sliding-window layers are kept: every token (cut anywhere, saved per token, memory of full attention),
# or only the window (memory bounded by the window, snapshotted at checkpoints like recurrent state).
WINDOWS_FULL, WINDOWS_ONLY = "full", "window"


def kind(layer: Any) -> LayerKind:
    """What kvchat can do with `layer` (UNKNOWN, which can do nothing, for a type it does not know)."""
    return _KINDS.get(type(layer), UNKNOWN)


def _has_kv(layer: Any) -> bool:
    return kind(layer).can_cut


def _has_state(layer: Any) -> bool:
    return kind(layer).has_state


def new_cache(model: Any, windows: str = WINDOWS_FULL, form: KVForm = KVForm()) -> Cache:
    """An empty cache laid out for `model`: growable attention layers (keeping keys and values in `form`);
    sliding-window ones kept whole, or with `windows=WINDOWS_ONLY` transformers' own window-only layers."""
    assert windows in (WINDOWS_FULL, WINDOWS_ONLY), f"unknown windows mode {windows!r}"
    cache = DynamicCache(config=model.config)
    grow = (DynamicLayer, DynamicSlidingWindowLayer) if windows == WINDOWS_FULL else (DynamicLayer,)

    def mine(layer: Any) -> Any:
        if type(layer) in grow:
            return GrowableLayer() if form.exact else EncodedLayer(form)
        if form.exact:
            return layer
        if type(layer) is DynamicIndexedLayer:
            return EncodedIndexedLayer(form)
        if type(layer) is LinearAttentionAndFullAttentionLayer:
            return EncodedHybridLayer(form, number_of_states=layer.number_of_states)
        return layer

    if cache.layers:
        cache.layers = [mine(layer) for layer in cache.layers]
    else:  # no per-layer layout known: layers are created on first use
        cache.layer_class_to_replicate = GrowableLayer if form.exact else functools.partial(EncodedLayer, form)
    return cache


def form_refusal(cache: Cache, form: KVForm) -> str | None:
    """Why this cache cannot keep its keys and values in `form` (a layer that would keep them as computed), or
    None when it can."""
    if form.exact:
        return None
    for i, layer in enumerate(cache.layers):
        if (kind(layer).can_cut or not kind(layer).known) and not isinstance(layer, ENCODED):
            return f"layer {i} keeps its keys and values in a {type(layer).__name__}, which cannot keep them in " \
                   f"{form.name}"
    return None  # (a KV-sharing layer reads what its source layer's update returned: the decoded form)


def static_refusal(cache: Cache) -> str | None:
    """Why a one-token pass cannot run on this cache as a static step (`one_step`), or None when it can: every
    layer must be a growable attention layer holding the same tokens, all on one device."""
    devices, lengths = set(), set()
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, ENCODED):
            return f"its keys and values are kept in {layer.form.name}; the compiled step reads them as computed"
        if type(layer) is not GrowableLayer:
            return f"layer {i} keeps its cache in a {type(layer).__name__}"
        if not layer.is_initialized or layer._key_buf is None:
            return "the cache is empty"
        devices.add(layer._key_buf.device)
        lengths.add(layer._n)
    if not cache.layers:
        return "the cache has no layers yet"
    if len(devices) > 1:
        return "the cache is spread over several devices"
    assert len(lengths) == 1, f"attention layers hold different numbers of tokens: {sorted(lengths)}"
    return None


@contextmanager
def one_step(cache: Cache) -> Iterator[torch.Tensor]:
    """Hold the cache static for one one-token forward pass (see GrowableLayer); yields the new token's position
    [1, 1] (a tensor kept with the cache, so a compiled step sees the same tensor every time). When the block
    ends normally every layer holds one more token; when it raises, the cache is as it was."""
    assert static_refusal(cache) is None, f"one_step() on a cache it cannot take: {static_refusal(cache)}"
    n = cache.layers[0]._n
    device = cache.layers[0]._key_buf.device
    position = getattr(cache, "_kvchat_position", None)
    if position is None or position.device != device:
        position = torch.zeros((1, 1), dtype=torch.long, device=device)
        cache._kvchat_position, cache._kvchat_slot = position, position.view(1)
        _mark(position, dynamic=False)
    position.fill_(n)
    for layer in cache.layers:
        # (a slot to spare on the CPU: a view that ends before its buffer, every time, so that the compiled step
        # never sees a contiguous one and specializes on it)
        layer._reserve(layer._key_buf, layer._value_buf, n + 1 if device.type == "cuda" else n + 2)
        if device.type == "cuda":  # the whole buffers: fixed addresses and shapes for the CUDA graph
            layer._static_keys, layer._static_values = layer._key_buf, layer._value_buf
        else:  # up to the new token: attention over spare slots would cost as much as over tokens
            layer._static_keys = layer._key_buf.narrow(2, 0, n + 1)
            layer._static_values = layer._value_buf.narrow(2, 0, n + 1)
        _mark(layer._static_keys, dynamic=True)
        _mark(layer._static_values, dynamic=True)
        layer._position, layer.static = cache._kvchat_slot, True
    try:
        yield position
    finally:
        for layer in cache.layers:
            layer.static = False
            layer._static_keys = layer._static_values = None
    for layer in cache.layers:
        layer._n = n + 1
        layer._expose()


@dataclass(frozen=True)
class RowStore:
    """One side (keys or values) of a layer's cache, for a step that writes and reads its rows itself: the KV
    form's name ("auto": as computed), its block length, and each part's whole buffer [1, kv_heads, capacity,
    width of the part] (see `KVForm.stored_shapes`; "v" for values kept as a float type)."""

    form: str
    block: int
    parts: dict[str, torch.Tensor]


def direct_refusal(cache: Cache) -> str | None:
    """Why a step that writes the new token's rows itself (`direct_step`) cannot run on this cache, or None: its
    layers must all be growable attention layers, or all plain encoded ones, holding the same tokens, on the
    CPU."""
    if not cache.layers:
        return "the cache has no layers yet"
    kinds = {type(layer) for layer in cache.layers}
    if kinds == {GrowableLayer}:
        reason = static_refusal(cache)
        if reason is None and cache.layers[0]._key_buf.device.type != "cpu":
            return "the cache is not on the CPU"
        return reason
    if kinds != {EncodedLayer}:
        return f"its layers are kept in {', '.join(sorted(kind.__name__ for kind in kinds))}"
    if not all(layer.is_initialized and layer.rows for layer in cache.layers):
        return "the cache is empty"
    if any(rows.device.type != "cpu" for layer in cache.layers for rows in layer.rows.values()):
        return "the cache is not on the CPU"
    counts = {rows.n for layer in cache.layers for rows in layer.rows.values()}
    assert len(counts) == 1, f"attention layers hold different numbers of tokens: {sorted(counts)}"
    return None


@contextmanager
def direct_step(cache: Cache) -> Iterator[list[tuple[RowStore, RowStore]]]:
    """Room for one more token in every layer, and each layer's keys and values as `RowStore`s, for a step that
    writes the token's rows at slot n (the tokens held) and attends over slots 0..n. When the block ends
    normally every layer holds one more token; when it raises, the cache holds what it held."""
    assert direct_refusal(cache) is None, f"direct_step() on a cache it cannot take: {direct_refusal(cache)}"
    n = length(cache)
    stores = []
    for layer in cache.layers:
        if type(layer) is GrowableLayer:
            layer._reserve(layer._key_buf, layer._value_buf, n + 1)
            stores.append((RowStore("auto", 1, {"v": layer._key_buf}), RowStore("auto", 1, {"v": layer._value_buf})))
        else:
            sides = (layer.rows["keys"], layer.rows["values"])
            for rows in sides:
                rows.reserve(n + 1)
            stores.append(tuple(RowStore(rows.form.name, block_size(rows.width), dict(rows._parts)) for rows in sides))
    yield stores
    for layer in cache.layers:
        if type(layer) is GrowableLayer:
            layer._n = n + 1
        else:
            for rows in layer.rows.values():
                rows.n = n + 1
        layer._expose()


def _mark(tensor: torch.Tensor, dynamic: bool) -> None:
    """Tell torch.compile, once per tensor, that its length varies (one compiled step serves every capacity) and,
    on CUDA, that its address stays (CUDA graphs replay on the addresses they recorded)."""
    if getattr(tensor, "_kvchat_marked", False):
        return
    if dynamic:
        torch._dynamo.mark_dynamic(tensor, 2)
    if tensor.is_cuda:
        torch._dynamo.mark_static_address(tensor)
    tensor._kvchat_marked = True


def cache_kwarg(model: Any) -> str:
    """The name under which this transformers version's forward takes the cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def takes_positions(model: Any) -> bool:
    """Whether the model's forward takes `position_ids`."""
    return "position_ids" in inspect.signature(model.forward).parameters


def stepwise_continuation(model: Any) -> bool:
    """Whether tokens fed on top of a recurrent state must go one at a time to stay exact."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "model_type", None) in _STEPWISE_MODEL_TYPES


def unsupported(cache: Cache) -> str | None:
    """Why this cache cannot be cut, snapshotted or saved exactly, or None when every layer is known and holds
    nothing kvchat cannot copy."""
    for i, layer in enumerate(cache.layers):
        if not kind(layer).known:
            return f"layer {i} keeps its cache in a {type(layer).__name__}, which kvchat cannot cut or save exactly"
        if getattr(layer, "indexer_position_ids", None) is not None:
            return f"layer {i} keeps indexer positions, which kvchat cannot cut or save exactly"
        if _has_state(layer) and (unknown := _uncopyable(layer)) is not None:
            return f"layer {i} keeps {unknown}, which kvchat cannot snapshot or save exactly"
    return None


# A state layer's snapshot is everything the layer object holds (its attributes, asked of the layer itself, so that a
# counter added by a transformers upgrade is copied too), except these:
_PLACEMENT = frozenset({"device", "dtype"})  # where it lives: a restore sets them from where it puts the state
_MADE_WITH = frozenset({"number_of_states", "sliding_window"})  # from the model's config: the restored layer's own


def _state_attributes(layer: Any) -> list[tuple[str, Any]]:
    skip = _PLACEMENT | _MADE_WITH | kind(layer).not_state  # (and the per-token part of what it keeps)
    return [(name, value) for name, value in vars(layer).items() if name not in skip]


def _entries(name: str, value: Any) -> list[tuple[str, Any, Any]]:
    """(entry name, dict key or None, value) of one attribute: a dict by state index gives one entry per index."""
    if isinstance(value, dict):
        return [(f"{name}.{key}", key, item) for key, item in value.items()]
    return [(name, None, value)]


def _copyable(key: Any, value: Any) -> bool:
    """Tensors, counts and flags (or nothing), in dicts keyed by state index: what a snapshot copies exactly."""
    return (key is None or type(key) is int) and (value is None or isinstance(value, (torch.Tensor, bool, int)))


def _uncopyable(layer: Any) -> str | None:
    for name, value in _state_attributes(layer):
        for entry, key, item in _entries(name, value):
            if not _copyable(key, item):
                return f"'{entry}' (a {type(item).__name__})"
    return None


def state_items(layer: Any) -> list[tuple[str, torch.Tensor | int | bool]]:
    """Everything a state or window layer holds, as (name, value): each attribute ('cumulative_length_linear'),
    or entry of a dict by state index ('conv_states.0'). Empty (None) entries are left out."""
    return [(entry, item) for name, value in _state_attributes(layer) for entry, key, item in _entries(name, value)
            if item is not None and _copyable(key, item)]


def counts(cache: Cache) -> list[tuple[int, int]]:
    """Every token count the cache's layers keep, as (layer index, count)."""
    return [(i, count) for i, layer in enumerate(cache.layers) for count in kind(layer).counts(layer)]


def miscount(cache: Cache, n: int) -> str | None:
    """Why the cache cannot be taken to hold exactly `n` tokens: some layer, or the cache as transformers reads it
    (the positions and masks of the next forward pass come from `get_seq_length()`), counts another number.
    None when every count is `n`."""
    for i, count in counts(cache):
        if count != n:
            return f"layer {i} of the cache counts {count} tokens where {n} are held"
    if cache.layers and not kind(cache.layers[0]).holds_nothing and int(cache.get_seq_length()) != n:
        return f"the cache reports {int(cache.get_seq_length())} tokens where {n} are held"
    return None


def has_state(cache: Cache) -> bool:
    """Whether some layer holds a conv/recurrent state that cannot be cut back."""
    return any(_has_state(layer) for layer in cache.layers)


def length(cache: Cache) -> int:
    """Tokens the cache's layers have taken in (the most any layer counts; see `miscount` for whether they agree)."""
    return max((count for _, count in counts(cache)), default=0)


def truncate(cache: Cache, n: int) -> None:
    """Keep only the first `n` tokens of every attention layer (state and window layers are the caller's
    business: restored from a checkpoint)."""
    assert unsupported(cache) is None, "truncate() called on a cache with layers kvchat does not know"
    for layer in cache.layers:
        kind(layer).cut(layer, n)


def nbytes(cache: Cache) -> int:
    """Bytes held by all tensors of the cache: key/value (and indexer) tensors, states, windows and counters."""
    total = 0
    for layer in cache.layers:
        tensors = []
        if isinstance(layer, ENCODED):
            total += layer.held_bytes()
        elif _has_kv(layer):
            tensors = [getattr(layer, name, None) for name in ("keys", "values", "indexer_keys")]
        if _has_state(layer):
            tensors += [value for _, value in state_items(layer)]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def can_export(cache: Cache) -> bool:
    """Whether every layer's content can be saved and restored exactly."""
    return unsupported(cache) is None


def export(cache: Cache, start: int, end: int) -> dict[str, torch.Tensor]:
    """Tokens [start, end) of every attention layer as CPU tensors: 'L.keys'/'L.values' [kv_heads, n, dim] (or,
    kept in another KV form, each part of it: 'L.keys.q' ..., see `Layout.stored_pieces`), and 'L.indexer_keys'
    [n, dim] for sparse-attention layers. State layers are exported by `export_state`.

    What the cache holds is kept as it is (its dtype, its form), so a restore is bit-exact.
    """
    assert can_export(cache), "export() called on a cache that cannot be saved exactly"
    return _export_known(cache, start, end)


def _export_known(cache: Cache, start: int, end: int) -> dict[str, torch.Tensor]:
    """`export` of the layers whose kind is known (all of them, once `can_export` holds)."""
    tensors = {}
    for i, layer in enumerate(cache.layers):
        if not _has_kv(layer) or not layer.is_initialized or layer.keys.numel() == 0:
            continue
        assert layer.keys.shape[0] == 1, "kvchat caches hold one sequence"
        if isinstance(layer, ENCODED):
            tensors.update({f"{i}.{name}": piece for name, piece in layer.export(start, end).items()})
            continue
        # Copies, never views: the live buffers are rewritten by later cuts and updates.
        tensors[f"{i}.keys"] = layer.keys[0, :, start:end, :].to("cpu", copy=True).contiguous()
        tensors[f"{i}.values"] = layer.values[0, :, start:end, :].to("cpu", copy=True).contiguous()
        if isinstance(layer, DynamicIndexedLayer) and layer.is_indexer_initialized:
            tensors[f"{i}.indexer_keys"] = layer.indexer_keys[0, start:end, :].to("cpu", copy=True).contiguous()
    return tensors


def export_state(cache: Cache, device: torch.device | str | None = "cpu") -> dict[str, torch.Tensor | int | bool]:
    """A snapshot of every state and window layer: 'L.NAME' -> each of `state_items` (tensors copied, counts and
    flags as they are), e.g. '3.conv_states.0', '3.cumulative_length_linear', or a window-only layer's '2.keys'.

    `device=None` keeps each copy where it is (an in-memory snapshot); "cpu" is for saving.
    """
    snapshot: dict[str, torch.Tensor | int | bool] = {}
    for i, layer in enumerate(cache.layers):
        if _has_state(layer):
            for name, value in state_items(layer):
                snapshot[f"{i}.{name}"] = _copy(value, device)
    return snapshot


def _copy(value: Any, device: torch.device | str | None) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return (value.detach().clone() if device is None else value.detach().to(device, copy=True)).contiguous()


def import_state(cache: Cache, snapshot: dict[str, torch.Tensor | int | bool],
                 devices: list[torch.device] | None = None) -> None:
    """Make every state and window layer hold exactly what `snapshot` (from `export_state`) says, each layer on
    `devices[i]` when given (else where it is); the snapshot is copied and stays usable.

    What the layer holds and the snapshot does not is cleared, so the layer is as it was when snapshotted: its
    states, flags and token counts alike.
    """
    for i, layer in enumerate(cache.layers):
        if not _has_state(layer):
            continue
        mine = {name.split(".", 1)[1]: value for name, value in snapshot.items() if name.split(".", 1)[0] == str(i)}
        tensors = [value for value in mine.values() if isinstance(value, torch.Tensor)]
        target = (devices[i] if devices and i < len(devices) else None) or getattr(layer, "device", None) or \
            (tensors[0].device if tensors else None)
        for name, value in _state_attributes(layer):  # clear
            if isinstance(value, dict):
                value.update(dict.fromkeys(value))
            else:
                setattr(layer, name, None)
        for entry, value in mine.items():
            name, _, key = entry.partition(".")
            value = value.to(target, copy=True) if isinstance(value, torch.Tensor) else value
            if key:
                if not isinstance(getattr(layer, name, None), dict):
                    setattr(layer, name, {})
                getattr(layer, name)[int(key)] = value
            else:
                setattr(layer, name, value)
        if tensors:  # (a window layer gets its device when it takes its first tokens: it has taken them)
            layer.device = target
        floats = [t for t in tensors if t.is_floating_point()]
        if hasattr(layer, "dtype") and floats:
            layer.dtype = floats[0].dtype


@dataclass
class Layout:
    """The shapes one token adds to each attention layer, and the state each state layer keeps, for a model.

    Learnt from one forward pass of one token, so it holds for any architecture transformers runs
    (per-layer head sizes, latent attention, multi-query attention) without reading its config.
    """

    per_token: dict[str, tuple[int, ...]]  # 'L.keys' -> (kv_heads, dim): a stored piece is (kv_heads, n, dim)
    state: dict[str, tuple[int, ...]]  # 'L.conv_states.0' -> the state's full shape (() for a count or flag)
    state_dtypes: dict[str, torch.dtype]  # (a count is stored as int64, a flag as bool)
    windows: dict[str, tuple[int, int, int]]  # a window-only layer's 'L.keys' -> (kv_heads, dim, window)
    logits_shape: tuple[int, ...] = ()  # next-token logits [vocab], kept with a prompt's checkpoint
    logits_dtype: torch.dtype = torch.float32
    scalars: dict[str, type] = field(default_factory=dict)  # state entries a layer keeps as Python int or bool
    kv_dtype: torch.dtype = torch.float32  # what the per-token tensors are kept in
    kv_form: str = "auto"  # the `KVForm` a conversation's cache keeps them in (see kv_forms)

    def piece_shape(self, name: str, n: int) -> tuple[int, ...]:
        """The shape of `n` tokens of the per-token tensor `name` as exported."""
        dims = self.per_token[name]
        return (n, dims[0]) if name.endswith(".indexer_keys") else (dims[0], n, dims[1])

    def stored_pieces(self, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors `export` makes of `n` tokens, as (shape, dtype) by name: 'L.keys' and 'L.values' (and
        'L.indexer_keys') as computed, or in another KV form one tensor per part of it ('L.keys.q', 'L.keys.scale',
        ...)."""
        form, pieces = KVForm(self.kv_form), {}
        for name in self.per_token:
            shape = self.piece_shape(name, n)
            if form.exact:
                pieces[name] = (shape, self.kv_dtype)
                continue
            side = form.side(name.split(".", 1)[1])
            for part, (part_shape, dtype) in side.stored_shapes(shape).items():
                pieces[f"{name}.{part}"] = (part_shape, dtype or side.float_dtype(self.kv_dtype))
        return pieces

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """What one token costs in the cache's attention layers (indexer keys included), computed in `dtype` and
        kept in the layout's KV form."""
        form = KVForm(self.kv_form)
        return round(sum(form.side(name.split(".", 1)[1]).bytes_per_value(dtype, dims[-1]) *
                         int(torch.tensor(dims).prod()) for name, dims in self.per_token.items()))

    def value_bytes(self, dtype: torch.dtype) -> float:
        """What one key or value costs in the cache's KV form, computed in `dtype` (keys and values in two forms:
        their mean)."""
        width = next((dims[-1] for name, dims in self.per_token.items() if not name.endswith(".indexer_keys")), 32)
        return KVForm(self.kv_form).bytes_per_value(dtype, width)

    @property
    def has_state(self) -> bool:
        return bool(self.state or self.windows)

    def state_shapes(self, tokens: int) -> dict[str, tuple[int, ...]]:
        """The shapes of a snapshot taken after `tokens` tokens (window-only layers hold up to window-1 of them)."""
        shapes = dict(self.state)
        for name, (heads, dim, window) in self.windows.items():
            shapes[name] = (1, heads, min(tokens, window - 1), dim)
        return shapes

    def state_bytes(self, tokens: int | None = None) -> int:
        """Bytes of the tensors of a snapshot after `tokens` tokens (None: once every window is full)."""
        shapes = self.state_shapes(tokens if tokens is not None else 1 << 62)
        return sum(int(torch.tensor(shape).prod()) * torch.empty((), dtype=self.state_dtypes[name]).element_size()
                   for name, shape in shapes.items() if name not in self.scalars)

    def encode_state(self, snapshot: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A snapshot (`export_state`) as CPU tensors to save: counts and flags become 0-d tensors."""
        return {name: torch.tensor(value, dtype=self.state_dtypes[name]) if name in self.scalars else
                value.detach().to("cpu").contiguous() for name, value in snapshot.items()}

    def decode_state(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, Any]:
        """The snapshot `encode_state` saved (tensors copied to `device`, counts and flags as Python values)."""
        return {name: self.scalars[name](tensor.item()) if name in self.scalars else tensor.to(device, copy=True)
                for name, tensor in tensors.items()}


class Unsupported(Exception):
    """A model whose cache kvchat cannot keep exactly (the message says why)."""


@torch.inference_mode()
def one_token(model: Any, device: torch.device, windows: str = WINDOWS_FULL,
              form: KVForm = KVForm()) -> tuple[Cache, torch.Tensor]:
    """A fresh cache of `model` after one token (id 0) went through it, laid out as a conversation's is, and that
    token's next-token logits [vocab]."""
    cache = new_cache(model, windows, form)
    logits = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True,
                   logits_to_keep=1, **{cache_kwarg(model): cache}).logits[0, -1]
    return cache, logits


@torch.inference_mode()
def layout(model: Any, device: torch.device, windows: str = WINDOWS_FULL) -> Layout:
    """Run one token through a fresh cache and record what each layer keeps.

    Raises Unsupported for a model that will not take transformers' dynamic cache (it needs a cache class of
    its own), that keeps nothing in it, or that keeps its recurrent state somewhere else (on its modules).
    """
    try:
        cache, logits = one_token(model, device, windows)
    except (ValueError, TypeError, AttributeError, NotImplementedError) as exc:
        raise Unsupported(f"its forward pass does not take kvchat's cache ({type(exc).__name__}: {exc})") from None
    held = [layer for layer in cache.layers if (kind(layer).can_cut or type(kind(layer)) is WindowKind)
            and layer.is_initialized and layer.keys is not None and layer.keys.numel()]
    stateless = [i for i, layer in enumerate(cache.layers)
                 if isinstance(kind(layer), (StateKind, AttentionAndStateKind))
                 and not any(layer.has_previous_state.values())]
    if stateless:
        raise Unsupported(f"it keeps the recurrent state of layer {stateless[0]} outside its cache, where kvchat "
                          "cannot snapshot it")
    if not held and not has_state(cache):
        raise Unsupported("it keeps nothing in its cache (its forward pass ignores it)")
    per_token = {}
    for name, tensor in _export_known(cache, 0, 1).items():
        per_token[name] = tuple(tensor.shape[1:]) if name.endswith(".indexer_keys") else \
            (tensor.shape[0], tensor.shape[2])
    states = export_state(cache, device=None)
    window_dims = {}
    for name, value in states.items():
        layer = cache.layers[int(name.split(".")[0])]
        if type(kind(layer)) is WindowKind and name.split(".", 1)[1] in ("keys", "values"):  # [1, kv_heads, m, dim]
            window_dims[name] = (value.shape[1], value.shape[3], layer.sliding_window)
    scalars = {name: type(value) for name, value in states.items() if not isinstance(value, torch.Tensor)}
    exported = _export_known(cache, 0, 1)
    kv_dtype = next(iter(exported.values())).dtype if exported else logits.dtype
    return Layout(per_token=per_token, windows=window_dims, kv_dtype=kv_dtype,
                  state={k: tuple(getattr(v, "shape", ())) for k, v in states.items() if k not in window_dims},
                  state_dtypes={k: torch.bool if v is bool else torch.int64 for k, v in scalars.items()} |
                  {k: v.dtype for k, v in states.items() if k not in scalars},
                  logits_shape=tuple(logits.shape),
                  logits_dtype=logits.dtype, scalars=scalars)


def _layer_devices(model: Any, default: torch.device) -> list[torch.device]:
    """Where each decoder layer runs (they differ when accelerate spread the model over several GPUs)."""
    try:
        return [next(block.parameters()).device for block in model.get_decoder().layers]
    except (AttributeError, StopIteration, TypeError):
        return [default] * len(new_cache(model).layers)


def restore(model: Any, pieces: list[dict[str, torch.Tensor]], device: torch.device,
            state: dict[str, Any] | None = None, windows: str = WINDOWS_FULL, layout: Layout | None = None) -> Cache:
    """A cache for `model` holding the concatenation of exported `pieces` (in order) and the snapshot `state`
    (`export_state`), each layer on its device, keeping keys and values in the KV form of `layout` (when given).
    Each layer's pieces are copied once, straight into a buffer with room to grow. Whether the result holds what
    it should is the caller's to check (`miscount`).
    """
    form = KVForm(layout.kv_form) if layout is not None else KVForm()
    cache = new_cache(model, windows, form)
    devices = _layer_devices(model, device)
    pinned: list[torch.Tensor] = []  # page-locked staging of the copies to a GPU, kept until they are done
    for i, layer in enumerate(cache.layers):
        target = devices[i] if i < len(devices) else device
        if isinstance(layer, ENCODED) and pieces and any(name.startswith(f"{i}.keys.") for name in pieces[0]):
            mine = {name[len(f"{i}."):]: [piece[name] for piece in pieces] for name in pieces[0]
                    if name.split(".", 1)[0] == str(i)}
            shapes = {name.split(".", 1)[1]: dims for name, dims in layout.per_token.items()
                      if name.split(".", 1)[0] == str(i)}
            layer.fill_encoded(mine, target, layout.kv_dtype, shapes)
            continue
        if f"{i}.keys" not in (pieces[0] if pieces else {}):
            continue
        parts = {name: [piece[f"{i}.{name}"] for piece in pieces] for name in ("keys", "values")}  # [kv_heads, n, dim]
        if isinstance(layer, GrowableLayer):
            layer.fill(parts["keys"], parts["values"], target, pinned)
        else:
            keys, values = (torch.cat(parts[name], dim=1).unsqueeze(0).to(target) for name in ("keys", "values"))
            DynamicLayer.update(layer, keys, values) if type(layer) is LinearAttentionAndFullAttentionLayer \
                else layer.update(keys, values)
        if isinstance(layer, DynamicIndexedLayer) and f"{i}.indexer_keys" in pieces[0]:
            layer.update_indexer(torch.cat([p[f"{i}.indexer_keys"] for p in pieces], dim=0).unsqueeze(0).to(target))
    if state:
        import_state(cache, state, devices)
    for gpu in {target for target in [*devices, device] if target.type == "cuda"} if pinned else ():
        torch.cuda.synchronize(gpu)  # the asynchronous copies have read their staging buffers
    return cache
