"""kvchat bench --quick as a smoke test: the shape of its output, never its timings."""

import io
import json

import pytest

from kvchat.ui.cli import main


def run_bench(monkeypatch, capsys, tmp_path, *model):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code = main(["bench", "--quick", *model, "--json", str(tmp_path / "b.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, json.loads((tmp_path / "b.json").read_text())


def check_shape(out, results):
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "| scenario | what | with the cache | without | speed-up | same tokens |"
    assert [row.split(" | ")[0] for row in table[1:5]] == [
        "| 1. cache vs recompute", "| 2. turns: TTFT turn 1", "| 2. turns: TTFT turn 4", "| 3. resume"]
    assert all(row.endswith("| yes |") for row in table[1:5])  # every side pair gave the same tokens
    assert "| formula (" in out and "| measured in the cache |" in out and "| on disk" in out
    saves = results["resume"]["autosaves"]
    assert saves and all(save["bytes"] > 0 for save in saves)
    assert ("| after turn 2 |" in out) is (len(saves) >= 2)
    assert results["memory"]["measured_bytes_per_token"] == results["memory"]["formula_bytes_per_token"]
    assert len(results["turns"]["ttft_ms"]["reuse"]) == len(results["turns"]["ttft_ms"]["no_reuse"]) == 4
    assert results["turns"]["prefilled"]["no_reuse"][-1] > results["turns"]["prefilled"]["reuse"][-1]
    assert results["resume"]["tokens"] >= 200
    assert len(results["cache_vs_recompute"]["runs"]["cached"]) == 2
    cost = [line for line in table if line.startswith("| turn cost") or "-token history" in line]
    assert cost[0].startswith("| turn cost before the first forward pass | prompt | whole render |")
    rows = results["turn_cost"]["rows"]
    assert len(cost) == 1 + len(rows) == 5 and all(row.endswith("| yes |") for row in cost[1:])
    assert [row["history_tokens"] >= size for row, size in zip(rows[::2], (300, 1200))] == [True, True]
    assert "Sampling one token with the default settings (top-k 50, top-p 0.95)" in out
    assert results["sampling"]["ms_per_token"] > 0


def test_bench_quick_on_the_tiny_model(monkeypatch, capsys, tmp_path, tiny_model_dir):
    out, results = run_bench(monkeypatch, capsys, tmp_path, "--model", str(tiny_model_dir))
    check_shape(out, results)


@pytest.mark.real_model
def test_bench_quick_on_the_default_model(monkeypatch, capsys, tmp_path):
    out, results = run_bench(monkeypatch, capsys, tmp_path)
    check_shape(out, results)
    assert results["model"] == "SmolLM2-135M-Instruct"
    assert "| after turn 2 |" in out  # the default model needs several turns to reach 200 tokens


def test_bench_refuses_bad_sizes(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["bench", "--repeat", "0"]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_bench_levers_quick_compares_each_weight_form_with_float32(monkeypatch, capsys, tmp_path, tiny_model_dir):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code = main(["bench", "--levers", "--quick", "--model", str(tiny_model_dir), "--json", str(tmp_path / "l.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    packed = "float32, int8 (approximate) weights"
    assert [row["precision"] for row in rows] == ["float32", packed, f"{packed}, direct step",
                                                  f"{packed}, compiled step", "bfloat16"]
    assert rows[0]["agree"] == [8, 8] and rows[0]["decode_x"] == 1.0  # float32 against itself
    assert rows[2]["agree"] == rows[1]["agree"]  # the direct step: transformers' int8 tokens
    assert rows[3]["agree"] == rows[1]["agree"] and rows[3]["compile_s"] > 0  # compiled: the eager int8 tokens
    assert all(len(row["agree"]) == 2 and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 for row in rows)
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| lever | context | decode tok/s | vs float32 |") and len(table) == 1 + 5
    assert table[1].startswith("| float32 | 128 |") and table[1].endswith("| 2/2 | 8 |")


def test_bench_kv_quick_reports_each_form_against_auto(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """Issue 22: memory and disk per token, perplexity over the shipped text, speed and greedy agreement, per
    KV form, against auto (as computed)."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code = main(["bench", "--kv", "--quick", "--model", str(tiny_model_dir), "--json", str(tmp_path / "k.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((tmp_path / "k.json").read_text())
    forms = results["forms"]
    assert list(forms) == ["auto", "float16", "bfloat16", "q8", "q8/q4", "q4"] and results["plan"]["text_tokens"] == 256
    assert forms["auto"]["memory_x"] == forms["auto"]["disk_x"] == forms["auto"]["perplexity_x"] == 1.0
    assert forms["float16"]["memory_x"] == 0.5 and forms["q8"]["memory_x"] < 0.3 and forms["q4"]["memory_x"] < 0.2
    assert forms["q8"]["disk_x"] < 0.3 and 1 < forms["auto"]["perplexity"] < 10_000
    assert forms["q4"]["memory_x"] < forms["q8/q4"]["memory_x"] < forms["q8"]["memory_x"]
    assert all(abs(f["perplexity_x"] - 1) < 0.05 for f in forms.values())  # a tiny random model: close to auto
    rows = results["rows"]
    assert [row["form"] for row in rows] == list(forms) and rows[0]["agree"] == [8, 8]
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| KV form | memory B/token |") and len(table) == 1 + 6 + 1 + 6


class FakeLlama:
    """Stands in for llama_cpp.Llama: greedy tokens from the tiny model itself, its prefix kept between calls."""

    engine = None

    def __init__(self, path, **kwargs):
        self.ids = []

    def reset(self):
        self.ids = []

    def eval(self, ids):
        self.ids = self.ids + list(ids)

    def generate(self, ids, temp, top_k, reset):
        from reference import greedy_without_cache

        self.ids = (self.ids if not reset else []) + list(ids)
        while True:
            token = greedy_without_cache(self.engine.model, self.ids, 1, frozenset())[0]
            self.ids.append(token)
            yield token

    def save_state(self):
        return list(self.ids)

    def load_state(self, state):
        self.ids = list(state)


def test_bench_peer_column_runs_the_same_work_on_the_peer(monkeypatch, tmp_path, tiny_model_dir):
    import sys
    import types

    from kvchat.bench import peer
    from kvchat.chat.engine import Engine
    from kvchat.weights.model import load_model

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    monkeypatch.setattr(peer.importlib.util, "find_spec", lambda name: object())
    loaded = load_model(str(tiny_model_dir), "cpu", "float32")
    FakeLlama.engine = Engine(loaded)
    gguf = tmp_path / "model.gguf"
    results = peer.run(loaded, gguf, peer.PeerPlan.quick(), lambda *_: None)
    assert [row["first_8_tokens_agree"] for row in results["rows"]] == [True]  # the same model on both sides
    assert results["rows"][0]["prompt_tokens"] >= 64 and results["rows"][0]["peer_decode"] > 0
    assert results["resume"]["tokens"] >= 150 and results["resume"]["peer_ms"] > 0
    table = peer.markdown(results)
    assert "| decode tok/s, " in table and "| TTFT at turn 3 " in table and "| resume a " in table
    monkeypatch.setattr(peer.importlib.util, "find_spec", lambda name: None)
    assert "llama_cpp is not importable" in peer.unavailable()


def test_bench_startup_quick_times_a_one_shot_run_and_its_steps(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """Issue 23: process start to first reply byte and peak memory of `kvchat -p` in a fresh process, and the
    start-up's steps, which add up to about the whole (no peer: the tiny model has no GGUF)."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code = main(["bench", "--startup", "--quick", "--model", str(tiny_model_dir), "--json", str(tmp_path / "s.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads((tmp_path / "s.json").read_text())
    assert list(results["sides"]) == ["kvchat", "warm"]  # cold, and served by a warm process
    for ours in results["sides"].values():
        assert 0 < ours["first_byte_s"] <= ours["total_s"]
        assert 50 * 2**20 < ours["peak_rss"] < 8 * 2**30  # (warm: the child that ran it, not the small client)
    assert not list((tmp_path / "home" / "warm").glob("*.sock"))  # the bench's warm process was stopped
    steps = dict(results["phases"])
    assert list(steps)[0] == "python started" and list(steps)[-1] == "the prompt and the first token"
    assert all(seconds >= 0 for seconds in steps.values()) and steps["import torch"] > 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| one-shot `-p`, one reply token | kvchat, cold | kvchat, warm |")
    assert len(table) == 1 + 3 + 1 + 6


def test_bench_sizes_without_llama_cpp_is_one_clear_line(monkeypatch, capsys):
    """Issue 23: the real-size files are made by llama.cpp's quantizer and compared with it: without it, one line."""
    from kvchat.bench import peer

    monkeypatch.setattr(peer.importlib.util, "find_spec", lambda name: None)
    code = main(["bench", "--sizes", "--quick"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.strip().count("\n") == 0 and "--sizes needs llama.cpp" in err


def test_bench_sizes_table_gives_each_file_kvchat_llama_cpp_and_their_ratio():
    from kvchat.bench import sizes

    side = {"first_byte_s": None, "total_s": 2.0, "peak_rss": 1000 * 2**20}
    row = {"file_type": "Q4_K_M", "file_bytes": 800 * 2**20, "weights": "int8 (4-bit and int8)",
           "prompt_tokens": 513, "kvchat_decode": 20.0, "peer_decode": 25.0, "kvchat_prefill": 100.0,
           "peer_prefill": 50.0, "first_8_tokens_agree": True,
           "startup": {"kvchat": side, "warm": {**side, "total_s": 1.0}, "peer": {**side, "peak_rss": 800 * 2**20,
                                                                                  "total_s": 0.5}}}
    bf16 = {**row, "file_type": "BF16", "file_bytes": 2100 * 2**20, "model_bytes": 800 * 2**20, "weights": "bfloat16"}
    table = sizes.markdown({"shape": "llama-3.2-1b", "parameters": sizes.SHAPES["llama-3.2-1b"].parameters,
                            "threads": 2, "rows": [row, bf16]})
    assert "(1.24B parameters)" in table
    # kvchat's BF16 model is a safetensors one: its size, and the peak RSS over it (the goal: at most 1.2x)
    assert "| BF16 | 800 safetensors (RSS 1.25x it), 2100 GGUF | bfloat16 | 20.0 / 25.0 (0.80x) |" in table
    assert "| Q4_K_M | 800 | int8 (4-bit and int8) | 20.0 / 25.0 (0.80x) | 100.0 / 50.0 (2.00x) | " \
           "1000 / 800 (1.25x) | 2.00 / 0.50 (4.00x) (1.00) |" in table
