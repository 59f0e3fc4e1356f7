"""kvchat bench --startup: a one-shot run as a user starts it (`kvchat -p hi`), process start to the first reply
byte and the process's peak resident memory, side by side with llama.cpp (llama-cpp-python on the same GGUF,
the same threads) when it is importable; the sides alternate. kvchat is measured twice: cold (no warm process,
`KVCHAT_WARM=0`: everything imported by the run) and warm (served by a warm process, see kvchat.ui.warm, which
a first run leaves and which is stopped at the end; its peak memory is that of the child that ran the command).
And where kvchat's cold start-up goes, phase by phase, timed inside a child process. Every run is a fresh
process; nothing here prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvchat.bench.common import Progress, median
from kvchat.config import kvchat_home


@dataclass(frozen=True)
class StartupPlan:
    repeat: int = 3
    prompt: str = "hi"
    first_byte: bool = True  # False: a run whose one token prints nothing (a random model's may not) is not failed

    @classmethod
    def quick(cls) -> "StartupPlan":
        return cls(repeat=1)


# A one-shot reply of one token on llama.cpp, as `kvchat -p` gives one: load, prompt, first token out.
_PEER = """
import sys
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=4096, n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
                      verbose=False)
for piece in llm.create_chat_completion([{"role": "user", "content": sys.argv[3]}], max_tokens=1, temperature=0,
                                        stream=True):
    text = piece["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
"""

# kvchat's start-up in the steps a one-shot run takes, each stamped with the wall clock.
_PHASES = """
import json, sys, time
stamps = [("python started", time.time())]
import torch
stamps.append(("import torch", time.time()))
import transformers, transformers.modeling_utils
from kvchat.chat.chat import Chat
from kvchat.chat.engine import Engine, TurnEnd
from kvchat.config import Sampling
from kvchat.weights.model import load_model
stamps.append(("import transformers and kvchat", time.time()))
loaded = load_model(sys.argv[1], "cpu")
stamps.append(("load the model (tokenizer, weights, packing)", time.time()))
engine = Engine(loaded)
stamps.append(("the cache's layout (one probe token)", time.time()))
chat = Chat(engine)
chat.sampling = Sampling(temperature=0, max_new_tokens=1)
for event in chat.send(sys.argv[2]):
    if isinstance(event, TurnEnd):
        break
stamps.append(("the prompt and the first token", time.time()))
print(json.dumps(stamps))
"""


# Runs a command and writes its peak RSS (ru_maxrss) to a file: started from this small process rather than from
# the bench's, because a process's ru_maxrss counts the memory of the process it was forked from (kept across
# exec on Linux), and the bench may hold a model.
_MEASURED = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def _timed(argv: list[str], env: dict[str, str], cwd: str) -> dict[str, Any]:
    """Run `argv` (its first item a path); seconds to its first stdout byte and to its end, its peak RSS in
    bytes, its exit status and the tail of its stderr."""
    with tempfile.TemporaryFile() as errors, tempfile.TemporaryDirectory(prefix="kvchat-rss-") as folder:
        report = Path(folder) / "peak"
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-S", "-c", _MEASURED, str(report), *argv],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, env=env, cwd=cwd)
        first = process.stdout.read(1)
        first_at = time.perf_counter()
        out = first + process.stdout.read()
        process.wait()
        ended = time.perf_counter()
        process.stdout.close()
        errors.seek(0)
        tail = errors.read().decode("utf-8", "replace")[-300:]
        measured = report.read_text() if report.is_file() else "0"
    # (ru_maxrss is in KiB on Linux, in bytes on macOS)
    peak = int(measured) * (1 if sys.platform == "darwin" else 1024)
    return {"first_byte_s": first_at - started if first else None, "total_s": ended - started, "peak_rss": peak,
            "rc": process.returncode, "out": out.decode("utf-8", "replace"), "stderr": tail}


def _warm_socket(primed: Path) -> Path | None:
    """The socket of the warm process that served a run (its report at `primed`), or None."""
    folder = kvchat_home() / "warm"  # (the runs' home is this process's)
    if not primed.is_file():
        return None
    server = str(json.loads(primed.read_text()).get("server"))
    for lock in folder.glob("*.lock"):
        if lock.read_text().strip() == server and lock.with_suffix(".sock").exists():
            return lock.with_suffix(".sock")
    return None


def _start_warm(argv: list[str], env: dict[str, str], cwd: str, report: Path) -> Path:
    """Leave a warm process for runs in `env` (a first run starts it) and wait until it serves; its socket."""
    report.unlink(missing_ok=True)
    _timed(argv, env, cwd)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        report.unlink(missing_ok=True)
        probe = _timed(argv, env, cwd)
        socket = _warm_socket(report)
        if probe["rc"] == 0 and socket is not None:
            return socket
        time.sleep(1)
    raise RuntimeError("no warm process served a one-shot run after a first one")


def _phases(model: str, prompt: str, env: dict[str, str], cwd: str) -> list[tuple[str, float]]:
    """kvchat's start-up steps in a fresh process, as (step, seconds it took); the first is the interpreter's
    own start."""
    started = time.time()
    result = subprocess.run([sys.executable, "-c", _PHASES, model, prompt], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode:
        raise RuntimeError(f"the start-up phases run failed: {result.stderr.strip()[-300:]}")
    stamps = json.loads(result.stdout.strip().splitlines()[-1])
    steps, last = [], started
    for name, stamp in stamps:
        steps.append((name, stamp - last))
        last = stamp
    return steps


def run(model: str, gguf: Path | None, threads: int, plan: StartupPlan, progress: Progress,
        peer: bool = True) -> dict[str, Any]:
    """`plan.repeat` one-shot runs a side, alternating, and one phases run a repeat; medians. The runs start in
    an empty folder without $KVCHAT_CONFIG: kvchat's defaults, no config file."""
    env = {key: value for key, value in os.environ.items() if key != "KVCHAT_CONFIG"}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))
    ours = [sys.executable, "-m", "kvchat", "--model", model, "--device", "cpu", "-p", plan.prompt,
            "--max-new-tokens", "1", "--temperature", "0", "--plain"]
    theirs = [sys.executable, "-c", _PEER, str(gguf), str(threads), plan.prompt] if peer and gguf else None
    runs: dict[str, list[dict[str, Any]]] = {"kvchat": [], "warm": [], "peer": []}
    phases: list[list[tuple[str, float]]] = []
    cold_env = {**env, "KVCHAT_WARM": "0"}
    with tempfile.TemporaryDirectory(prefix="kvchat-startup-") as cwd:
        report = Path(cwd) / "warm-report.json"
        warm_env = {**env, "KVCHAT_WARM": "300", "KVCHAT_WARM_REPORT": str(report)}
        progress("startup: a warm process", 0, 1)
        socket = _start_warm(ours, warm_env, cwd, report)
        try:
            for rep in range(plan.repeat):
                progress("startup: one-shot runs", rep, plan.repeat)
                runs["kvchat"].append(_timed(ours, cold_env, cwd))
                report.unlink(missing_ok=True)
                warm = _timed(ours, warm_env, cwd)
                if warm["rc"] == 0 and _warm_socket(report) != socket:
                    raise RuntimeError("a warm one-shot run was not served by the warm process")
                if warm["rc"] == 0:
                    warm["peak_rss"] = json.loads(report.read_text())["peak_rss"]  # the child that ran it
                runs["warm"].append(warm)
                if theirs:
                    runs["peer"].append(_timed(theirs, env, cwd))
                phases.append(_phases(model, plan.prompt, cold_env, cwd))
        finally:
            socket.unlink(missing_ok=True)  # (the warm process sees it gone and ends)
    for side, done in runs.items():
        failed = [run for run in done if run["rc"] or (plan.first_byte and run["first_byte_s"] is None)]
        if failed:
            raise RuntimeError(f"a {side} one-shot run failed (exit {failed[0]['rc']}): {failed[0]['stderr']}")
    figures = {side: {key: median([run[key] for run in done]) if all(run[key] is not None for run in done) else None
                      for key in ("first_byte_s", "total_s", "peak_rss")}
               for side, done in runs.items() if done}
    steps = [(name, median([run[i][1] for run in phases])) for i, (name, _) in enumerate(phases[0])]
    return {"model": model, "gguf": gguf.name if theirs else None, "threads": threads, "repeat": plan.repeat,
            "sides": figures, "phases": steps}


def markdown(results: dict[str, Any]) -> str:
    """The one-shot table (kvchat, and llama.cpp with kvchat's figure over its when it ran) and the phases."""
    sides = results["sides"]
    peer = "peer" in sides
    head = "| one-shot `-p`, one reply token | kvchat, cold | kvchat, warm |" + (
        " llama.cpp | cold / llama.cpp | warm / llama.cpp |" if peer else "")
    lines = [head, "|---|---|---|" + ("---|---|---|" if peer else "")]
    for key, what, unit in (("first_byte_s", "process start to first reply byte", "s"),
                            ("total_s", "process start to exit", "s"), ("peak_rss", "peak RSS", "MiB")):
        scale = 1 / 2**20 if unit == "MiB" else 1
        cold, warm = sides["kvchat"][key] * scale, sides["warm"][key] * scale
        row = f"| {what} ({unit}) | {cold:.2f} | {warm:.2f} |"
        if peer:
            theirs = sides["peer"][key] * scale
            row += f" {theirs:.2f} | {cold / theirs if theirs else 0:.1f}x | {warm / theirs if theirs else 0:.1f}x |"
        lines.append(row)
    lines += ["", "| kvchat's start-up, step by step (median) | s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in results["phases"]]
    return "\n".join(lines)
