"""Weights kept as integer blocks for fast CPU decoding, computed in float32.

Decoding one token reads every weight once, so on a CPU its speed is the speed of reading the weights. Here
each linear layer (and the embedding) keeps its weight as integers with a scale and offset per block of 32
inputs (w = q * scale + offset), in one of these forms: int8 values with float32 scales and offsets (1.25 bytes
per weight instead of 4), or, where every value is 0..15, 4-bit values two to a byte with float16 scales and
offsets where every one is a float16, as a GGUF's Q4_1 and Q4_0 blocks are (0.625 bytes per weight, what
llama.cpp reads for Q4_1), else float32 ones, as Q4_K's (0.75). All stand for the same float32 weights, and the
kernel computes them in the same order, to the same bits. A weight made of GGUF's Q6_K blocks (a scale every 16
inputs) keeps its 6-bit values with the file's own scales, an int8 per 16 inputs and a float16 per 256 (0.82 bytes
per weight, as the file; `narrow6`), or, where the scales are not of that shape, int8 values with a float32 scale
and offset per 16 inputs (1.25). A bfloat16 or float16 model's weights
are kept as they are, 16-bit floats (`wide`: 2 bytes a weight instead of 4; each widens to float32 exactly, so
they are the same numbers as the float32 upcast). Activations, attention and the KV cache stay float32.

Models converted from a GGUF file (the default model among them) carry weights that were quantized in such
blocks (Q4_0, Q4_1, Q8_0): `pack` finds each block's scale and offset and checks that every weight comes back
bit for bit, so the model computes with exactly the weights of its float32 form. K-quant blocks (Q4_K, Q5_K,
Q6_K) are packed from the scales read from the file (see `kvchat.weights.kquants`), checked the same way. Blocks
that do not come back exactly are quantized (symmetric int8, the scale in float32); `Packing.exact` says whether
any were.

A token's products run through a small C kernel (kernels/packed_matvec.c, built when kvchat is installed,
with a portable path and, on x86-64, an AVX2 path that compute the same bits) that reads the packed weights and
computes in float32; a prompt's chunks dequantize the weight and use the float32 matrix product.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvchat.config import read_regular
from kvchat.errors import KvchatError, one_line

BLOCK = 32  # inputs per scale, as in GGUF's Q4_0/Q4_1/Q8_0

# (levels, asymmetric, shift): the block formats `pack` recognises, tried in order. Q4_1 is v = d*q + m with q in
# 0..15 and m the block's minimum; Q8_0 and Q4_0 are v = d*q with |q| at most 127 and 8. d and m are float16.
# A shift keeps a Q4_0 block as q + 8 (0..15) with the offset -8d (a float16 too, and every value the same
# number), so that it has the 4-bit form (see `narrow`).
FORMATS = ((15, True, 0), (127, False, 0), (8, False, 8))


Packed = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]  # weight key -> (q, scale, offset, missing)


@dataclass
class Packing:
    """What `pack_model` did to a model."""

    approximate: int = 0  # blocks quantized because no format reproduced them exactly
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def exact(self) -> bool:
        return self.approximate == 0


def pack(weight: torch.Tensor, allow_approximate: bool = True,
         hint: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Split `weight` [out, in] into q int8 [out, in], scale and offset float32 [out, in // BLOCK].

    Returns them and how many blocks were quantized rather than recovered. With `allow_approximate` False the
    count is returned without quantizing (q is then meaningless where it is non-zero). `hint` is a scale and
    offset [out, in // 32 or in // 16] that the weight's blocks may have been made with (a GGUF K-quant's, see
    `kvchat.weights.kquants`): when every value comes back from them bit for bit, they are the packing (in
    blocks of 16 inputs where they are)."""
    rows, cols = weight.shape
    assert cols % BLOCK == 0, f"a packed weight needs a multiple of {BLOCK} inputs, not {cols}"
    if hint is not None:
        found = _from_scales(weight, *hint)
        if found is not None:
            return (*found, 0)
    blocks = weight.detach().to(torch.float32).reshape(-1, BLOCK)  # [out * in/B, B]
    q = torch.zeros(blocks.shape, dtype=torch.int8)
    scale = torch.zeros(blocks.shape[0])
    offset = torch.zeros(blocks.shape[0])
    left = torch.arange(blocks.shape[0])  # blocks no format has reproduced yet
    for levels, asymmetric, shift in FORMATS:
        if not len(left):
            break
        part = blocks[left]
        base = part.amin(-1, keepdim=True) if asymmetric else torch.zeros(len(left), 1)
        spread = part.amax(-1, keepdim=True) - base if asymmetric else part.abs().amax(-1, keepdim=True)
        base = base.half().float()  # (Q4_1's m is a float16: a Q4_0 block whose minimum is none is left to Q4_0)
        if shift:  # (Q4_0's d is the value of largest magnitude over -8: negative where that value is positive)
            spread = -part.gather(-1, part.abs().argmax(-1, keepdim=True))
        step = (spread / levels).half().float()
        trial = torch.round((part - base) / torch.where(step == 0, 1.0, step)).clamp(-128, 127) + shift
        base = base - shift * step
        exact = ((trial * step + base) == part).all(-1) & ((trial >= -128) & (trial <= 127)).all(-1)
        hit = left[exact]
        q[hit], scale[hit], offset[hit] = trial[exact].to(torch.int8), step[exact, 0], base[exact, 0]
        left = left[~exact]
    if len(left) and allow_approximate:
        part = blocks[left]
        step = part.abs().amax(-1) / 127
        q[left] = torch.round(part / torch.where(step == 0, 1.0, step)[:, None]).clamp(-127, 127).to(torch.int8)
        scale[left], offset[left] = step, 0.0
    return q.reshape(rows, cols), scale.reshape(rows, -1), offset.reshape(rows, -1), len(left)


def _from_scales(weight: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The int8 values that give `weight` exactly from these scales and offsets (blocks of in // scale columns
    inputs, 32 or 16), with them; None where any value does not come back bit for bit."""
    rows, cols = weight.shape
    if scale.shape != offset.shape or scale.dim() != 2 or scale.shape[0] != rows or not scale.shape[1] \
            or cols % scale.shape[1] or cols // scale.shape[1] not in (BLOCK, 16):
        return None
    scale, offset = scale.to(torch.float32).contiguous(), offset.to(torch.float32).contiguous()
    blocks = weight.detach().to(torch.float32).reshape(rows, scale.shape[1], -1)
    step = torch.where(scale == 0, 1.0, scale)[..., None]
    trial = torch.round((blocks - offset[..., None]) / step).clamp(-128, 127)
    if not torch.equal(trial * scale[..., None] + offset[..., None], blocks):
        return None
    return trial.to(torch.int8).reshape(rows, cols), scale, offset


def narrow(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The 4-bit form of a packing of 32-input blocks from `pack`: q uint8 [out, in / 2] (byte j of a block
    holds value j in its low four bits and value j + 16 in its high four), scale and offset [out, in / BLOCK] as
    float16 where every one is a float16 (as GGUF's Q4_0 and Q4_1 blocks), else float32 (as Q4_K's); None when
    some value is outside 0..15, or the blocks are not of 32 inputs."""
    if q.dtype != torch.int8 or not len(q) or block_of(q, scale) != BLOCK or int(q.min()) < 0 or int(q.max()) > 15:
        return None
    scale16, offset16 = scale.half(), offset.half()
    if torch.equal(scale16.float(), scale) and torch.equal(offset16.float(), offset):
        scale, offset = scale16, offset16
    rows, cols = q.shape
    halves = q.reshape(rows, cols // BLOCK, 2, BLOCK // 2).to(torch.uint8)
    nibbles = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(rows, cols // 2)
    return nibbles, scale, offset


def narrowest(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A packing in its smallest form: 4-bit (see `narrow`), 6-bit (`narrow6`), or as it is."""
    smaller = narrow(q, scale, offset)
    if smaller is None:
        smaller = narrow6(q, scale, offset)
    return (q, scale, offset) if smaller is None else smaller


def narrow_all(packed: "Packed") -> bool:
    """Put every entry of `packed` in its smallest form (see `narrowest`), in place; whether any changed."""
    narrowed = False
    for key, (q, scale, offset, missing) in packed.items():
        smaller = narrowest(q, scale, offset)
        if smaller[0] is not q:
            packed[key], narrowed = (*smaller, missing), True
    return narrowed


WIDE = (torch.bfloat16, torch.float16)  # the 16-bit float weights kept as they are (see `wide`)


def wide(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A bfloat16 or float16 weight [out, in] (in a multiple of BLOCK) as a packing of its own: its values as
    they are (not copied), with scales of 1 and offsets of 0 as stand-ins that take no memory (the kernel reads
    neither)."""
    assert weight.dtype in WIDE and weight.dim() == 2 and weight.shape[1] % BLOCK == 0, \
        f"a {weight.dtype} weight of shape {tuple(weight.shape)} kept as it is"
    scale = torch.ones((), dtype=torch.float32).expand(weight.shape[0], weight.shape[1] // BLOCK)
    return weight, scale, zero_stand_in(scale), 0


def is_wide(q: torch.Tensor) -> bool:
    """Whether a packed weight's values are 16-bit floats kept as they are (see `wide`)."""
    return q.dtype in WIDE


def is_nibbles(q: torch.Tensor) -> bool:
    """Whether a packed weight's values are in the 4-bit form (see `narrow`)."""
    return q.dtype == torch.uint8 and q.dim() == 2


def is_six(q: torch.Tensor) -> bool:
    """Whether a packed weight's values are in the 6-bit form (see `narrow6`): [out, in / 16, 12 bytes]."""
    return q.dim() == 3


SUPER = 256  # inputs of a super-block of the 6-bit form: one float16 d (GGUF's Q6_K's)
SIX_SCALE_BYTES = 18  # a super-block's 16 int8 sub-scales and its float16 d, in the 6-bit form


def narrow6(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The 6-bit form of a packing of 16-input blocks without offsets (as GGUF's Q6_K): q uint8 [out, in / 16,
    12] (per block, bytes 0..7 hold value j + 32's low four bits in byte j's low half and value j + 8's in its
    high half, bytes 8..11 a little-endian word with value j's two high bits at bit 2j), scale uint8 [out,
    in / 256, 18] (per 256 inputs, 16 int8 sub-scales and a float16 d: a block's scale is d * sub-scale, exact),
    and a zero stand-in for the offsets. None when some value is outside -32..31, the inputs are no multiple of
    256, an offset is not zero, or the scales of some 256 inputs are not one float16 times integers of int8."""
    if q.dtype != torch.int8 or q.dim() != 2 or not len(q) or block_of(q, scale) != 16 or not all_zero(offset):
        return None
    rows, cols = q.shape
    if cols % SUPER or int(q.min()) < -32 or int(q.max()) > 31:
        return None
    scales = scale.to(torch.float32).reshape(rows, cols // SUPER, 16)
    largest = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))  # [rows, supers, 1]
    d = torch.zeros_like(largest)
    left = ~(scales == 0).all(-1, keepdim=True)  # (a super-block of zero scales: d = 0)
    # The sub-scale of largest magnitude is -128 in llama.cpp's quantizer (d = 1 / (-128 / max)); others tried too.
    for k in (-128, 127, -127, *[sign * n for n in range(126, 0, -1) for sign in (1, -1)]):
        if not bool(left.any()):
            break
        trial = (largest / k).half().float()
        ints = torch.round(scales / torch.where(trial == 0, 1.0, trial))
        good = left & (trial != 0) & ((ints * trial == scales) & (ints >= -128) & (ints <= 127)).all(-1, keepdim=True)
        d = torch.where(good, trial, d)
        left = left & ~good
    if bool(left.any()):
        return None
    sub = torch.round(scales / torch.where(d == 0, 1.0, d)).to(torch.int8)
    values = (q + 32).view(torch.uint8).reshape(rows, cols // 16, 16)  # (0..63: no int8 overflow)
    low = (values[..., :8] & 15) | ((values[..., 8:] & 15) << 4)
    pairs = (values >> 4).reshape(rows, cols // 16, 4, 4)  # byte m of the word: values 4m..4m+3's high pairs
    high = pairs[..., 0] | (pairs[..., 1] << 2) | (pairs[..., 2] << 4) | (pairs[..., 3] << 6)
    six = torch.cat([low, high], dim=-1).contiguous()
    packed_scales = torch.cat([sub.view(torch.uint8), d.half().view(torch.uint8)], dim=-1).contiguous()
    return six, packed_scales, zero_stand_in(packed_scales)


def widen6(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 values [out, in] and float32 scales [out, in / 16] of a packing in the 6-bit form (`narrow6`)."""
    rows, blocks = q.shape[0], q.shape[1]
    low = torch.cat([q[..., :8] & 15, q[..., :8] >> 4], dim=-1).to(torch.int16)  # [rows, blocks, 16]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    high = ((q[..., 8:].to(torch.int16)[..., None] >> shifts) & 3).reshape(rows, blocks, 16)
    values = ((low | (high << 4)) - 32).to(torch.int8).reshape(rows, blocks * 16)
    sub = scale[..., :16].contiguous().view(torch.int8).to(torch.float32)
    d = scale[..., 16:].contiguous().view(torch.float16).to(torch.float32)
    return values, (d * sub).reshape(rows, blocks)


def no_offset(offset: torch.Tensor | None) -> bool:
    """Whether a packing's offsets are all zero and kept as a stand-in that takes no memory (see `zero_stand_in`);
    the kernel is then given none."""
    return offset is None or (offset.dim() >= 2 and not any(offset.stride()))


def all_zero(offset: torch.Tensor) -> bool:
    """Whether every offset of a packing is zero (symmetric blocks: Q8_0, Q6_K), kept as a stand-in or not."""
    return no_offset(offset) or not bool(offset.any())


def zero_stand_in(scale: torch.Tensor) -> torch.Tensor:
    """Offsets that are all zero for a packing with these scales, as a stand-in of no memory (one zero, expanded)."""
    return torch.zeros((), dtype=scale.dtype).expand(scale.shape)


def zero_offsets(offset: torch.Tensor) -> torch.Tensor:
    """`offset` as a stand-in (see `zero_stand_in`) when every offset is zero, else as it is."""
    return zero_stand_in(offset) if all_zero(offset) else offset


def columns(q: torch.Tensor) -> int:
    """The inputs of a packed weight whose values are `q` (any form)."""
    return q.shape[1] * 16 if is_six(q) else q.shape[1] * 2 if is_nibbles(q) else q.shape[1]


def kernel_form(q: torch.Tensor, scale: torch.Tensor) -> int:
    """The number the kernel knows a packed weight's form by (MAT_* in kernels/packed_matvec.c, and the index of
    its functions in `Kernel.forms`): 0 int8, 1 4-bit with float16 scales, 2 4-bit with float32 scales, 3 int8 in
    blocks of 16 inputs, 4 bfloat16, 5 float16, 6 6-bit in blocks of 16."""
    if is_six(q):
        return 6
    if is_wide(q):
        return 4 if q.dtype == torch.bfloat16 else 5
    if is_nibbles(q):
        return 1 if scale.dtype == torch.float16 else 2
    return 0 if block_of(q, scale) == BLOCK else 3


def block_of(q: torch.Tensor, scale: torch.Tensor) -> int:
    """The inputs a scale of a packed weight covers: BLOCK, or 16 (GGUF's K-quants Q6_K, Q3_K and Q2_K)."""
    return 16 if is_six(q) else columns(q) // scale.shape[1]


def unpack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] that `pack` (or `narrow`, or `wide`) split."""
    if is_wide(q):
        return q.to(torch.float32)  # (exact; its scales are 1 and its offsets 0)
    if is_six(q):
        q, scale = widen6(q, scale)
        offset = zero_stand_in(scale)
    if is_nibbles(q):
        rows = q.shape[0]
        bytes_ = q.reshape(rows, -1, 1, BLOCK // 2)
        q = torch.cat([bytes_ & 15, bytes_ >> 4], dim=2).to(torch.int8).reshape(rows, -1)
    rows, cols = q.shape
    blocks = q.reshape(rows, scale.shape[1], cols // scale.shape[1]).to(torch.float32)
    return (blocks * scale.float()[..., None] + offset.float()[..., None]).reshape(rows, cols)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """What `unpack` computes, in one pass through the kernel when it is built."""
    return KERNEL.weight(q, scale, offset) if KERNEL.expand is not None else unpack(q, scale, offset)


KERNEL_SOURCES = ("packed_matvec.c", "module.c")  # what setup.py builds the library from, in its digest's order
PATHS = ("avx2", "scalar")  # the kernel's code paths, the one to prefer first; every one computes the same bits


class Kernel:
    """The kernel library (kernels/packed_matvec.c), built when kvchat was installed (setup.py) and kept beside
    this module: the one-token product, unpacking, and the direct decode step, in the code path this CPU runs.
    `build` loads it, or says why it cannot be used (installed without a C compiler, built from other sources,
    a path this library or CPU lacks). Nothing is compiled, or loaded from anywhere else, at run time."""

    SOURCES = Path(__file__).with_name("kernels")

    def __init__(self, directory: Path | None = None, path: str | None = None) -> None:
        self.directory = directory if directory is not None else Path(__file__).parent
        self.wanted = path  # a code path to use (tests); None: the best this CPU runs
        self.path: str | None = None  # the path in use, once built
        self.function: Any = None  # packed_matvec
        self.expand: Any = None  # packed_unpack
        self.forms: list[tuple[Any, Any]] = []  # (product, unpacking) of each form, by `kernel_form`
        self.step: Any = None  # llama_step (see kvchat.weights.direct)
        self.failure: str | None = None
        self._library: Any = None

    def build(self) -> bool:
        """Load the kernel in its path and check it on small weights; False with `failure` set when it cannot be
        used. (The name stays from when it was compiled here: nothing is built now.)"""
        if self.function is not None or self.failure is not None:
            return self.function is not None
        try:
            self._library = library = self._load()
            available = library.kvchat_kernel_paths().decode().split()
            runs = {"scalar"} | ({"avx2"} if library.kvchat_kernel_avx2() else set())
            if self.wanted is not None:
                if self.wanted not in available or self.wanted not in runs:
                    raise KvchatError(f"the kernel's {self.wanted} path is not "
                                      + ("in this build" if self.wanted not in available else "run by this CPU"))
                self.path = self.wanted
            else:
                self.path = next(path for path in PATHS if path in available and path in runs)
            self._bind(self.path)
            self._check()
        except (OSError, AttributeError, KvchatError) as exc:
            self.function = self.expand = self.step = None
            self.forms = []
            self.path = None
            self.failure = one_line(exc, 200)
        return self.function is not None

    def describe(self) -> str:
        """One line for `kvchat info`: the path in use and those built, or why there is no kernel."""
        if not self.build():
            return f"kernel: none, weights stay float32 ({self.failure})"
        built = self._library.kvchat_kernel_paths().decode()
        return f"kernel: the {self.path} path (built at install with: {built}; every path computes the same bits)"

    def _load(self) -> Any:
        """The built library beside this module, checked to come from this kvchat's kernel sources."""
        candidates = [self.directory / f"_kernel{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
        found = [path for path in candidates if os.path.lexists(path)]
        if not found:
            raise KvchatError("kvchat was installed without its C kernel (no working C compiler at install); "
                              "reinstall it where gcc or clang runs")
        library_path = found[0]
        if not stat.S_ISREG(os.lstat(library_path).st_mode):
            raise KvchatError(f"the kernel library {library_path.name} is not a regular file")
        library = ctypes.CDLL(str(library_path))
        for name in ("kvchat_kernel_paths", "kvchat_kernel_source"):
            getattr(library, name).restype = ctypes.c_char_p
            getattr(library, name).argtypes = []
        library.kvchat_kernel_avx2.restype, library.kvchat_kernel_avx2.argtypes = ctypes.c_int, []
        digest = hashlib.sha256()
        for name in KERNEL_SOURCES:
            source = read_regular(self.SOURCES / name)
            if source is None:
                raise KvchatError(f"kvchat's kernel source {name} is missing; reinstall kvchat")
            digest.update(source)
        if library.kvchat_kernel_source().decode() != digest.hexdigest():
            raise KvchatError("the kernel library was built from other sources than this kvchat's; "
                              "reinstall kvchat (pip install -e . in a checkout)")
        return library

    def _bind(self, path: str) -> None:
        product = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        expansion = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_void_p, ctypes.c_int]
        self.forms = []
        for name in ("packed", "packed4", "packed4f", "packed16", "wide_bf16", "wide_f16", "packed6"):  # (by form)
            functions = []
            for kind, argtypes in (("matvec", product), ("unpack", expansion)):
                function = getattr(self._library, f"{name}_{kind}_{path}")
                function.argtypes, function.restype = argtypes, None
                functions.append(function)
            self.forms.append((functions[0], functions[1]))
        self.function, self.expand = self.forms[0]
        self.step = getattr(self._library, f"llama_step_{path}")
        self.step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int]
        self.step.restype = ctypes.c_int

    def _check(self) -> None:
        """Raise KvchatError unless the path computes what `unpack` says, in every form, and to the same bits in
        the forms of 32-input blocks (weights of Q4_1-like blocks: values 0..15, float16 scales and offsets; of
        Q4_K-like ones: float32 scales; and of 16-input blocks, as Q6_K's)."""
        generator = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (40, 3 * BLOCK), dtype=torch.int8, generator=generator)
        x = torch.randn(2, 3 * BLOCK, generator=generator)
        for rounding in (torch.float16, torch.float32):
            scale = (torch.rand(40, 3, generator=generator) * 0.01).to(rounding).float()
            offset = (torch.randn(40, 3, generator=generator) * 0.05).to(rounding).float()
            nibbles = narrow(q, scale, offset)
            assert nibbles is not None and nibbles[1].dtype == rounding, "the check's weight has no 4-bit form"
            product = self(x, q, scale, offset)
            if not torch.allclose(product, x @ unpack(q, scale, offset).T, rtol=1e-4, atol=1e-4):
                raise KvchatError(f"the kernel's {self.path} path computes wrong products")
            if not torch.equal(self(x, *nibbles), product):
                raise KvchatError(f"the kernel's {self.path} path computes 4-bit products unlike int8 ones")
            if not (torch.equal(self.weight(q, scale, offset), unpack(q, scale, offset))
                    and torch.equal(self.weight(*nibbles), unpack(q, scale, offset))):
                raise KvchatError(f"the kernel's {self.path} path unpacks wrong weights")
        q16 = torch.randint(-32, 32, (40, 3 * BLOCK), dtype=torch.int8, generator=generator)
        scale16 = torch.rand(40, 6, generator=generator) * 0.01
        offset16 = torch.randn(40, 6, generator=generator) * 0.05
        for offsets in (offset16, torch.zeros_like(offset16)):
            if not (torch.allclose(self(x, q16, scale16, offsets), x @ unpack(q16, scale16, offsets).T,
                                   rtol=1e-4, atol=1e-4)
                    and torch.equal(self.weight(q16, scale16, offsets), unpack(q16, scale16, offsets))):
                raise KvchatError(f"the kernel's {self.path} path computes wrong products of 16-input blocks")
        q6 = torch.randint(-32, 32, (3, 2 * SUPER), dtype=torch.int8, generator=generator)
        d6 = (torch.rand(3, 2, 1, generator=generator) * 0.002).half().float()
        scale6 = (d6 * torch.randint(-128, 128, (3, 2, 16), generator=generator).float()).reshape(3, 32)
        six = narrow6(q6, scale6, torch.zeros_like(scale6))
        x6 = torch.randn(2, 2 * SUPER, generator=generator)
        if six is None or not (torch.equal(self(x6, *six), self(x6, q6, scale6, None))
                               and torch.equal(self.weight(*six), unpack(q6, scale6, torch.zeros_like(scale6)))):
            raise KvchatError(f"the kernel's {self.path} path computes wrong products of 6-bit weights")
        ones = torch.ones(40, 3)
        for kind in WIDE:  # small integers: 16-bit floats computed as int8 values with scales of 1, to the bit
            values = q16.to(kind)
            if not (torch.equal(self(x, *wide(values)[:3]), self(x, q16, ones, None))
                    and torch.equal(self.weight(*wide(values)[:3]), values.float())):
                raise KvchatError(f"the kernel's {self.path} path computes wrong products of {kind} weights")

    def __call__(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None) -> torch.Tensor:
        """x [vectors, in] float32 times the packed weight (any form): [vectors, out]. `offset` None or a
        stand-in (see `no_offset`): every offset is zero (the kernel then never reads them)."""
        assert self.function is not None, "the kernel is used before it is built"
        x = x.contiguous()
        rows, cols = q.shape[0], columns(q)
        y = x.new_empty((x.shape[0], rows))
        block_sums = x.new_empty((x.shape[0], scale.shape[1]))
        function = self.forms[kernel_form(q, scale)][0]
        function(x.data_ptr(), x.shape[0], q.data_ptr(), scale.data_ptr(),
                 None if no_offset(offset) else offset.data_ptr(), rows, cols, block_sums.data_ptr(), y.data_ptr(),
                 torch.get_num_threads())
        return y

    def weight(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The float32 weight [out, in] of a packed one (either form), in one pass over it (what `unpack`
        computes)."""
        assert self.expand is not None, "the kernel is used before it is built"
        rows, cols = q.shape[0], columns(q)
        weight = torch.empty((rows, cols), dtype=torch.float32)
        expand = self.forms[kernel_form(q, scale)][1]
        expand(q.data_ptr(), scale.data_ptr(), None if no_offset(offset) else offset.data_ptr(), rows, cols,
               weight.data_ptr(), torch.get_num_threads())
        return weight


KERNEL = Kernel()
DECODE_ROWS = 4  # inputs of at most this many rows use the kernel; longer ones a dequantized matrix product


@torch.library.custom_op("kvchat::packed_matvec", mutates_args=())
def packed_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The kernel's product as one opaque operator, so that a compiled step calls it as it is (eager code calls
    KERNEL directly: an operator's dispatch costs more than the small products it would wrap)."""
    return KERNEL(x, q, scale, offset)


@packed_matvec.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))


class _Packed(nn.Module):
    """A layer whose weight [out, in] is kept packed (see `pack`) as buffers q, scale and offset."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", zero_offsets(offset))  # (all zero: kept as a stand-in, never read)

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight (transformers reads `.weight` of input and output layers, for dtype and device)."""
        return dequantize(self.q, self.scale, self.offset)


class PackedLinear(_Packed):
    """An nn.Linear whose weight is kept packed."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(q, scale, offset)
        self.in_features, self.out_features = columns(q), q.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= DECODE_ROWS and KERNEL.function is not None:
            product = packed_matvec if torch.compiler.is_compiling() else KERNEL
            y = product(rows.to(torch.float32), self.q, self.scale, self.offset)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = nn.functional.linear(rows.to(torch.float32), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class PackedEmbedding(_Packed):
    """An nn.Embedding whose table is kept packed; looked-up rows are dequantized."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, padding_idx: int | None):
        super().__init__(q, scale, offset)
        self.num_embeddings, self.embedding_dim = q.shape[0], columns(q)
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [...] -> [..., dim]
        flat = ids.reshape(-1)
        rows = unpack(self.q[flat], self.scale[flat], self.offset[flat])
        return rows.reshape(*ids.shape, self.embedding_dim)


def pack_model(model: nn.Module, allow_approximate: bool = True, stored: Path | None = None,
               keep: bool = True) -> Packing:
    """Replace the model's float32 nn.Linear and nn.Embedding layers (exact classes only: subclasses may scale
    or reshape) by packed ones, in place. A weight shared by two layers (tied embeddings) is packed once.

    With `allow_approximate` False nothing is replaced unless every block comes back exactly; the returned
    `Packing` then tells how many did not. `stored` is a file that keeps the packed weights between runs
    (packing reads every weight several times: seconds for a 135M model): read when it matches the model's
    layers, else (with `keep`) written."""
    packing = Packing()
    plan, aliases = _plan(model)
    weights = {key: child.weight for _, _, child, key in plan}
    if not allow_approximate:  # a model whose weights are no block format fails on its first rows: cheaply
        for key, weight in weights.items():
            missing = pack(weight[:PROBE_ROWS], allow_approximate=False)[3]
            if missing:
                packing.approximate = missing  # (of the probed rows of `key`)
                return packing
    packed = _read_stored(stored, weights, aliases) if stored else None
    write = packed is None
    if packed is None:
        packed = {key: pack(weight, allow_approximate) for key, weight in weights.items()}
    if narrow_all(packed):
        write = True  # (a packing kept before kvchat had the 4-bit form is kept again in it)
    if stored and keep and write and (allow_approximate or not any(entry[3] for entry in packed.values())):
        write_packing(stored, packed)
    for key, weight in weights.items():
        q, scale, offset, missing = packed[key]
        packing.approximate += missing
        packing.bytes_before += weight.numel() * 4
        packing.bytes_after += q.nbytes + scale.nbytes + (0 if all_zero(offset) else offset.nbytes)
    if not allow_approximate and not packing.exact:
        return packing
    _replace(plan, packed)
    return packing


Plan = list[tuple[nn.Module, str, nn.Module, str]]  # (parent, attribute, layer, key of its weight)


def _plan(model: nn.Module) -> tuple[Plan, dict[str, list[str]]]:
    """The model's layers that can be packed (exact nn.Linear and nn.Embedding classes: subclasses may scale or
    reshape; float32 on the CPU, rows a whole number of blocks), and every layer name each weight's key goes by
    (a tied weight has two)."""
    plan: Plan = []
    keys: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    # Depth first, as a state dict is ordered: a tied weight is keyed by the name save_pretrained keeps
    # ('model.embed_tokens', not 'lm_head'), which is what a packed model's own file holds.
    for full_name, child in model.named_modules(remove_duplicate=False):
        if type(child) not in (nn.Linear, nn.Embedding) or not full_name:
            continue
        weight = child.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.shape[1] % BLOCK:
            continue  # left as it is
        parent_name, _, name = full_name.rpartition(".")
        key = keys.setdefault(id(weight), full_name)
        aliases.setdefault(key, []).append(full_name)
        plan.append((model.get_submodule(parent_name), name, child, key))
    return plan, aliases


def _replace(plan: Plan, packed: Packed) -> None:
    for parent, name, child, key in plan:
        q, scale, offset, _ = packed[key]
        if isinstance(child, nn.Linear):
            setattr(parent, name, PackedLinear(q, scale, offset, child.bias))
        else:
            setattr(parent, name, PackedEmbedding(q, scale, offset, child.padding_idx))


def install(model: nn.Module, packed: Packed) -> set[str]:
    """Put packings read from the model's own weights file (`read_packing`: they are its weights, nothing to
    check against) in place of the layers whose weights they are, in place; those layers' own weights are never
    read (they may be placeholders). Returns the packed keys that no layer took: the caller gives those weights
    their float32 values."""
    plan, aliases = _plan(model)
    found = {key: next((name for name in aliases[key] if name in packed), None) for _, _, _, key in plan}
    _replace([entry for entry in plan if found[entry[3]]],  # (a layer the file does not pack keeps its weight)
             {key: packed[name] for key, name in found.items() if name})
    return set(packed) - set(found.values())


PROBE_ROWS = 64  # rows of each weight tried before packing any, when only exact packings are wanted


def read_packing(path: Path) -> tuple[Packed, dict[str, torch.Tensor]]:
    """The packings kept in `path` by `write_packing`, and the other tensors kept with them. Raises OSError,
    ValueError, KeyError, TypeError or SafetensorError on a file that is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would block the open forever, a link lead elsewhere
        raise ValueError(f"{path.name} is not a regular file")
    with safe_open(str(path), "pt") as handle:
        missing = json.loads((handle.metadata() or {})["missing"])
    tensors = load_file(str(path))
    packed = {}
    for key in missing:
        q, scale = tensors.pop(f"{key}.q"), tensors.pop(f"{key}.scale")
        offset = tensors.pop(f"{key}.offset", None)  # (not kept when all zero: see `write_packing`)
        packed[key] = q, scale, zero_stand_in(scale) if offset is None else offset, int(missing[key])
    for key, (q, scale, offset, _) in packed.items():
        if q.dim() not in (2, 3) or scale.dim() != q.dim() \
                or not _well_formed(q, scale, offset, q.shape[0], columns(q)):
            raise ValueError(f"the packing of {key} is of no form kvchat writes")
    return packed, tensors


def _well_formed(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, rows: int, cols: int) -> bool:
    """Whether a packing has one of the forms `pack` and `narrow` make, for a weight of `rows` x `cols`."""
    if cols % BLOCK:
        return False
    forms = [(torch.int8, torch.float32, torch.float32, (rows, cols), (rows, cols // size), (rows, cols // size))
             for size in (BLOCK, 16)]
    forms += [(torch.uint8, kind, kind, (rows, cols // 2), (rows, cols // BLOCK), (rows, cols // BLOCK))
              for kind in (torch.float16, torch.float32)]
    if cols % SUPER == 0:
        supers = (rows, cols // SUPER, SIX_SCALE_BYTES)
        forms.append((torch.uint8, torch.uint8, torch.uint8, (rows, cols // 16, 12), supers, supers))
    return (q.dtype, scale.dtype, offset.dtype, tuple(q.shape), tuple(scale.shape), tuple(offset.shape)) in forms


def write_packing(path: Path, packed: Packed, others: dict[str, torch.Tensor] | None = None) -> bool:
    """Keep `packed` (and `others`, tensors kept as they are) in `path`, atomically; False when it could not
    be written."""
    from safetensors.torch import save_file

    tensors = dict(others or {})
    for key, (q, scale, offset, _) in packed.items():
        tensors.update({f"{key}.q": q, f"{key}.scale": scale})
        if not all_zero(offset):  # (offsets all zero are not kept: `read_packing` makes them)
            tensors[f"{key}.offset"] = offset
    metadata = {"missing": json.dumps({key: entry[3] for key, entry in packed.items()})}
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(staging), metadata=metadata)
        os.replace(staging, path)
    except OSError:
        staging.unlink(missing_ok=True)
        return False
    return True


def _read_stored(path: Path, weights: dict[str, torch.Tensor],
                 aliases: dict[str, list[str]] | None = None) -> Packed | None:
    """The packed weights kept in `path` (each under its key or another name it goes by, in `aliases`), when it
    holds exactly these weights' packings; None otherwise."""
    from safetensors import SafetensorError

    try:
        kept, _ = read_packing(path)
        packed = {key: kept[next(name for name in (aliases or {}).get(key, [key]) if name in kept)] for key in weights}
    except (OSError, ValueError, KeyError, TypeError, StopIteration, SafetensorError):
        return None
    for key, weight in weights.items():
        q, scale, offset, missing = packed[key]
        if not _well_formed(q, scale, offset, *weight.shape):
            return None
        if not _matches(weight, q, scale, offset, missing):
            return None
    return packed


def _matches(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, missing: int) -> bool:
    """Whether a stored packing is this weight's: bit for bit when it was exact, else within half a step
    (a damaged file, or one of other weights with the same shapes, must not change the model's numbers)."""
    restored = dequantize(q, scale, offset)
    if missing == 0:
        return torch.equal(restored, weight.detach())
    bound = scale.float().abs().repeat_interleave(block_of(q, scale), dim=1) * 0.5 + 1e-6 * weight.detach().abs()
    return bool(((restored - weight.detach()).abs() <= bound).all())


def forms(model: nn.Module) -> str:
    """The forms the model's packed weights are kept in, for people: 'int8', '4-bit', '4-bit and int8',
    'bfloat16'."""
    kept = {str(m.q.dtype).replace("torch.", "") if is_wide(m.q) else "4-bit" if is_nibbles(m.q) else
            "6-bit" if is_six(m.q) else "int8" for m in model.modules() if isinstance(m, _Packed)}
    return " and ".join(form for form in ("bfloat16", "float16", "4-bit", "6-bit", "int8") if form in kept)


def is_packed(model: nn.Module) -> bool:
    """Whether `pack_model` replaced any of the model's layers."""
    return any(isinstance(m, _Packed) for m in model.modules())
