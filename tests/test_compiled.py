"""The compiled one-token decode step (kvchat/cache/compiled.py, layers.one_step): every exactness property of the cache
holds through it (reuse, undo, continue, resume, a cache that grows past its first buffer, sliding windows), it
gives the eager step's tokens, and where it cannot run or fails, decoding goes on eagerly with nothing lost."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from bound import engine_with_store, new_chat
from families import make_family
from kvchat.cache import compiled
from kvchat.cache import layers
from kvchat.config import Sampling, load_config
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, TurnEnd, turn_notices
from kvchat.errors import ConfigError
from kvchat.chat.saving import Persister, open_chat
from reference import greedy_without_cache
from tiny import make_loaded

GREEDY = Sampling(temperature=0, max_new_tokens=12)
MESSAGES = ["Hello, how are you today?", "What is the capital of France?", "Tell me a story about a cat.",
            "Numbers: 1 2 3 4 5."]


def run_turn(chat, text, sampling=GREEDY):
    chat.sampling = sampling
    return [e for e in chat.send(text) if isinstance(e, TurnEnd)][-1]


def fresh(engine, chat, sampling=GREEDY):
    """The greedy reply to the conversation's last user message, computed with no cache at all."""
    return greedy_without_cache(engine.model, engine.render(chat.messages[:-1]), sampling.max_new_tokens,
                                engine.stop_ids)


@pytest.fixture(scope="module")
def compiled_tiny():
    """The tiny float64 Llama and its step, compiled once for the module (`on_tiny` engines share it)."""
    loaded = make_loaded(torch.float64)
    engine = Engine(loaded, compile="on", warm_up=False)
    engine.step.warm_up(background=False)
    assert engine.step.ready and engine.step.failure is None, engine.step.failure
    return SimpleNamespace(loaded=loaded, step=engine.step)


def on_tiny(shared, **kwargs):
    """An engine on the module's tiny model that decodes with its shared compiled step."""
    return Engine(shared.loaded, step=shared.step, **{"compile": "on", **kwargs})


def test_compiled_turns_reuse_undo_and_continue_exactly(compiled_tiny):
    engine = on_tiny(compiled_tiny, prefill_chunk=5)
    chat = Chat.start(engine, "Be brief.")
    for number, text in enumerate(MESSAGES[:3]):
        end = run_turn(chat, text)
        assert end.token_ids == fresh(engine, chat), f"turn {number + 1} diverged from a fresh prefill"
        # every token fed one at a time (the reply after its first token, a 1-token last prefill chunk) went compiled
        assert len(end.token_ids) > 3 and end.stats.compiled >= len(end.token_ids) - 1
        assert number == 0 or end.stats.reused > 0
    chat.undo()
    redo = run_turn(chat, MESSAGES[3])
    assert redo.stats.reused > 0 and redo.token_ids == fresh(engine, chat)
    cut = run_turn(chat, "Count to twenty.", Sampling(temperature=0, max_new_tokens=4))
    assert cut.stats.stop == "length"
    chat.sampling = Sampling(temperature=0, max_new_tokens=8)
    more = [e for e in chat.extend() if isinstance(e, TurnEnd)][-1]
    whole = greedy_without_cache(engine.model, engine.render(chat.conversation.view()[:-1]), 12, engine.stop_ids)
    assert more.token_ids == whole[:len(more.token_ids)] and more.stats.compiled > 0
    assert chat.cache.tokens == len(chat.cache.ids) == layers.length(chat.cache.model_cache)


def test_compiled_and_eager_steps_give_the_same_replies(compiled_tiny):
    replies = {}
    for mode in ("on", "off"):
        engine = on_tiny(compiled_tiny, compile=mode)
        chat = Chat.start(engine)
        replies[mode] = [run_turn(chat, text).token_ids for text in MESSAGES]
        assert (engine.compiled_tokens > 0) == (mode == "on")
    assert replies["on"] == replies["off"]


def test_a_compiled_reply_past_the_first_buffer_grows_it_without_recompiling_or_diverging(compiled_tiny):
    from torch._dynamo.utils import counters

    engine = on_tiny(compiled_tiny)
    engine.stop_ids = frozenset()  # a long reply: past the 256 slots the cache starts with
    chat = Chat.start(engine)
    long = Sampling(temperature=0, max_new_tokens=300)
    run_turn(chat, "Hi.", Sampling(temperature=0, max_new_tokens=3))  # compiled by now
    chat = Chat.start(engine)
    graphs = counters["stats"]["unique_graphs"]
    end = run_turn(chat, "Tell me a story about a cat and a dog.", long)
    assert len(end.token_ids) == 300 and end.stats.compiled == 299
    assert counters["stats"]["unique_graphs"] == graphs, "a step of another length or capacity was compiled again"
    assert chat.cache.model_cache.layers[0]._key_buf.shape[-2] > 256 > len(engine.render(chat.messages[:-1]))
    assert end.token_ids == greedy_without_cache(engine.model, engine.render(chat.messages[:-1]), 300, frozenset())
    assert engine.step.failure is None


def test_a_compiled_session_resumes_exactly_in_a_new_engine(compiled_tiny, tmp_path):
    engine, store = engine_with_store(compiled_tiny.loaded, tmp_path, compile="on", step=compiled_tiny.step)
    chat = new_chat(engine, store, "Be brief.")
    persister = Persister(store, "talk")
    for text in MESSAGES[:2]:
        run_turn(chat, text)
        persister.after_turn(chat)
    uninterrupted = run_turn(chat, MESSAGES[2])
    store.close()

    engine2, store2 = engine_with_store(compiled_tiny.loaded, tmp_path, compile="on", step=compiled_tiny.step)
    resumed = run_turn(open_chat(engine2, store2, "talk").chat, MESSAGES[2])
    assert resumed.stats.loaded == resumed.stats.reused > 0 and resumed.stats.compiled > 0
    assert resumed.token_ids == uninterrupted.token_ids
    store2.close()


def test_an_interrupted_compiled_reply_leaves_the_cache_matching_its_tokens(compiled_tiny):
    engine = on_tiny(compiled_tiny)
    chat = Chat.start(engine)
    events = chat.send(MESSAGES[0])
    tokens = 0
    for event in events:
        tokens += hasattr(event, "token_id")
        if tokens == 3:
            break
    events.close()
    assert chat.cache.tokens == len(chat.cache.ids) == layers.length(chat.cache.model_cache)
    end = run_turn(chat, MESSAGES[1])
    assert end.stats.reused > 0 and end.token_ids == fresh(engine, chat)


def test_a_failing_compile_is_told_once_and_the_turn_decodes_eagerly_with_the_same_tokens(monkeypatch):
    loaded = make_loaded(torch.float64)
    expected = [run_turn(Chat.start(Engine(loaded)), text).token_ids for text in MESSAGES[:1]]
    engine = Engine(loaded, compile="on", warm_up=False)

    def broken(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler"), None)

    monkeypatch.setattr(engine.step, "_compiled", broken)
    chat = Chat.start(engine)
    first = run_turn(chat, MESSAGES[0])
    assert first.token_ids == expected[0] and first.stats.compiled == 0
    assert "BackendCompilerFailed" in first.stats.compile_failure
    notes = turn_notices(first.stats, None)
    assert any(note.startswith("the compiled decode step failed (BackendCompilerFailed") for note in notes)
    second = run_turn(chat, MESSAGES[1])
    assert second.stats.compile_failure is None and second.token_ids == fresh(engine, chat)
    assert chat.cache.tokens == len(chat.cache.ids) == layers.length(chat.cache.model_cache)


@pytest.mark.parametrize("family", ["gemma3", "qwen3.5"])
def test_sliding_windows_compile_and_recurrent_state_is_refused_and_decodes_eagerly(family):
    loaded = make_family(family)
    engine = Engine(loaded, compile="on", warm_up=False)
    engine.step.warm_up(background=False)
    chat = Chat.start(engine, "Be brief.")
    for number, text in enumerate(MESSAGES[:2]):
        end = run_turn(chat, text)
        assert end.token_ids == fresh(engine, chat), f"{family}: turn {number + 1} diverged"
    if family == "gemma3":  # its 12-token windows are applied by the mask over the static buffers
        assert engine.step.refused is None and engine.step.failure is None and end.stats.compiled > 0
    else:
        assert "LinearAttentionLayer" in engine.step.refused and end.stats.compiled == 0


def test_a_background_warm_up_leaves_replies_eager_until_it_is_done(compiled_tiny):
    loaded = make_loaded(torch.float64, seed=1)
    engine = Engine(loaded, compile="on")  # warms up in a thread
    chat = Chat.start(engine)
    first = run_turn(chat, MESSAGES[0])  # eager or compiled, depending on the race: the same tokens
    assert first.token_ids == fresh(engine, chat)
    engine.step.wait()
    assert engine.step.ready
    second = run_turn(chat, MESSAGES[1])
    assert second.stats.compiled == len(second.token_ids) - 1 and second.token_ids == fresh(engine, chat)


def test_a_model_and_its_compiled_step_are_freed_together():
    """Regression (issue 20): the registry of steps held each step, and each step its model, so a model once
    compiled stayed in memory for the life of the process. Now an engine owns its step; none is kept elsewhere."""
    loaded = make_loaded(torch.float64, seed=2)
    step = Engine(loaded, compile="on", warm_up=False).step
    step.warm_up(background=False)
    assert step.ready, step.failure
    model = weakref.ref(loaded.model)
    del step, loaded
    gc.collect()
    assert model() is None


def test_making_a_compiled_step_edits_no_environment_and_the_cli_points_inductor_home(monkeypatch, tmp_path,
                                                                                      tiny_model_dir):
    """Issue 20: the step's constructor set TORCHINDUCTOR_CACHE_DIR for the whole process; now the command line
    does, once, and a directory the user chose wins."""
    import os

    from kvchat.ui import cli

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("KVCHAT_HOME", str(tmp_path / "home"))
    compiled.CompiledStep(make_loaded(torch.float64, seed=3).model, torch.device("cpu"))
    ours = str(tmp_path / "home" / "compiled")
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != ours  # (torch may set its own default; kvchat does not)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compiled.cache_directory() == {"TORCHINDUCTOR_CACHE_DIR": ours}
    cli.load(load_config(None, {"model": str(tiny_model_dir)}), progress=lambda *_: None)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiled.cache_directory() == {}  # the user's own choice stays


def test_compile_setting_is_checked_and_auto_compiles_on_cuda_only(tmp_path):
    from kvchat.cache.compiled import wanted

    config = tmp_path / "config.toml"
    config.write_text('compile = "maybe"\n')
    with pytest.raises(ConfigError, match="compile.*must be one of auto, on, off"):
        load_config(config, {})
    assert load_config(None, {"compile": "on"}).compile == "on"
    assert wanted("auto", torch.device("cuda")) and not wanted("auto", torch.device("cpu"))
    assert wanted("on", torch.device("cpu")) and not wanted("off", torch.device("cuda"))


def test_compiled_attention_reads_grouped_heads_without_repeating_them(monkeypatch):
    from transformers.integrations import sdpa_attention

    from kvchat.cache.compiled import _static_sdpa

    transformers_sdpa = sdpa_attention.sdpa_attention_forward
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    torch.manual_seed(0)
    query, keys, values = torch.randn(1, 6, 1, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    mask = (torch.arange(40) <= 29).view(1, 1, 1, 40)  # 30 tokens held, 10 spare slots (random, not zeros)
    expected, _ = transformers_sdpa(module, query, keys, values, mask, scaling=0.25)  # transformers' own, eager
    exact, _ = transformers_sdpa(module, query, keys[:, :, :30], values[:, :, :30], None, scaling=0.25)

    def repeat_kv(*args):
        raise AssertionError("the compiled step repeated the key/value heads")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", repeat_kv)
    compiled = torch.compile(lambda q, k, v, m: _static_sdpa(module, q, k, v, m, scaling=0.25)[0], fullgraph=True)
    got = compiled(query, keys, values, mask)
    assert got.shape == expected.shape == (1, 1, 6, 16)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, exact)


def test_the_command_line_compiles_on_request_with_the_same_replies(monkeypatch, capsys, tiny_model_dir):
    import io
    import json

    from kvchat.cache import compiled
    from kvchat.ui.cli import main

    def run(*flags):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Hello, how are you?\nTell me a story.\n")))
        code = main(["--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "8", "--lines",
                     "--stats", *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out, [json.loads(line) for line in err.splitlines() if line.startswith("{")]

    steps = []
    real_init = compiled.CompiledStep.__init__

    def recording(self, *args):
        real_init(self, *args)
        steps.append(self)

    monkeypatch.setattr(compiled.CompiledStep, "__init__", recording)
    eager, eager_stats = run("--compile", "off")
    on, on_stats = run("--compile", "on")  # compiles in the background: the first replies may decode eagerly
    assert on == eager and all(record["compiled"] == 0 for record in eager_stats)
    assert [record["generated"] for record in on_stats] == [record["generated"] for record in eager_stats]
    assert len(steps) == 1
    steps[0].wait()  # no compile left running into the next tests
    assert main(["info", "--model", str(tiny_model_dir), "--compile", "on"]) == 0
    assert "decode step: compiled with torch.compile" in capsys.readouterr().out
    assert main(["info", "--model", str(tiny_model_dir)]) == 0
    assert "decode step: eager (compile = auto; 'auto' compiles it on CUDA only)" in capsys.readouterr().out


def test_each_model_gets_its_own_compiled_step_even_of_the_same_class():
    """Regression: with the module guards skipped, a graph traced for one Llama was offered to the next one
    built in the process (one with int8 weights crashed on it, in the levers benchmark)."""
    from kvchat.weights import quant

    assert quant.KERNEL.build(), quant.KERNEL.failure
    full = make_loaded(torch.float32, seed=2)
    packed = make_loaded(torch.float32, seed=2)
    quant.pack_model(packed.model, allow_approximate=True)
    for loaded in (full, packed):
        step = compiled.CompiledStep(loaded.model, loaded.device)
        assert step.compile_now() > 0 and step.ready, step.failure
        with torch.inference_mode():
            eager_cache, _ = layers.one_token(loaded.model, loaded.device)
            compiled_cache, _ = layers.one_token(loaded.model, loaded.device)
            expected = loaded.model(input_ids=torch.tensor([[5]]), use_cache=True, logits_to_keep=1,
                                    **{layers.cache_kwarg(loaded.model): eager_cache}).logits[0, -1]
            got = step(compiled_cache, 5)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_compiled_model_runs_kvchats_attention_by_its_own_name_and_no_other_model_does():
    """Issue 20: the step re-registered transformers' "sdpa" for the whole process; now kvchat's attention has a
    name of its own, selected for the compiled model only, with sdpa's masks (the replies equal, as above)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def logits(loaded):
        """A prefill of 5 tokens, then of 4 more on top of their cache (where only a mask keeps it causal)."""
        cache = layers.new_cache(loaded.model)
        with torch.inference_mode():
            first = loaded.model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), use_cache=True,
                                 **{layers.cache_kwarg(loaded.model): cache}).logits
            more = loaded.model(input_ids=torch.tensor([[10, 11, 12, 13]]), use_cache=True,
                                **{layers.cache_kwarg(loaded.model): cache}).logits
        return torch.cat([first, more], dim=1)

    mine, other = make_loaded(torch.float64, seed=4), make_loaded(torch.float64, seed=4)
    before = logits(mine)
    Engine(mine, compile="on", warm_up=False)
    assert mine.model.config._attn_implementation == compiled.ATTENTION
    assert other.model.config._attn_implementation == "sdpa"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # transformers' own, untouched
    torch.testing.assert_close(logits(mine), before, rtol=1e-12, atol=1e-12)  # eager passes are what they were
    torch.testing.assert_close(logits(other), before, rtol=1e-12, atol=1e-12)
