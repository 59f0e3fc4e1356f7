"""The on-disk store: exact resume, shared prefixes, flat autosave, and every kind of damage."""

import json
import os

import pytest
import torch

from kvchat.store import kvfile
from kvchat.store import manifests as store_module
from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.conversation import Conversation
from kvchat.chat.saving import Persister, open_chat, save_chat
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.weights.model import fingerprint
from kvchat.store.sessions import Store, StoreError, check_name
from bound import engine_with_store, new_chat
from reference import greedy_without_cache
from tiny import make_loaded

GREEDY = Sampling(temperature=0, max_new_tokens=12)
SYSTEM = "You are a helpful assistant. Answer in one short sentence, and be kind to cats and dogs."
MESSAGES = [
    "Hello, how are you today?",
    "What is the capital of France?",
    "Tell me a story about a cat.",
    "Numbers: 1 2 3 4 5.",
    "The quick brown fox jumps over the lazy dog.",
]


pytestmark = pytest.mark.usefixtures("small_chunks")


def make_engine(loaded, root, **store_kwargs):
    return engine_with_store(loaded, root, store_kwargs)


def turn(chat, text, persister=None):
    chat.sampling = GREEDY
    try:
        return [e for e in chat.send(text) if isinstance(e, TurnEnd)][0]
    finally:
        if persister is not None:
            persister.after_turn(chat)


def fresh_reply(engine, messages):
    return greedy_without_cache(engine.model, engine.render(messages), GREEDY.max_new_tokens, engine.stop_ids)


def kv_files(root):
    return sorted(p for p in (root / ".kv").rglob("*.safetensors"))


def test_resumed_session_continues_exactly_and_prefills_only_the_new_message(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    persister = Persister(store, "talk")
    for text in MESSAGES[:3]:
        turn(chat, text, persister)
    store.close()
    cached = chat.cache.tokens
    assert cached > 3 * store_module.CHUNK_TOKENS  # several full chunks and a tail

    uninterrupted = turn(chat, MESSAGES[3])

    engine2, store2 = make_engine(tiny, tmp_path)  # a new process, the next day
    opened = open_chat(engine2, store2, "talk")
    assert opened.notice is None and opened.loaded_tokens == cached
    assert opened.chat.messages == chat.messages[:-2]
    resumed = turn(opened.chat, MESSAGES[3])
    assert resumed.token_ids == uninterrupted.token_ids
    # Exactly what the uninterrupted run reused (all of the cache, less any re-tokenization drift of
    # the last reply), now loaded from disk; nothing of the history is prefilled again.
    assert resumed.stats.reused == uninterrupted.stats.reused == resumed.stats.loaded
    assert resumed.stats.reused > cached - GREEDY.max_new_tokens
    assert resumed.stats.prefilled == uninterrupted.stats.prefilled


def test_kv_is_stored_in_the_cache_dtype_bit_exact(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store, "s"))
    store.close()
    engine2, store2 = make_engine(tiny, tmp_path)
    restored = open_chat(engine2, store2, "s").chat
    for before, after in zip(chat.cache.model_cache.layers, restored.cache.model_cache.layers):
        assert after.keys.dtype == torch.float64
        assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)


def test_same_system_prompt_is_prefilled_once_ever(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    first = turn(new_chat(engine, store, SYSTEM), MESSAGES[0], Persister(store))
    assert first.stats.loaded == 0
    system_prefix = engine.system_prefix_ids(SYSTEM)

    engine2, store2 = make_engine(tiny, tmp_path)
    chat = new_chat(engine2, store2, SYSTEM)
    second = turn(chat, MESSAGES[1])
    assert second.stats.loaded == second.stats.reused == len(system_prefix)
    # Only what follows the shared prefix (the user message and its template tokens) is prefilled.
    assert second.stats.prefilled == len(engine2.render(chat.messages[:-1])) - len(system_prefix)
    system_tokens = len(tiny.tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
    assert len(system_prefix) > system_tokens > second.stats.prefilled
    assert second.token_ids == fresh_reply(engine2, chat.messages[:-1])


def test_any_stored_chunk_prefix_is_loaded_for_a_new_conversation(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    persister = Persister(store, "long")
    for text in MESSAGES[:3]:
        turn(chat, text, persister)
    # A new conversation replaying the same first two exchanges, then asking something else.
    engine2, store2 = make_engine(tiny, tmp_path)
    replay = Chat(engine2, Conversation(messages=[dict(m) for m in chat.messages[:5]]),
                  prefixes=store2.longest_prefix)
    end = turn(replay, MESSAGES[4])
    whole_chunks = engine2.render(chat.messages[:5])
    assert end.stats.loaded >= len(whole_chunks) // 16 * 16 - 16
    assert end.token_ids == fresh_reply(engine2, replay.messages[:-1])


def test_fork_stores_no_duplicate_kv_bytes(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES[:2]:
        turn(chat, text, Persister(store, "parent"))
    files_before = {p: p.stat().st_ino for p in kv_files(tmp_path)}
    written_before = store.counters.bytes_written
    save_chat(store, "child", chat)
    manifest_bytes = (tmp_path / "child.json").stat().st_size
    assert store.counters.bytes_written - written_before == manifest_bytes  # no KV bytes written
    inodes = {p.stat().st_ino for p in kv_files(tmp_path)}
    assert inodes == set(files_before.values())  # the child's tail is a hard link to the parent's
    store.close()
    engine2, store2 = make_engine(tiny, tmp_path)
    child = open_chat(engine2, store2, "child")
    assert child.notice is None and child.loaded_tokens == chat.cache.tokens


def test_autosave_writes_only_what_is_new(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    persister = Persister(store, "grow")
    cfg = tiny.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 8
    kv_written = []
    for i in range(20):
        before_bytes, before_tokens = store.counters.bytes_written, chat.cache.tokens
        turn(chat, MESSAGES[i % len(MESSAGES)], persister)
        manifest = (tmp_path / "grow.json").stat().st_size
        prefix_bytes = sum(p.stat().st_size for p in (tmp_path / ".kv" / "prefixes").glob("*.json")) if i == 0 else 0
        kv_bytes = store.counters.bytes_written - before_bytes - manifest - prefix_bytes
        new_tokens = chat.cache.tokens - before_tokens
        # New full chunks plus one tail: never more than the new tokens and one chunk (+ file headers).
        assert kv_bytes <= (new_tokens + 2 * 16) * per_token * 1.1 + 8192 * 3, f"turn {i + 1}"
        kv_written.append(kv_bytes)
    assert chat.cache.tokens > 20 * 16
    assert max(kv_written[10:]) <= 2 * max(kv_written[:10])  # flat, not growing with the session


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_bitflip(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))


def damage_empty(path):
    path.write_bytes(b"")


def damage_missing(path):
    path.unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_bitflip, damage_empty, damage_missing])
@pytest.mark.parametrize("which", ["chunk", "tail"])
def test_damaged_kv_is_detected_and_rebuilt_from_text(tiny, tmp_path, damage, which):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES[:4]:  # at least two turns, ending in a partial chunk (a tail)
        turn(chat, text, Persister(store, "s"))
        if len(chat.messages) >= 5 and len(chat.cache.ids) % store_module.CHUNK_TOKENS:
            break
    store.close()
    manifest = json.loads((tmp_path / "s.json").read_text())
    target = (tmp_path / ".kv" / "chunks" / f"{manifest['chunks'][-1]}.safetensors" if which == "chunk"
              else tmp_path / ".kv" / "tails" / manifest["tail"]["file"])
    damage(target)

    engine2 = Engine(tiny)
    store2 = Store(tmp_path).bind(engine2.layout, fingerprint(tiny), tiny.name)
    opened = open_chat(engine2, store2, "s", prefixes=False)  # the rebuild must come from the text
    assert opened.notice and "not usable" in opened.notice and "rebuilding" in opened.notice
    assert "\n" not in opened.notice
    assert opened.chat.messages == chat.messages  # nothing lost
    assert opened.chat.cache.tokens == 0
    end = turn(opened.chat, MESSAGES[4])
    assert end.token_ids == fresh_reply(engine2, opened.chat.messages[:-1])


def test_a_damaged_chunk_heals_at_the_next_save(tiny, tmp_path):
    """Regression (issue 21, item 12): a corrupted chunk was reported "not usable" and re-prefilled on every
    resume, never rewritten (the save saw that its file existed). The save after a resume writes it again."""
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES[:3]:  # until the cache ends in a partial chunk (a tail)
        turn(chat, text, Persister(store, "s"))
        if len(chat.cache.ids) % store_module.CHUNK_TOKENS:
            break
    store.close()
    manifest = json.loads((tmp_path / "s.json").read_text())
    assert manifest["chunks"] and manifest.get("tail")
    damage_bitflip(tmp_path / ".kv" / "chunks" / f"{manifest['chunks'][0]}.safetensors")
    for resume, text in enumerate(MESSAGES[3:5]):
        engine2 = Engine(tiny)
        store2 = Store(tmp_path).bind(engine2.layout, fingerprint(tiny), tiny.name)
        opened = open_chat(engine2, store2, "s")
        assert (opened.notice is not None) == (resume == 0), opened.notice
        if resume:
            assert opened.loaded_tokens == len(json.loads((tmp_path / "s.json").read_text())["token_ids"])
        end = turn(opened.chat, text, Persister(store2, "s"))
        assert end.token_ids == fresh_reply(engine2, opened.chat.messages[:-1])
        store2.close()


def test_snapshot_of_another_model_is_never_used(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store, "s"))
    store.close()
    other = make_loaded(torch.float64, seed=1)
    engine2, store2 = make_engine(other, tmp_path)
    opened = open_chat(engine2, store2, "s")
    assert opened.notice and "another model" in opened.notice
    assert opened.chat.messages == chat.messages and opened.chat.cache.tokens == 0
    end = turn(opened.chat, MESSAGES[1])
    assert end.stats.loaded == 0  # not even the shared system prefix of the other model
    assert end.token_ids == fresh_reply(engine2, opened.chat.messages[:-1])


def test_session_saved_with_another_chunk_size_is_another_format(tiny, tmp_path, monkeypatch):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store, "s"))
    store.close()
    monkeypatch.setattr(store_module, "CHUNK_TOKENS", 32)
    engine2, store2 = make_engine(tiny, tmp_path)
    opened = open_chat(engine2, store2, "s")
    assert "another model or format" in opened.notice and opened.chat.messages == chat.messages
    end = turn(opened.chat, MESSAGES[1])
    assert end.token_ids == fresh_reply(engine2, opened.chat.messages[:-1])


def test_other_dtype_is_another_model(tmp_path):
    a, b = make_loaded(torch.float64), make_loaded(torch.float32)
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "..", ".hidden", "x" * 65, "a b", "nul\x00"])
def test_bad_session_names_are_refused_and_nothing_is_written(tiny, tmp_path, name):
    root = tmp_path / "sessions"
    engine, store = make_engine(tiny, root)
    with pytest.raises(StoreError, match="invalid session name"):
        open_chat(engine, store, name)
    with pytest.raises(StoreError, match="invalid session name"):
        check_name(name)
    assert not any(tmp_path.rglob("*evil*")) and not root.exists()


def test_second_process_gets_a_clear_lock_error_and_nothing_is_lost(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store, "s"))
    engine2, other = make_engine(tiny, tmp_path)  # flock conflicts between open file descriptions, as between processes
    with pytest.raises(StoreError, match="open in another kvchat process"):
        open_chat(engine2, other, "s")
    turn(chat, MESSAGES[1], Persister(store, "s"))
    store.close()
    reopened = open_chat(engine2, other, "s")
    assert reopened.chat.messages == chat.messages


def test_a_crash_mid_save_leaves_the_previous_state_loadable(tiny, tmp_path, monkeypatch):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    persister = Persister(store, "s")
    for text in MESSAGES[:2]:
        turn(chat, text, persister)
    saved_messages = [dict(m) for m in chat.messages]
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("s.json"):
            raise KeyboardInterrupt("killed")  # the process dies between writing KV and the manifest
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        turn(chat, MESSAGES[2], persister)
    monkeypatch.setattr(os, "replace", real_replace)
    store.close()
    engine2, store2 = make_engine(tiny, tmp_path)
    opened = open_chat(engine2, store2, "s")
    assert opened.notice is None
    assert opened.chat.messages == saved_messages


def test_prune_removes_only_unused_chunks_and_cap_evicts_prefixes(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES[:2]:
        turn(chat, text, Persister(store, "keep"))
    other = new_chat(engine, store, "A different system prompt for a throwaway chat.")
    turn(other, MESSAGES[0], Persister(store, "gone"))
    store.close()
    store.remove_session("gone")
    removed, freed = store.prune()
    assert removed > 0 and freed > 0
    engine2, store2 = make_engine(tiny, tmp_path)
    assert open_chat(engine2, store2, "keep").loaded_tokens == chat.cache.tokens  # still intact
    assert store.prune() == (0, 0)
    # A cap of 1 byte evicts every shared prefix; the session's chunks stay.
    store3 = Store(tmp_path, max_bytes=1).bind(engine.layout, fingerprint(tiny), tiny.name)
    store3.enforce_cap()
    assert store3.summary()["prefixes"] == []
    store2.close()
    assert open_chat(engine, store3, "keep").loaded_tokens == chat.cache.tokens


def test_disk_full_is_one_clear_error_and_the_previous_save_survives(tiny, tmp_path, monkeypatch):
    import errno

    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    persister = Persister(store, "s")
    turn(chat, MESSAGES[0], persister)
    saved = [dict(m) for m in chat.messages]

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write = kvfile.atomic_write
    monkeypatch.setattr(kvfile, "atomic_write", full)
    with pytest.raises(StoreError, match="cannot save session 's'.*No space left on device; the save before "
                                         r"\(1 turn\) is intact"):
        turn(chat, MESSAGES[1], persister)
    monkeypatch.setattr(kvfile, "atomic_write", real_write)
    store.close()
    engine2, store2 = make_engine(tiny, tmp_path)
    opened = open_chat(engine2, store2, "s")
    assert opened.notice is None and opened.chat.messages == saved


@pytest.mark.parametrize("damage", [damage_truncate, damage_bitflip, damage_missing])
def test_damaged_shared_prefix_is_never_used(tiny, tmp_path, damage):
    engine, store = make_engine(tiny, tmp_path)
    turn(new_chat(engine, store, SYSTEM), MESSAGES[0], Persister(store))
    entry = json.loads(next((tmp_path / ".kv" / "prefixes").glob("*.json")).read_text())
    damage(tmp_path / ".kv" / "chunks" / f"{entry['chunks'][-1]}.safetensors")
    engine2, store2 = make_engine(tiny, tmp_path)
    chat = new_chat(engine2, store2, SYSTEM)
    end = turn(chat, MESSAGES[1])
    # Full chunks before the damaged last piece may still serve; the damaged piece never does.
    assert end.stats.loaded < len(engine2.system_prefix_ids(SYSTEM))
    assert end.stats.loaded % store_module.CHUNK_TOKENS == 0
    assert end.token_ids == fresh_reply(engine2, chat.messages[:-1])


# -- recurrent state on disk (a hybrid model: linear attention + attention) ----------------------------


@pytest.fixture(scope="module")
def hybrid():
    from families import make_family

    return make_family("qwen3.5")


def state_files(root):
    return sorted((root / ".kv" / "states").glob("*.safetensors"))


@pytest.mark.parametrize("which", ["end", "earlier"])
def test_a_damaged_state_file_is_never_used(hybrid, tmp_path, which):
    engine, store = make_engine(hybrid, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES[:3]:
        turn(chat, text, Persister(store, "h"))
    store.close()
    manifest = json.loads((tmp_path / "h.json").read_text())
    entry = manifest["states"][-1 if which == "end" else -2]
    target = tmp_path / ".kv" / "states" / f"h-{entry['key'][:16]}.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))

    engine2 = Engine(hybrid)
    opened = open_chat(engine2, Store(tmp_path).bind(engine2.layout, fingerprint(hybrid), hybrid.name), "h",
                       prefixes=False)
    resumed = opened.chat
    assert resumed.messages == chat.messages  # nothing lost
    if which == "end":  # the state the cache needs: the session is rebuilt from its text
        assert "not usable" in opened.notice and "checksum" in opened.notice and resumed.cache.tokens == 0
    else:  # an earlier checkpoint: skipped, never restored
        assert opened.notice is None and entry["tokens"] not in [c.tokens for c in resumed.cache.checkpoints]
    end = turn(resumed, MESSAGES[3])
    assert end.token_ids == fresh_reply(engine2, resumed.messages[:-1])


def test_a_sessions_state_files_stay_few_are_linked_by_a_fork_and_go_with_it(hybrid, tmp_path):
    engine, store = make_engine(hybrid, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES:
        turn(chat, text, Persister(store, "a"))
        own = [p for p in state_files(tmp_path) if p.name.startswith("a-")]
        assert len(own) <= 5  # the system prompt's, the last turn's three, the end: older ones are deleted
    shared = [p for p in state_files(tmp_path) if "-" not in p.stem]
    assert len(shared) == 1  # the system prompt's state, for any new conversation

    written = store.counters.bytes_written
    save_chat(store, "b", chat)  # a fork
    assert store.counters.bytes_written - written == (tmp_path / "b.json").stat().st_size
    forked = [p for p in state_files(tmp_path) if p.name.startswith("b-")]
    assert forked and all(p.stat().st_nlink == 2 for p in forked)

    store.remove_session("a")
    assert not [p for p in state_files(tmp_path) if p.name.startswith("a-")]
    assert store.prune()[0] >= 0 and set(forked + shared) <= set(state_files(tmp_path))
    store.close()
    engine2, store2 = make_engine(hybrid, tmp_path)
    opened = open_chat(engine2, store2, "b")
    assert opened.notice is None and opened.loaded_tokens == len(chat.cache.ids)
    end = turn(opened.chat, "One more, please.")
    assert end.stats.loaded == end.stats.reused > 0
    assert end.token_ids == fresh_reply(engine2, opened.chat.messages[:-1])


def test_a_tail_file_named_in_a_manifest_never_reaches_outside_the_store(tiny, tmp_path):
    """Regression: `tail.file` was opened, and deleted on the next save and by `sessions rm`, as written."""
    root = tmp_path / "store"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    engine, store = make_engine(tiny, root)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES:  # until the session ends in a partial chunk, so that it has a tail
        turn(chat, text, Persister(store, "s"))
        if len(chat.cache.ids) % store_module.CHUNK_TOKENS:
            break
    store.close()
    manifest = json.loads((root / "s.json").read_text())
    assert manifest["tail"]
    manifest["tail"]["file"] = "../../victim.txt"
    (root / "s.json").write_text(json.dumps(manifest))

    engine2, store2 = make_engine(tiny, root)
    opened = open_chat(engine2, store2, "s")  # the tail is found by its key, not by the name written in the manifest
    assert opened.notice is None and opened.loaded_tokens == len(chat.cache.ids)
    turn(opened.chat, "And another one?", Persister(store2, "s"))
    store2.remove_session("s")
    assert victim.read_text() == "keep me"


def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(tiny, tmp_path):
    """Regression (issue 10): NAME.lock was followed through a symlink and its target overwritten with the PID."""
    root = tmp_path / "store"
    root.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (root / "s.lock").symlink_to(victim)
    _, store = make_engine(tiny, root)
    with pytest.raises(StoreError, match="lock file .* is not a regular file"):
        store.lock("s")
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("plant", ["fifo", "symlink", "directory"])
def test_a_tail_that_is_not_a_regular_file_is_reported_never_read(tiny, tmp_path, plant):
    """Regression (issue 10): a FIFO in place of a KV file hung kvchat; a symlink was followed out of the store."""
    import signal

    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    for text in MESSAGES:
        turn(chat, text, Persister(store, "s"))
        if len(chat.cache.ids) % store_module.CHUNK_TOKENS:
            break
    store.close()
    manifest = json.loads((tmp_path / "s.json").read_text())
    tail = tmp_path / ".kv" / "tails" / manifest["tail"]["file"]
    tail.unlink()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    outside.write_bytes(b"not yours")
    {"fifo": lambda: os.mkfifo(tail), "symlink": lambda: tail.symlink_to(outside), "directory": tail.mkdir}[plant]()

    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("hung on the planted file")))
    signal.alarm(20)
    try:
        engine2, store2 = make_engine(tiny, tmp_path)
        opened = open_chat(engine2, store2, "s")
    finally:
        signal.alarm(0)
    assert opened.notice and "not a regular file" in opened.notice and opened.chat.cache.tokens == 0
    assert opened.chat.messages == chat.messages
    assert outside.read_bytes() == b"not yours"


def test_a_damaged_prefix_entry_under_a_size_cap_does_not_stop_the_save(tiny, tmp_path):
    """Regression (issue 10): with cache_max_mb, one damaged prefix manifest crashed after the reply
    (JSONDecodeError in the cap), and the session was never saved."""
    engine, store = make_engine(tiny, tmp_path, max_bytes=1)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store, "s"))
    (tmp_path / ".kv" / "prefixes" / "damaged.json").write_text("{not json")
    other = new_chat(engine, store, "Another system prompt, another prefix.")
    turn(other, MESSAGES[1], Persister(store, "t"))
    assert store.read_manifest("t").turns == 1


def test_an_overlong_session_name_is_not_echoed_whole(tiny, tmp_path):
    with pytest.raises(StoreError) as refused:
        check_name("x" * 100_000)
    assert len(str(refused.value)) < 300


def _kv_bytes(header, body=b"\0" * 16):
    import struct
    import zlib

    if isinstance(header, dict) and isinstance(header.get("__metadata__"), dict):
        header["__metadata__"]["crc32"] = str(zlib.crc32(body))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("header", [
    [1, 2, 3],
    {"__metadata__": "not a dict"},
    {"__metadata__": {"format": "1", "fingerprint": "f"}, "0.keys": {"dtype": "F32", "shape": [1, 1, 2]}},
    {"__metadata__": {"format": "1", "fingerprint": "f"}, "0.keys": {"dtype": "F32", "shape": 4, "data_offsets": [0, 8]}},
    {"__metadata__": {"format": "1", "fingerprint": "f"},
     "0.keys": {"dtype": "F32", "shape": [1, 1, 2], "data_offsets": ["a", None]}},
], ids=["list", "metadata-string", "no-offsets", "shape-int", "offsets-wrong-type"])
def test_a_kv_header_of_valid_json_and_crc_but_wrong_structure_is_damage_not_a_traceback(tmp_path, header):
    """Regression (issue 10): four such headers raised KeyError/TypeError out of the reader."""
    from kvchat.store import kvfile

    path = tmp_path / "chunk.safetensors"
    path.write_bytes(_kv_bytes(header))
    with pytest.raises(kvfile.DamagedKV):
        kvfile.read(path, {"fingerprint": "f"}, {"0.keys": (1, 1, 2)}, torch.float32)


def _two_saves(tiny, root, name="s", texts=MESSAGES[:2]):
    engine, store = make_engine(tiny, root)
    chat = new_chat(engine, store, SYSTEM)
    for text in texts:
        turn(chat, text, Persister(store, name))
    store.close()
    return chat


@pytest.mark.parametrize("damage", ["swapped", "changed-byte", "wrong-types", "deleted"])
def test_a_damaged_manifest_is_never_adopted_and_the_previous_save_is_recovered(tiny, tmp_path, damage):
    """Regression (issue 10): a manifest swapped with another session's was adopted, a changed byte that kept
    the JSON valid was accepted, valid JSON of the wrong types raised tracebacks, and there was no second copy."""
    chat = _two_saves(tiny, tmp_path, "s")
    other = _two_saves(tiny, tmp_path / "elsewhere", "t", MESSAGES[2:4])
    path = tmp_path / "s.json"
    manifest = json.loads(path.read_text())
    if damage == "swapped":
        path.write_bytes((tmp_path / "elsewhere" / "t.json").read_bytes())
    elif damage == "changed-byte":
        manifest["messages"][1]["content"] = manifest["messages"][1]["content"].replace("o", "0")
        path.write_text(json.dumps(manifest))
    elif damage == "wrong-types":
        path.write_text(json.dumps({**manifest, "token_ids": "1,2,3", "first_kept": "x"}))
    else:
        path.unlink()
    engine, store = make_engine(tiny, tmp_path)
    opened = open_chat(engine, store, "s")
    assert opened.notice and "recovered the save before it (1 turns)" in opened.notice
    assert opened.chat.messages == chat.messages[:3]  # the first turn, as saved before the second
    assert opened.chat.messages != other.messages[:3]
    end = turn(opened.chat, MESSAGES[2], Persister(store, "s"))
    assert end.token_ids == fresh_reply(engine, opened.chat.messages[:-1])
    assert store.read_manifest("s").turns == 2 and store.read_manifest("s").recovered is None


@pytest.mark.parametrize("fields", [{"messages": {"a": 1}}, {"messages": [{"role": 1, "content": None}]},
                                    {"chunks": 5}, {"tail": [1]}, {"states": "x"}, {"turns": "many"},
                                    {"first_kept": 10**6}],
                         ids=["messages-dict", "message-types", "chunks", "tail", "states", "turns", "first-kept"])
def test_valid_json_of_the_wrong_types_is_one_clear_error(tiny, tmp_path, fields):
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store, "s"))  # one save: no previous to recover
    store.close()
    manifest = json.loads((tmp_path / "s.json").read_text())
    (tmp_path / "s.json").write_text(json.dumps({**manifest, **fields}))
    engine2, store2 = make_engine(tiny, tmp_path)
    with pytest.raises(StoreError, match="cannot be read .* it was left as it is"):
        open_chat(engine2, store2, "s")
    assert json.loads((tmp_path / "s.json").read_text()) == {**manifest, **fields}  # nothing touched
    rows = store2.list_sessions()
    assert rows[0]["damaged"]


def test_prune_waits_for_a_save_in_progress_and_counts_leftovers(tiny, tmp_path):
    """Regression (issue 10): prune took no lock, so it deleted chunks and temporaries a concurrent save had
    written but not yet listed; leftovers of killed writes were not counted by `kvchat cache`."""
    import threading

    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0])
    (tmp_path / ".kv" / "chunks").mkdir(parents=True, exist_ok=True)
    (tmp_path / ".kv" / "chunks" / ".orphan.safetensors.1.tmp").write_bytes(b"x")
    assert store.summary()["leftovers"] == 1

    in_save, go_on = threading.Event(), threading.Event()
    real_write_kv = store.blobs.write_kv

    def slow_write_kv(*args, **kwargs):  # a save stopped between writing its chunks and listing them
        real_write_kv(*args, **kwargs)
        in_save.set()
        go_on.wait(10)

    store.blobs.write_kv = slow_write_kv
    saver = threading.Thread(target=save_chat, args=(store, "s", chat))
    saver.start()
    assert in_save.wait(10)
    pruner = threading.Thread(target=Store(tmp_path).prune)
    pruner.start()
    pruner.join(0.5)
    assert pruner.is_alive()  # it waits for the save
    go_on.set()
    saver.join(10)
    pruner.join(10)
    store.close()
    engine2, store2 = make_engine(tiny, tmp_path)
    opened = open_chat(engine2, store2, "s")
    assert opened.notice is None and opened.loaded_tokens == len(chat.cache.ids)  # nothing the save wrote was lost
    assert store2.summary()["leftovers"] == 0


def test_the_size_cap_never_evicts_the_prefix_it_just_saved(tiny, tmp_path):
    engine, store = make_engine(tiny, tmp_path, max_bytes=1)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store))
    assert len(list((tmp_path / ".kv" / "prefixes").glob("*.json"))) == 1


def test_weights_the_fingerprint_sample_misses_still_make_another_model(tmp_path):
    """Regression (issue 10): changing weights that the sampled fingerprint never reads gave the same
    fingerprint, and model B loaded model A's KV. Weights from files count by their SHA-256."""
    from kvchat.weights.model import load_model

    dirs = []
    for changed in (False, True):
        loaded = make_loaded(torch.float32)
        if changed:
            with torch.no_grad():
                loaded.model.model.embed_tokens.weight[5, 1] += 1.0  # not one of the ~4k sampled values
        path = tmp_path / f"model-{changed}"
        loaded.model.save_pretrained(path)
        loaded.tokenizer.save_pretrained(path)
        dirs.append(path)
    a, b = (load_model(str(path), "cpu", "float32") for path in dirs)
    assert a.weights and b.weights
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(load_model(str(dirs[0]), "cpu", "float32"))  # stable, from the memo


def test_a_weight_file_rewritten_with_the_same_size_and_mtime_changes_the_fingerprint(tmp_path, monkeypatch):
    """Regression (issue 19): a remembered digest was keyed by path, size and mtime, so weights updated in place
    (mtime set back) kept the old fingerprint, and a resumed session used KV made by the old weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from kvchat.weights import model as model_module
    from kvchat.weights.model import load_model

    monkeypatch.setattr(model_module, "SETTLED_NS", 0)  # remember digests of files written a moment ago
    path = tmp_path / "m"
    loaded = make_loaded(torch.float32)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    before = fingerprint(load_model(str(path), "cpu", "float32"))
    memo = json.loads((tmp_path / "home" / "digests.json").read_text())
    assert len(memo) == 1  # remembered: the next run does not read the weights again

    weights = path / "model.safetensors"
    info = weights.stat()
    with safe_open(weights, "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"][5, 1] += 1.0
    save_file(tensors, weights, metadata=meta)
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)

    after = fingerprint(load_model(str(path), "cpu", "float32"))
    assert after != before
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "fresh-home"))
    assert after == fingerprint(load_model(str(path), "cpu", "float32"))


def test_a_weight_file_changed_a_moment_ago_is_hashed_again(tmp_path):
    """A digest is remembered only for a file that has not changed in the last seconds (a write within the same
    timestamp tick would go unseen), so a file just written is read again rather than trusted."""
    from kvchat.weights.model import file_digest

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 64)
    first = file_digest(weights)
    weights.write_bytes(b"b" * 64)  # quite possibly within the same tick
    assert file_digest(weights) != first
    assert not (tmp_path / "home" / "digests.json").exists()


@pytest.mark.parametrize("failure", ["read-only", "disk-full"])
def test_a_read_only_or_full_store_at_lock_time_is_one_clear_error_or_no_error(tiny, tmp_path, monkeypatch, failure):
    """Regression (issue 10): a read-only store or a full disk when taking a session's lock gave a traceback."""
    import errno

    from kvchat.store import kvfile

    _, store = make_engine(tiny, tmp_path)
    if failure == "read-only":
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(kvfile, "open_regular", refuse)
        with pytest.raises(StoreError, match="cannot lock session 's' with .*s.lock: Read-only file system"):
            store.lock("s")
    else:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        store.lock("s")  # the flock holds; only the holder's pid could not be written
        monkeypatch.undo()
        with pytest.raises(StoreError, match="open in another kvchat process"):
            Store(tmp_path).lock("s")
    store.close()


@pytest.mark.parametrize("lock", ["s.lock", ".kv/store.lock"])
def test_a_lock_file_made_unreadable_is_one_line_that_names_it_and_the_session_is_untouched(tiny, lock):
    """Permission 000 on a lock file, for a user it stops (as root the store is read as nobody): one line
    naming the file, never a traceback, and the saved transcript stays as it was."""
    import shutil
    import tempfile
    from pathlib import Path

    from corruption_loop import NOBODY, _as_user, _hand_over

    top = Path(tempfile.mkdtemp(prefix="kvchat-lock-"))
    try:
        root = top / "sessions"
        engine, store = make_engine(tiny, root)
        chat = new_chat(engine, store, SYSTEM)
        turn(chat, MESSAGES[0], Persister(store, "s"))
        store.close()
        saved = (root / "s.json").read_bytes()
        (root / lock).touch()  # a session's lock file is left only by a process that died (kill -9)
        (root / lock).chmod(0)
        user = NOBODY if os.geteuid() == 0 else None
        if user is not None:
            _hand_over(top, user)
        with _as_user(user):
            engine, store = make_engine(tiny, root)
            try:
                if lock == "s.lock":
                    with pytest.raises(StoreError, match=r"cannot lock session 's' with .*s\.lock: Permission denied"):
                        store.lock("s")
                else:
                    opened = open_chat(engine, store, "s")
                    turn(opened.chat, MESSAGES[1])
                    with pytest.raises(StoreError, match=r"Permission denied \(the store's lock file .*store\.lock\); "
                                                         "the session on disk is as it was"):
                        Persister(store, "s").after_turn(opened.chat)
            finally:
                store.close()
        assert (root / "s.json").read_bytes() == saved
    finally:
        shutil.rmtree(top)


def test_a_clean_close_leaves_no_lock_file_and_the_lock_still_excludes(tiny, tmp_path):
    """Regression (issue 11): NAME.lock files stayed after a clean exit."""
    engine, store = make_engine(tiny, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    turn(chat, MESSAGES[0], Persister(store, "s"))
    assert (tmp_path / "s.lock").exists()
    other = Store(tmp_path)
    with pytest.raises(StoreError, match="open in another kvchat process"):
        other.lock("s")
    store.close()
    assert not (tmp_path / "s.lock").exists()
    other.lock("s")  # free now
    with pytest.raises(StoreError, match="open in another kvchat process"):
        Store(tmp_path).lock("s")
    other.close()
    assert not list(tmp_path.glob("*.lock"))


@pytest.mark.parametrize("family", ["tiny", "hybrid"])
def test_a_full_disk_for_the_kv_keeps_the_text_and_a_resume_rebuilds_exactly(family, request, tmp_path, monkeypatch):
    """Regression (issue 21, item 3): the KV was written before the transcript and any error dropped the whole
    save, so a full disk lost every later turn's text. Now the text is saved first and on its own; a KV that
    cannot be written is one notice, no partial file is left, and a resume re-reads what is missing and answers
    as a fresh prefill does."""
    import errno

    loaded = request.getfixturevalue(family)
    engine, store = make_engine(loaded, tmp_path)
    chat = new_chat(engine, store, SYSTEM)
    persister = Persister(store, "s")
    turn(chat, MESSAGES[0], persister)
    real_write = kvfile.atomic_write

    def kv_full(path, data):
        if path.suffix == ".safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(kvfile, "atomic_write", kv_full)
    turn(chat, MESSAGES[1])
    assert persister.after_turn(chat) == ("session 's': its text is saved, its KV is not (No space left on device); "
                                          "resuming it re-reads what is missing")
    monkeypatch.setattr(kvfile, "atomic_write", real_write)
    store.close()
    assert not [p for p in tmp_path.rglob("*.tmp")]
    engine2, store2 = make_engine(loaded, tmp_path)
    opened = open_chat(engine2, store2, "s")
    assert opened.chat.messages == chat.messages
    end = turn(opened.chat, MESSAGES[2])
    assert end.token_ids == fresh_reply(engine2, opened.chat.messages[:-1])
    assert 0 < end.stats.reused < len(engine2.render(opened.chat.messages[:-1]))  # the last save's KV was kept
    store2.close()
