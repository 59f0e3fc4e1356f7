"""Issue 21, item 10: a reply that reached the terminal is in the session's transcript even when the process dies
before the turn's save (a kill -9, a power cut of the process): the turn journal."""

import json
import shutil

import pytest

from bound import engine_with_store
from families import make_family
from kvchat.chat.engine import Token, TurnEnd
from kvchat.chat.saving import Persister, open_chat
from kvchat.config import Sampling
from reference import greedy_without_cache

GREEDY = Sampling(temperature=0, max_new_tokens=10)
MESSAGES = ["Hello there, how are you?", "Tell me about the sea.", "And about cats?"]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen3.5"])
def loaded(request, tiny):
    return tiny if request.param == "llama" else make_family(request.param)


def printed_until_death(persister, events, tokens):
    """Run a turn's events through the journal as the UI does, 'printing' until `tokens` tokens (None: up to the
    turn's end, not included); then the process dies: no save, no cleanup, the generator never resumed."""
    printed, count = [], 0
    for event in persister.journaled(events):
        if isinstance(event, TurnEnd):
            break
        if isinstance(event, Token):
            printed.append(event.text)
            count += 1
            if count == tokens:
                break
    return "".join(printed)


def die(store):
    store.close()  # what the kernel does to a killed process: its locks go; nothing is saved


def resume(loaded, root):
    engine, store = engine_with_store(loaded, root)
    opened = open_chat(engine, store, "s")
    opened.chat.sampling = GREEDY
    return engine, store, opened


def fresh(engine, chat):
    return greedy_without_cache(engine.model, engine.render(chat.conversation.view()[:-1]), GREEDY.max_new_tokens,
                                engine.stop_ids)


def saved_chat(loaded, root, turns=1):
    engine, store = engine_with_store(loaded, root)
    opened = open_chat(engine, store, "s", system="Be brief.")
    opened.chat.sampling = GREEDY
    persister = Persister(store, "s")
    for text in MESSAGES[:turns]:
        list(persister.journaled(opened.chat.send(text)))
        persister.after_turn(opened.chat)
    return store, opened.chat, persister


@pytest.mark.parametrize("tokens", [3, None])
def test_a_reply_printed_before_a_kill_is_in_the_transcript(loaded, tmp_path, tokens):
    """Regression: 3 of 44 kill -9 during an autosave lost the last printed reply. Killed mid-reply or after the
    whole reply was printed, before its save: the resumed session holds the reply as far as it was printed, and
    the next turn is what a fresh prefill of that transcript gives."""
    store, chat, persister = saved_chat(loaded, tmp_path)
    before = [dict(m) for m in chat.messages]
    printed = printed_until_death(persister, chat.send(MESSAGES[1]), tokens)
    assert printed
    die(store)

    engine, store2, opened = resume(loaded, tmp_path)
    assert "recovered that from the session's journal" in opened.notice and "\n" not in opened.notice
    messages = opened.chat.messages
    assert [dict(m) for m in messages[:len(before)]] == before
    assert messages[len(before):] == [{"role": "user", "content": MESSAGES[1]},
                                      {"role": "assistant", "content": printed}]
    assert opened.loaded_tokens > 0  # the KV of the saved turns is used
    persister2 = Persister(store2, "s")
    end = [e for e in persister2.journaled(opened.chat.send(MESSAGES[2])) if isinstance(e, TurnEnd)][0]
    assert end.token_ids == fresh(engine, opened.chat)
    persister2.after_turn(opened.chat)
    assert not store2.journal_path("s").exists()  # the save took the turn: the journal went with it
    want = [dict(m) for m in opened.chat.messages]
    die(store2)
    _, _, again = resume(loaded, tmp_path)
    assert again.notice is None and again.chat.messages == want and len(want) == len(before) + 4


def test_a_continued_reply_and_a_new_session_are_recovered_too(tiny, tmp_path):
    """/continue appends to the last reply; a session never saved before the kill is recovered from nothing."""
    store, chat, persister = saved_chat(tiny, tmp_path)
    before = chat.messages[-1]["content"]
    printed = printed_until_death(persister, chat.extend(), 2)
    die(store)
    _, store2, opened = resume(tiny, tmp_path)
    assert opened.chat.messages[-1] == {"role": "assistant", "content": before + printed}
    die(store2)

    fresh_root = tmp_path / "new"
    engine, store3 = engine_with_store(tiny, fresh_root)
    chat3 = open_chat(engine, store3, "s").chat
    chat3.sampling = GREEDY
    printed = printed_until_death(Persister(store3, "s"), chat3.send(MESSAGES[0]), None)
    die(store3)
    _, _, opened = resume(tiny, fresh_root)
    assert opened.chat.messages == [{"role": "user", "content": MESSAGES[0]},
                                    {"role": "assistant", "content": printed}]


def test_a_journal_older_than_the_save_is_never_used(tiny, tmp_path):
    """Killed after the save, before its journal was removed (or a journal someone put back): the manifest is
    newer, so the journal is ignored and nothing is doubled."""
    store, chat, persister = saved_chat(tiny, tmp_path)
    printed_until_death(persister, chat.send(MESSAGES[1]), 2)
    shutil.copy(store.journal_path("s"), tmp_path / "kept")
    persister.after_turn(chat)  # the save of that turn (the chat recorded the cut reply)
    shutil.copy(tmp_path / "kept", store.journal_path("s"))
    want = [dict(m) for m in chat.messages]
    die(store)
    _, _, opened = resume(tiny, tmp_path)
    assert opened.notice is None and opened.chat.messages == want


@pytest.mark.parametrize("damage", [b"", b"{not json\n", b'{"kvchat_journal": 1}\n"x"\n',
                                    b'{"kvchat_journal": 1, "follows": null, "messages": [], "first_kept": 0, '
                                    b'"continuing": false}\n"x"\n', b"\xff\xfe\n\x00"])
def test_a_damaged_journal_is_ignored(tiny, tmp_path, damage):
    store, chat, _ = saved_chat(tiny, tmp_path)
    want = [dict(m) for m in chat.messages]
    die(store)
    (tmp_path / "s.journal").write_bytes(damage)
    _, _, opened = resume(tiny, tmp_path)
    assert opened.notice is None and opened.chat.messages == want


def test_a_journal_is_private_never_followed_and_goes_with_its_session(tiny, tmp_path):
    import os
    import stat

    from kvchat.ui.cli import main

    store, chat, persister = saved_chat(tiny, tmp_path)
    printed_until_death(persister, chat.send(MESSAGES[1]), 2)
    journal = store.journal_path("s")
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    die(store)
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_text("keep me")
    journal.unlink()
    journal.symlink_to(victim)
    store2, chat2, persister2 = saved_chat(tiny, tmp_path)  # resumes; its turn cannot open the planted link
    assert victim.read_text() == "keep me"
    die(store2)
    assert main(["sessions", "rm", "s", "--sessions-dir", str(tmp_path)]) == 0
    assert not os.path.lexists(journal) and victim.read_text() == "keep me"


def test_a_damaged_piece_ends_the_recovered_reply_there(tiny, tmp_path):
    """Each journal line carries a checksum: a piece damaged on disk is never taken for text that was printed."""
    store, chat, persister = saved_chat(tiny, tmp_path)
    printed_until_death(persister, chat.send(MESSAGES[1]), 4)
    die(store)
    lines = store.journal_path("s").read_bytes().split(b"\n")
    assert len(lines) >= 4  # a header, pieces, the empty end
    first = lines[1]
    damaged = lines[2].replace(b"[", b"[9", 1)  # a wrong checksum on the second piece
    store.journal_path("s").write_bytes(b"\n".join([lines[0], first, damaged, *lines[3:]]))
    _, _, opened = resume(tiny, tmp_path)
    from kvchat.store.journal import JournalTurn

    saved = json.loads((tmp_path / "s.json").read_text())["messages"]
    want = JournalTurn.parse(lines[0] + b"\n" + first + b"\n", saved).text
    assert want and opened.chat.messages[-1] == {"role": "assistant", "content": want}


def test_a_turn_killed_before_its_reply_keeps_what_the_journal_before_it_recovered(tiny, tmp_path):
    """Found by the kill loop on the real model: a reply recovered from the journal, then the next process killed
    after its turn's journal began but before any reply: the recovered reply was lost (the new journal replaced
    the old one and, holding no reply, was ignored). A journal keeps the transcript before its turn too."""
    store, chat, persister = saved_chat(tiny, tmp_path)
    printed = printed_until_death(persister, chat.send(MESSAGES[1]), 3)
    die(store)
    _, store2, opened = resume(tiny, tmp_path)
    recovered = [dict(m) for m in opened.chat.messages]
    assert recovered[-1] == {"role": "assistant", "content": printed}
    events = Persister(store2, "s").journaled(opened.chat.send(MESSAGES[2]))
    next(events)  # the turn has begun (its journal written); no token yet
    die(store2)
    _, _, again = resume(tiny, tmp_path)
    assert again.notice and [dict(m) for m in again.chat.messages] == recovered


def test_a_turns_journal_does_not_repeat_a_saved_transcript(tiny, tmp_path):
    """A turn's start writes what the turn adds, not the whole conversation again: its journal header is as
    small at the third turn as at the first (the last save holds the rest)."""
    store, chat, persister = saved_chat(tiny, tmp_path, turns=3)
    events = persister.journaled(chat.send(MESSAGES[0]))
    next(events)
    header = store.journal_path("s").read_bytes().split(b"\n")[0]
    assert len(header) < 400 and MESSAGES[0].encode() in header, header
    events.close()
    die(store)
