"""The direct decode step: one token through a Llama-family model whose matrices are all packed, in one call into
kvchat's kernel library (`llama_step` in kernels/packed_matvec.c) instead of transformers' thousands of small tensor
operations a token.

It computes what transformers' LlamaForCausalLM computes for one token (RMS norms, rotary positions, grouped-query
attention over the cache, SiLU MLP, the packed output layer), with the packed kernel's products: the same numbers
up to the order of float32 sums. The same structure covers Mistral without a sliding window, Qwen2 (biases on the
query, key and value products) and Qwen3 (each query and key head RMS-normed before its rotation). It is offered
only for models it can prove it covers (`refusal`: the exact transformers classes, plain SiLU, only those biases,
full attention in every layer, a static rotary table, every matrix packed); any other model decodes through
transformers as before.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from kvchat.weights import quant


class _Family:
    """What the direct step accepts of one transformers family: its module and class-name prefix, whether the
    query, key and value products may carry biases, and whether its heads are RMS-normed (q_norm, k_norm)."""

    def __init__(self, module: str, prefix: str, qkv_bias: bool = False, head_norms: bool = False):
        self.module, self.prefix, self.qkv_bias, self.head_norms = module, prefix, qkv_bias, head_norms


# Model class name -> its family. Qwen3's biases follow its config's attention_bias, like Llama's (refused).
FAMILIES = {
    "LlamaForCausalLM": _Family("transformers.models.llama.modeling_llama", "Llama"),
    "MistralForCausalLM": _Family("transformers.models.mistral.modeling_mistral", "Mistral"),
    "Qwen2ForCausalLM": _Family("transformers.models.qwen2.modeling_qwen2", "Qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": _Family("transformers.models.qwen3.modeling_qwen3", "Qwen3", head_norms=True),
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # a rotary table that does not change with the length


class _Mat(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("form", ctypes.c_int64)]


class _Side(ctypes.Structure):
    _fields_ = [("form", ctypes.c_int64), ("block", ctypes.c_int64), ("capacity", ctypes.c_int64),
                ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("offset", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("q", _Mat), ("k", _Mat),
                ("v", _Mat), ("o", _Mat), ("gate", _Mat), ("up", _Mat), ("down", _Mat), ("keys", _Side),
                ("values", _Side), ("q_bias", ctypes.c_void_p), ("k_bias", ctypes.c_void_p),
                ("v_bias", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p)]


# The KV forms the C step keeps rows in (kernels/packed_matvec.c: FORM_*), with the dtypes of their parts.
FORMS = {"auto": (0, {"v": torch.float32}), "float32": (0, {"v": torch.float32}),
         "float16": (1, {"v": torch.float16}), "bfloat16": (2, {"v": torch.bfloat16}),
         "q8": (3, {"q": torch.int8, "scale": torch.float16}),
         "q4": (4, {"q": torch.uint8, "scale": torch.float16, "offset": torch.float16})}


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("eps", ctypes.c_float), ("scaling", ctypes.c_float), ("layer", ctypes.POINTER(_Layer)),
                ("final_norm", ctypes.c_void_p), ("head", _Mat)]


def _of(module: Any, family: _Family, name: str) -> bool:
    return type(module).__name__ == family.prefix + name and type(module).__module__ == family.module


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def refusal(model: Any) -> str | None:
    """Why the direct step cannot run `model` (a reason for people), or None when it can."""
    if quant.KERNEL.step is None and not (quant.KERNEL.build() and quant.KERNEL.step is not None):
        return f"no kernel ({quant.KERNEL.failure})"
    family = FAMILIES.get(type(model).__name__)
    if family is None or not _of(model, family, "ForCausalLM"):
        return f"only Llama, Mistral, Qwen2 and Qwen3 models ({type(model).__name__} is none of them)"
    config, inner = model.config, model.model
    if (getattr(config, "hidden_act", None) != "silu" or getattr(config, "attention_bias", False)
            or getattr(config, "mlp_bias", False) or getattr(config, "pretraining_tp", 1) > 1):
        return "the model's activation, biases or tensor-parallel split are not plain Llama's"
    if getattr(config, "sliding_window", None) is not None or any(
            getattr(layer.self_attn, "sliding_window", None) for layer in inner.layers) or any(
            kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "a layer attends over a sliding window"
    if getattr(inner.rotary_emb, "rope_type", None) not in ROPE_TYPES:
        return f"rotary positions of type {getattr(inner.rotary_emb, 'rope_type', None)!r}"
    if not isinstance(inner.embed_tokens, quant.PackedEmbedding) or type(model.lm_head) is not quant.PackedLinear:
        return "the embedding and output layers are not packed"
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if not (_of(layer, family, "DecoderLayer") and _of(attention, family, "Attention") and _of(mlp, family, "MLP")
                and _of(layer.input_layernorm, family, "RMSNorm")
                and _of(layer.post_attention_layernorm, family, "RMSNorm")):
            return f"a layer is not transformers' own {family.prefix} layer"
        linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
                   mlp.down_proj)
        if any(type(m) is not quant.PackedLinear for m in linears):
            return "a layer's matrices are not all packed"
        biased = [m.bias is not None for m in linears]
        if any(biased[3:]) or (any(biased[:3]) and not (family.qkv_bias and all(biased[:3]))):
            return "a layer's products carry biases the step does not add"
        norms = [getattr(attention, name, None) for name in ("q_norm", "k_norm")]
        if family.head_norms != all(norm is not None for norm in norms) or (
                family.head_norms and not all(_of(norm, family, "RMSNorm") for norm in norms)):
            return "a layer's query and key head norms are not its family's"
    heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    head_dim = _head_dim(config)
    if head_dim % 2 or head_dim > 512 or heads % kv_heads:
        return "an odd head size, one over 512, or query heads not a multiple of key/value heads"
    inter = inner.layers[0].mlp.gate_proj.out_features
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    for layer in inner.layers:
        found = {name: (m.in_features, m.out_features) for name, m in
                 [*layer.self_attn.named_children(), *layer.mlp.named_children()] if name in shapes}
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        head_norms = [getattr(layer.self_attn, name).weight for name in ("q_norm", "k_norm") if family.head_norms]
        biases = {name: getattr(layer.self_attn, name).bias for name in ("q_proj", "k_proj", "v_proj")}
        if (found != shapes or any(tuple(norm.shape) != (hidden,) for norm in norms)
                or any(tuple(norm.shape) != (head_dim,) for norm in head_norms)
                or any(bias is not None and tuple(bias.shape) != (shapes[name][1],) for name, bias in biases.items())):
            return "a layer's shapes are not those its config gives every layer"
    if len({layer.self_attn.scaling for layer in inner.layers}) != 1 or len(_epsilons(inner)) != 1:
        return "its layers differ in attention scaling or RMS-norm epsilon"
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return "float32 on the CPU only"
    return None


def _epsilons(inner: Any) -> set[float]:
    """The RMS-norm epsilons of every norm of the decoder (`inner`: the model's `model`)."""
    norms = [norm for layer in inner.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm,
                                                         getattr(layer.self_attn, "q_norm", None),
                                                         getattr(layer.self_attn, "k_norm", None)) if norm is not None]
    return {norm.variance_epsilon for norm in [*norms, inner.norm]}


class DirectStep:
    """Runs one token through the model (see the module's docstring) from the packings its layers hold (nothing
    copied); built once per engine."""

    def __init__(self, model: Any):
        reason = refusal(model)
        assert reason is None, f"a direct step for a model it cannot run: {reason}"
        config, inner = model.config, model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = _head_dim(config)
        self._embed, self._rotary = inner.embed_tokens, inner.rotary_emb
        self._keep: list[Any] = []  # every tensor the C structures point into (the model's own)
        layers = (_Layer * len(inner.layers))()
        for index, layer in enumerate(inner.layers):
            attention, mlp = layer.self_attn, layer.mlp
            layers[index].attn_norm = self._pointer(layer.input_layernorm.weight)
            layers[index].mlp_norm = self._pointer(layer.post_attention_layernorm.weight)
            for field, linear in (("q", attention.q_proj), ("k", attention.k_proj), ("v", attention.v_proj),
                                  ("o", attention.o_proj), ("gate", mlp.gate_proj), ("up", mlp.up_proj),
                                  ("down", mlp.down_proj)):
                setattr(layers[index], field, self._mat(linear))
                if field in ("q", "k", "v") and linear.bias is not None:
                    setattr(layers[index], f"{field}_bias", self._pointer(linear.bias))
            for field in ("q_norm", "k_norm"):
                if getattr(attention, field, None) is not None:
                    setattr(layers[index], field, self._pointer(getattr(attention, field).weight))
        self._layers = layers
        self._seen: list[tuple[Any, ...] | None] = [None] * (2 * len(layers))  # what each side points at
        self._model = _Model(layers=len(inner.layers), hidden=config.hidden_size, heads=self.heads,
                             kv_heads=self.kv_heads, head_dim=self.head_dim,
                             intermediate=inner.layers[0].mlp.gate_proj.out_features, eps=_epsilons(inner).pop(),
                             scaling=inner.layers[0].self_attn.scaling,
                             layer=ctypes.cast(layers, ctypes.POINTER(_Layer)),
                             final_norm=self._pointer(inner.norm.weight), head=self._mat(model.lm_head))
        self.vocab = model.lm_head.out_features
        self._ids = torch.zeros(1, dtype=torch.long)

    def _pointer(self, tensor: torch.Tensor) -> int:
        assert tensor.is_contiguous() and tensor.dtype == torch.float32, "a norm weight the step cannot read"
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _mat(self, linear: Any) -> _Mat:
        q, scale, offset = linear.q, linear.scale, linear.offset
        symmetric = quant.all_zero(offset)  # (Q8_0, Q6_K: offsets not given, not read)
        assert q.is_contiguous() and (quant.is_wide(q) or scale.is_contiguous()) \
            and (symmetric or offset.is_contiguous()), "a packing not contiguous"  # (16-bit floats: no scales read)
        self._keep += [q, scale, offset]
        return _Mat(q=q.data_ptr(), scale=scale.data_ptr(), offset=None if symmetric else offset.data_ptr(),
                    rows=q.shape[0], cols=quant.columns(q), form=quant.kernel_form(q, scale))

    def _side(self, side: Any, store: Any) -> None:
        """Point `side` at a layer's keys or values (a `layers.RowStore`), checked against what the C step reads."""
        code, dtypes = FORMS[store.form]
        parts = store.parts
        assert {name: t.dtype for name, t in parts.items()} == dtypes, f"parts of a {store.form} side: {parts.keys()}"
        capacity = parts[next(iter(dtypes))].shape[2]
        widths = {"v": self.head_dim, "q": self.head_dim if code == 3 else (self.head_dim + 1) // 2,
                  "scale": self.head_dim // store.block, "offset": self.head_dim // store.block}
        for name, tensor in parts.items():
            assert tuple(tensor.shape) == (1, self.kv_heads, capacity, widths[name]) and tensor.is_contiguous(), \
                f"a {store.form} part {name} of shape {tuple(tensor.shape)}"
        assert self.head_dim % store.block == 0, "a partial block"
        side.form, side.block, side.capacity = code, store.block, capacity
        side.data = parts["v" if "v" in parts else "q"].data_ptr()
        side.scale = parts["scale"].data_ptr() if "scale" in parts else None
        side.offset = parts["offset"].data_ptr() if "offset" in parts else None

    def __call__(self, token_id: int, n: int, stores: list[tuple[Any, Any]]) -> torch.Tensor:
        """The next-token logits [vocab] after `token_id` at position `n`. `stores` are each layer's keys and
        values (`layers.direct_step`): the token's rows are written at slot n, in the cache's KV form."""
        assert len(stores) == len(self._layers), "keys and values for every layer"
        for index, (layer, (keys, values)) in enumerate(zip(self._layers, stores)):
            for slot, side, store in ((2 * index, layer.keys, keys), (2 * index + 1, layer.values, values)):
                # The same buffers as last token (addresses and capacity; the form fixes the rest): already
                # checked and pointed at. New ones (the cache grew, another cache) are checked again.
                seen = (store.form, store.block, *(t.data_ptr() for t in store.parts.values()),
                        next(iter(store.parts.values())).shape[2])
                if self._seen[slot] != seen:
                    self._side(side, store)
                    self._seen[slot] = seen
                assert seen[-1] > n, "no room for the token"
        self._ids.fill_(token_id)
        x = self._embed(self._ids).reshape(-1).contiguous()
        # The rotary table at n, as transformers' rotary embedding computes it (a float32 product, cos and sin).
        freqs = self._rotary.inv_freq.float() * torch.tensor(float(n))
        angles = torch.cat((freqs, freqs))
        cos = (angles.cos() * self._rotary.attention_scaling).contiguous()
        sin = (angles.sin() * self._rotary.attention_scaling).contiguous()
        logits = torch.empty(self.vocab, dtype=torch.float32)
        failed = quant.KERNEL.step(ctypes.addressof(self._model), x.data_ptr(), n, cos.data_ptr(), sin.data_ptr(),
                                   logits.data_ptr(), torch.get_num_threads())
        if failed:
            raise MemoryError("the direct decode step could not allocate its scratch memory")
        return logits
