"""The forms a cache keeps keys and values in: as computed ("auto"), in a float type, or quantized in blocks.

Every token's row is encoded on its own as it enters the cache, and attention always reads the decoded form of
every token, those of the running pass included. So with one form a reply is the same whether the cache was
reused, cut, or built in one pass: the exactness kvchat promises holds per form (not across forms).

- float32, bfloat16, float16: the values rounded to that type; read back in the compute type.
- q8: int8 values in blocks along the head dimension, one float16 scale per block (absmax / 127), as llama.cpp's
  q8_0; 1.0625 bytes a value with 32-value blocks.
- q4: 4-bit values (two a byte) in blocks, a float16 scale and a float16 offset (the block's minimum) per block;
  0.625 bytes a value with 32-value blocks.

Keys and values may take different forms: "KEYS/VALUES" names the pair ("q8/q4": keys in q8, values in q4; keys
carry more of a reply's precision than values do). A sparse-attention indexer's keys take the keys' form.

A row whose width is not a multiple of 32 takes the largest of 16, 8, 4, 2 that divides it (tiny test models),
and a width with none of them one block per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NAMES = ("auto", "float32", "bfloat16", "float16", "q8", "q4")
QUANTIZED = ("q8", "q4")
BLOCK = 32


def block_size(width: int) -> int:
    """The block length for rows of `width` values."""
    return next((b for b in (BLOCK, 16, 8, 4, 2) if width % b == 0), width)


def _sides(name: str) -> tuple[str, str]:
    keys, _, values = name.partition("/")
    return keys, values or keys


@dataclass(frozen=True)
class KVForm:
    """The form of the cache's keys and values (see the module docstring): `name` is one of NAMES, or
    "KEYS/VALUES", two different ones. The methods that encode and measure rows are a single form's (`keys`,
    `values` and `side` give each side's)."""

    name: str = "auto"

    def __post_init__(self) -> None:
        keys, values = _sides(self.name)
        assert keys in NAMES and values in NAMES, f"unknown KV form {self.name!r}"
        assert self.single or keys != values, f"a pair of equal KV forms is named once: {keys!r}"

    @property
    def single(self) -> bool:
        """Whether keys and values take the same form."""
        return "/" not in self.name

    @property
    def keys(self) -> "KVForm":
        return KVForm(_sides(self.name)[0])

    @property
    def values(self) -> "KVForm":
        return KVForm(_sides(self.name)[1])

    def side(self, tensor: str) -> "KVForm":
        """The form of a layer's per-token tensor `tensor`: 'values', or 'keys' and 'indexer_keys' (keys')."""
        return self.values if tensor == "values" else self.keys

    @property
    def quantized(self) -> bool:
        return any(side in QUANTIZED for side in _sides(self.name))

    @property
    def exact(self) -> bool:
        """Whether the form keeps the computed values as they are (`auto`)."""
        return self.name == "auto"

    def float_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The type a float form keeps values in (the compute type for `auto`)."""
        assert self.single, "a pair of KV forms has one float type a side"
        return compute if self.name == "auto" or self.quantized else getattr(torch, self.name)

    def bytes_per_value(self, compute: torch.dtype, width: int = BLOCK) -> float:
        """What one value of a row of `width` costs in memory and on disk (a pair: the mean of a key's and a
        value's)."""
        if not self.single:
            return (self.keys.bytes_per_value(compute, width) + self.values.bytes_per_value(compute, width)) / 2
        block = block_size(width)
        if self.name == "q8":
            return 1 + 2 / block
        if self.name == "q4":
            return 0.5 + 4 / block
        return torch.empty((), dtype=self.float_dtype(compute)).element_size()

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """The tensors a form keeps for rows of `shape` (..., width): name -> (shape, dtype; None: the float
        type)."""
        assert self.single, "a pair of KV forms keeps tensors a side"
        *lead, width = shape
        blocks = width // block_size(width)
        if self.name == "q8":
            return {"q": ((*lead, width), torch.int8), "scale": ((*lead, blocks), torch.float16)}
        if self.name == "q4":
            return {"q": ((*lead, (width + 1) // 2), torch.uint8), "scale": ((*lead, blocks), torch.float16),
                    "offset": ((*lead, blocks), torch.float16)}
        return {"v": ((*lead, width), None)}

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """`rows` (..., width) in the form's tensors (see `stored_shapes`), each row on its own. (Few tensor
        operations: at decode this runs for every layer on one token, where each operation's overhead counts.)"""
        assert self.single, "a pair of KV forms encodes a side at a time"
        if not self.quantized:
            return {"v": rows.to(self.float_dtype(rows.dtype))}
        width = rows.shape[-1]
        block = block_size(width)
        blocks = rows.float().reshape(*rows.shape[:-1], width // block, block)  # (rows may be a strided view)
        if self.name == "q8":
            scale = blocks.abs().amax(-1, keepdim=True).div_(127)
            q = blocks.div(scale.clamp_min(1e-30)).round_().to(torch.int8)  # |q| <= 127: the absmax row is 127
            return {"q": q.reshape(rows.shape), "scale": scale.squeeze(-1).half()}
        low, high = blocks.aminmax(dim=-1, keepdim=True)
        scale = high.sub_(low).div_(15)
        q = blocks.sub(low).div_(scale.clamp_min(1e-30)).round_().clamp_(0, 15).to(torch.uint8).reshape(rows.shape)
        if width % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        return {"q": q[..., 0::2] | (q[..., 1::2] << 4), "scale": scale.squeeze(-1).half(),
                "offset": low.squeeze(-1).half()}

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype, width: int) -> torch.Tensor:
        """The rows `encode` made (or slices of them along the rows), as `dtype` (..., width)."""
        if not self.quantized:
            return stored["v"].to(dtype)
        block = block_size(width)
        lead = stored["scale"].shape[:-1]
        scale = stored["scale"].unsqueeze(-1)
        if self.name == "q8":
            values = stored["q"].to(torch.float32).view(*lead, width // block, block).mul_(scale)
            return values.view(*lead, width).to(dtype)
        packed = stored["q"]
        q = torch.stack((packed & 15, packed >> 4), dim=-1).view(*lead, -1)[..., :width]
        values = q.to(torch.float32).view(*lead, width // block, block).mul_(scale).add_(stored["offset"].unsqueeze(-1))
        return values.view(*lead, width).to(dtype)


def parse(name: str) -> KVForm:
    """The form named `name` (one of NAMES, or "KEYS/VALUES"; a pair of equal forms is that form); ValueError
    naming the choices for any other."""
    keys, values = _sides(name)
    if keys not in NAMES or values not in NAMES or name.count("/") > 1:
        raise ValueError(f"unknown KV form {name!r}: choose one of {', '.join(NAMES)}, or KEYS/VALUES (e.g. q8/q4)")
    return KVForm(keys if keys == values else f"{keys}/{values}")
