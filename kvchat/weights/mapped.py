"""Safetensors files mapped into memory: their tensors as views of the file's pages, read from disk as they are
first used and never copied (what llama.cpp does with its GGUF files), so that a model of 16-bit weights takes
its file's size in memory, and starts without reading all of it.

A mapping is private: nothing kvchat does writes to the file. A file that another program truncates or rewrites
in place while it is mapped changes (or, truncated, ends) the process, as it does llama.cpp's; model files are
not written in place by the tools that make them (Hugging Face's cache keeps each file once, by its digest).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import torch

# The safetensors dtypes kvchat maps, with their torch types.
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
HEADER_LIMIT = 100 << 20  # the largest header read (safetensors' own limit)


class NotMappable(ValueError):
    """A file kvchat does not map (damaged, or of a kind it leaves to transformers' loader): the reason."""


def header(path: Path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int]], int]:
    """Each tensor of a safetensors file by name: (dtype, shape, byte offset in the file), and the file's size;
    every entry checked to lie inside the file and to have its shape's size. Raises NotMappable."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise NotMappable(f"{path.name} is not a regular file")
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                raise NotMappable(f"{path.name} is too short for a safetensors file")
            length = int.from_bytes(size_bytes, "little")
            if length > min(HEADER_LIMIT, info.st_size - 8):
                raise NotMappable(f"{path.name} has a header of {length} bytes")
            entries = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise exc if isinstance(exc, NotMappable) else NotMappable(f"{path.name}: {exc}") from None
    if not isinstance(entries, dict):
        raise NotMappable(f"{path.name}'s header is not a table of tensors")
    start, data = 8 + length, info.st_size - 8 - length
    found = {}
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise NotMappable(f"{path.name}: tensor {name!r} is of a kind kvchat does not map") from None
        if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)) or not begin <= end <= data:
            raise NotMappable(f"{path.name}: tensor {name!r} lies outside the file")
        count = 1
        for n in shape:
            count *= n
        if end - begin != count * dtype.itemsize or (start + begin) % dtype.itemsize:
            raise NotMappable(f"{path.name}: tensor {name!r} has {end - begin} bytes for its shape, or is unaligned")
        found[name] = dtype, tuple(shape), start + begin
    return found, info.st_size


def map_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as a view of the file mapped privately into memory (nothing read
    yet). Raises NotMappable."""
    if sys.byteorder != "little":
        raise NotMappable("safetensors files are little-endian; this machine is not")
    entries, size = header(path)
    if not entries:
        return {}
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    except RuntimeError as exc:  # (changed since its header was read)
        raise NotMappable(f"{path.name} cannot be mapped: {exc}") from None
    return {name: torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)  # (contiguous)
            for name, (dtype, shape, offset) in entries.items()}
