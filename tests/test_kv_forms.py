"""Issue 22: the cache keeps keys and values in a chosen form (a float type, q8 or q4 blocks), and with each form
a reply with reuse, after a cut, a /retry, an /undo, a context drop or a resume is the reply of a fresh prefill
in that same form."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from bound import engine_with_store
from families import make_family, window_cache
from kvchat.cache import layers
from kvchat.cache.kv_forms import KVForm, block_size, parse
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.chat.saving import Persister, open_chat
from kvchat.config import ConfigError, Sampling, load_config
from kvchat.errors import KvchatError
from kvchat.ui.cli import main
from kvchat.weights.model import LoadedModel
from reference import greedy_after_prefill
from tiny import make_tokenizer

GREEDY = Sampling(temperature=0, max_new_tokens=8)
SYSTEM = "You are a helpful assistant."
MESSAGES = ["Hello, how are you today?", "What is the capital of France?", "Tell me a story about a cat.",
            "Numbers: 1 2 3 4 5.", "The quick brown fox jumps over the lazy dog."]
FORMS = ("q8", "q4", "float16", "q8/q4")


@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize("width", [64, 16, 6])
def test_each_row_is_encoded_on_its_own_within_half_a_step(name, width):
    form = KVForm(name)
    rows = torch.randn(2, 3, 5, width, dtype=torch.float64) * torch.logspace(-3, 2, 5, dtype=torch.float64)[:, None]
    rows[0, 0, 0] = 0  # a block of zeros
    stored = form.encode(rows)
    decoded = form.decode(stored, torch.float64, width)
    assert decoded.shape == rows.shape and decoded.dtype == torch.float64
    block = block_size(width)
    blocks = rows.reshape(*rows.shape[:-1], width // block, block)
    spread = blocks.abs().amax(-1) if name == "q8" else blocks.amax(-1) - blocks.amin(-1)
    step = spread / (127 if name == "q8" else 15)
    error = (decoded - rows).abs().reshape(blocks.shape).amax(-1)
    rounding = blocks.abs().amax(-1) * 2e-3 + 127 * 2.0 ** -24  # (float16 scales and offsets, subnormal ones)
    assert bool((error <= step * 0.5 * 1.01 + rounding).all())  # half a step
    assert torch.equal(decoded[0, 0, 0], torch.zeros(width, dtype=torch.float64))
    one_by_one = torch.cat([form.decode(form.encode(rows[..., i:i + 1, :]), torch.float64, width)
                            for i in range(rows.shape[-2])], dim=-2)
    assert torch.equal(one_by_one, decoded)  # a row's form never depends on its neighbours


def test_the_forms_cost_what_they_promise_per_token():
    """q8 at most 0.3x of float32's memory per token, q4 at most 0.17x, float16 half (head size 64, as the
    default model's), measured on the cache a chat holds."""
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    loaded = LoadedModel(model=model, tokenizer=make_tokenizer(), device=torch.device("cpu"), dtype=torch.float32,
                         name="tiny-64")
    per_token = {}
    for name in ("auto", *FORMS):
        chat = Chat.start(Engine(loaded, kv_form=KVForm(name)), SYSTEM, sampling=GREEDY)
        list(chat.send(MESSAGES[0]))
        per_token[name] = chat.cache.nbytes / chat.cache.tokens
        assert chat.engine.layout.bytes_per_token(torch.float32) == round(per_token[name])
    assert per_token["q8"] <= 0.3 * per_token["auto"] and per_token["q4"] <= 0.17 * per_token["auto"]
    assert per_token["float16"] == per_token["auto"] / 2
    assert per_token["q8/q4"] == (per_token["q8"] + per_token["q4"]) / 2  # (keys and values are as wide)


def fresh_reply(engine, prompt):
    """Greedy reply from a cache of the engine's form filled in one pass over the whole prompt."""
    return greedy_after_prefill(engine, prompt, GREEDY.max_new_tokens)


def turn(chat, events=None, text=None):
    chat.sampling = GREEDY
    end = [e for e in (events if events is not None else chat.send(text)) if isinstance(e, TurnEnd)][0]
    want = fresh_reply(chat.engine, chat.engine.render(chat.conversation.view()[:-1]))
    assert end.token_ids == want, f"a reply in {chat.engine.kv_form.name} differs from a fresh prefill in it"
    assert end.stats.fallback is None, end.stats.fallback
    chat.cache.check()
    return end.stats


@pytest.fixture(scope="module", params=["llama", "mistral", "deepseek-v3", "deepseek-v3.2", "qwen3.5", "falcon-h1",
                                        "gemma3n"])
def family(request, tiny):
    return tiny if request.param == "llama" else make_family(request.param)


@pytest.mark.parametrize("form", FORMS)
def test_reuse_retry_undo_and_resume_in_a_form_equal_a_fresh_prefill_in_it(family, form, tmp_path):
    """Full attention (llama), sliding windows kept whole (mistral), latent attention (deepseek-v3), latent
    attention with sparse-attention indexer keys (deepseek-v3.2), a hybrid of linear and full attention (qwen3.5),
    attention and a recurrent state in one layer (falcon-h1), and KV sharing (gemma3n: later layers read an
    earlier one's)."""
    engine, store = engine_with_store(family, tmp_path, window_cache=window_cache(family), kv_form=KVForm(form))
    chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
    persister = Persister(store, "s")
    for text in MESSAGES[:3]:
        stats = turn(chat, text=text)
        persister.after_turn(chat)
    assert stats.reused > 0  # the cache was reused, in its form
    turn(chat, chat.retry())
    chat.undo()
    stats = turn(chat, text=MESSAGES[3])
    assert stats.reused > 0
    persister.after_turn(chat)
    store.close()

    engine2, store2 = engine_with_store(family, tmp_path, window_cache=window_cache(family), kv_form=KVForm(form))
    opened = open_chat(engine2, store2, "s", sampling=GREEDY)
    assert opened.chat.messages == chat.messages
    assert opened.notice is None and opened.loaded_tokens == chat.cache.tokens  # its KV, in its form, from disk
    stats = turn(opened.chat, text=MESSAGES[4])
    assert stats.loaded == stats.reused > 0
    # A new conversation with the same system prompt starts from the stored prefix, in the same form.
    fresh = Chat(engine2, prefixes=store2.longest_prefix)
    fresh.conversation.set_system(SYSTEM)
    stats = turn(fresh, text=MESSAGES[0])
    assert stats.reused > 0


@pytest.mark.parametrize("form", ["q8", "q4"])
def test_a_context_drop_in_a_form_equals_a_fresh_prefill_in_it(tiny, form):
    engine = Engine(tiny, max_context=96, kv_form=KVForm(form))
    chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
    dropped = 0
    for text in MESSAGES * 2:
        stats = turn(chat, text=text)
        dropped += stats.dropped
    assert dropped > 0


def test_a_saved_session_takes_on_disk_what_its_form_takes_in_memory(tiny, tmp_path):
    """Chunks, tails and prefixes are written in the form in use: q8 at least 3.5x smaller than float32."""
    sizes = {}
    for form in ("float32", "q8", "q4"):
        root = tmp_path / form
        engine, store = engine_with_store(tiny, root, kv_form=KVForm(form))
        chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
        for text in MESSAGES[:3]:
            turn(chat, text=text)
            Persister(store, "s").after_turn(chat)
        store.close()
        files = list((root / ".kv").rglob("*.safetensors"))  # their tensors' bytes (a tiny model's headers weigh)
        sizes[form] = sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in files) / \
            chat.cache.tokens
    assert sizes["float32"] >= 3.5 * sizes["q8"] and sizes["q8"] >= 1.4 * sizes["q4"], sizes


def test_a_session_saved_in_one_form_is_rebuilt_from_its_text_in_another(tiny, tmp_path):
    engine, store = engine_with_store(tiny, tmp_path)
    chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
    turn(chat, text=MESSAGES[0])
    Persister(store, "s").after_turn(chat)
    store.close()
    engine2, store2 = engine_with_store(tiny, tmp_path, kv_form=KVForm("q8"))
    opened = open_chat(engine2, store2, "s", sampling=GREEDY)
    assert "another model or format" in opened.notice and opened.loaded_tokens == 0
    turn(opened.chat, text=MESSAGES[1])


class UnknownLayer(DynamicLayer):
    """A layer type kvchat has never heard of (a subclass may keep more than its base does)."""


def test_a_layer_kvchat_cannot_keep_in_a_form_is_one_line_never_kept_as_computed(tiny, monkeypatch):
    made = layers.new_cache

    def with_an_unknown_layer(model, windows=layers.WINDOWS_FULL, form=KVForm()):
        cache = made(model, windows, form)
        cache.layers[1] = UnknownLayer()
        return cache

    monkeypatch.setattr(layers, "new_cache", with_an_unknown_layer)
    with pytest.raises(KvchatError, match="cannot keep keys and values in q8: layer 1 .*UnknownLayer") as caught:
        Engine(tiny, kv_form=KVForm("q8"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["deepseek-v3.2", "falcon-h1"])
def test_indexer_keys_and_attention_beside_a_state_are_kept_in_the_form(name):
    """Each token costs what the layout says in q8 (the sparse-attention indexer's keys and Falcon-H1's attention
    encoded too, not kept as computed), and a quarter of what it costs as computed or less."""
    per_token = {}
    for form in ("auto", "q8"):
        chat = Chat.start(Engine(make_family(name), kv_form=KVForm(form)), SYSTEM, sampling=GREEDY)
        list(chat.send(MESSAGES[0]))
        before = (chat.cache.nbytes, chat.cache.tokens)
        list(chat.send(MESSAGES[1]))  # (the recurrent state's bytes stay: the difference is per token)
        per_token[form] = (chat.cache.nbytes - before[0]) / (chat.cache.tokens - before[1])
        assert round(per_token[form]) == chat.engine.layout.bytes_per_token(torch.float64)
    assert per_token["q8"] <= 0.3 * per_token["auto"] / 2  # (the tiny models compute in float64)


def test_the_compiled_step_with_a_quantized_form_is_one_line(tiny):
    with pytest.raises(KvchatError, match="--kv-dtype q4 use --compile off"):
        Engine(tiny, kv_form=KVForm("q4"), compile="on", warm_up=False)


def test_a_damaged_chunk_in_a_form_is_never_used(tiny, tmp_path):
    engine, store = engine_with_store(tiny, tmp_path, kv_form=KVForm("q4"))
    chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
    for text in MESSAGES[:2]:
        turn(chat, text=text)
        Persister(store, "s").after_turn(chat)
    store.close()
    for path in (tmp_path / ".kv").rglob("*.safetensors"):
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    engine2, store2 = engine_with_store(tiny, tmp_path, kv_form=KVForm("q4"))
    opened = open_chat(engine2, store2, "s", sampling=GREEDY)
    assert "not usable" in opened.notice and opened.loaded_tokens == 0
    turn(opened.chat, text=MESSAGES[2])


@pytest.mark.parametrize("name", ["q8", "q4", "float16"])
def test_rows_given_as_a_strided_view_encode_as_their_copy_does(name):
    """Attention hands over keys and values as transposed views (float32: no copy on the way in)."""
    form = KVForm(name)
    rows = torch.randn(1, 7, 3, 64).transpose(1, 2)  # [1, 3, 7, 64], not contiguous
    assert not rows.is_contiguous()
    got, want = form.encode(rows), form.encode(rows.contiguous())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_keys_and_values_may_take_two_forms_named_as_a_pair():
    """`--kv-dtype KEYS/VALUES`, or a side set apart by `--kv-dtype-k`/`--kv-dtype-v`; equal sides are one form."""
    assert load_config(None, {"kv_dtype": "q8", "kv_dtype_v": "q4"}).kv_form == "q8/q4"
    assert load_config(None, {"kv_dtype": "q8/q4", "kv_dtype_k": "q4"}).kv_form == "q4"
    assert load_config(None, {"kv_dtype_k": "float16"}).kv_form == "float16/auto"
    assert parse("q4/q4") == KVForm("q4") and parse("q8/q4") == KVForm("q8/q4")
    form = KVForm("q8/q4")
    assert (form.side("keys"), form.side("indexer_keys"), form.side("values")) == (KVForm("q8"), KVForm("q8"),
                                                                                   KVForm("q4"))
    for bad in ({"kv_dtype": "q8/q4/q4"}, {"kv_dtype": "q5"}, {"kv_dtype_k": "q8/q4"}, {"kv_dtype": 8}):
        with pytest.raises(ConfigError, match=r"invalid --kv-dtype.*one of auto, float32") as caught:
            load_config(None, bad)
        assert "\n" not in str(caught.value)


def test_info_prints_a_pair_of_forms_in_use_between_its_sides(monkeypatch, capsys, tiny_model_dir):
    assert main(["info", "--model", str(tiny_model_dir), "--kv-dtype", "q8", "--kv-dtype-v", "q4"]) == 0
    out = capsys.readouterr().out
    assert "in use: q8/q4" in out
    per_token = {line.split()[0]: line.split()[1:3] for line in out.splitlines()
                 if line.startswith("  ") and "/token" in line}
    assert list(per_token)[-3:] == ["q8", "q4", "q8/q4"], per_token
