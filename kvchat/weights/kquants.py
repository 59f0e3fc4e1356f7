"""The block scales and offsets of a GGUF file's K-quant weights, for packing them exactly.

GGUF's K-quants keep a weight in super-blocks of 256 inputs whose sub-blocks each have a scale (and for Q4_K
and Q5_K an offset) made of integers times a float16: Q4_K and Q5_K have sub-blocks of 32 inputs with
w = (d * sc) * q - (dmin * m), Q6_K sub-blocks of 16 with w = (d * sc) * q. Each product d * sc and dmin * m is
exact in float32, so each sub-block is a packing `quant.pack` knows (int8 values, a float32 scale and offset a
block; 16-input blocks for Q6_K), but one it cannot find from the values alone. This module reads the scales and
offsets from the file's blocks and finds, for each row of the converted model's float32 weights, the file's row
it came from (by the row's float32 bytes: a conversion may reorder rows, as transformers does with Llama's
query and key heads, but does not change them). `quant.pack` then checks every value comes back bit for bit;
a row found wrongly, or a weight of any other type, is simply not packed from these.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

Scales = tuple[np.ndarray, np.ndarray]  # scale and offset float32 [rows, blocks]


def _halves(raw: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each super-block, as float32 [super-blocks, 1]."""
    return raw[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's 8 six-bit scales and mins of each super-block, from its 12 bytes [n, 12]."""
    d, m, m_d = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales, mins


def block_scales(type_name: str, raw: np.ndarray) -> Scales | None:
    """The scale and offset of every sub-block of super-blocks `raw` [n, bytes] of GGUF type `type_name`,
    [n, sub-blocks], computed as GGUF's dequantization does; None for a type not read here."""
    if type_name in ("Q4_K", "Q5_K"):
        sc, m = _scales_and_mins(raw[:, 4:16])
        scale = _halves(raw, 0) * sc.astype(np.float32)
        offset = -(_halves(raw, 2) * m.astype(np.float32))
        return scale, offset
    if type_name == "Q6_K":
        sc = raw[:, 192:208].copy().view(np.int8).astype(np.float32)
        scale = _halves(raw, 208) * sc
        return scale, np.zeros_like(scale)
    return None


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


class RowIndex:
    """Every row of a GGUF file's K-quant weights, by the digest of its float32 values: its scales and offsets."""

    def __init__(self) -> None:
        self.tables: list[Scales] = []  # per weight: scale and offset [rows, blocks]
        self.rows: dict[bytes, tuple[int, int]] = {}  # digest -> (table, row)

    @classmethod
    def of(cls, gguf: Path) -> "RowIndex":
        from gguf import GGUFReader, dequantize

        index = cls()
        for tensor in GGUFReader(str(gguf)).tensors:
            size = block_size(tensor.tensor_type.name)
            raw = np.asarray(tensor.data)
            if not size or raw.dtype != np.uint8 or raw.ndim < 2 or raw.shape[-1] % size:
                continue
            raw = raw.reshape(-1, raw.shape[-1])  # [rows, bytes of a row]
            rows = raw.shape[0]
            found = block_scales(tensor.tensor_type.name, raw.reshape(-1, size))
            assert found is not None, f"no scales read from a {tensor.tensor_type.name} weight"
            scale, offset = (part.reshape(rows, -1) for part in found)
            values = dequantize(raw, tensor.tensor_type).reshape(rows, -1)
            table = len(index.tables)
            index.tables.append((scale, offset))
            for r in range(rows):
                index.rows.setdefault(_digest(values[r]), (table, r))
        return index

    def hint(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The scales and offsets [rows, blocks] of `weight`'s rows, when every row is one of the file's and all
        have blocks of one size; else None."""
        values = weight.detach().to(torch.float32).numpy()
        found = [self.rows.get(_digest(row)) for row in values]
        if not found or any(entry is None for entry in found):
            return None
        widths = {self.tables[t][0].shape[1] for t, _ in found}  # type: ignore[misc]
        if len(widths) != 1:
            return None
        scale = np.stack([self.tables[t][0][r] for t, r in found])  # type: ignore[misc]
        offset = np.stack([self.tables[t][1][r] for t, r in found])  # type: ignore[misc]
        return torch.from_numpy(scale), torch.from_numpy(offset)


def block_size(type_name: str) -> int:
    """Bytes of a super-block of 256 inputs of a type read here; 0 for others."""
    return {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}.get(type_name, 0)
