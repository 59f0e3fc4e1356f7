"""Issue 23: the direct decode step (one call into the kernel library a token) gives the tokens of transformers' own
one-token pass, and the promise holds through it: reuse, /retry, /undo and a resume equal a fresh prefill."""

import pytest
import torch

from bound import engine_with_store
from families import make_family
from kvchat.cache import layers
from kvchat.cache.kv_forms import KVForm
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.chat.saving import Persister, open_chat
from kvchat.config import Sampling
from kvchat.weights import direct, quant
from reference import greedy_after_prefill
from test_quant import gguf_like, through_gguf
from tiny import make_tokenizer

GREEDY = Sampling(temperature=0, max_new_tokens=12)
SYSTEM = "You are a helpful assistant."
MESSAGES = ["Hello, how are you today?", "What is the capital of France?", "Tell me a story about a cat.",
            "Numbers: 1 2 3 4 5.", "The quick brown fox jumps over the lazy dog."]


def packed(**overrides):
    assert quant.KERNEL.build(), f"the kernel did not build here: {quant.KERNEL.failure}"
    loaded = gguf_like(**overrides)
    assert quant.pack_model(loaded.model, allow_approximate=False).exact
    loaded.weight_format = "int8"
    return loaded


@pytest.fixture(scope="module")
def model():
    return packed()


def packed_family(model_type, **overrides):
    """A tiny float32 model of another family the step covers, its matrices in Q4_1 (embeddings Q8_0) and packed;
    biases and head norms random, so that a step which skipped them would be seen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvchat.weights.model import LoadedModel

    tok = make_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, initializer_range=0.2, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.generation_config.eos_token_id = 2
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                kind = "Q8_0" if "embed" in name or "lm_head" in name else "Q4_1"
                parameter.copy_(through_gguf(parameter, kind))
            elif name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                parameter.copy_(torch.randn_like(parameter) * 0.5 + (1.0 if "norm" in name else 0.0))
    loaded = LoadedModel(model=model, tokenizer=tok, name=f"tiny-{model_type}", device=torch.device("cpu"),
                         dtype=torch.float32)
    assert quant.pack_model(loaded.model, allow_approximate=False).exact
    loaded.weight_format = "int8"
    return loaded


OTHER_FAMILIES = {"qwen2": {}, "qwen3": {}, "mistral": {"sliding_window": None}}


@pytest.mark.parametrize("model_type", sorted(OTHER_FAMILIES))
def test_qwen2_qwen3_and_mistral_go_direct_and_keep_the_promise(model_type, tmp_path):
    """Qwen2's query/key/value biases and Qwen3's head norms in the C step: its logits are transformers' one-token
    pass's, and reuse, /retry, /undo and a resume through it equal a fresh prefill."""
    loaded = packed_family(model_type, **OTHER_FAMILIES[model_type])
    assert direct.refusal(loaded.model) is None
    engine = Engine(loaded)
    assert engine.direct is not None
    prompt = engine.render([{"role": "user", "content": MESSAGES[2]}])
    kwarg = layers.cache_kwarg(engine.model)
    with torch.inference_mode():
        ours, theirs = (layers.new_cache(engine.model) for _ in range(2))
        for cache in (ours, theirs):
            engine.model(input_ids=torch.tensor([prompt]), use_cache=True, **{kwarg: cache})
        for n in range(len(prompt), len(prompt) + 4):
            with layers.direct_step(ours) as stores:
                mine = engine.direct(5 + 17 * n % 200, n, stores)
            want = engine.model(input_ids=torch.tensor([[5 + 17 * n % 200]]), position_ids=torch.tensor([[n]]),
                                use_cache=True, **{kwarg: theirs}).logits[0, -1]
            assert torch.allclose(mine, want, rtol=1e-4, atol=1e-4), float((mine - want).abs().max())
    keeps_the_promise(loaded, tmp_path, "auto", turns=2)


def transformers_reply(engine, prompt, max_new_tokens=GREEDY.max_new_tokens):
    """Greedy reply from a fresh prefill of `prompt` then transformers' own one-token passes."""
    return greedy_after_prefill(engine, prompt, max_new_tokens)


def turn(chat, events=None, text=None):
    chat.sampling = GREEDY
    end = [e for e in (events if events is not None else chat.send(text)) if isinstance(e, TurnEnd)][0]
    assert end.token_ids == transformers_reply(chat.engine, chat.engine.render(chat.conversation.view()[:-1]))
    fed = len(end.token_ids) - (1 if end.stats.stop == "length" else 0)  # (the last is fed with the next turn)
    assert end.stats.direct == max(0, fed), end.stats  # every token fed alone went direct
    chat.cache.check()
    return end.stats


@pytest.mark.parametrize("tied,form", [(False, "auto"), (True, "auto"), (False, "float16"), (False, "bfloat16"),
                                       (False, "q8"), (False, "q8/q4")])
def test_the_direct_step_computes_transformers_one_token_pass(tied, form):
    loaded = packed(tie_word_embeddings=tied)
    engine = Engine(loaded, kv_form=KVForm(form))
    assert engine.direct is not None
    prompt = engine.render([{"role": "user", "content": MESSAGES[2]}])
    kwarg = layers.cache_kwarg(engine.model)
    with torch.inference_mode():
        ours, theirs = (layers.new_cache(engine.model, form=KVForm(form)) for _ in range(2))
        for cache in (ours, theirs):
            engine.model(input_ids=torch.tensor([prompt]), use_cache=True, **{kwarg: cache})
        for n in range(len(prompt), len(prompt) + 6):
            token = 5 + 17 * n % 200
            assert layers.direct_refusal(ours) is None
            with layers.direct_step(ours) as stores:
                mine = engine.direct(token, n, stores)
            want = engine.model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[n]]), use_cache=True,
                                **{kwarg: theirs}).logits[0, -1]
            assert torch.allclose(mine, want, rtol=1e-4, atol=1e-4), float((mine - want).abs().max())
            assert layers.length(ours) == layers.length(theirs) == n + 1
            for a, b in zip(ours.layers, theirs.layers):  # the rows it wrote, rotated, in the form's layout
                for side in ("keys", "values"):
                    mine_rows, want_rows = getattr(a, side), getattr(b, side)
                    if form == "auto":
                        assert torch.allclose(mine_rows, want_rows, rtol=1e-4, atol=1e-4), (side, n)
                    else:  # inputs a rounding apart land on the same encoded value nearly always
                        same = (mine_rows == want_rows).float().mean()
                        assert same > 0.9, (side, n, float(same))


@pytest.mark.parametrize("form", ["auto", "q8", "q4", "float16", "q8/q4"])
def test_reuse_retry_undo_and_resume_through_the_direct_step_equal_a_fresh_prefill(model, tmp_path, form):
    """The promise per KV form, with every token fed alone going through the direct step."""
    keeps_the_promise(model, tmp_path, form)


def keeps_the_promise(loaded, tmp_path, form, turns=3):
    """`turns` turns, /retry, /undo, a turn, then a resume in a new engine and a turn: every reply is a fresh
    prefill's (see `turn`), and the turns after the first reuse the cache, the last one loaded from disk."""
    engine, store = engine_with_store(loaded, tmp_path, kv_form=KVForm(form))
    assert engine.direct is not None
    chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
    persister = Persister(store, "s")
    for text in MESSAGES[:turns]:
        stats = turn(chat, text=text)
        persister.after_turn(chat)
    assert stats.reused > 0
    turn(chat, chat.retry())
    chat.undo()
    assert turn(chat, text=MESSAGES[3]).reused > 0
    persister.after_turn(chat)
    store.close()
    engine2, store2 = engine_with_store(loaded, tmp_path, kv_form=KVForm(form))
    opened = open_chat(engine2, store2, "s", sampling=GREEDY)
    assert opened.loaded_tokens == chat.cache.tokens
    stats = turn(opened.chat, text=MESSAGES[4])
    assert stats.loaded == stats.reused > 0


@pytest.mark.parametrize("form", ["auto", "q8", "q4"])
def test_the_direct_step_computes_the_same_bits_on_every_kernel_path(monkeypatch, model, form):
    """The scalar and the AVX2 path of the kernel library: the same logits and cache rows, bit for bit (float32
    attention by head, and the encoded forms' three passes)."""
    engine = Engine(model, kv_form=KVForm(form))
    prompt = engine.render([{"role": "user", "content": MESSAGES[3]}])
    kwarg = layers.cache_kwarg(engine.model)
    results = []
    for path in ("scalar", "avx2"):
        kernel = quant.Kernel(path=path)
        if not kernel.build():
            assert path == "avx2" and "not run by this CPU" in kernel.failure, kernel.failure
            pytest.skip("this CPU does not run the avx2 path")
        monkeypatch.setattr(quant, "KERNEL", kernel)
        with torch.inference_mode():
            cache = layers.new_cache(engine.model, form=KVForm(form))
            engine.model(input_ids=torch.tensor([prompt]), use_cache=True, **{kwarg: cache})
            logits = []
            for n in range(len(prompt), len(prompt) + 6):
                with layers.direct_step(cache) as stores:
                    logits.append(engine.direct(5 + 17 * n % 200, n, stores).clone())
        rows = [getattr(layer, side).clone() for layer in cache.layers for side in ("keys", "values")]
        results.append((torch.stack(logits), rows))
    (scalar_logits, scalar_rows), (avx2_logits, avx2_rows) = results
    assert torch.equal(scalar_logits, avx2_logits), float((scalar_logits - avx2_logits).abs().max())
    assert all(torch.equal(a, b) for a, b in zip(scalar_rows, avx2_rows))

def test_a_reply_that_outgrows_the_cache_buffers_stays_exact(model):
    """The buffers grow (new memory) while the reply decodes: the step writes where the cache now is."""
    engine = Engine(model)
    engine.stop_ids = frozenset()
    chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
    chat.sampling = Sampling(temperature=0, max_new_tokens=300)
    end = [e for e in chat.send(MESSAGES[0]) if isinstance(e, TurnEnd)][0]
    assert end.stats.direct == 299
    prompt = engine.render(chat.conversation.view()[:-1])
    assert end.token_ids == transformers_reply(engine, prompt, 300)


def test_models_the_step_does_not_cover_decode_through_transformers(model, tiny):
    assert direct.refusal(tiny.model) == "the embedding and output layers are not packed"  # float64, unpacked
    assert Engine(tiny).direct is None
    assert "sliding window" in direct.refusal(make_family("mistral").model)
    assert "only Llama, Mistral, Qwen2 and Qwen3" in direct.refusal(make_family("gemma3").model)
    no_norms = packed_family("qwen3")
    no_norms.model.model.layers[2].self_attn.k_norm = None  # a head norm missing where the family has them
    assert "head norms" in direct.refusal(no_norms.model)
    one_bias = packed_family("qwen2")
    one_bias.model.model.layers[0].self_attn.k_proj.bias = None  # biases on some products only
    assert "biases" in direct.refusal(one_bias.model)
    assert "rotary positions" in direct.refusal(packed(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 10000.0}).model)
    assert "biases" in direct.refusal(packed(attention_bias=True).model)
    assert Engine(model, direct=False).direct is None
    uneven = packed()
    uneven.model.model.layers[1].post_attention_layernorm.variance_epsilon = 1e-3  # one norm unlike the others
    assert "RMS-norm epsilon" in direct.refusal(uneven.model) and Engine(uneven).direct is None


def test_the_step_reads_the_models_own_packings_and_takes_one_in_either_form(model):
    """No weight is copied for the step (the model's buffers stay as they are), and a layer whose matrices are
    packed in different forms (here one in the int8 form beside 4-bit ones) is run as transformers runs it."""
    before = {name: t.data_ptr() for name, t in model.model.named_buffers()}
    assert Engine(model).direct is not None
    assert {name: t.data_ptr() for name, t in model.model.named_buffers()} == before
    mixed = packed()
    layer = mixed.model.model.layers[0].self_attn
    weight = quant.unpack(layer.k_proj.q, layer.k_proj.scale, layer.k_proj.offset)
    layer.k_proj.q, layer.k_proj.scale, layer.k_proj.offset, missing = quant.pack(weight, allow_approximate=False)
    assert missing == 0 and not quant.is_nibbles(layer.k_proj.q) and quant.is_nibbles(layer.q_proj.q)
    engine = Engine(mixed)
    assert engine.direct is not None
    chat = Chat.start(engine, SYSTEM, sampling=GREEDY)
    turn(chat, text=MESSAGES[1])


def test_info_says_which_decode_step_runs(tmp_path, capsys, monkeypatch):
    from kvchat.ui.cli import main
    from kvchat.weights.model import pack_directory

    loaded = gguf_like()
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    assert pack_directory(tmp_path / "m")
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "home"))
    assert main(["info", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 0
    assert "decode step: direct (one call a token into kvchat's kernel library)" in capsys.readouterr().out
    assert main(["info", "--model", str(tmp_path / "m"), "--device", "cpu", "--kv-dtype", "q8"]) == 0
    assert "decode step: direct (one call a token into kvchat's kernel library)" in capsys.readouterr().out
    monkeypatch.setattr(quant.KERNEL, "step", None)
    monkeypatch.setattr(quant.KERNEL, "failure", "no C compiler")
    assert main(["info", "--model", str(tmp_path / "m"), "--device", "cpu", "--weights", "full"]) == 0
    out = capsys.readouterr().out
    assert "decode step: direct" not in out
    assert "direct decode step: off (no kernel (no C compiler))" in out
