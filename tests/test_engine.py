"""Exactness of cache reuse: every turn gives the same greedy tokens as a fresh, cache-free run."""

import pytest
import torch

from kvchat.cache import layers
from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, Token, TurnEnd, common_prefix
from kvchat.errors import InputError
from reference import greedy_without_cache
from tiny import make_loaded

GREEDY = Sampling(temperature=0, max_new_tokens=10)
MESSAGES = [
    "Hello, how are you today?",
    "What is the capital of France?",
    "Tell me a story about a cat.",
    "Numbers: 1 2 3 4 5.",
]


def run_turn(chat, text, sampling=GREEDY):
    chat.sampling = sampling
    events = list(chat.send(text))
    end = events[-1]
    assert isinstance(end, TurnEnd)
    assert "".join(e.text for e in events if isinstance(e, Token)) == end.reply
    return end


def fresh_reply_ids(engine, messages, sampling=GREEDY):
    """What a fresh full prefill (no cache ever) answers to `messages`."""
    prompt = engine.render(messages)
    return greedy_without_cache(engine.model, prompt, sampling.max_new_tokens, engine.stop_ids)


def test_multi_turn_reuse_matches_fresh_prefill_every_turn(tiny):
    engine = Engine(tiny, prefill_chunk=7)  # small chunks: prefill spans several forward passes
    chat = Chat.start(engine, "You are a helpful assistant.")
    for turn, text in enumerate(MESSAGES):
        before = chat.cache.tokens
        history = chat.messages + [{"role": "user", "content": text}]
        end = run_turn(chat, text)
        assert end.token_ids == fresh_reply_ids(engine, history), f"turn {turn + 1} diverged"
        assert end.stats.generated == len(end.token_ids)
        if turn > 0:
            assert end.stats.reused > 0
            assert end.stats.reused <= before
            assert end.stats.reused + end.stats.prefilled == len(engine.render(history))
        chat.cache.check()


def test_reuse_prefills_only_the_new_message(tiny):
    engine = Engine(tiny)
    chat = Chat.start(engine, "You are a helpful assistant.")
    first = run_turn(chat, MESSAGES[0])
    first_prompt = engine.render(chat.messages[:2])
    cached = list(chat.cache.ids)
    end = run_turn(chat, MESSAGES[1])
    new_prompt = engine.render(chat.messages[:-1])
    shared = common_prefix(cached, new_prompt)
    assert end.stats.reused == shared
    assert end.stats.prefilled == len(new_prompt) - shared
    # The whole first prompt is reused; at most the (re-tokenized) reply, the new message and
    # template tokens are prefilled. Random replies of the tiny model may re-tokenize differently.
    assert end.stats.reused >= len(first_prompt)
    new_message_tokens = len(engine.tokenizer(MESSAGES[1], add_special_tokens=False)["input_ids"])
    assert end.stats.prefilled <= first.stats.generated + new_message_tokens + 12


def test_no_reuse_gives_the_same_replies_and_prefills_everything(tiny):
    reuse, baseline = Engine(tiny), Engine(tiny, reuse=False)
    a, b = Chat.start(reuse, "Be brief."), Chat.start(baseline, "Be brief.")
    for text in MESSAGES:
        end_a, end_b = run_turn(a, text), run_turn(b, text)
        assert end_a.token_ids == end_b.token_ids
        assert end_b.stats.reused == 0
        assert end_b.stats.prefilled == len(baseline.render(b.messages[:-1]))


def test_last_position_logits_match_a_full_forward_pass():
    loaded = make_loaded(torch.float32)
    engine = Engine(loaded, prefill_chunk=5)
    chat = Chat.start(engine, "You are a helpful assistant.")
    for text in MESSAGES[:3]:
        run_turn(chat, text)
    chat.messages.append({"role": "user", "content": "One more question?"})
    target = engine.render(chat.messages)
    with torch.inference_mode():
        reused, _, _ = engine._sync_cache(chat.cache, target, None)
        assert reused > 0
        progress = engine._prefill(chat.cache, target[reused:])  # yields its progress, returns the last logits
        done = []
        while True:
            try:
                done.append(next(progress).done)
            except StopIteration as end:
                cached_logits = end.value
                break
        assert done == list(range(5, len(target) - reused, 5)) + [len(target) - reused]
        full_logits = loaded.model(input_ids=torch.tensor([target]), use_cache=False).logits[0, -1]
    torch.testing.assert_close(cached_logits, full_logits, atol=1e-4, rtol=1e-4)


def test_edited_history_reuses_only_the_common_prefix(tiny):
    engine = Engine(tiny)
    chat = Chat.start(engine, "You are a helpful assistant.")
    for text in MESSAGES[:3]:
        run_turn(chat, text)
    # Edit the first user message, then ask something new.
    chat.messages[1] = {"role": "user", "content": "Hello, how are you tonight?"}
    history = chat.messages + [{"role": "user", "content": MESSAGES[3]}]
    edited_prompt = engine.render(history)
    shared = common_prefix(chat.cache.ids, edited_prompt)
    end = run_turn(chat, MESSAGES[3])
    assert end.stats.reused == shared
    assert shared < len(engine.render(chat.messages[:2]))  # the cut is inside the edited message
    assert end.token_ids == fresh_reply_ids(engine, history)
    chat.cache.check()


def test_close_mid_reply_keeps_the_conversation_consistent(tiny):
    engine = Engine(tiny)
    chat = Chat.start(engine, "You are a helpful assistant.")
    chat.sampling = GREEDY
    stream = chat.send(MESSAGES[0])
    tokens = []
    while len(tokens) < 3:
        event = next(stream)
        if isinstance(event, Token):
            tokens.append(event)
    stream.close()  # what the REPL does on Ctrl-C while printing
    chat.cache.check()
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.messages[-1]["content"].startswith("".join(t.text for t in tokens))
    history = chat.messages + [{"role": "user", "content": MESSAGES[1]}]
    end = run_turn(chat, MESSAGES[1])
    assert end.token_ids == fresh_reply_ids(engine, history)


class InterruptLayer:
    """Raises KeyboardInterrupt inside the second decoder layer on its n-th call (mid forward pass)."""

    def __init__(self, layer, when):
        self.layer, self.when, self.calls = layer, when, 0
        self.original = layer.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            self.calls += 1
            if self.calls == self.when:
                raise KeyboardInterrupt
            return self.original(*args, **kwargs)

        self.layer.forward = forward
        return self

    def __exit__(self, *exc):
        self.layer.forward = self.original


@pytest.mark.parametrize("when", [1, 4], ids=["during-prefill", "during-decode"])
def test_ctrl_c_inside_a_forward_pass_leaves_the_cache_exact(when):
    loaded = make_loaded(torch.float64)
    engine = Engine(loaded)
    chat = Chat.start(engine, "You are a helpful assistant.")
    run_turn(chat, MESSAGES[0])
    with InterruptLayer(loaded.model.model.layers[1], when), pytest.raises(KeyboardInterrupt):
        run_turn(chat, MESSAGES[1])
    chat.cache.check()  # layer 0 had already stored the token's KV; it must be gone
    assert len({count for _, count in layers.counts(chat.cache.model_cache)}) == 1
    if when == 1:
        assert chat.messages[-1]["role"] == "assistant" and len(chat.messages) == 3  # turn dropped
    history = chat.messages + [{"role": "user", "content": MESSAGES[2]}]
    end = run_turn(chat, MESSAGES[2])
    assert end.token_ids == fresh_reply_ids(engine, history)


def test_sliding_window_cache_is_cut_behind_its_window_exactly():
    from transformers import MistralConfig, MistralForCausalLM

    from kvchat.weights.model import LoadedModel
    from tiny import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    model = MistralForCausalLM(config).to(torch.float64).eval()
    loaded = LoadedModel(model=model, tokenizer=tok, name="tiny-mistral", device=torch.device("cpu"),
                         dtype=torch.float64)
    engine = Engine(loaded)
    chat = Chat.start(engine, "You are a helpful assistant.")
    run_turn(chat, MESSAGES[0])
    chat.messages[1]["content"] = "Edited."  # forces a cut far behind the 16-token window
    history = chat.messages + [{"role": "user", "content": MESSAGES[1]}]
    end = run_turn(chat, MESSAGES[1])
    # The window layers keep every token (the mask applies the window), so the system prompt is still reused.
    assert end.stats.fallback is None and end.stats.reused >= len(engine.system_prefix_ids(chat.system))
    assert end.token_ids == fresh_reply_ids(engine, history)


def test_max_new_tokens_and_stop_reason(tiny):
    engine = Engine(tiny)
    chat = Chat.start(engine)
    end = run_turn(chat, MESSAGES[0], Sampling(temperature=0, max_new_tokens=3))
    assert end.stats.generated == 3 and end.stats.stop == "length"
    chat.cache.check()
    # The last sampled token was never fed; the next turn still matches a fresh prefill.
    history = chat.messages + [{"role": "user", "content": MESSAGES[1]}]
    assert run_turn(chat, MESSAGES[1]).token_ids == fresh_reply_ids(engine, history)


def test_stop_token_ends_the_reply(tiny):
    engine = Engine(tiny)
    assert tiny.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.stop_ids
    chat = Chat.start(engine)
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    lm_head = tiny.model.lm_head
    saved = lm_head.bias
    lm_head.bias = torch.nn.Parameter(torch.zeros(lm_head.out_features, dtype=torch.float64))
    lm_head.bias.data[eos] = 1e6  # the model now always wants to end its turn
    try:
        end = run_turn(chat, MESSAGES[0])
    finally:
        lm_head.bias = saved
    assert end.stats.stop == "eos" and end.stats.generated == 0 and end.reply == ""
    chat.cache.check()


def test_stats_report_cache_size(tiny):
    engine = Engine(tiny)
    chat = Chat.start(engine)
    end = run_turn(chat, MESSAGES[0])
    cfg = tiny.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 8
    assert end.stats.kv_bytes == per_token * chat.cache.tokens
    assert end.stats.ttft_ms > 0 and end.stats.decode_tok_s > 0


@pytest.mark.parametrize("text, message", [
    ("", "empty message"), ("   \n\t", "empty message"), ("a\x00b", "NUL byte"),
])
def test_bad_messages_are_refused_and_change_nothing(tiny, text, message):
    engine = Engine(tiny)
    chat = Chat.start(engine, "sys")
    run_turn(chat, MESSAGES[0])
    before = (list(chat.messages), list(chat.cache.ids))
    with pytest.raises(InputError, match=message):
        chat.send(text)
    assert (chat.messages, list(chat.cache.ids)) == before


def test_interrupted_retry_and_send_leave_a_consistent_conversation():
    loaded = make_loaded(torch.float64)
    engine = Engine(loaded)
    chat = Chat.start(engine, "You are a helpful assistant.")
    first = run_turn(chat, MESSAGES[0])
    before = [dict(m) for m in chat.messages]
    # A retry feeds nothing before its first token; Ctrl-C in the next forward keeps that token as the reply.
    with InterruptLayer(loaded.model.model.layers[1], 1), pytest.raises(KeyboardInterrupt):
        list(chat.retry())
    assert chat.messages[:-1] == before[:-1] and chat.messages[-1]["role"] == "assistant"
    assert first.reply.startswith(chat.messages[-1]["content"])
    chat.cache.check()
    chat.messages[-1] = before[-1]
    engine.trim(chat.conversation, chat.cache)
    # A new message cut off inside its prefill never happened.
    with InterruptLayer(loaded.model.model.layers[1], 1), pytest.raises(KeyboardInterrupt):
        list(chat.send(MESSAGES[1]))
    assert chat.messages == before
    chat.cache.check()
    assert run_turn(chat, MESSAGES[1]).token_ids == fresh_reply_ids(engine, before + [
        {"role": "user", "content": MESSAGES[1]}])


def test_a_seed_is_drawn_from_once_per_conversation_so_retry_gives_a_new_reply(tiny):
    """Regression (issue 10): the generator was re-seeded every turn, so with a seed /retry repeated itself."""
    engine = Engine(tiny)
    sampling = Sampling(temperature=1.5, top_k=0, top_p=1.0, seed=7, max_new_tokens=8)

    def replies():
        chat = Chat.start(engine, "Be brief.", sampling=sampling)
        first = [e for e in chat.send(MESSAGES[0]) if isinstance(e, TurnEnd)][0]
        again = [[e for e in chat.retry() if isinstance(e, TurnEnd)][0].token_ids for _ in range(3)]
        return [first.token_ids] + again

    run = replies()
    assert len({tuple(ids) for ids in run}) > 1  # retries draw new replies
    assert replies() == run  # and the conversation is reproducible from its seed


def test_a_turn_that_never_starts_leaves_no_trace(tiny, monkeypatch):
    """Regression (issue 10): the user's message stayed in the conversation after a template rejection, a
    Ctrl-C while the prompt was rendered, or a Ctrl-C between send() returning and the first token."""
    from kvchat.errors import KvchatError

    engine = Engine(tiny)
    chat = Chat.start(engine, "You are a helpful assistant.")
    run_turn(chat, MESSAGES[0])
    before = [dict(m) for m in chat.messages]

    stream = chat.send(MESSAGES[1])  # returned, never iterated (Ctrl-C right here)
    stream.close()
    del stream
    assert chat.messages == before
    assert chat.retry() is not None and chat.messages == before  # the old reply stays until a new one

    def interrupted_render(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(engine, "render", interrupted_render)
        with pytest.raises(KeyboardInterrupt):
            chat.send(MESSAGES[1])
    assert chat.messages == before

    strict = "{% for m in messages %}{% if m['content'] == 'BAD' %}{{ raise_exception('no BAD') }}{% endif %}{% endfor %}"
    with monkeypatch.context() as patch:
        patch.setattr(engine.tokenizer, "chat_template", strict + engine.tokenizer.chat_template)
        with pytest.raises(KvchatError, match="no BAD"):
            chat.send("BAD")
        assert chat.messages == before
        end = run_turn(chat, MESSAGES[1])  # the chat goes on, exactly
    assert end.token_ids == fresh_reply_ids(engine, before + [{"role": "user", "content": MESSAGES[1]}])


def test_the_models_own_reply_tokens_are_kept_so_every_turn_reuses_the_whole_cache(tiny):
    """Regression (issue 10): re-tokenizing a reply's text (cut mid-character, or merged differently) gave other
    ids than the generated ones, so the next turn re-prefilled from inside the reply, and a resume too."""
    engine = Engine(tiny)
    chat = Chat.start(engine, "You are a helpful assistant.")
    drifted = 0
    for text in MESSAGES:
        before = chat.cache.tokens
        end = run_turn(chat, text)
        assert end.stats.reused == before  # all of the cache, every turn
        reply = chat.messages[-1]
        assert reply["token_ids"] == end.token_ids
        drifted += engine.tokenizer(reply["content"], add_special_tokens=False)["input_ids"] != end.token_ids
    assert drifted  # the tiny model's replies do re-tokenize differently: the test shows something
    # An edited reply is tokenized from its new text: the stored ids no longer decode to it.
    chat.messages[2]["content"] = "Edited."
    assert "Edited." in engine.tokenizer.decode(engine.render(chat.conversation.view()))


def test_continue_extends_a_cut_reply_exactly_and_prefills_only_its_last_token(tiny):
    """/continue (issue 11): a reply cut at max_new_tokens goes on where it stopped; greedy, a reply cut at 5
    and continued by 7 is the reply a 12-token budget gives, and only the cut token is prefilled."""
    short, long = Sampling(temperature=0, max_new_tokens=5), Sampling(temperature=0, max_new_tokens=12)
    engine = Engine(tiny)
    engine.stop_ids = frozenset()  # replies of exactly the budget
    chat, whole = Chat.start(engine, "Be brief."), Chat.start(engine, "Be brief.")
    first = run_turn(chat, MESSAGES[0], short)
    assert first.stats.stop == "length" and len(first.token_ids) == 5
    cached = chat.cache.tokens
    chat.sampling = Sampling(temperature=0, max_new_tokens=7)
    events = list(chat.extend())
    end = events[-1]
    assert end.stats.prefilled == 1 and end.stats.reused == cached and end.stats.generated == 7
    assert end.token_ids == run_turn(whole, MESSAGES[0], long).token_ids
    assert chat.messages[-1]["token_ids"] == end.token_ids
    assert chat.messages[-1]["content"] == end.reply == whole.messages[-1]["content"]
    streamed = "".join(e.text for e in events if isinstance(e, Token))
    assert first.reply + streamed == end.reply
    next_turn = run_turn(chat, MESSAGES[1], short)  # the chat goes on from the whole reply, exactly
    assert next_turn.stats.reused == len(engine.render(chat.messages[:2])) + 12 - 1  # all but the fed token
    assert next_turn.token_ids == fresh_reply_ids(engine, chat.messages[:-1], short)


def test_continue_refuses_without_a_reply_or_room(tiny):
    engine = Engine(tiny, max_context=64)
    chat = Chat.start(engine, "Be brief.")
    with pytest.raises(InputError, match="no reply to continue"):
        chat.extend()
    chat.messages.extend([{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "x", "token_ids": [60] * 80}])
    with pytest.raises(InputError, match="is not the model's own tokens"):
        chat.extend()
    chat.messages[-1]["content"] = engine.tokenizer.decode([60] * 80, skip_special_tokens=True)
    with pytest.raises(InputError, match="the context of 64 tokens is full"):
        chat.extend()


def test_common_prefix_is_exact_past_its_first_block_for_lists_and_tuples_alike():
    """Regression (issue 20): the cache's ids became a tuple, a tuple block never equals a list block, and every
    token past the first 512 counted as shared."""
    ids = list(range(1000))
    edited = ids[:608] + [-1] + ids[609:]
    for a, b in ((ids, edited), (tuple(ids), edited), (ids, tuple(edited)), (tuple(ids), tuple(edited))):
        assert common_prefix(a, b) == 608
    assert common_prefix(tuple(ids), ids[:700]) == 700 and common_prefix((), ids) == 0


def test_an_edit_past_the_first_512_tokens_reuses_only_what_is_shared(tiny):
    """The engine side of the regression above: an edit beyond token 512 reused stale KV."""
    engine = Engine(tiny)
    chat = Chat.start(engine, "Be kind to cats and dogs. " * 90)  # a system prompt of over 512 tokens
    run_turn(chat, MESSAGES[0])
    assert len(engine.system_prefix_ids(chat.system)) > 512
    chat.messages[1] = {"role": "user", "content": "Hello, how are you tonight?"}
    history = chat.messages + [{"role": "user", "content": MESSAGES[1]}]
    shared = common_prefix(list(chat.cache.ids), engine.render(history))
    end = run_turn(chat, MESSAGES[1])
    assert 512 < end.stats.reused == shared < len(engine.render(chat.messages[:2]))
    assert end.token_ids == fresh_reply_ids(engine, history)
