"""Issue 23, real model files: GGUF's K-quants (Q4_K, Q5_K, Q6_K: what Q4_K_M, Q5_K_M and Q6_K files hold, and
the Q6_K output layer llama.cpp gives most files of 2,048-wide models) are packed exactly from the scales in the
file's blocks, a GGUF file is converted and packed once, and every exactness property holds with them."""

import numpy as np
import pytest
import torch

from families import make_family
from kvchat.bench.sizes import SUPER_BLOCK, Shape, random_blocks, write_random_gguf
from kvchat.chat.engine import Engine
from kvchat.weights import model as model_module
from kvchat.weights import quant
from kvchat.weights.kquants import RowIndex, block_scales
from kvchat.weights.model import NOT_PACKED, PACKED_WEIGHTS, load_model
from test_direct import keeps_the_promise
from test_quant import MESSAGES, reuses_undoes_and_continues_exactly

TINY = Shape("tiny", 256, 512, 2, 4, 2, 512)
MIX = {"token_embd": "Q6_K", "attn_v": "Q5_K", "ffn_down": "Q6_K", "*": "Q4_K"}


@pytest.fixture
def kvchat_home(tmp_path):
    return tmp_path / "home"  # (where conftest points KVCHAT_HOME)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    return write_random_gguf(tmp_path_factory.mktemp("kq") / "tiny-mix.gguf", TINY, None, seed=3,
                             block_types=MIX)


def dequantized(type_name, raw):
    from gguf import GGMLQuantizationType, dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, GGMLQuantizationType[type_name]),
                                                 dtype=np.float32))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_come_back_bit_for_bit_from_the_files_scales_and_from_nothing_else(type_name):
    raw = random_blocks(type_name, 6, 512, np.random.default_rng(1))
    weight = dequantized(type_name, raw)
    found = block_scales(type_name, raw.reshape(-1, SUPER_BLOCK[type_name]))
    scale, offset = (torch.from_numpy(part.reshape(6, -1)) for part in found)
    q, s, o, missing = quant.pack(weight, allow_approximate=False, hint=(scale, offset))
    assert missing == 0 and torch.equal(quant.unpack(q, s, o), weight)
    assert quant.block_of(q, s) == (16 if type_name == "Q6_K" else 32)
    assert quant.pack(weight, allow_approximate=False)[3] > 0  # the values alone do not give them
    wrong = scale.clone()
    wrong[2, 1] *= 1.5
    assert quant.pack(weight, allow_approximate=False, hint=(wrong, offset))[3] > 0  # a wrong scale is refused


def test_a_row_index_finds_reordered_rows_and_nothing_for_rows_it_lacks(mixed_gguf):
    index = RowIndex.of(mixed_gguf)
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(mixed_gguf)).tensors if t.name == "blk.0.ffn_up.weight")
    weight = dequantized("Q4_K", np.asarray(tensor.data))
    order = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))
    scale, offset = index.hint(weight[order])
    q, s, o, missing = quant.pack(weight[order], allow_approximate=False, hint=(scale, offset))
    assert missing == 0 and torch.equal(quant.unpack(q, s, o), weight[order])
    other = weight.clone()
    other[3, 7] += 1e-3
    assert index.hint(other) is None


def test_a_k_quant_gguf_is_converted_once_packed_exactly_and_decoded_by_the_direct_step(mixed_gguf, kvchat_home,
                                                                                        monkeypatch):
    full = load_model(str(mixed_gguf), "cpu", "float32", weights="full")
    loaded = load_model(str(mixed_gguf), "cpu", "float32")
    assert loaded.weight_format == "int8" and quant.is_packed(loaded.model)
    assert [path.name for path in loaded.weights] == [PACKED_WEIGHTS]
    reference = full.model.state_dict()
    kinds = {}
    for name, module in loaded.model.named_modules():
        if isinstance(module, quant._Packed):
            assert torch.equal(module.weight, reference[f"{name}.weight"]), name  # the same float32 numbers
            kinds[name.split(".")[-1]] = (module.q.dtype, module.scale.dtype, quant.block_of(module.q, module.scale))
    assert kinds["q_proj"] == (torch.uint8, torch.float32, 32)  # Q4_K: 4 bits, float32 scales and offsets
    assert kinds["v_proj"] == (torch.int8, torch.float32, 32)  # Q5_K: int8
    assert kinds["down_proj"] == kinds["embed_tokens"] == (torch.uint8, torch.uint8, 16)  # Q6_K: its own 6 bits
    down = loaded.model.model.layers[0].mlp.down_proj
    assert quant.is_six(down.q) and (down.q.nbytes + down.scale.nbytes) / down.q.shape[0] / 512 == 210 / 256
    engine = Engine(loaded)
    assert engine.direct is not None
    ids = engine.render([{"role": "user", "content": MESSAGES[0]}])
    with torch.no_grad():
        assert torch.equal(loaded.model(torch.tensor([ids])).logits, full.model(torch.tensor([ids])).logits)
    monkeypatch.setattr(model_module, "convert_gguf", lambda *a, **k: pytest.fail("converted a second time"))
    again = load_model(str(mixed_gguf), "cpu", "float32")
    assert again.weights == loaded.weights


def test_with_k_quant_weights_the_direct_step_keeps_the_promise(mixed_gguf, kvchat_home, tmp_path):
    keeps_the_promise(load_model(str(mixed_gguf), "cpu", "float32"), tmp_path, "auto")


def test_a_gguf_of_weights_kvchat_cannot_pack_is_noted_once_and_loaded_from_the_file(kvchat_home, tmp_path,
                                                                                      monkeypatch):
    path = write_random_gguf(tmp_path / "tiny-f16.gguf", TINY, None, seed=4)  # float16 weights
    loaded = load_model(str(path), "cpu", "float32")
    assert loaded.weight_format == "full" and loaded.weights == [path]
    notes = list((kvchat_home / "models").glob(f"gguf-*/{NOT_PACKED}"))
    assert len(notes) == 1 and [p.name for p in notes[0].parent.iterdir()] == [NOT_PACKED]  # no float32 copy
    monkeypatch.setattr(model_module, "convert_gguf", lambda *a, **k: pytest.fail("converted a second time"))
    assert load_model(str(path), "cpu", "float32").weights == [path]


def kquant_like(loaded, seed):
    """Give every matrix of `loaded` K-quant-like blocks (scales that are a float16 times a small integer, as
    d * sc; 16-input blocks without offsets for some, as Q6_K's), pack them with those scales and put the
    packings in place (`quant.install`)."""
    generator = torch.Generator().manual_seed(seed)
    packed = {}
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if parameter.dim() != 2 or parameter.shape[1] % quant.BLOCK:
                continue
            rows, cols = parameter.shape
            size = 16 if len(packed) % 2 else 32
            blocks = cols // size
            d = (torch.rand(rows, 1, generator=generator) * 0.002 + 0.0004).half().float()
            scale = d * torch.randint(1, 64, (rows, blocks), generator=generator).float()
            offset = torch.zeros(rows, blocks) if size == 16 else \
                -(d * torch.randint(0, 64, (rows, blocks), generator=generator).float())
            q = torch.randint(0 if size == 32 else -32, 16 if size == 32 else 32, (rows, cols), generator=generator)
            weight = quant.unpack(q.to(torch.int8), scale, offset)
            parameter.copy_(weight)
            entry = quant.pack(parameter, allow_approximate=False, hint=(scale, offset))
            assert entry[3] == 0, name
            packed[name[: -len(".weight")]] = entry
    quant.narrow_all(packed)
    assert packed and not quant.install(loaded.model, packed)
    loaded.weight_format = "int8"
    return loaded


@pytest.mark.parametrize("family", ["mistral", "lfm2"])
def test_k_quant_packings_reuse_undo_and_continue_exactly_on_other_families(family):
    """A sliding-window family and a hybrid one (convolution layers) through transformers' own step."""
    assert quant.KERNEL.build(), quant.KERNEL.failure
    loaded = kquant_like(make_family(family, dtype=torch.float32), seed=5)
    assert any(quant.block_of(m.q, m.scale) == 16 for m in loaded.model.modules() if isinstance(m, quant._Packed))
    reuses_undoes_and_continues_exactly(loaded, family)


def test_a_converted_model_missing_a_weight_is_refused_in_one_line_not_filled_with_random_values(mixed_gguf,
                                                                                                kvchat_home):
    from kvchat.errors import KvchatError

    load_model(str(mixed_gguf), "cpu", "float32")
    path = next((kvchat_home / "models").glob(f"gguf-*/{PACKED_WEIGHTS}"))
    packed, others = quant.read_packing(path)
    del packed["model.layers.1.mlp.up_proj"]
    assert quant.write_packing(path, packed, others)
    with pytest.raises(KvchatError, match=r"is damaged \(1 weights missing, model.layers.1.mlp.up_proj.weight "
                                          r"among them\): delete that folder"):
        load_model(str(mixed_gguf), "cpu", "float32")


def test_offsets_that_are_all_zero_are_neither_kept_on_disk_nor_held_and_compute_the_same_bits(mixed_gguf,
                                                                                             kvchat_home):
    """Q6_K and Q8_0 blocks have no offsets: a quarter and a ninth of their packing's bytes, not kept."""
    from safetensors import safe_open

    loaded = load_model(str(mixed_gguf), "cpu", "float32")
    with safe_open(str(loaded.weights[0]), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.down_proj.offset" not in keys  # Q6_K
    assert "model.layers.0.self_attn.q_proj.offset" in keys  # Q4_K: offsets of their own
    down = loaded.model.model.layers[0].mlp.down_proj
    assert quant.no_offset(down.offset) and down.offset.untyped_storage().nbytes() <= 4
    zeros = torch.zeros(down.offset.shape)
    x = torch.randn(3, quant.columns(down.q), generator=torch.Generator().manual_seed(0))
    assert torch.equal(quant.KERNEL(x, down.q, down.scale, down.offset), quant.KERNEL(x, down.q, down.scale, zeros))
    assert torch.equal(down.weight, quant.KERNEL.weight(down.q, down.scale, zeros))
    assert torch.equal(down.weight, quant.unpack(down.q, down.scale, zeros))


def q6_k_like(rows, supers, seed):
    """Int8 values in -32..31 and float32 scales a 16-input block that are a float16 d (one per 256 inputs) times
    an int8 sub-scale, as a Q6_K weight's packing of 16-input blocks; the largest sub-scale -128, as llama.cpp's."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-32, 32, (rows, supers * 256), dtype=torch.int8, generator=generator)
    d = (torch.rand(rows, supers, 1, generator=generator) * 0.002 + 1e-4).half().float()
    sub = torch.randint(-127, 128, (rows, supers, 16), generator=generator).float()
    sub[..., 3] = -128
    return q, (d * sub).reshape(rows, supers * 16)


def test_q6_k_packings_take_the_files_size_in_their_6_bit_form_and_come_back_bit_for_bit(tmp_path):
    q, scale = q6_k_like(5, 3, seed=1)
    q[0, :16], q[1, -16:] = -32, 31  # the ends of the range
    scale[2, :16] = 0.0  # a super-block of zero scales (d = 0)
    zero = torch.zeros_like(scale)
    six = quant.narrow6(q, scale, zero)
    assert six is not None and quant.is_six(six[0]) and quant.kernel_form(six[0], six[1]) == 6
    assert (six[0].nbytes + six[1].nbytes) / q.numel() == 210 / 256 and quant.no_offset(six[2])
    assert quant.columns(six[0]) == q.shape[1] and quant.block_of(six[0], six[1]) == 16
    assert torch.equal(quant.unpack(*six), quant.unpack(q, scale, zero))
    path = tmp_path / "six.safetensors"
    assert quant.write_packing(path, {"w": (*six, 0)})
    read, _ = quant.read_packing(path)  # (offsets all zero: not kept)
    assert all(torch.equal(a, b) for a, b in zip(read["w"][:2], six[:2])) and quant.no_offset(read["w"][2])
    packed = {"w": (q, scale, zero, 0)}
    assert quant.narrow_all(packed) and quant.is_six(packed["w"][0])  # (what a conversion keeps)


@pytest.mark.parametrize("damage", ["value", "scale", "offset", "width"])
def test_a_packing_that_is_not_q6_k_like_keeps_its_int8_form(damage):
    q, scale = q6_k_like(4, 2, seed=2)
    offset = torch.zeros_like(scale)
    if damage == "value":
        q[1, 5] = 40  # outside -32..31
    elif damage == "scale":
        scale[2, 7] = scale[2, 7] * (1 + 2 ** -20)  # no float16 times an integer
    elif damage == "offset":
        offset[0, 0] = 0.5
    else:
        q, scale, offset = q[:, :384], scale[:, :24], offset[:, :24]  # not whole super-blocks
    assert quant.narrow6(q, scale, offset) is None


def test_a_conversion_kept_before_the_6_bit_form_is_repacked_in_it_once(mixed_gguf, kvchat_home):
    loaded = load_model(str(mixed_gguf), "cpu", "float32")
    path = loaded.weights[0]
    packed, others = quant.read_packing(path)
    for key, (q, scale, offset, missing) in packed.items():  # as kvchat kept Q6_K weights before: int8 values
        if quant.is_six(q):
            q, scale = quant.widen6(q, scale)
            packed[key] = q, scale, quant.zero_stand_in(scale), missing
    assert quant.write_packing(path, packed, others) and model_module._has_int8_sixteens(path)
    before = load_model(str(mixed_gguf), "cpu", "float32")  # (repacks, and loads the 6-bit form)
    assert not model_module._has_int8_sixteens(path)
    assert quant.is_six(before.model.model.layers[0].mlp.down_proj.q)
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        assert torch.equal(before.model(ids).logits, loaded.model(ids).logits)


def test_a_gguf_is_converted_tensor_by_tensor_without_a_float32_model(kvchat_home, tmp_path, monkeypatch):
    """Each weight is dequantized, packed and dropped in turn (transformers' loader, which makes the whole model in
    float32 first, is not used): a K-quant file packs, with the same numbers as transformers' own loading of it;
    a file of other blocks is noted without it too."""
    import transformers

    path = write_random_gguf(tmp_path / "tiny-mix.gguf", TINY, None, seed=3, block_types=MIX)
    full = load_model(str(path), "cpu", "float32", weights="full")  # (transformers' loading, for the numbers)
    loader = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a float32 model was made to convert the file"))
    loaded = load_model(str(path), "cpu", "float32")
    assert loaded.weight_format == "int8" and [p.name for p in loaded.weights] == [PACKED_WEIGHTS]
    reference = full.model.state_dict()
    for name, module in loaded.model.named_modules():
        if isinstance(module, quant._Packed):
            assert torch.equal(module.weight, reference[f"{name}.weight"]), name
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loader)  # (a file not packed loads so)
    monkeypatch.setattr(model_module, "pack_directory", lambda *a, **k: pytest.fail("converted through float32"))
    plain = write_random_gguf(tmp_path / "tiny-f16.gguf", TINY, None, seed=4)
    assert load_model(str(plain), "cpu", "float32").weight_format == "full"
    assert list((kvchat_home / "models").glob(f"gguf-*/{NOT_PACKED}"))
