"""The REPL driven through prompt-toolkit's pipe input with a tiny engine: transcripts and slash commands."""

import errno
import io
import re
import time

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from bound import engine_with_store, new_chat
from kvchat.config import Sampling, Settings
from kvchat.chat.chat import Chat
from kvchat.chat.conversation import Conversation
from kvchat.chat.saving import Persister, open_chat, save_chat
from kvchat.ui.display import WrappingWriter
from kvchat.chat.engine import Engine, Token
from kvchat.weights.model import fingerprint
from kvchat.ui.repl import Repl
from kvchat.store.sessions import Store

SETTINGS = Settings(sampling=Sampling(temperature=0, max_new_tokens=6))


@pytest.fixture
def pipe():
    with create_pipe_input() as pipe:
        yield pipe


def drive(repl, keys: str) -> str:
    """Type `keys` into the REPL ("\\r" is Enter; end with /quit or Ctrl-D), run it, return all it printed."""
    repl.pipe.send_text(keys)
    assert repl.run() == 0
    return repl.out.getvalue()


def make_repl(tiny, pipe, tmp_path=None, chat=None, **kwargs):
    engine = Engine(tiny)
    store = persister = None
    if tmp_path is not None:
        store = Store(tmp_path / "sessions").bind(engine.layout, fingerprint(tiny), tiny.name)
        persister = Persister(store)
    repl = Repl(chat or new_chat(engine, store, "Be brief.", SETTINGS.sampling), SETTINGS, persister=persister,
                input=pipe, output=DummyOutput(), out=io.StringIO(), **kwargs)
    repl.pipe = pipe
    return repl


def reply_to(engine, messages):
    """The greedy reply text a fresh conversation gives (the reference for transcripts)."""
    chat = Chat(engine, Conversation(messages=[dict(m) for m in messages[:-1]]), sampling=SETTINGS.sampling)
    events = list(chat.send(messages[-1]["content"]))
    return events[-1].reply


def test_exact_transcript_of_a_two_turn_chat(tiny, pipe):
    repl = make_repl(tiny, pipe)
    out = drive(repl, "Hello there\r\r   \rWhat is the capital of France?\r/quit\r")
    first = reply_to(repl.engine, [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello there"}])
    # The model's own reply tokens stand for its reply (a fresh prefill of the tokens in the cache).
    second = reply_to(repl.engine, [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hello there"},
                                    {"role": "assistant", "content": first,
                                     "token_ids": repl.chat.messages[2]["token_ids"]},
                                    {"role": "user", "content": "What is the capital of France?"}])
    lines = out.splitlines()
    assert lines[0].startswith("kvchat · tiny-llama on cpu (float64)")
    cut = "[cut at max_new_tokens=6: /continue goes on]"  # after a reply that stopped at the limit
    expected = [line for text, message in ((first, repl.chat.messages[2]), (second, repl.chat.messages[4]))
                for line in [text] + ([cut] if len(message["token_ids"]) == 6 else [])]
    assert lines[1:] == expected  # blank input is ignored, each reply on its own line
    assert [m["role"] for m in repl.chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert repl.totals.turns == 2 and repl.last.reused > 0


def test_undo_and_retry_prefill_nothing_that_was_cached(tiny, pipe):
    repl = make_repl(tiny, pipe)
    drive(repl, "Hello there\rTell me a story.\r/quit\r")
    chat = repl.chat
    reply = chat.messages[-1]["content"]
    cached = chat.cache.tokens
    out_before = len(repl.out.getvalue())

    drive(repl, "/retry\r/quit\r")
    assert repl.last.prefilled == 0 and repl.last.reused == len(repl.engine.render(chat.messages[:-1]))
    assert chat.messages[-1]["content"] == reply  # greedy: the same reply again
    assert reply in repl.out.getvalue()[out_before:]

    drive(repl, "/undo\r/quit\r")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.cache.tokens < cached
    kept = chat.cache.tokens
    assert list(chat.cache.ids) == repl.engine.render(chat.messages)[:kept]  # cut exactly at the shared prefix

    drive(repl, "Tell me a story.\r/quit\r")
    assert repl.last.reused == kept  # everything still cached is reused...
    history = repl.engine.render(chat.messages[:-1])
    assert repl.last.prefilled == len(history) - kept  # ...and only what follows it is prefilled
    assert chat.messages[-1]["content"] == reply


def test_set_changes_sampling_and_bad_values_only_hint(tiny, pipe):
    repl = make_repl(tiny, pipe)
    out = drive(repl, "/set max_new_tokens=2\r/set temperature=hot\r/set colour=red\r/set\r/bogus\rHi\r/quit\r")
    assert repl.chat.sampling.max_new_tokens == 2 and repl.last.generated <= 2
    assert "max_new_tokens = 2" in out
    assert "invalid temperature" in out and "unknown setting 'colour'" in out and "usage: /set" in out
    assert "unknown command /bogus; /help lists them" in out


def test_system_reset_help_and_stats(tiny, pipe):
    repl = make_repl(tiny, pipe)
    out = drive(repl, "/help\rHello\r/stats\r/system You are a pirate.\r/reset\r/quit\r")
    assert "/retry" in out and "Alt-Enter" in out
    assert "turns 1" in out and "time saved by reuse" in out
    assert repl.chat.messages == [{"role": "system", "content": "You are a pirate."}]
    assert list(repl.chat.cache.ids) == repl.engine.system_prefix_ids("You are a pirate.")[:repl.chat.cache.tokens]


def test_alt_enter_adds_a_newline_and_enter_sends(tiny, pipe):
    repl = make_repl(tiny, pipe)
    drive(repl, "first line\x1b\rsecond line\r/quit\r")
    assert repl.chat.messages[1] == {"role": "user", "content": "first line\nsecond line"}


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_exits(tiny, pipe):
    repl = make_repl(tiny, pipe)
    drive(repl, "never sent\x03Hello\r\x04")
    assert [m["content"] for m in repl.chat.messages if m["role"] == "user"] == ["Hello"]


def test_save_fork_load_and_sessions(tiny, pipe, tmp_path):
    repl = make_repl(tiny, pipe, tmp_path)
    out = drive(repl, "/save\r/save ../bad\rHello\r/save main\rTell me a story.\r/fork side\rNumbers?\r"
                      "/sessions\r/fork main\r/load main\r/load nope\r/quit\r")
    assert "no session yet: /save NAME" in out and "invalid session name" in out
    assert "forked from 'main' to 'side'" in out and "a session named 'main' already exists" in out
    assert "* side" in out and "  main" in out
    assert "loaded 'main': 2 turns" in out and "no session named 'nope'" in out
    store = repl.persister.store
    main, side = store.read_manifest("main"), store.read_manifest("side")
    assert main.turns == 2 and side.turns == 3
    assert side.chunks[: len(main.chunks)] == main.chunks  # the fork shares the parent's chunks
    assert [m["content"] for m in repl.chat.messages] == [m["content"] for m in main.messages]
    store.close()


def test_session_names_complete_after_load(tiny, pipe, tmp_path):
    from prompt_toolkit.document import Document

    repl = make_repl(tiny, pipe, tmp_path)
    save_chat(repl.persister.store, "alpha", repl.chat)
    save_chat(repl.persister.store, "beta", repl.chat)
    complete = lambda text: [c.text for c in repl.session.completer.get_completions(Document(text), None)]
    assert complete("/lo") == ["/load"]
    assert complete("/load a") == ["alpha"]
    assert complete("/set top") == ["top_p=", "top_k="]
    assert complete("hello") == []
    repl.persister.store.close()


@pytest.mark.parametrize("text, width, expected", [
    ("the quick brown fox jumps", 10, "the quick\nbrown fox\njumps\n"),
    ("日本語のテキストです", 8, "日本語の\nテキスト\nです\n"),  # wide characters take two columns
    ("cafe\u0301 au lait", 6, "cafe\u0301\nau\nlait\n"),  # a combining accent takes none
    ("abcdefghijkl", 5, "abcde\nfghij\nkl\n"),  # a word longer than the line is hard-broken
    ("def f():\n    return 1", 12, "def f():\n    return 1\n"),  # indentation after a real newline stays
])
def test_wrapping_writer_breaks_between_words(text, width, expected):
    out = io.StringIO()
    writer = WrappingWriter(out, width)
    for i in range(0, len(text), 3):  # arrives in pieces, as tokens do
        writer.write(text[i:i + 3])
    writer.finish()
    assert out.getvalue() == expected


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True

    def fileno(self):
        raise OSError("not a real terminal")


@pytest.mark.parametrize("no_color", [False, True])
def test_colour_only_on_a_terminal_without_no_color(tiny, pipe, monkeypatch, no_color):
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    repl = Repl(Chat.start(Engine(tiny), sampling=SETTINGS.sampling), SETTINGS, input=pipe, output=DummyOutput(),
                out=FakeTerminal(), width=80)
    repl.pipe = pipe
    repl.progress_delay = 0  # the progress line shows too, coloured or not
    out = drive(repl, "Hello\r/quit\r")
    colour = re.compile(r"\x1b\[[0-9;]*m")  # SGR: colours and styles (a live line also moves the cursor)
    assert bool(colour.search(out)) is (not no_color)
    plain = make_repl(tiny, pipe)  # output that is not a terminal: no escape sequence at all
    assert "\x1b[" not in drive(plain, "Hello\r/quit\r")


def test_ctrl_c_during_a_reply_keeps_it_and_the_chat_goes_on(tiny, pipe):
    repl = make_repl(tiny, pipe)
    real_send = repl.chat.send

    def send_then_interrupt(text):
        stream = real_send(text)
        if text == "Hello":
            for event in stream:
                yield event
                if isinstance(event, Token):
                    break
            stream.close()  # what the generator sees when Ctrl-C lands while a token is printed
            raise KeyboardInterrupt
        yield from stream

    repl.chat.send = send_then_interrupt
    out = drive(repl, "Hello\rTell me a story.\r/quit\r")
    assert "[interrupted]" in out
    roles = [m["role"] for m in repl.chat.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    repl.chat.cache.check()
    assert repl.last.reused > 0


def test_oversized_message_in_the_repl_is_a_hint_and_the_chat_goes_on(tiny, pipe):
    repl = make_repl(tiny, pipe)
    repl.engine.max_context = 100
    out = drive(repl, "Hello\r" + "dogs " * 200 + "\rTell me a story.\r/quit\r")
    assert "the message is too long" in out
    assert [m["content"] for m in repl.chat.messages if m["role"] == "user"] == ["Hello", "Tell me a story."]
    repl.chat.cache.check()


def test_input_history_persists_across_runs(tiny, pipe, tmp_path):
    history = str(tmp_path / "history")
    first = make_repl(tiny, pipe, history_path=history)
    drive(first, "Hello there\r/quit\r")
    second = make_repl(tiny, pipe, history_path=history)
    assert "Hello there" in list(second.session.history.load_history_strings())
    drive(second, "\x1b[A\x1b[A\r/quit\r")  # Up, Up: past the last run's /quit to its message; Enter sends
    assert [m["content"] for m in second.chat.messages if m["role"] == "user"] == ["Hello there"]


def test_ctrl_c_during_an_autosave_does_not_end_the_chat(tiny, pipe, tmp_path):
    repl = make_repl(tiny, pipe, tmp_path)
    repl.persister.session = "s"
    calls = []

    def interrupted_save(chat):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    repl.persister.after_turn = interrupted_save
    out = drive(repl, "Hello\rTell me a story.\r/quit\r")
    assert "[interrupted]" in out and len(calls) == 2
    assert [m["role"] for m in repl.chat.messages].count("assistant") == 2


def test_escape_sequences_in_a_reply_are_shown_not_obeyed(tiny, pipe, monkeypatch):
    """Regression (issue 10): a reply's escape sequences (clear screen, retitle, bell) went to the terminal raw."""
    from kvchat.chat.engine import Token, TurnEnd

    repl = make_repl(tiny, pipe)
    real_send = repl.chat.send

    def hostile_send(text):
        for event in real_send(text):
            if isinstance(event, TurnEnd):
                yield Token("\x1b[2J\x1b]0;pwned\x07", 1)
            yield event

    monkeypatch.setattr(repl.chat, "send", hostile_send)
    out = drive(repl, "Hello\r/quit\r")
    assert "\x1b[2J" not in out and "\x07" not in out and "^[[2J^[]0;pwned^G" in out


def test_reset_in_a_saved_session_and_save_onto_another_lose_nothing(tiny, pipe, tmp_path):
    """Regression (issue 10): /reset in a saved session wiped its transcript at the next autosave, and
    /save NAME silently replaced another session."""
    first = make_repl(tiny, pipe, tmp_path / "first")
    drive(first, "Hello\r/save trip\rTell me a story.\r/reset\rNumbers?\r/quit\r")
    kept = first.persister.store.read_manifest("trip")
    assert [m["content"] for m in kept.messages if m["role"] == "user"] == ["Hello", "Tell me a story."]
    first.persister.store.close()

    repl = make_repl(tiny, pipe, tmp_path)
    out = drive(repl, "Hello\r/save trip\rTell me a story.\r/reset\rNumbers?\r/save other\rCats?\r"
                      "/save trip\r/save trip!\r/quit\r")
    assert "session 'trip' stays saved as it was" in out
    assert "a session named 'trip' already exists; /save trip! replaces it" in out
    store = repl.persister.store
    assert store.read_manifest("other").turns == 2
    assert store.read_manifest("trip").turns == 2  # replaced only by the explicit /save trip!
    assert [m["content"] for m in store.read_manifest("trip").messages if m["role"] == "user"] == \
        ["Numbers?", "Cats?"]
    store.close()


def test_system_and_reset_keep_the_view_right_after_turns_were_dropped(tiny):
    """Regression (issue 10): after a context drop, /system shifted first_kept onto a reply, and /reset kept it."""
    chat = Chat.start(Engine(tiny), "Be brief.")
    for i in range(4):
        chat.messages.extend([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
    chat.conversation.first_kept = 5  # q2 is the first message the model still sees
    chat.set_system(None)
    assert chat.conversation.view()[0] == {"role": "user", "content": "q2"}
    chat.set_system("Be kind.")
    assert chat.conversation.view()[:2] == [{"role": "system", "content": "Be kind."},
                                            {"role": "user", "content": "q2"}]
    chat.reset()
    chat.messages.append({"role": "user", "content": "new"})
    assert chat.conversation.view() == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "new"}]


def test_a_failure_inside_a_turn_is_one_line_and_the_chat_goes_on(tiny, pipe, monkeypatch):
    """Regression (issue 10): an exception inside a turn (out of memory, sampling) ended the chat with a traceback."""
    import kvchat.chat.engine as engine_module

    repl = make_repl(tiny, pipe)
    calls = {"n": 0}
    real = engine_module.next_token

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "next_token", failing_once)
    out = drive(repl, "Hello\rHello again\r/quit\r")
    assert "error in this turn (RuntimeError: CUDA out of memory. Tried to allocate 2 GiB)" in out
    assert [m["role"] for m in repl.chat.messages] == ["system", "user", "assistant"]  # the failed turn left nothing
    assert repl.chat.messages[1]["content"] == "Hello again"
    repl.chat.cache.check()


def test_a_long_prefill_shows_its_progress_and_the_reply_follows(tiny, pipe):
    """Regression (issue 11): nothing moved on screen while a long message was read (108 s seen). In a
    terminal, a turn without its first token shows a transient line: tokens read of how many, the rate,
    Ctrl-C to stop; the reply follows it."""
    repl = make_repl(tiny, pipe, terminal=True, width=120)
    repl.engine.prefill_chunk = 16
    repl.progress_delay = 0
    message = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    out = drive(repl, message + "\r/quit\r")
    total = len(repl.engine.render(repl.chat.messages[:-1]))  # nothing was cached: the whole prompt
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    assert "reading the prompt" in lines and "Ctrl-C stops" in lines and "tok/s" in lines
    assert f"16/{total} tokens" in lines
    expected = reply_to(repl.engine, repl.chat.messages[:-1])
    assert expected.strip() and expected.strip() in lines


def test_no_progress_line_outside_a_terminal(tiny, pipe):
    repl = make_repl(tiny, pipe)
    repl.engine.prefill_chunk = 16
    repl.progress_delay = 0
    out = drive(repl, " ".join(["The quick brown fox."] * 12) + "\r/quit\r")
    assert "reading the prompt" not in out and "\x1b[" not in out


def screen_repl(tiny, pipe, **kwargs):
    """A REPL whose prompt is drawn into a string (an 80x24 xterm), to read what stays on screen."""
    from prompt_toolkit.data_structures import Size
    from prompt_toolkit.output.vt100 import Vt100_Output

    screen = io.StringIO()
    repl = Repl(Chat.start(Engine(tiny), "Be brief.", sampling=SETTINGS.sampling), SETTINGS, input=pipe, width=80,
                output=Vt100_Output(screen, lambda: Size(rows=24, columns=80), term="xterm"), out=io.StringIO(),
                **kwargs)
    repl.pipe, repl.screen = pipe, screen
    return repl


def test_a_long_paste_stays_on_screen_collapsed_and_the_model_gets_all_of_it(tiny, pipe, tmp_path, monkeypatch):
    """Regression (issue 11): a paste taller than the terminal blanked the screen and was never shown; the
    input history kept 300 KB pastes. Now it is shown as its first lines and what is left out; the model
    and the input history get the whole text (history only below MAX_HISTORY_CHARS)."""
    monkeypatch.setattr("kvchat.ui.repl.MAX_HISTORY_CHARS", 5000)  # a message over it that still fits the context
    paste = "\n".join(f"row {i} of the paste" for i in range(1, 201))
    huge = "The quick brown fox jumps over the lazy dog. " * 120
    repl = screen_repl(tiny, pipe, history_path=str(tmp_path / "history"))
    drive(repl, f"\x1b[200~{paste}\x1b[201~\r\x1b[200~{huge}\x1b[201~\rShort one.\r/quit\r")
    sent = [m["content"] for m in repl.chat.messages if m["role"] == "user"]
    assert sent == [paste, huge, "Short one."]
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", repl.screen.getvalue())
    assert "row 6 of the paste" in screen and f"[… 194 more lines; {len(paste):,} characters sent]" in screen
    assert "row 7 of the paste" not in screen and "row 200 " not in screen
    assert f"more characters; {len(huge):,} characters sent]" in screen
    assert repl.history.get_strings()[-3:] == [paste, "Short one.", "/quit"]  # the huge one is not kept


def test_resuming_shows_the_last_exchanges_and_history_shows_them_all(tiny, pipe, tmp_path):
    """Regression (issue 11): resuming said only "resumed: 5 turns" (and "1 turns" for one)."""
    from kvchat.ui.repl import RESUME_EXCHANGES

    first = make_repl(tiny, pipe, tmp_path)
    drive(first, "/save talk\rHello\rTell me a story.\rNumbers?\r/quit\r")
    first.persister.store.close()
    messages = [m for m in first.chat.messages if m["role"] != "system"]
    engine, store = engine_with_store(tiny, tmp_path / "sessions")
    chat = open_chat(engine, store, "talk", sampling=SETTINGS.sampling).chat
    with create_pipe_input() as again:
        resumed = Repl(chat, SETTINGS, persister=Persister(store, "talk"), input=again,
                       output=DummyOutput(), out=io.StringIO())
        resumed.pipe = again
        out = drive(resumed, "/history\r/history 1\r/history x\r/quit\r")
    head = out[:out.index("you> Tell me a story.")]
    assert "resumed: 3 turns" in head and "[1 earlier exchange: /history shows all]" in head
    shown = out[out.index("you> Tell me a story."):]
    for message in messages[-2 * RESUME_EXCHANGES:]:
        assert message["content"].strip()[:20] in shown
    assert out.count("you> Hello") == 1  # once, by /history (all), not on resume
    assert out.count("you> Numbers?") == 3  # resume, /history, /history 1
    assert "usage: /history [N]" in out
    store.close()

    single = make_repl(tiny, pipe)
    single.chat.messages.extend([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    assert "resumed: 1 turn," in drive(single, "/quit\r")


def test_a_cut_reply_is_marked_and_continue_goes_on_with_it(tiny, pipe):
    """Regression (issue 11): replies cut at max_new_tokens were not marked; /continue extends them."""
    repl = make_repl(tiny, pipe)
    repl.engine.stop_ids = frozenset()  # every reply runs to max_new_tokens
    out = drive(repl, "Hello\r/continue\r/continue\r/quit\r")
    assert out.count("[cut at max_new_tokens=6: /continue goes on]") == 3
    assert [m["role"] for m in repl.chat.messages] == ["system", "user", "assistant"]
    assert len(repl.chat.messages[-1]["token_ids"]) == 18 and repl.last.prefilled == 1
    repl.chat.cache.check()


def test_commands_refuse_arguments_they_do_not_take_and_help_shows_arguments_with_the_name(tiny, pipe):
    """Regression (issue 11): `/undo 3` silently removed one exchange; /help put TEXT and NAME in the
    description column."""
    repl = make_repl(tiny, pipe)
    out = drive(repl, "Hello\rAgain\r/undo 3\r/help\r/quit\r")
    assert "/undo takes no argument" in out
    assert [m["content"] for m in repl.chat.messages if m["role"] == "user"] == ["Hello", "Again"]
    assert "  /system TEXT  " in out and "  /load NAME  " in out and "  /save [NAME]  " in out
    assert "  /undo  " in out and "TEXT  set" not in out


def test_set_values_are_kept_with_the_session_and_load_brings_them_back(tiny, pipe, tmp_path):
    repl = make_repl(tiny, pipe, tmp_path)
    out = drive(repl, "/save a\r/set max_new_tokens=3\r/save b\r/set max_new_tokens=4\r/load a\r/quit\r")
    assert repl.chat.sampling.max_new_tokens == 3  # a was saved (autosave after /set) with 3
    store = repl.persister.store
    assert store.read_manifest("b").settings["max_new_tokens"] == 4
    assert "max_new_tokens = 4" in out
    store.close()


def test_system_mid_chat_says_how_much_the_next_turn_reads_again(tiny, pipe):
    """Regression (issue 11): /system mid-chat re-prefilled the whole conversation without a word."""
    repl = make_repl(tiny, pipe)
    out = drive(repl, "Hello\rTell me a story.\r/system You are a pirate.\r/quit\r")
    chat = repl.chat
    again = len(repl.engine.render(chat.conversation.view(), generation_prompt=False)) - chat.cache.tokens
    assert again > 20 and f"system prompt set; the next turn re-reads {again:,} tokens of the conversation" in out
    first = drive(make_repl(tiny, pipe), "/system Short.\r/quit\r")  # before any exchange: nothing read again
    assert "system prompt set" in first and "re-reads" not in first


def test_time_saved_is_estimated_from_the_measured_cost_of_a_prompt_token():
    """Regression (issue 11): /stats divided all prefill time by all prefilled tokens, so the fixed cost of the
    many small prefills (5-11 tok/s) inflated the time saved; it now uses the slope over the larger prefills."""
    from kvchat.chat.engine import TurnStats
    from kvchat.ui.repl import Totals

    totals = Totals()
    for prefilled, ms, reused in ((12, 120.0, 0), (500, 1100.0, 40), (1000, 2100.0, 600), (20, 150.0, 1500)):
        totals.add(TurnStats(reused=reused, prefilled=prefilled, generated=4, ttft_ms=ms, decode_tok_s=20.0,
                             kv_bytes=0, prefill_ms=ms))
    assert totals.marginal_ms_per_token() == pytest.approx(2.0)  # (2100 - 1100) / (1000 - 500)
    assert totals.prefill_ms_per_token > 2.1  # what the old estimate used
    single = Totals(samples=[(8, 100.0), (300, 600.0)])
    assert single.marginal_ms_per_token() == pytest.approx(2.0)  # one size of 32 or more: its rate
    assert Totals().marginal_ms_per_token() == 0.0


def test_stats_count_this_conversation_only(tiny, pipe, tmp_path):
    repl = make_repl(tiny, pipe, tmp_path)
    out = drive(repl, "/save a\rHello\rAgain\r/save b\r/load a\r/stats\r/quit\r")
    assert "turns 0 · cache" in out  # the turns of session b are not session a's
    assert "time saved by reuse: not measured yet" in out
    repl.persister.store.close()


def test_after_an_interrupted_reply_the_toolbar_shows_no_old_figures(tiny, pipe):
    """Regression (issue 11): the toolbar kept the previous turn's reused/TTFT figures after a Ctrl-C."""
    repl = make_repl(tiny, pipe)
    real_send = repl.chat.send

    def interrupted_second(text):
        for event in real_send(text):
            yield event
            if text == "Again" and isinstance(event, Token):
                raise KeyboardInterrupt

    repl.chat.send = interrupted_second
    drive(repl, "Hello\r/quit\r")
    assert "TTFT" in repl.toolbar().value
    drive(repl, "Again\r/quit\r")
    bar = repl.toolbar().value
    assert "TTFT" not in bar and "reused" not in bar and f"cache {repl.chat.cache.tokens}/" in bar


def test_typed_ahead_keys_are_not_echoed_into_a_streaming_reply_and_wait_for_the_prompt():
    """Regression (issue 11): text typed while a reply streamed was echoed inside it. During a reply the
    terminal neither echoes nor edits lines (Ctrl-C still interrupts); the keys stay for the next prompt."""
    import os
    import pty
    import select
    import termios

    from kvchat.ui.display import quiet_input

    leader, follower = pty.openpty()
    try:
        with os.fdopen(os.dup(follower), "rb", buffering=0) as tty:
            before = termios.tcgetattr(follower)
            with quiet_input(tty):
                during = termios.tcgetattr(follower)
                os.write(leader, b"typed ahead\n")
                assert select.select([follower], [], [], 5)[0], "the typed keys were lost"  # the line discipline saw them
            after = termios.tcgetattr(follower)
            assert not during[3] & (termios.ECHO | termios.ICANON) and during[3] & termios.ISIG
            assert after == before and before[3] & termios.ECHO
            assert os.read(follower, 100) == b"typed ahead\n"  # still there for the prompt
            assert not select.select([leader], [], [], 0.2)[0]  # and nothing was echoed
    finally:
        os.close(leader)
        os.close(follower)


MARKDOWN_REPLY = "# Plan\n\nSome **bold** words and `code`.\n\n```python\nprint(1)\n```\n\n- first\n- second\n"


def markdown_repl(tiny, pipe, monkeypatch, **settings):
    """A REPL on a (fake) terminal whose model answers MARKDOWN_REPLY, a few characters at a time."""
    from kvchat.chat.engine import TurnEnd, TurnStats

    monkeypatch.delenv("NO_COLOR", raising=False)
    repl = Repl(Chat.start(Engine(tiny), sampling=SETTINGS.sampling), Settings(sampling=SETTINGS.sampling, **settings),
                input=pipe, output=DummyOutput(), out=FakeTerminal(), width=60)
    repl.pipe = pipe

    def send(text):
        for start in range(0, len(MARKDOWN_REPLY), 3):
            time.sleep(0.01)  # a model's pace: the live view is redrawn 8 times a second
            yield Token(MARKDOWN_REPLY[start:start + 3], 1)
        yield TurnEnd(MARKDOWN_REPLY, TurnStats(0, 1, 1, 1.0, 1.0, 0), [1])

    repl.chat.send = send
    return repl


def test_replies_are_rendered_as_markdown_in_a_terminal_and_plain_gives_the_raw_text(tiny, pipe, monkeypatch):
    """Issue 11: replies in a terminal are Markdown (headings, emphasis, code blocks, lists), streamed;
    --plain gives the raw text."""
    out = drive(markdown_repl(tiny, pipe, monkeypatch), "Plan?\r/quit\r")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", out)
    assert "Plan" in shown and "bold" in shown and "print(1)" in shown and "• first" in shown
    assert "**bold**" not in shown and "```" not in shown and "# Plan" not in shown
    assert "\x1b[1m" in out  # bold, as the terminal shows it
    assert "tok/s · cache " in shown and "Ctrl-C stops" in shown  # a status line under the streaming reply
    assert not shown.rstrip().endswith("Ctrl-C stops")  # and gone once it ends
    plain = drive(markdown_repl(tiny, pipe, monkeypatch, plain=True), "Plan?\r/quit\r")
    assert "**bold**" in plain and "```python" in plain and "# Plan" in plain


def test_the_prompt_is_up_while_the_model_loads_and_the_first_message_waits_for_it(tiny, pipe):
    """Issue 11: a chat at its prompt at once; the model loads behind it (the toolbar says how far), and a
    message sent before it is ready waits for it, then goes through exactly as without the wait."""
    import threading

    from kvchat.errors import KvchatError
    from kvchat.ui.repl import Pending

    release = threading.Event()

    def make(report):
        report("loading tiny-llama", 0, 1)
        release.wait(10)
        return Chat.start(Engine(tiny), "Be brief.", sampling=SETTINGS.sampling), None, ["a notice from loading"]

    pending = Pending(make)
    repl = Repl(None, SETTINGS, input=pipe, output=DummyOutput(), out=io.StringIO(), pending=pending)
    repl.pipe = pipe
    assert "loading tiny-llama…" in repl.toolbar().value and repl.chat is None
    threading.Timer(0.3, release.set).start()
    out = drive(repl, "/help\rHello there\r/quit\r")
    assert "the model loads while you type" in out and "[waiting for the model to load]" in out
    assert out.index("/retry") < out.index("[waiting")  # /help answered before the model was there
    assert "a notice from loading" in out and "kvchat · tiny-llama on cpu" in out
    assert repl.chat.messages[-1]["content"] == reply_to(repl.engine, [{"role": "system", "content": "Be brief."},
                                                                      {"role": "user", "content": "Hello there"}])

    def broken(report):
        raise KvchatError("model 'nope' is not there")

    with create_pipe_input() as other:
        failing = Repl(None, SETTINGS, input=other, output=DummyOutput(), out=io.StringIO(),
                       pending=Pending(broken))
        other.send_text("Hello\r")
        with pytest.raises(KvchatError, match="is not there"):
            failing.run()


def test_system_mid_chat_is_autosaved_like_undo_and_set(tiny, pipe, tmp_path):
    """Regression (issue 21): `/system` in a saved session changed the chat but not the session on disk."""
    repl = make_repl(tiny, pipe, tmp_path)
    drive(repl, "Hello\r/save s\r/system Speak like a pirate.\r/quit\r")
    saved = repl.persister.store.read_manifest("s")
    assert saved.messages[0] == {"role": "system", "content": "Speak like a pirate."}
    assert saved.messages == repl.chat.messages
    repl.persister.store.close()


@pytest.mark.parametrize("command", ["/save s", "/fork f"])
def test_a_disk_error_in_save_or_fork_is_one_line_and_the_chat_goes_on(tiny, pipe, tmp_path, monkeypatch, command):
    """Regression (issue 21): an OSError in /save or /fork ended the REPL with a traceback, and the unsaved
    conversation with it."""
    from kvchat.store import kvfile

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    repl = make_repl(tiny, pipe, tmp_path)
    monkeypatch.setattr(kvfile, "atomic_write", full)
    out = drive(repl, f"Hello\r{command}\rAnd then?\r/quit\r")
    name = command.split()[1]
    assert f"cannot save session '{name}' in {tmp_path / 'sessions'}: No space left on device; nothing of it was " \
           "saved" in out
    assert [m["content"] for m in repl.chat.messages if m["role"] == "user"] == ["Hello", "And then?"]
    repl.persister.store.close()


def test_the_toolbar_and_stats_name_the_kv_form(tiny, pipe):
    """Issue 22: a cache kept in q8 says so under the prompt and in /stats (as computed says nothing there)."""
    from kvchat.cache.kv_forms import KVForm

    plain = make_repl(tiny, pipe)
    assert "q8" not in plain.toolbar().value
    engine = Engine(tiny, kv_form=KVForm("q8"))
    repl = make_repl(tiny, pipe, chat=new_chat(engine, None, "Be brief.", SETTINGS.sampling))
    out = drive(repl, "Hello\r/stats\r/quit\r")
    assert "KV q8 " in repl.toolbar().value
    assert re.search(r"cache \d+ tokens · KV [0-9.]+ MB \(q8\)", out), out
