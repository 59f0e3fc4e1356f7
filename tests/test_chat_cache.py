"""ChatCache on its own (issue 20): trimmed, checkpointed, exported and adopted, it holds exactly what a fresh
prefill of its token ids gives, for a full-attention, a sliding-window, a hybrid recurrent and a KV-sharing model."""

import pytest
import torch

from exact import differences, fresh_cache, next_logits, relative
from families import make_family, window_cache
from kvchat.chat.chat import Chat
from kvchat.chat.conversation import Conversation
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.config import Sampling
from tiny import make_loaded

GREEDY = Sampling(temperature=0, max_new_tokens=6)
MESSAGES = ["Hello, how are you today?", "What is the capital of France?", "Tell me a story about a cat."]
FLOOR = {"qwen3.5": 1e-5}  # its recurrence runs in float32 inside a float64 model


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen3.5", "gemma3n"],
                ids=["full", "sliding", "hybrid", "kv-sharing"])
def engine(request):
    loaded = make_loaded(torch.float64) if request.param == "llama" else make_family(request.param)
    return Engine(loaded, window_cache=window_cache(loaded))


def assert_fresh(engine, cache, floor):
    """Every layer of `cache` equals a fresh prefill of the ids it says it holds, and so do the next logits."""
    cache.check()
    ids = list(cache.ids)
    fresh = fresh_cache(engine, ids)
    for i, (mine, want) in enumerate(zip(cache.model_cache.layers, fresh.layers, strict=True)):
        assert type(mine) is type(want), f"layer {i} is a {type(mine).__name__}"
        for name, size in differences(mine, want):
            assert size < floor, f"layer {i} {name} differs from a fresh prefill by {size:.2g}"
    logits = relative(next_logits(engine, cache.model_cache, len(ids), 5), next_logits(engine, fresh, len(ids), 5))
    assert logits < floor, f"the next logits differ from a fresh prefill's by {logits:.2g}"


def chat_turns(engine, n):
    """A chat after `n` turns, and how many tokens its cache held after each."""
    chat, held = Chat.start(engine, "Be brief.", sampling=GREEDY), []
    for text in MESSAGES[:n]:
        assert [e for e in chat.send(text) if isinstance(e, TurnEnd)]
        held.append(chat.cache.tokens)
    return chat, held


def test_a_trimmed_checkpointed_exported_and_adopted_cache_is_a_fresh_prefill(engine):
    floor = FLOOR.get(engine.loaded.name.removeprefix("tiny-"), 1e-9)
    chat, held = chat_turns(engine, 3)
    cache = chat.cache
    assert cache.has_state == engine.layout.has_state
    assert_fresh(engine, cache, floor)

    # Back to the end of the second turn: attention is cut there, a state comes back from its checkpoint.
    back = held[1]
    assert cache.trim(back) == back and cache.tokens == back
    assert_fresh(engine, cache, floor)
    cache.checkpoint()
    if cache.has_state:
        assert cache.checkpoint_at(back) is not None

    # Exported as the store writes it (two pieces, the state, the checkpoints) and adopted by a new cache.
    ids, middle = list(cache.ids), back // 2
    pieces = [cache.export(0, middle), cache.export(middle, back)]
    state = cache.export_state() if cache.has_state else None
    adopted = engine.new_cache()
    assert adopted.adopt(ids, pieces, state, list(cache.checkpoints)) is None
    assert list(adopted.ids) == ids and adopted.nbytes == cache.nbytes and adopted.loaded == len(ids)
    assert_fresh(engine, adopted, floor)
    if cache.has_state:  # its checkpoints came too: it can be cut back to the system prompt's
        assert [c.tokens for c in adopted.checkpoints] == [c.tokens for c in cache.checkpoints]

    # The chat goes on from the adopted cache with the tokens of a chat that never left memory.
    resumed = Chat(engine, Conversation(messages=[dict(m) for m in chat.messages[:5]]), adopted, GREEDY)
    mine = [e for e in resumed.send(MESSAGES[2]) if isinstance(e, TurnEnd)][0]
    straight, _ = chat_turns(engine, 2)
    want = [e for e in straight.send(MESSAGES[2]) if isinstance(e, TurnEnd)][0]
    assert mine.token_ids == want.token_ids and mine.stats.reused > 0


def test_adopting_pieces_that_do_not_hold_the_ids_is_refused_and_changes_nothing(engine):
    chat, held = chat_turns(engine, 1)
    cache = chat.cache
    pieces = [cache.export(0, held[0])]
    state = cache.export_state() if cache.has_state else None
    other = engine.new_cache()
    assert other.adopt(list(cache.ids)[:-1], pieces, state) is not None  # one id fewer than the KV holds
    assert other.tokens == 0 and other.nbytes == 0
    with pytest.raises(AssertionError, match="cannot be saved"):
        engine.new_cache().export(0, 1)  # an empty cache exports nothing
