"""One KV file on disk: safetensors whose metadata carries a CRC32 of the tensor bytes and what the file holds.

Also the helpers every store write goes through: atomic replacement and chunk keys.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import secrets
import stat
import struct
import zlib
from pathlib import Path

from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMAT = 1
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",  # names in torch
           "I64": "int64", "BOOL": "bool",  # (a recurrent state's token counts and flags)
           "I8": "int8", "U8": "uint8"}  # (keys and values in q8 and q4 blocks)


class DamagedKV(Exception):
    """A KV file that cannot be used (missing, truncated, corrupted, foreign); handled by rebuilding from text.

    `path` is the file at fault when one is (a later save writes it again), else None."""

    def __init__(self, reason: str, path: Path | None = None):
        super().__init__(reason)
        self.path = path


class NotRegular(OSError):
    """A store path that is a symlink, FIFO, directory or device: never followed, read or written."""


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A file descriptor for `path`, opened without following a symlink or blocking on a FIFO; raises NotRegular
    unless it is a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise NotRegular(exc.errno, f"{path.name} is not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, f"{path.name} is not a regular file")
    return fd


def is_regular(path: Path) -> bool:
    """Whether `path` is a regular file itself (a link to one is not)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_bytes(path: Path) -> bytes:
    """The whole of a regular file (see `open_regular`)."""
    with os.fdopen(open_regular(path), "rb") as handle:
        return handle.read()


def atomic_write(path: Path, data: bytes) -> int:
    """Write `data` to `path` so that a crash leaves either the old or the new file; returns bytes written.

    The temporary file has an unpredictable name and is created exclusively, never through a planted link.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:  # named after the file it was to become, not the temporary
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    except BaseException:  # a full disk, an interrupt: the partial file must not eat what space is left
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(data)


def _ids_bytes(ids: list[int]) -> bytes:
    return array("q", ids).tobytes()  # int64 in native byte order


class ChunkKeys:
    """Keys for every chunk boundary of a token sequence, from one running hash."""

    def __init__(self, fingerprint: str):
        self._hash = hashlib.sha256(f"kvchat/{FORMAT}/{fingerprint}".encode())
        self._fed = 0

    def advance(self, ids: list[int], end: int) -> str:
        """Key of ids[:end]; `end` never decreases between calls."""
        assert end >= self._fed, "chunk boundaries must be visited in order"
        self._hash.update(_ids_bytes(ids[self._fed:end]))
        self._fed = end
        return self._hash.copy().hexdigest()[:40]


def chunk_key(fingerprint: str, ids: list[int]) -> str:
    """Key of the KV of exactly these token ids under this model."""
    return ChunkKeys(fingerprint).advance(ids, len(ids))


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes whose metadata adds the CRC32 of the tensor data (serialized twice to learn it)."""
    from safetensors.torch import save as st_save

    meta = dict(meta, format=str(FORMAT))
    plain = st_save(tensors, metadata=meta)
    header_len = struct.unpack("<Q", plain[:8])[0]
    meta["crc32"] = str(zlib.crc32(plain[8 + header_len:]))
    return st_save(tensors, metadata=meta)


def read(path: Path, expect: dict[str, str], shapes: dict[str, tuple[int, ...]],
         dtype: torch.dtype | dict[str, torch.dtype], optional: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Map and check one KV file: checksum, `expect`ed metadata, and exactly the tensors named in `shapes`,
    each of its shape and dtype (one for all, or one per name; those named in `optional` may be absent). Its tensors are views of the mapping (no copy).
    Raises DamagedKV with the reason.
    """
    import torch

    try:
        with os.fdopen(open_regular(path), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise DamagedKV(f"{path.name} is {'empty' if not size else 'truncated'}", path)
            # Copy-on-write private mapping: writable for torch.frombuffer, never written back.
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise DamagedKV(f"{path.name} is missing", path) from None
    except OSError as exc:  # not a regular file, unreadable
        raise DamagedKV(f"{path.name} cannot be read ({exc.strerror or exc})", path) from None
    data = memoryview(mapped)
    header_len = struct.unpack("<Q", data[:8])[0]
    if 8 + header_len > len(data):
        raise DamagedKV(f"{path.name} is truncated", path)
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
        meta = header.pop("__metadata__", {})
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
        raise DamagedKV(f"{path.name} has a corrupt header", path) from None
    if not isinstance(header, dict) or not isinstance(meta, dict):
        raise DamagedKV(f"{path.name} has a corrupt header", path)
    body = 8 + header_len
    if meta.get("crc32") != str(zlib.crc32(data[body:])):
        raise DamagedKV(f"{path.name} fails its checksum (truncated or corrupted)", path)
    if meta.get("format") != str(FORMAT) or meta.get("fingerprint") != expect.get("fingerprint"):
        raise DamagedKV(f"{path.name} was made by another model or format", path)
    if any(meta.get(name) != value for name, value in expect.items()):
        raise DamagedKV(f"{path.name} does not hold the tokens its manifest lists", path)
    if not set(shapes) - optional <= set(header) <= set(shapes):
        raise DamagedKV(f"{path.name} does not hold the tensors this model keeps", path)
    tensors = {}
    for name, shape in shapes.items():
        if name not in header:
            continue
        entry, want = header[name], dtype if isinstance(dtype, torch.dtype) else dtype[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or \
                tuple(entry["shape"]) != tuple(shape):
            raise DamagedKV(f"{path.name} has wrong shapes for this model", path)
        name_of_dtype = entry.get("dtype")
        if not isinstance(name_of_dtype, str) or getattr(torch, _DTYPES.get(name_of_dtype, ""), None) != want:
            raise DamagedKV(f"{path.name} holds {entry.get('dtype')}, the model runs in {want}", path)
        count = 1
        for dim in shape:
            count *= dim
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise DamagedKV(f"{path.name} has a corrupt header", path)
        begin, end = offsets
        if end - begin != count * want.itemsize or body + end > len(data):
            raise DamagedKV(f"{path.name} has tensor offsets that do not fit", path)
        tensors[name] = torch.frombuffer(mapped, dtype=want, count=count, offset=body + begin).view(shape) \
            if count else torch.empty(shape, dtype=want)
    return tensors
