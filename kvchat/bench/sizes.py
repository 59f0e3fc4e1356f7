"""Models of real sizes for kvchat bench --sizes: random weights in the published shapes of models people run on
CPUs, written as GGUF files the way users get them (float16, then llama.cpp's own quantizer for each block type),
so that kvchat and llama.cpp can be measured side by side on the same files without downloading anything.

The tokenizer is the default model's (its GGUF metadata), with reserved tokens added up to the shape's
vocabulary size (as normal tokens: tens of thousands of special ones would make the tokenizer slow to load),
so the embedding and output layers have their published sizes. Weights are drawn from a seeded
normal distribution (norm weights are ones): the same seed gives the same file. Nothing here prints.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kvchat.bench.common import Progress


@dataclass(frozen=True)
class Shape:
    """A Llama-family model's published shape (what the GGUF's `llama.*` metadata says)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_base: float = 500000.0
    eps: float = 1e-5

    @property
    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.vocab * self.hidden + self.layers * (attention + 3 * self.hidden * self.intermediate)


# Llama-3.2-1B's and -3B's shapes (tied embeddings); what fits a test: a shape small enough to build in a second.
SHAPES = {"llama-3.2-1b": Shape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256),
          "llama-3.2-3b": Shape("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256),
          "tiny": Shape("tiny", 256, 512, 2, 4, 2, 49152 + 64)}

# The block types measured, as llama.cpp's quantizer names them (its LLAMA_FTYPE_MOSTLY_* numbers). BF16 is also
# written as a bfloat16 safetensors model (`safetensors_model`): what kvchat loads for that row.
FILE_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q6_K": 18, "BF16": 32}


# Bytes of a 256-input super-block of the K-quant types `random_blocks` makes.
SUPER_BLOCK = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random super-blocks of a K-quant type (raw bytes [rows, bytes of a row]) for a weight [rows, cols]:
    random values and sub-block scales, float16 super-block scales that keep weights about 0.1 in size."""
    assert cols % 256 == 0, "K-quant weights have a multiple of 256 inputs"
    raw = rng.integers(0, 256, (rows * cols // 256, SUPER_BLOCK[type_name]), dtype=np.uint8)
    if type_name == "Q6_K":
        raw[:, 208:210] = rng.uniform(0.5e-4, 1.5e-4, (len(raw), 1)).astype(np.float16).view(np.uint8)
    else:
        raw[:, 0:2] = rng.uniform(2e-4, 8e-4, (len(raw), 1)).astype(np.float16).view(np.uint8)
        raw[:, 2:4] = rng.uniform(0.5e-3, 2e-3, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_tokens() -> list[str]:
    """The 256 byte tokens of a GPT-2 style byte-level vocabulary (each byte as the character it is written as)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_random_gguf(path: Path, shape: Shape, tokenizer_from: Path | None, seed: int = 0,
                      block_types: dict[str, str] | None = None) -> Path:
    """Write a GGUF of `shape` with random weights and `tokenizer_from`'s tokenizer to `path` (None: a byte-level
    tokenizer with ChatML's tokens and template, quick to read): float16 weights, or where `block_types` names a
    K-quant type for a weight (by the end of its GGUF name, as "attn_v", or "*" for every one), random blocks of
    that type."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    source = GGUFReader(str(tokenizer_from)) if tokenizer_from is not None else None
    rng = np.random.default_rng(seed)
    staging = path.with_name(f".{path.name}.partial")
    writer = GGUFWriter(str(staging), "llama")
    writer.add_name(f"kvchat random {shape.name}")
    writer.add_block_count(shape.layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(shape.eps)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(1)  # mostly float16
    if source is not None:
        for key, field in source.fields.items():
            if not key.startswith("tokenizer.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                continue
            types = field.types
            if types[0] == GGUFValueType.ARRAY:
                writer.add_key_value(key, field.contents(), types[0], sub_type=types[1])
            else:
                writer.add_key_value(key, field.contents(), types[0])
        tokens = list(source.fields["tokenizer.ggml.tokens"].contents())
        kinds = list(source.fields["tokenizer.ggml.token_type"].contents())
    else:
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_tokens(), "\u0120t", "he"]
        kinds = [3, 3, 3] + [1] * (len(tokens) - 3)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_merges(["\u0120 t", "h e"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
        writer.add_chat_template(CHATML)
    assert shape.vocab >= len(tokens), "a vocabulary smaller than the tokenizer's"
    extra = shape.vocab - len(tokens)
    writer.add_token_list(tokens + [f"<|reserved_{i}|>" for i in range(extra)])
    writer.add_token_types(kinds + [1] * extra)  # 1: a normal token (as many special ones would slow the tokenizer)

    def normal(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)

    def add_weight(name: str, rows: int, cols: int) -> None:
        role = name.split(".")[-2]
        kind = (block_types or {}).get(role, (block_types or {}).get("*"))
        if kind is None:
            writer.add_tensor(name, normal(rows, cols))
        else:
            writer.add_tensor(name, random_blocks(kind, rows, cols, rng), raw_dtype=GGMLQuantizationType[kind])

    head_dim = shape.hidden // shape.heads
    add_weight("token_embd.weight", shape.vocab, shape.hidden)
    writer.add_tensor("output_norm.weight", np.ones(shape.hidden, dtype=np.float32))
    for i in range(shape.layers):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(shape.hidden, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(shape.hidden, dtype=np.float32))
        add_weight(f"{block}.attn_q.weight", shape.heads * head_dim, shape.hidden)
        add_weight(f"{block}.attn_k.weight", shape.kv_heads * head_dim, shape.hidden)
        add_weight(f"{block}.attn_v.weight", shape.kv_heads * head_dim, shape.hidden)
        add_weight(f"{block}.attn_output.weight", shape.hidden, shape.heads * head_dim)
        add_weight(f"{block}.ffn_gate.weight", shape.intermediate, shape.hidden)
        add_weight(f"{block}.ffn_up.weight", shape.intermediate, shape.hidden)
        add_weight(f"{block}.ffn_down.weight", shape.hidden, shape.intermediate)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(staging, path)
    return path


_QUANTIZE = """
import sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def quantize(source: Path, path: Path, file_type: str, threads: int) -> Path:
    """`source` quantized to `file_type` (a FILE_TYPES key) by llama.cpp's own quantizer, written to `path` (in
    a child process: the quantizer writes its log to the process's stderr)."""
    staging = path.with_name(f".{path.name}.partial")
    result = subprocess.run([sys.executable, "-c", _QUANTIZE, str(source), str(staging),
                             str(FILE_TYPES[file_type]), str(threads)], capture_output=True, text=True)
    if result.returncode:
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's quantizer failed on {source.name} -> {file_type}: "
                           f"{result.stderr.strip()[-200:]}")
    os.replace(staging, path)
    return path


def safetensors_model(gguf: Path, directory: Path) -> Path:
    """A GGUF file's model as a bfloat16 safetensors model directory (what a Hugging Face download holds), written
    by transformers in a child process (its float32 copy of the weights is freed with it)."""
    staging = directory.with_name(f".{directory.name}.partial")
    result = subprocess.run([sys.executable, "-c", _AS_SAFETENSORS, str(gguf), str(staging)], capture_output=True,
                            text=True)
    if result.returncode:
        raise RuntimeError(f"writing {gguf.name} as bfloat16 safetensors failed: {result.stderr.strip()[-200:]}")
    os.replace(staging, directory)
    return directory


_AS_SAFETENSORS = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out = sys.argv[1], sys.argv[2]
folder, name = source.rsplit("/", 1)
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
"""


def model_files(folder: Path, shape: Shape, file_types: tuple[str, ...], tokenizer_from: Path, threads: int,
                seed: int = 0) -> dict[str, Path]:
    """The GGUF files of `shape` in each of `file_types`, written into `folder` unless they are there already
    (the float16 source is kept beside them, as `F16`; BF16 comes with its safetensors model, as `BF16 model`)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"{shape.name}-seed{seed}.F16.gguf"
    if not source.is_file():
        write_random_gguf(source, shape, tokenizer_from, seed)
    files = {"F16": source}
    for file_type in file_types:
        target = folder / f"{shape.name}-seed{seed}.{file_type}.gguf"
        files[file_type] = target if target.is_file() else quantize(source, target, file_type, threads)
        if file_type == "BF16":
            directory = folder / f"{shape.name}-seed{seed}.bf16-safetensors"
            files["BF16 model"] = directory if (directory / "config.json").is_file() else \
                safetensors_model(source, directory)
    return files


@dataclass(frozen=True)
class SizesPlan:
    shape: str = "llama-3.2-1b"
    file_types: tuple[str, ...] = ("Q4_0", "Q8_0", "Q4_K_M", "Q6_K", "BF16")
    context: int = 512
    new_tokens: int = 32
    repeat: int = 3
    startup_repeat: int = 1

    @classmethod
    def quick(cls) -> "SizesPlan":
        return cls(shape="tiny", file_types=("Q4_K_M",), context=64, new_tokens=8, repeat=1)


def run(folder: Path, plan: SizesPlan, load: Callable[[Path], Any], threads: int, progress: Progress) -> dict[str, Any]:
    """Each file type of `plan.shape` (made in `folder` the first time) side by side with llama.cpp: decode and
    prefill at a prompt of `plan.context` tokens in this process (kvchat's model loaded by `load`), one-shot
    start-up and peak memory in fresh processes (see `kvchat.bench.startup`)."""
    from kvchat.bench import peer, startup
    from kvchat.chat.engine import Engine
    from kvchat.weights.model import default_gguf_path, weights_label

    shape = SHAPES[plan.shape]
    progress(f"sizes: the {shape.name} files (made once)", 0, 1)
    files = model_files(folder, shape, plan.file_types, default_gguf_path(), threads)
    rows = []
    for file_type in plan.file_types:
        path = files[file_type]  # (llama.cpp's file; kvchat's own for BF16 is the safetensors model)
        model = files.get(f"{file_type} model", path)
        progress(f"sizes: {model.name}", 0, 1)
        loaded = load(model)
        engine = Engine(loaded)
        engine.stop_ids = frozenset()  # equal work: replies of exactly the asked length on both sides
        llm = peer.llama(path, threads)
        speed = peer.speeds(engine, llm, (plan.context,), plan.new_tokens, plan.repeat, progress)[0]
        kept = weights_label(loaded)
        del llm, engine, loaded
        gc.collect()
        started = startup.run(str(model), path, threads,  # (a random model's one token may print nothing)
                              startup.StartupPlan(repeat=plan.startup_repeat, first_byte=False), progress)
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) if model.is_dir() else None
        rows.append({"file_type": file_type, "file_bytes": path.stat().st_size, "weights": kept, **speed,
                     "startup": started["sides"], **({"model_bytes": weights} if weights else {})})
    return {"shape": shape.name, "parameters": shape.parameters, "threads": threads, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    """One row a file: kvchat's figure, llama.cpp's and kvchat's over llama.cpp's (speed: above 1 is faster;
    memory and time: below 1 is less)."""
    lines = [f"Random weights in the shape of {results['shape']} ({results['parameters'] / 1e9:.2f}B parameters), "
             f"llama.cpp's quantizer, {results['threads']} threads; kvchat / llama.cpp",
             "", "| file | MiB | kvchat keeps | decode tok/s | prefill tok/s | peak RSS MiB, one-shot | "
             "one-shot start to exit s, one token, cold (warm) |", "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        sides = row["startup"]
        ours, theirs = sides["kvchat"], sides.get("peer", {})

        def pair(a: float, b: float | None, digits: int = 1) -> str:
            return f"{a:.{digits}f} / {b:.{digits}f} ({a / b:.2f}x)" if b else f"{a:.{digits}f}"

        mib = 1 / 2**20
        size = f"{row['file_bytes'] * mib:.0f}"
        if row.get("model_bytes"):  # (kvchat's is a safetensors model: its size, and peak RSS over it)
            size = (f"{row['model_bytes'] * mib:.0f} safetensors (RSS {ours['peak_rss'] / row['model_bytes']:.2f}x "
                    f"it), {size} GGUF")
        lines.append(f"| {row['file_type']} | {size} | {row['weights']} | "
                     f"{pair(row['kvchat_decode'], row['peer_decode'])} | "
                     f"{pair(row['kvchat_prefill'], row['peer_prefill'])} | "
                     f"{pair(ours['peak_rss'] * mib, theirs.get('peak_rss', 0) * mib, 0)} | "
                     f"{pair(ours['total_s'], theirs.get('total_s'), 2)} "
                     f"({sides['warm']['total_s']:.2f}) |")
    return "\n".join(lines)
