"""kill -9 in the middle of a saved session, a few times (the long form: python tests/kill_loop.py MODEL_DIR 40)."""

import torch

from kill_loop import run_kills
from kvchat.config import Sampling
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.chat.saving import open_chat
from kvchat.weights.model import fingerprint, load_model
from kvchat.store.sessions import Store
from reference import greedy_without_cache


def test_kill_9_at_random_moments_never_loses_a_saved_turn_and_the_chat_goes_on_exactly(tiny_model_dir, tmp_path):
    sessions = tmp_path / "sessions"
    figures = run_kills(tiny_model_dir, sessions, kills=5, seed=1)
    assert figures["kills"] == 5 and figures["turns"] > 0
    loaded = load_model(str(tiny_model_dir), "cpu", "float32")
    engine = Engine(loaded)
    store = Store(sessions).bind(engine.layout, fingerprint(loaded), loaded.name)
    chat = open_chat(engine, store, "crash").chat
    chat.sampling = Sampling(temperature=0, max_new_tokens=8)
    end = [e for e in chat.send("One more question?") if isinstance(e, TurnEnd)][0]
    with torch.inference_mode():
        want = greedy_without_cache(loaded.model, engine.render(chat.conversation.view()[:-1]), 8, engine.stop_ids)
    assert end.token_ids == want
    store.close()


def test_random_damage_to_store_files_never_gives_a_traceback_a_wrong_reply_or_a_lost_transcript():
    """The short form of tests/corruption_loop.py (100 rounds for the figures)."""
    from corruption_loop import run_rounds

    figures = run_rounds(20, seed=3)
    assert figures["rounds"] == 20 and sum(figures[k] for k in ("intact", "older", "recovered", "refused")) == 40


def test_wrong_shapes_linked_or_foreign_folders_and_a_full_disk_never_reach_outside_or_lose_a_printed_turn():
    """The kinds of damage issue 21 added to the loop, each several times: JSON (and safetensors headers) of the
    wrong shape, store folders swapped for links or given to another user, a disk that fills mid-save."""
    from corruption_loop import run_rounds

    figures = run_rounds(24, seed=11, damages=("wrong-shape", "dir-link", "dir-foreign", "full-disk"))
    assert figures["rounds"] == 24 and sum(figures[k] for k in ("intact", "older", "recovered", "refused")) == 48
    assert figures["refused"] > 0 and figures["disk_full_hit"] > 0  # the damage was felt


def test_unreadable_store_files_as_a_non_root_user_are_damage_like_any_other():
    """Permission 000 on any store file, read by a user it stops (as root the rounds run as nobody): one line
    or a rebuild, never a traceback or a lost transcript."""
    from corruption_loop import run_rounds

    figures = run_rounds(12, seed=5, damages=("unreadable",))
    assert figures["as_user"] != 0
    assert figures["rounds"] == 12 and sum(figures[k] for k in ("intact", "older", "recovered", "refused")) == 24
    assert figures["rebuilt"] + figures["recovered"] + figures["refused"] > 0  # the damage was felt
