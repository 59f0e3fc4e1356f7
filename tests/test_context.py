"""Long conversations: the context budget drops whole old turns, oversized input is refused, KV memory is reported."""

import io
import json

import pytest
import torch

from kvchat.cache import layers
from kvchat.weights import memory
from kvchat.ui.cli import main
from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.conversation import Conversation
from kvchat.chat.engine import Engine, TurnEnd, common_prefix
from kvchat.errors import InputError
from kvchat.weights.model import fingerprint
from kvchat.chat.saving import Persister
from kvchat.store.sessions import Store
from reference import greedy_without_cache

SAMPLING = Sampling(temperature=0, max_new_tokens=8)
SYSTEM = "You are a helpful assistant."
TOPICS = ["cats", "dogs", "the sea", "numbers", "Paris", "a fox", "the sky", "bread", "music", "trees"]


def turn(chat, text):
    chat.sampling = SAMPLING
    return [e for e in chat.send(text) if isinstance(e, TurnEnd)][0]


def test_thirty_turns_in_a_small_context_drop_whole_turns_and_stay_exact(tiny, tmp_path):
    engine = Engine(tiny, max_context=160)
    store = Store(tmp_path).bind(engine.layout, fingerprint(tiny), tiny.name)
    persister = Persister(store, "long")
    chat = Chat.start(engine, SYSTEM)
    drops = 0
    for i in range(30):
        text = f"Tell me about {TOPICS[i % len(TOPICS)]}, please."
        cached_before = list(chat.cache.ids)
        end = turn(chat, text)
        persister.after_turn(chat)
        view = chat.conversation.view()
        prompt = engine.render(view[:-1])
        assert len(prompt) + SAMPLING.max_new_tokens <= 160
        # The reply is what a fresh prefill of exactly the turns kept gives.
        assert end.token_ids == greedy_without_cache(tiny.model, prompt, SAMPLING.max_new_tokens, engine.stop_ids)
        # Only the changed suffix is prefilled: everything up to the first differing token is reused.
        assert end.stats.reused == min(common_prefix(cached_before, prompt), len(prompt) - 1)
        assert end.stats.prefilled == len(prompt) - end.stats.reused
        if end.stats.dropped:
            drops += 1
            assert view[0] == {"role": "system", "content": SYSTEM}  # the system prompt is always kept
            assert view[1]["role"] == "user"  # whole exchanges are dropped
            assert end.stats.reused >= len(engine.system_prefix_ids(SYSTEM)) - 1
        chat.cache.check()
    assert drops >= 3 and chat.conversation.dropped_turns > 10
    # The transcript on disk keeps every turn.
    manifest = store.read_manifest("long")
    assert sum(1 for m in manifest.messages if m["role"] == "user") == 30
    assert manifest.first_kept == chat.conversation.first_kept
    store.close()


def test_too_long_message_is_refused_and_changes_nothing(tiny):
    engine = Engine(tiny, max_context=120)
    chat = Chat.start(engine, SYSTEM)
    turn(chat, "Hello!")
    before = ([dict(m) for m in chat.messages], list(chat.cache.ids), chat.conversation.first_kept, chat.cache.nbytes)
    with pytest.raises(InputError, match="the message is too long"):
        chat.send("cats and dogs " * 60)
    assert (chat.messages, list(chat.cache.ids), chat.conversation.first_kept, chat.cache.nbytes) == before
    end = turn(chat, "What about dogs?")  # the next turn works and reuses the cache
    assert end.stats.reused > 0


def test_reply_room_that_leaves_no_prompt_room_is_an_error(tiny):
    engine = Engine(tiny, max_context=64)
    with pytest.raises(InputError, match="max_new_tokens=64 leaves no room"):
        Chat.start(engine, sampling=Sampling(temperature=0, max_new_tokens=64)).send("Hi")


def test_max_context_above_the_model_is_refused(tiny):
    from kvchat.errors import KvchatError

    with pytest.raises(KvchatError, match="exceeds the model's context of 4096"):
        Engine(tiny, max_context=5000)


def test_info_bytes_per_token_equal_a_real_forward_pass(tiny):
    shape = memory.model_shape(tiny, None, layers.layout(tiny.model, tiny.device))
    cache = layers.new_cache(tiny.model)
    with torch.inference_mode():
        tiny.model(input_ids=torch.arange(5, 42)[None], cache=cache, use_cache=True)
    assert shape.bytes_per_token == layers.nbytes(cache) // 37
    assert shape.bytes_per_token == 2 * 2 * 2 * 16 * 8  # layers, KV heads, head dim, float64
    lines = "\n".join(memory.info_lines(shape, torch.device("cpu"), torch.float64))
    assert f"= {shape.bytes_per_token:,} B" in lines
    assert "Llama-3-70B" in lines and "320.0 KiB per token instead of the 2.5 MiB" in lines


def test_info_command_prints_the_formula(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["info", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "KV bytes per token: 2 x 2 layers x 2 KV heads x 16 head dim x 4 bytes = 512 B" in out
    assert "KV cache at the full context of 4096 tokens: 2.0 MiB" in out


def test_memory_guard_warns_with_numbers_and_a_suggestion(monkeypatch, capsys, tiny_model_dir):
    shape = memory.KVShape("m", layers=2, kv_heads=2, head_dim=16, context=4096, dtype_bytes=4)
    assert memory.memory_warning(shape, 10**9) is None
    warning = memory.memory_warning(shape, 1_000_000)
    assert "needs 2.0 MiB (512 B/token), but only 976.6 KiB is free" in warning
    assert "set max_context to 1757 or less" in warning
    monkeypatch.setattr(memory, "free_memory", lambda device: 100_000)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code = main(["--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "2", "-p", "hi"])
    err = capsys.readouterr().err
    assert code == 0 and "warning: the KV cache at the full 4096-token context" in err and "--max-context 175" in err


def test_dropped_turns_are_announced_on_stderr(monkeypatch, capsys, tiny_model_dir):
    stdin = "\n".join(f"Tell me about {t}, please." for t in TOPICS).encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "8",
                 "--max-context", "120", "--lines"])
    out, err = capsys.readouterr()
    assert code == 0 and len(out.splitlines()) >= len(TOPICS)
    assert "oldest turn" in err and "120-token context" in err and "the transcript keeps them" in err


def test_oversized_stdin_message_is_one_line_and_exit_1(monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"dogs " * 500)))
    code = main(["--model", str(tiny_model_dir), "--max-context", "200", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and "too long" in err and len(err.strip().splitlines()) == 1


def test_lines_mode_reports_a_too_long_line_by_number_and_goes_on(monkeypatch, capsys, tiny_model_dir):
    """Regression (issue 10): one message too long for the context ended the whole --lines script."""
    stdin = b"Tell me about dogs.\n\n" + b"dogs " * 500 + b"\nTell me about cats.\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["--model", str(tiny_model_dir), "--temperature", "0", "--max-context", "200",
                 "--max-new-tokens", "8", "--lines", "--stats"])
    out, err = capsys.readouterr()
    assert code == 1
    assert len(out.splitlines()) == 2  # the replies to lines 1 and 4
    assert "line 3: the message is too long" in err and "1 of 3 lines failed" in err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(records) == 2 and records[1]["reused"] > 0  # the conversation went on, its cache intact


def test_fit_finds_the_fewest_drops_with_a_few_renders_not_one_per_turn(tiny, monkeypatch):
    """Regression (issue 10): fit() re-rendered the conversation once per dropped turn (39 renders for one
    drop at 16k tokens)."""
    engine = Engine(tiny, max_context=400)
    conv = Conversation.start("Be brief.")
    for i in range(60):
        conv.messages += [{"role": "user", "content": f"Tell me about topic {i}, please."},
                          {"role": "assistant", "content": f"Topic {i} is a fine topic."}]
    conv.messages.append({"role": "user", "content": "And the last one?"})
    sampling = Sampling(temperature=0, max_new_tokens=8)
    room = 400 - 8
    users = [i for i, m in enumerate(conv.messages) if m["role"] == "user"]
    fewest = next(k for k in range(1, len(users))
                  if len(engine.render(Conversation(messages=conv.messages, first_kept=users[k]).view())) <= room * 3 // 4)
    calls = {"n": 0}
    real_render = engine.render

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_render(*args, **kwargs)

    monkeypatch.setattr(engine, "render", counting)
    target, first_kept, dropped = engine.fit(conv, sampling)
    assert (dropped, first_kept) == (fewest, users[fewest]) and len(target) <= room * 3 // 4
    assert calls["n"] <= 10 < fewest  # bisection: a handful of renders for dozens of dropped turns
