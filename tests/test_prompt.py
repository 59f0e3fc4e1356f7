"""Rendering from remembered pieces gives exactly the tokens of a whole render, for every kind of template, at a
cost per turn that does not grow with the history (issue 10)."""

import random

import pytest

from kvchat.config import Sampling
from kvchat.chat.conversation import Conversation
from kvchat.chat.engine import Engine
from kvchat.chat.prompt import VERIFY_MESSAGES, Renderer
from tiny import CHATML, CORPUS, make_tokenizer

TURN = "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
GENERATION = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# Segment-stable templates, in the ways real ones are written.
STABLE = {
    "chatml": CHATML,
    # SmolLM2: a default system prompt when the conversation has none.
    "default system": (
        "{% for message in messages %}{% set content = message['content'] %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}" + TURN +
        "{% endfor %}" + GENERATION),
    # Gemma: the system prompt goes into the first user message, and roles must alternate.
    "system in first user": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
        "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
        "{% for message in rest %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{% set content = (system if loop.first else '') + message['content'] %}" + TURN +
        "{% endfor %}" + GENERATION),
    # Templates that always strip a reply's think block.
    "strips every think block": (
        "{% for message in messages %}{% set content = message['content'] %}"
        "{% if message['role'] == 'assistant' %}{% set content = content.split('</think>')[-1].lstrip() %}"
        "{% endif %}" + TURN + "{% endfor %}" + GENERATION),
}

# Templates whose pieces depend on more than their window: they must be rendered whole.
UNSTABLE = {
    # Qwen3: think blocks are stripped only from replies before the latest user message.
    "strips think before the last question": (
        "{% set ns = namespace(last=-1) %}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for message in messages %}{% set content = message['content'] %}"
        "{% if message['role'] == 'assistant' and loop.index0 < ns.last %}"
        "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}" + TURN +
        "{% endfor %}" + GENERATION),
    # Mistral: the system prompt goes into the last user message.
    "system in last user": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
        "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
        "{% for message in rest %}{% set content = message['content'] %}"
        "{% if loop.last and message['role'] == 'user' %}{% set content = system + content %}{% endif %}"
        + TURN + "{% endfor %}" + GENERATION),
    # Turns numbered from the start of the conversation.
    "numbered turns": (
        "{% for message in messages %}{% set content = loop.index|string + '. ' + message['content'] %}"
        + TURN + "{% endfor %}" + GENERATION),
}


def tokenizer_with(template):
    tok = make_tokenizer()
    tok.chat_template = template
    return tok


def conversation(tok, seed, exchanges=12, system=True):
    """Random exchanges; replies carry generated ids (one token per character, so they differ from the
    tokenizer's own, as sampled ids can), some with a think block."""
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if system else []
    for turn in range(exchanges):
        messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 9)))})
        reply = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        if rng.random() < 0.3:
            reply = f"<think>\n{rng.choice(words)}\n</think>\n\n{reply}"
        ids = [i for ch in reply for i in tok(ch, add_special_tokens=False)["input_ids"]]
        messages.append({"role": "assistant", "content": reply, "token_ids": ids})
    return messages


def views(messages):
    """Every prompt a chat of `messages` renders: each prefix ending with a user message, from every dropped start."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head):]
    for end in range(1, len(body) + 1, 2):
        for start in range(0, end, 2):
            yield head + body[start:end]


@pytest.mark.parametrize("name", list(STABLE) + list(UNSTABLE))
@pytest.mark.parametrize("system", [True, False])
def test_pieces_give_the_tokens_of_a_whole_render(name, system):
    template = STABLE.get(name) or UNSTABLE[name]
    tok = tokenizer_with(template)
    pieces, whole = Renderer(tok), Renderer(tok, pieces=False)
    messages = conversation(tok, seed=len(name) + system, system=system)
    assert len(messages) > VERIFY_MESSAGES  # past the length where renders are also checked whole
    for view in views(messages):  # as a chat renders them: growing, with drops
        assert pieces.render(view) == whole.render(view), f"{len(view)} messages"
        assert pieces.render(view, generation_prompt=False) == whole.render(view, generation_prompt=False)
    assert pieces.pieces_apply() is (name in STABLE), pieces.whole_reason
    # An edit in the middle of the history is rendered, and what follows it too.
    edited = [dict(m) for m in messages]
    edited[len(edited) // 2]["content"] = "Edited in the middle."
    edited[-2]["content"] += " And at the end."
    assert pieces.render(edited[:-1]) == whole.render(edited[:-1])
    assert pieces.render(messages[:-1]) == whole.render(messages[:-1])  # and back


def test_a_template_changed_on_the_fly_is_followed():
    tok = tokenizer_with(CHATML)
    renderer = Renderer(tok)
    messages = conversation(tok, seed=3)[:-1]
    before = renderer.render(messages)
    tok.chat_template = STABLE["strips every think block"].replace("<|im_end|>", "<|im_end|><|im_end|>")
    after = renderer.render(messages)
    assert after != before and after == Renderer(tok, pieces=False).render(messages)
    tok.chat_template = UNSTABLE["numbered turns"]
    assert renderer.render(messages) == Renderer(tok, pieces=False).render(messages)
    assert not renderer.pieces_apply()


class Counting:
    """A tokenizer that counts the messages its template renders and the characters it tokenizes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.messages = self.chars = 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def apply_chat_template(self, messages, **kwargs):
        self.messages += len(messages)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


@pytest.mark.parametrize("context", [None, 700])
def test_a_turn_renders_and_tokenizes_only_what_is_new_however_long_the_history(tiny, context):
    """Regression (issue 10): every turn rendered and tokenized the whole conversation, and fit() rendered it
    again for each candidate drop; a turn's cost grew with the history. Fitting a turn now renders a bounded
    number of messages and tokenizes only the new text, at turn 8 as at turn 60, with or without drops; and
    gives what rendering whole gives."""
    counting = Counting(tiny.tokenizer)
    engine, whole = Engine(tiny, max_context=context), Engine(tiny, max_context=context)
    engine.renderer, whole.renderer = Renderer(counting), Renderer(tiny.tokenizer, pieces=False)
    sampling = Sampling(temperature=0, max_new_tokens=64)
    history = conversation(tiny.tokenizer, seed=7, exchanges=60)
    conv = Conversation.start(history[0]["content"])
    cost = []
    for turn in range(60):
        user, reply = history[1 + 2 * turn], history[2 + 2 * turn]
        counting.messages = counting.chars = 0
        target, first_kept, dropped = engine.fit(conv, sampling, conv.messages + [user])
        cost.append((counting.messages, counting.chars, len(user["content"]) + len(conv.messages[-1]["content"])))
        assert (target, first_kept, dropped) == whole.fit(conv, sampling, conv.messages + [user])
        conv.messages += [user, reply]
        conv.first_kept = first_kept
    if context:
        assert conv.first_kept > 20  # the view did move on
    # A few small windows; with drops, also the first message of each view the bisection tries.
    headers = 1000 if context else 200
    for rendered, tokenized, new in cost[8:]:
        assert rendered <= 24 and tokenized <= 2 * new + headers, cost
