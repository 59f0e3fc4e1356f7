"""Every architecture keeps the promise: exact reuse, only the new message prefilled, exact resume from disk.

Tiny random models of each family (tests/families.py): sliding-window attention (window of 12 tokens,
filled in the first turn), linear attention, Mamba, short convolutions, KV sharing, latent attention,
sparse-attention indexers. Every reply is checked against a cache-free greedy run of the same prompt.
"""

import io
import json
import os
import re

import pytest
import torch
from safetensors import safe_open

from kvchat.cache import layers
from kvchat.store import kvfile
from kvchat.weights import memory
from kvchat.ui.cli import main
from kvchat.config import Sampling
from kvchat.cache.chat_cache import MAX_CHECKPOINTS, CacheSpec, ChatCache
from kvchat.chat.engine import Engine, TurnEnd, common_prefix
from kvchat.chat.saving import Persister, open_chat
from kvchat.errors import KvchatError
from kvchat.weights.model import fingerprint
from kvchat.store.sessions import Store
import bound
from exact import differences, fresh_cache, next_logits, relative
from families import FAMILIES, REFUSED, SLIDING, make_family, window_cache
from reference import greedy_without_cache

GREEDY = Sampling(temperature=0, max_new_tokens=8)
SYSTEM = "You are a helpful assistant."
MESSAGES = [
    "Hello, how are you today?",
    "What is the capital of France?",
    "Tell me a story about a cat.",
    "Numbers: 1 2 3 4 5.",
    "The quick brown fox jumps over the lazy dog.",
    "Tell me a story about a dog.",
]


pytestmark = pytest.mark.usefixtures("small_chunks")


@pytest.fixture(scope="module", params=list(FAMILIES) + [f"{name}:window" for name in SLIDING])
def family(request):
    return make_family(request.param)


def new_engine(loaded, **kwargs):
    return Engine(loaded, window_cache=window_cache(loaded), **kwargs)


def engine_with_store(loaded, root, **engine_kwargs):
    return bound.engine_with_store(loaded, root, window_cache=window_cache(loaded), **engine_kwargs)


def new_chat(engine, store=None):
    """A new chat with the system prompt, greedy; seeded from the store's prefixes when a store is given (as an
    engine bound to a store started every conversation)."""
    return bound.new_chat(engine, store, SYSTEM, GREEDY)


def turn_end(events):
    return [e for e in events if isinstance(e, TurnEnd)][0]


def send(chat, text):
    """One turn; checks its reply against a cache-free greedy run of the prompt the model saw, returns its stats."""
    engine = chat.engine
    chat.sampling = GREEDY
    end = turn_end(chat.send(text))
    prompt = engine.render(chat.conversation.view()[:-1])  # the view after any drop, without the new reply
    want = greedy_without_cache(engine.model, prompt, GREEDY.max_new_tokens, engine.stop_ids)
    assert end.token_ids == want, f"reply to {text!r} differs from a fresh prefill"
    assert end.stats.fallback is None, end.stats.fallback
    chat.cache.check()
    return end.stats


def retry(chat):
    chat.sampling = GREEDY
    return turn_end(chat.retry())


def assert_only_new_message(chat, cached_before, stats):
    """Reuse stopped no earlier than it had to: at the cached prefix, or (recurrent state, after a template
    re-tokenized the last reply differently) at the last prompt's end at worst."""
    engine, cached_before = chat.engine, list(cached_before)
    target = engine.render(chat.conversation.view()[:-1])
    shared = common_prefix(cached_before, target)
    assert stats.reused + stats.prefilled == len(target)
    if shared == len(cached_before) or not layers.has_state(chat.cache.model_cache):
        assert stats.reused == min(shared, len(target) - 1), "prefilled more than the new message"
    else:
        previous_prompt = engine.render(chat.conversation.view()[:-3])
        assert stats.reused >= len(previous_prompt) - 8


def test_multi_turn_reuse_resume_undo_retry_are_exact(family, tmp_path):
    engine, store = engine_with_store(family, tmp_path)
    persister = Persister(store, session="chat")
    chat = new_chat(engine, store)
    for text in MESSAGES[:4]:
        before = list(chat.cache.ids)
        stats = send(chat, text)
        persister.after_turn(chat)
        if before:
            assert_only_new_message(chat, before, stats)

    # Resume in a new engine and store (as a new process would): everything cached comes from disk.
    store.close()
    engine2, store2 = engine_with_store(family, tmp_path)
    opened = open_chat(engine2, store2, "chat", sampling=GREEDY)
    assert opened.notice is None and opened.loaded_tokens == chat.cache.tokens
    resumed = opened.chat
    stats = send(resumed, MESSAGES[4])
    assert stats.loaded == stats.reused > 0
    assert_only_new_message(resumed, chat.cache.ids, stats)

    # /retry prefills nothing; /undo then a new message prefills only that message.
    again = retry(resumed)
    assert again.stats.prefilled == 0 and again.stats.fallback is None
    resumed.undo()
    cached = list(resumed.cache.ids)
    stats = send(resumed, MESSAGES[5])
    assert_only_new_message(resumed, cached, stats)
    new_tokens = len(family.tokenizer(MESSAGES[5], add_special_tokens=False)["input_ids"])
    assert stats.prefilled <= new_tokens + 12

    # An edited earlier message: exact; reuse stops at or before the edit (for recurrent state, at the latest
    # checkpoint kept before it, at worst the end of the system message).
    resumed.messages[3]["content"] = "Edited."
    stats = send(resumed, MESSAGES[0])
    assert 0 < stats.reused <= len(engine2.render(resumed.messages[:3]))


# A template that writes a space before the reply and trims it from past replies (as Qwen3-Next's drops a
# reply's leading space): the rendering of every past reply parts from the cached tokens at its start, so every
# turn cuts the cache back to a checkpoint.
SPACE_TRIMMING_CHATML = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' %}{% set content = content | trim %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n ' }}{% endif %}"
)

# Families whose recurrence transformers computes in float32 even in a float64 model (the Mamba2 scan, the gated
# delta rule, KDA): their recurrent states agree with a fresh prefill to float32's floor, not float64's.
FLOAT32_RECURRENCE = {"qwen3.5", "qwen3-next", "granite-hybrid", "falcon-h1", "nemotron-h", "mamba2", "bamba",
                      "bailing-hybrid"}


def assert_holds_its_tokens(chat, when):
    """Every tensor and every count of every cache layer equals a fresh prefill of the token ids the conversation
    says it holds (relative difference below 1e-6 in float64, 1e-5 for a float32 recurrence), and the next forward
    pass gives the same logits."""
    engine = chat.engine
    # (a dropped cache holds no tokens; ChatCache.model_cache would make an empty one, so it is not asked first)
    assert chat.cache.tokens, f"{when}: the cache was dropped"
    chat.cache.check()
    model_cache = chat.cache.model_cache
    ids, family = list(chat.cache.ids), engine.loaded.name.removeprefix("tiny-").split(":")[0]
    assert int(model_cache.get_seq_length()) == len(ids), f"{when}: get_seq_length() is not the tokens held"
    fresh = fresh_cache(engine, ids)
    for i, (mine, want) in enumerate(zip(model_cache.layers, fresh.layers, strict=True)):
        assert type(mine) is type(want), f"{when}: layer {i} is a {type(mine).__name__}"
        for name, size in differences(mine, want):
            floor = 1e-5 if family in FLOAT32_RECURRENCE and name.startswith("recurrent_states") else 1e-6
            assert size < floor, f"{when}: layer {i} {name} differs from a fresh prefill by {size:.2g}"
    logits = relative(next_logits(engine, model_cache, len(ids), 5), next_logits(engine, fresh, len(ids), 5))
    assert logits < 1e-6, f"{when}: the next logits differ from a fresh prefill's by {logits:.2g}"


def test_the_cache_is_a_fresh_prefill_after_every_cut_undo_retry_drop_and_resume(family, tmp_path, monkeypatch):
    """Regression (issue 19): a restored checkpoint left a linear-attention layer's token count where the cut
    began, so Qwen3-Next's positions ran ahead by the cut's length, and a resumed Qwen3.5 counted from 0."""
    monkeypatch.setattr(family.tokenizer, "chat_template", SPACE_TRIMMING_CHATML)
    engine, store = engine_with_store(family, tmp_path)
    persister = Persister(store, session="chat")
    chat = new_chat(engine, store)
    for turn, text in enumerate(MESSAGES[:3]):
        before = list(chat.cache.ids)
        stats = send(chat, text)
        assert not turn or stats.reused < len(before), "the template did not make the turn cut the cache"
        assert_holds_its_tokens(chat, f"turn {turn + 1}")
        persister.after_turn(chat)
    engine.trim(chat.conversation, chat.cache)  # the cut the next turn makes, on its own
    assert chat.cache.tokens < len(before) + stats.prefilled + stats.generated
    assert_holds_its_tokens(chat, "a cut back to a checkpoint")
    again = retry(chat)
    assert again.stats.fallback is None
    assert_holds_its_tokens(chat, "/retry")
    chat.undo()
    assert_holds_its_tokens(chat, "/undo")
    send(chat, MESSAGES[3])
    assert_holds_its_tokens(chat, "a turn after /undo")
    persister.after_turn(chat)

    store.close()  # resumed by a new engine and store, as a new process would
    engine2, _ = engine_with_store(family, tmp_path)
    resumed = open_chat(engine2, Store(tmp_path).bind(engine2.layout, fingerprint(family), family.name), "chat",
                        sampling=GREEDY).chat
    assert resumed.cache.ids == chat.cache.ids
    assert_holds_its_tokens(resumed, "a resume")
    stats = send(resumed, MESSAGES[4])
    assert stats.loaded > 0
    assert_holds_its_tokens(resumed, "a turn after a resume")

    engine3 = new_engine(family, max_context=150)  # a context drop comes back to the system prompt's checkpoint
    chat3, drops = new_chat(engine3), 0
    for text in MESSAGES:
        stats = send(chat3, text)
        drops += stats.dropped
        assert_holds_its_tokens(chat3, f"a turn that dropped {stats.dropped}")
    assert drops > 0


def first_turn_with_cuts(name, tmp_path=None):
    """A qwen3.5-like hybrid whose template cuts every turn, after one turn (saved as session 'chat' when a store
    directory is given)."""
    loaded = make_family(name)
    loaded.tokenizer.chat_template = SPACE_TRIMMING_CHATML
    engine, store = engine_with_store(loaded, tmp_path) if tmp_path else (new_engine(loaded), None)
    chat = new_chat(engine, store)
    send(chat, MESSAGES[0])
    if store is not None:
        Persister(store, session="chat").after_turn(chat)
    return engine, store, chat


def reply(chat, text):
    """One turn that may refuse reuse; its reply must still be a fresh prefill's. Returns the fallback."""
    engine = chat.engine
    chat.sampling = GREEDY
    end = turn_end(chat.send(text))
    want = greedy_without_cache(engine.model, engine.render(chat.conversation.view()[:-1]), GREEDY.max_new_tokens,
                                engine.stop_ids)
    assert end.token_ids == want
    return end.stats.fallback


def test_a_snapshot_holds_whatever_a_state_layer_keeps():
    """The snapshot is asked of the layer: a count it keeps that kvchat has never heard of is copied and put back."""
    engine, _, chat = first_turn_with_cuts("qwen3.5")
    model_cache = chat.cache.model_cache
    layer = model_cache.layers[0]
    layer.tokens_seen_by_a_newer_transformers = 41
    snapshot = layers.export_state(model_cache, device=None)
    assert snapshot["0.tokens_seen_by_a_newer_transformers"] == 41
    assert snapshot["0.cumulative_length_linear"] == chat.cache.tokens
    layer.tokens_seen_by_a_newer_transformers = 99
    layer.cumulative_length_linear = layer.cumulative_length_linear + 5
    layers.import_state(model_cache, snapshot)
    assert layer.tokens_seen_by_a_newer_transformers == 41 and layers.miscount(model_cache, chat.cache.tokens) is None


def test_a_state_layer_keeping_what_kvchat_cannot_copy_is_never_cut_and_the_turn_prefills_all():
    engine, _, chat = first_turn_with_cuts("qwen3.5")
    chat.cache.model_cache.layers[1].mystery = object()
    assert "layer 1 keeps 'mystery' (a object)" in layers.unsupported(chat.cache.model_cache)
    fallback = reply(chat, MESSAGES[1])
    assert fallback == ("layer 1 keeps 'mystery' (a object), which kvchat cannot snapshot or save exactly; "
                        "prefilling all")
    assert_holds_its_tokens(chat, "after the refusal")


@pytest.mark.parametrize("name", ["qwen3-next", "falcon-h1"])
def test_a_checkpoint_whose_token_count_disagrees_is_refused_with_the_reason(name):
    """The invariant after every restore: a checkpoint that would leave a layer counting other tokens than the
    conversation holds is not continued from; the turn prefills all and says why."""
    engine, _, chat = first_turn_with_cuts(name)
    for point in chat.cache.checkpoints:
        point.state["0.cumulative_length_linear"] = point.state["0.cumulative_length_linear"] + 3
    fallback = reply(chat, MESSAGES[1])
    counted = re.fullmatch(r"layer 0 of the cache counts (\d+) tokens where (\d+) are held; prefilling all", fallback)
    assert counted and int(counted[1]) == int(counted[2]) + 3, fallback
    assert_holds_its_tokens(chat, "after the refusal")


def test_a_stored_state_whose_token_count_disagrees_is_rebuilt_from_the_text(tmp_path):
    engine, store, chat = first_turn_with_cuts("qwen3.5", tmp_path)
    store.close()
    for path in (tmp_path / ".kv" / "states").glob("chat-*.safetensors"):
        with safe_open(path, "pt") as handle:
            meta = {k: v for k, v in handle.metadata().items() if k not in ("crc32", "format")}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        tensors["0.cumulative_length_linear"] += 1
        path.write_bytes(kvfile.encode(tensors, meta))
    engine2, store2 = engine_with_store(engine.loaded, tmp_path)
    opened = open_chat(engine2, store2, "chat", sampling=GREEDY)
    assert opened.notice == (f"session 'chat': KV not usable (layer 0 of the cache counts {chat.cache.tokens + 1} "
                             f"tokens where {chat.cache.tokens} are held); rebuilding its cache from the text")
    assert opened.chat.messages == chat.messages
    assert reply(opened.chat, MESSAGES[1]) is None
    assert_holds_its_tokens(opened.chat, "after the rebuild")


def test_retry_right_after_a_resume_is_exact(family, tmp_path):
    """A recurrent state's checkpoint at the last prompt is stored with its logits: nothing is prefilled.
    Attention-only caches prefill the prompt's last token."""
    engine, store = engine_with_store(family, tmp_path)
    chat = new_chat(engine, store)
    for text in MESSAGES[:2]:
        send(chat, text)
        Persister(store, session="r").after_turn(chat)
    store.close()
    engine2, _ = engine_with_store(family, tmp_path)
    resumed = open_chat(engine2, Store(tmp_path).bind(engine2.layout, fingerprint(family), family.name), "r",
                        sampling=GREEDY).chat
    prompt = engine2.render(resumed.conversation.view()[:-1])
    want = greedy_without_cache(engine2.model, prompt, GREEDY.max_new_tokens, engine2.stop_ids)
    again = retry(resumed)
    assert again.token_ids == want and again.stats.fallback is None
    assert again.stats.prefilled == (0 if layers.has_state(resumed.cache.model_cache) else 1)


def test_a_context_drop_reuses_the_system_prompt(family):
    engine = new_engine(family, max_context=120)
    chat = new_chat(engine)
    drops = 0
    for text in MESSAGES:
        stats = send(chat, text)
        drops += stats.dropped
        if stats.dropped:
            assert stats.reused >= len(engine.system_prefix_ids(SYSTEM))
    assert drops > 0


def test_a_new_conversation_starts_from_the_stored_system_prompt(family, tmp_path):
    engine, store = engine_with_store(family, tmp_path)
    chat = new_chat(engine, store)
    send(chat, MESSAGES[0])
    Persister(store).after_turn(chat)
    fresh = new_chat(engine, store)
    stats = send(fresh, MESSAGES[1])
    assert stats.loaded == stats.reused == len(engine.system_prefix_ids(SYSTEM))


def test_info_arithmetic_matches_what_a_forward_pass_keeps(family):
    """KV bytes per token and the fixed state size in `kvchat info` equal what the cache really holds."""
    shape = memory.model_shape(family, None, layers.layout(family.model, family.device, window_cache(family)))
    sizes = []
    for n in (20, 30):
        cache = layers.new_cache(family.model, window_cache(family))
        with torch.inference_mode():
            family.model(input_ids=torch.arange(5, 5 + n)[None], use_cache=True,
                         **{layers.cache_kwarg(family.model): cache})
        sizes.append(layers.nbytes(cache))
    assert shape.bytes_per_token == (sizes[1] - sizes[0]) // 10
    assert shape.state_bytes == sizes[0] - 20 * shape.bytes_per_token
    lines = "\n".join(memory.info_lines(shape, family.device, family.dtype, MAX_CHECKPOINTS))
    assert f"{shape.bytes_per_token:,} B" in lines or "no layer keeps every token" in lines
    if shape.state_bytes:
        assert "recurrent/conv state" in lines or "window-only sliding layers" in lines


THINKING_CHATML = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' %}{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("name", ["qwen3.5", "granite-hybrid"])
def test_a_template_that_strips_past_think_blocks_stays_exact_and_cheap_on_a_hybrid(name):
    """Qwen3-style templates render a past reply without the think block its prompt ended with, so the cached
    tokens part from the rendering at the reply's header: each turn prefills at most that reply and the new
    message (the checkpoint before the reply header is restored), never the conversation."""
    loaded = make_family(name)
    loaded.tokenizer.chat_template = THINKING_CHATML
    engine = new_engine(loaded)
    chat = new_chat(engine)
    for turn, text in enumerate(MESSAGES):
        before = list(chat.cache.ids)
        stats = send(chat, text)
        if turn:
            assert stats.reused < len(before)  # the template did rewrite the cached past
            # Reuse reaches the end of the previous user message: only the previous reply (with its header)
            # and the new message are prefilled.
            assert stats.reused == len(engine.render(chat.conversation.view()[:-3], generation_prompt=False))


def test_jamba_continues_its_recurrent_state_one_token_at_a_time():
    """Jamba's multi-token pass starts its selective scan from zero: after the first turn every prefilled token
    goes through the model alone, and the replies stay exact."""
    loaded = make_family("jamba")
    engine = new_engine(loaded, prefill_chunk=64)
    assert engine.stepwise
    widths = []

    def record(module, args, kwargs):
        if kwargs.get(layers.cache_kwarg(loaded.model)) is not None:  # the engine's passes, not the reference's
            widths.append(kwargs["input_ids"].shape[1])

    hook = loaded.model.register_forward_pre_hook(record, with_kwargs=True)
    chat = new_chat(engine)
    try:
        send(chat, MESSAGES[0])
        assert widths[0] > 1  # the first prefill, from an empty state, is one pass
        widths.clear()
        stats = send(chat, MESSAGES[1])
    finally:
        hook.remove()
    assert stats.prefilled > 1 and set(widths) == {1}


def test_sparse_attention_indexer_keys_are_cut_and_restored_exactly(tmp_path):
    """DeepSeek-V3.2 layers keep indexer keys beside the KV: a cut and a save/restore leave exactly what a fresh
    prefill of the same tokens holds."""
    loaded = make_family("deepseek-v3.2")
    model, ids = loaded.model, list(range(5, 45))
    key = layers.cache_kwarg(model)

    def prefill(tokens):
        cache = layers.new_cache(model)
        with torch.inference_mode():
            model(input_ids=torch.tensor([tokens]), use_cache=True, **{key: cache})
        return cache

    fresh = prefill(ids[:25])
    held = ChatCache(CacheSpec(model, loaded.device))  # the same one pass over all 40 tokens, held by a ChatCache
    with torch.inference_mode():
        held.feed(ids, lambda cache, start: model(input_ids=torch.tensor([ids]), use_cache=True, **{key: cache}))
    cut = held.model_cache
    assert held.trim(25) == 25
    restored = layers.restore(model, [layers.export(fresh, 0, 10), layers.export(fresh, 10, 25)], loaded.device)
    for mine, want in zip(restored.layers, fresh.layers):  # bit-exact through export and restore
        assert torch.equal(mine.indexer_keys, want.indexer_keys)
        assert torch.equal(mine.keys, want.keys) and torch.equal(mine.values, want.values)
    for mine, want in zip(cut.layers, fresh.layers):  # 40 tokens prefilled then cut: float32 rope rounding differs
        assert mine.indexer_keys.shape == want.indexer_keys.shape
        torch.testing.assert_close(mine.indexer_keys, want.indexer_keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.keys, want.keys, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def hybrid_model_dir(tmp_path_factory):
    """A tiny Qwen3.5 (linear attention + attention) saved as a model directory, for `--model PATH`."""
    loaded = make_family("qwen3.5", dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-qwen3.5")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def run_cli(monkeypatch, capsys, argv, stdin=b""):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_hybrid_session_resumed_by_a_new_run_matches_a_straight_run(monkeypatch, capsys, hybrid_model_dir, tmp_path):
    chat = ["--model", str(hybrid_model_dir), "--temperature", "0", "--max-new-tokens", "8", "--stats",
            "--sessions-dir", str(tmp_path / "sessions")]
    code, straight, _ = run_cli(monkeypatch, capsys, chat + ["--lines"], f"{MESSAGES[0]}\n{MESSAGES[1]}\n".encode())
    assert code == 0
    code, first, _ = run_cli(monkeypatch, capsys, chat + ["--session", "h", "-p", MESSAGES[0]])
    assert code == 0
    code, second, err = run_cli(monkeypatch, capsys, chat + ["--session", "h", "-p", MESSAGES[1]])
    assert code == 0 and first + second == straight
    record = json.loads(err.strip().splitlines()[-1])
    assert record["loaded"] == record["reused"] > 0 and record["fallback"] is None
    assert record["prefilled"] <= len(MESSAGES[1]) + 12  # the new message and template tokens, not the session
    code, out, _ = run_cli(monkeypatch, capsys, ["info", "--model", str(hybrid_model_dir)])
    state = layers.layout(make_family("qwen3.5", dtype=torch.float32).model, torch.device("cpu")).state_bytes()
    assert code == 0 and f"recurrent/conv state: {memory.human(state)} in 3 layers" in out


def test_window_cache_setting_from_the_command_line(monkeypatch, capsys, tmp_path):
    loaded = make_family("gemma3", dtype=torch.float32)
    model_dir = tmp_path / "gemma3"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    code, out, _ = run_cli(monkeypatch, capsys, ["info", "--model", str(model_dir)])
    assert code == 0 and "a window-only cache (--window-cache window) would hold" in out
    code, out, _ = run_cli(monkeypatch, capsys, ["info", "--model", str(model_dir), "--window-cache", "window"])
    assert code == 0 and "window-only sliding layers" in out and "layers with KV: 1," in out
    code, _, err = run_cli(monkeypatch, capsys, ["info", "--model", str(model_dir), "--window-cache", "half"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "invalid --window-cache" in err

    # A session saved with whole windows is another format for a window-only run: rebuilt from its text.
    chat = ["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "6", "--stats",
            "--sessions-dir", str(tmp_path / "sessions"), "--session", "g"]
    assert run_cli(monkeypatch, capsys, chat + ["-p", MESSAGES[0]])[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, chat + ["--window-cache", "window", "-p", MESSAGES[1]])
    assert code == 0 and "another model or format" in err
    code, _, err = run_cli(monkeypatch, capsys, chat + ["--window-cache", "window", "-p", MESSAGES[2]])
    record = json.loads(err.strip().splitlines()[-1])
    assert code == 0 and record["loaded"] == record["reused"] > 0 and record["fallback"] is None


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_whose_cache_kvchat_cannot_keep_are_refused_in_one_line(name):
    loaded = make_family(name)
    with pytest.raises(KvchatError, match="kvchat cannot keep the cache of model") as refused:
        Engine(loaded)
    assert "\n" not in str(refused.value)


def test_a_hybrid_session_resumes_in_a_new_process(hybrid_model_dir, tmp_path):
    """Two separate `python -m kvchat` processes: the second loads the first's KV and recurrent state."""
    import subprocess
    import sys

    chat = [sys.executable, "-m", "kvchat", "--model", str(hybrid_model_dir), "--temperature", "0",
            "--max-new-tokens", "8", "--stats", "--sessions-dir", str(tmp_path / "sessions"), "--session", "p"]
    env = {**os.environ, "KVCHAT_HOME": str(tmp_path / "home")}
    first = subprocess.run(chat + ["-p", MESSAGES[0]], capture_output=True, text=True, env=env, timeout=120)
    second = subprocess.run(chat + ["-p", MESSAGES[1]], capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    record = json.loads(second.stderr.strip().splitlines()[-1])
    assert record["loaded"] == record["reused"] > 0 and record["fallback"] is None
    assert record["prefilled"] <= len(MESSAGES[1]) + 12
