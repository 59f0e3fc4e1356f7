"""Issue 23: a bfloat16 (or float16) model on the CPU keeps its matrices in their own 2 bytes, mapped from its
files and read as they are used, and computes in float32: the same weights as the float32 upcast, at half its
memory, with every exactness property of the cache."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from families import make_family
from kvchat.chat.engine import Engine
from kvchat.errors import KvchatError
from kvchat.weights import direct, quant
from kvchat.weights.model import fingerprint, load_model, precision, wide_state
from test_direct import keeps_the_promise
from test_quant import reuses_undoes_and_continues_exactly
from tiny import make_loaded


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert quant.KERNEL.build(), quant.KERNEL.failure


def save(loaded, directory, dtype=torch.bfloat16, **options):
    loaded.model.to(dtype).save_pretrained(directory, **options)
    loaded.tokenizer.save_pretrained(directory)
    loaded.model.to(torch.float32)
    return directory


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny Llama with tied embeddings, saved in bfloat16, wide weights so that greedy choices are clear."""
    return save(make_loaded(torch.float32, initializer_range=0.2, tie_word_embeddings=True),
                tmp_path_factory.mktemp("bf16"))


def matrices(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, quant._Packed))]


def test_a_bfloat16_model_keeps_its_matrices_as_they_are_mapped_from_its_file(bf16_dir):
    loaded = load_model(str(bf16_dir), "cpu", "auto")
    assert loaded.weight_format == "bfloat16" and precision(loaded) == "float32, bfloat16 weights"
    size = (bf16_dir / "model.safetensors").stat().st_size
    kept = matrices(loaded.model)
    assert kept and all(type(m) in (quant.PackedLinear, quant.PackedEmbedding) for m in kept)
    for m in kept:  # views of the mapped file, not copies
        assert m.q.dtype == torch.bfloat16 and m.q.untyped_storage().nbytes() == size
    assert loaded.model.lm_head.q is loaded.model.model.embed_tokens.q  # (tied: one table)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # norms: float32
    assert direct.refusal(loaded.model) is None  # the direct step decodes it

    full = load_model(str(bf16_dir), "cpu", "auto", weights="full")  # the float32 upcast, as before
    assert full.weight_format == "full" and fingerprint(full) != fingerprint(loaded)
    ids = torch.tensor([[5, 17, 30, 41, 99, 7, 64]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, full.model(ids).logits)  # the same weights: same prompt bits
        for m, f in zip(matrices(loaded.model), matrices(full.model)):
            assert torch.equal(m.weight, f.weight)


def test_a_float16_model_in_shards_is_kept_in_two_bytes_too(tmp_path):
    directory = save(make_loaded(torch.float32, initializer_range=0.2), tmp_path / "f16", torch.float16,
                     max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    loaded = load_model(str(directory), "cpu", "auto")
    assert loaded.weight_format == "float16"
    assert all(m.q.dtype == torch.float16 for m in matrices(loaded.model))
    reuses_undoes_and_continues_exactly(loaded, "float16 shards")


def test_with_bfloat16_weights_the_direct_step_keeps_the_promise(bf16_dir, tmp_path):
    keeps_the_promise(load_model(str(bf16_dir), "cpu", "auto"), tmp_path, "auto")


@pytest.mark.parametrize("family", ["mistral", "lfm2"])
def test_bfloat16_weights_reuse_undo_and_continue_exactly_on_other_families(family, tmp_path):
    """A sliding-window family and a hybrid one (convolution layers) through transformers' own step."""
    directory = save(make_family(family, dtype=torch.float32), tmp_path / family)
    loaded = load_model(str(directory), "cpu", "auto")
    assert loaded.weight_format == "bfloat16" and direct.refusal(loaded.model) is not None
    reuses_undoes_and_continues_exactly(loaded, family)


def test_a_16_bit_model_whose_weights_do_not_fit_its_model_is_loaded_as_before_and_says_why(bf16_dir, tmp_path):
    """A weight the model has no place for (here one more matrix): the file is left to transformers' loader,
    which upcasts it as before; `kvchat info`'s note says why."""
    from safetensors.torch import load_file

    directory = tmp_path / "extra"
    directory.mkdir()
    for path in bf16_dir.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(bf16_dir / "model.safetensors"))
    tensors["model.extra.weight"] = torch.zeros(4, 64, dtype=torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(str(directory), "cpu", "auto")
    assert loaded.weight_format == "full" and not quant.is_packed(loaded.model)
    assert "cannot be kept as they are (1 weights unexpected, model.extra.weight" in loaded.weight_note
    Engine(loaded)  # (it chats)


def header_of(path):
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return length, json.loads(path.read_bytes()[8:8 + length])


@pytest.mark.parametrize("damage", ["truncated", "outside", "huge header"])
def test_a_damaged_16_bit_file_is_one_line_and_nothing_is_mapped(bf16_dir, tmp_path, damage):
    directory = tmp_path / "damaged"
    directory.mkdir()
    for path in bf16_dir.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    path = directory / "model.safetensors"
    data = path.read_bytes()
    length, entries = header_of(path)
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "outside":
        name = next(key for key in entries if key != "__metadata__")
        entries[name]["data_offsets"][1] += 1 << 30
        text = json.dumps(entries).encode().ljust(length)
        path.write_bytes(data[:8] + text + data[8 + length:] if len(text) == length else
                         struct.pack("<Q", len(text)) + text + data[8 + length:])
    else:
        path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(KvchatError) as raised:
        load_model(str(directory), "cpu", "auto")
    message = str(raised.value)
    assert "\n" not in message and str(directory) in message, message
    assert wide_state(directory) is None  # (never mapped: the header is checked against the file first)
