"""Command line: parse arguments, wire config, model, engine and terminal together. No logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TextIO

from kvchat import __version__
from kvchat.weights import memory
from kvchat.config import KV_DTYPES, Settings, load_config, private_home
from kvchat.chat.conversation import check_message
from kvchat.errors import ConfigError, InputError, KvchatError, one_line
from kvchat.store import kvfile
from kvchat.store.catalog import Catalog, check_name
from kvchat.store.sessions import Store
from kvchat.ui.terminal import visible, wrap

if TYPE_CHECKING:
    from kvchat.chat.chat import Chat
    from kvchat.chat.engine import Engine, TurnEnd
    from kvchat.chat.saving import Persister

# torch and transformers are imported only by the commands that load a model: --help, --version, sessions and
# cache answer at once.


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config file (default: ./config.toml if present)")
    parser.add_argument("--sessions-dir", dest="sessions_dir", help="where sessions and the KV store live")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvchat", description="Chat with a local model; the KV cache is kept across turns.",
                     epilog="Also: kvchat sessions {list,show,rm}, kvchat cache [prune], kvchat models, kvchat info, "
                            "kvchat bench.")
    parser.add_argument("--version", action="version", version=f"kvchat {__version__}")
    parser.add_argument("--session", help="start or resume this named session (saved after every turn)")
    parser.add_argument("-p", "--prompt", help="send one message and print the reply (stdin is not read)")
    parser.add_argument("--lines", action="store_true", help="scripting: each non-empty stdin line is one turn")
    parser.add_argument("--model", help="'default', a model directory, a .gguf file, or a Hugging Face id (org/name: downloaded once)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", help="0 for greedy decoding")
    parser.add_argument("--top-p", dest="top_p")
    parser.add_argument("--top-k", dest="top_k", help="0 disables top-k")
    parser.add_argument("--seed")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens")
    parser.add_argument("--prefill-chunk", dest="prefill_chunk", help="tokens per prefill forward pass")
    parser.add_argument("--window-cache", dest="window_cache",
                        help="sliding-window layers: 'full' keeps every token (cut anywhere), 'window' only the window")
    parser.add_argument("--kv-dtype", dest="kv_dtype",
                        help="what the cache keeps keys and values in: auto (as computed, exact), float32, bfloat16, "
                             "float16, q8 or q4 (blocks of int8 or 4-bit values with float16 scales), or KEYS/VALUES "
                             "(e.g. q8/q4)")
    parser.add_argument("--kv-dtype-k", dest="kv_dtype_k", help="the keys' form, when not --kv-dtype's")
    parser.add_argument("--kv-dtype-v", dest="kv_dtype_v", help="the values' form, when not --kv-dtype's")
    parser.add_argument("--max-context", dest="max_context",
                        help="context budget in tokens (default: the model's); oldest turns are dropped to fit")
    parser.add_argument("--device", help="auto, cpu, cuda or mps")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--weights", help="auto (packed 4-bit and int8 blocks on the CPU where exact), full or int8 (packed, quantizing where not exact)")
    parser.add_argument("--compile", help="auto (on CUDA), on or off: decode through a compiled one-token step")
    _add_store_flags(parser)
    parser.add_argument("--stats", action="store_const", const=True, help="one JSON line of statistics per turn on stderr")
    parser.add_argument("--plain", action="store_const", const=True,
                        help="replies as raw text (no Markdown rendering; pipes and NO_COLOR are always raw)")
    parser.add_argument("--no-reuse", dest="reuse", action="store_const", const=False,
                        help="baseline: re-prefill the whole conversation every turn")
    return parser


def usage_name(name: str) -> str:
    """A session name given on the command line; a bad one is a usage error (exit 2)."""
    try:
        return check_name(name)
    except KvchatError as exc:
        raise ConfigError(str(exc)) from None


def config_path(given: Path | None) -> Path | None:
    """--config, else $KVCHAT_CONFIG, else ./config.toml when it exists."""
    if given is not None:
        return given
    if os.environ.get("KVCHAT_CONFIG"):
        return Path(os.environ["KVCHAT_CONFIG"])
    local = Path("config.toml")
    return local if local.is_file() else None


CHAT_KEYS = ("model", "system", "temperature", "top_p", "top_k", "seed", "max_new_tokens", "prefill_chunk",
             "window_cache", "kv_dtype", "kv_dtype_k", "kv_dtype_v", "max_context", "device", "dtype", "weights",
             "compile", "stats", "reuse", "sessions_dir", "plain")


def settings_from_args(args: argparse.Namespace, keys: Iterable[str] = CHAT_KEYS) -> tuple[Settings, Path | None]:
    """Settings from defaults, the config file and the flags in `args`; also the config file used."""
    path = config_path(args.config)
    overrides = {key: getattr(args, key, None) for key in keys}
    if overrides.get("sessions_dir"):
        overrides["sessions_dir"] = str(Path(overrides["sessions_dir"]).resolve())
    return load_config(path, overrides), path


def private_history(path: Path) -> str | None:
    """The input history file, created private to this user (0600; a looser one is tightened); None (history
    kept in memory only) when it cannot be, or is not a regular file."""
    try:
        fd = kvfile.open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # no link, no FIFO; new: 0600
    except OSError:  # (NotRegular too)
        return None
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError:
        return None
    finally:
        os.close(fd)
    return str(path)


def store_root(settings: Settings, config_file: Path | None) -> Path:
    """The configured sessions directory (relative paths start at the config file's folder)."""
    if settings.sessions_dir:
        root = Path(settings.sessions_dir)
        if not root.is_absolute():
            root = (config_file.parent if config_file else Path.cwd()) / root
        return root
    return config_file.parent / "sessions" if config_file is not None else private_home() / "sessions"


def open_store(settings: Settings, config_file: Path | None) -> Store:
    """The store a chat opens and saves its sessions in; one that is unsafe to use is refused at once."""
    store = Store(store_root(settings, config_file), max_bytes=settings.cache_max_mb * 1024 * 1024)
    store.check_dirs()
    return store


def open_catalog(settings: Settings, config_file: Path | None) -> Catalog:
    """The store as a catalog (list, show, remove, prune): no model, no torch; one unsafe to use is refused."""
    catalog = Catalog(store_root(settings, config_file), max_bytes=settings.cache_max_mb * 1024 * 1024)
    catalog.check_dirs()
    return catalog


def load(settings: Settings, progress: Any = None) -> Any:
    """Load the configured model; its progress goes to `progress(what, step, steps)`, by default on stderr (a
    transient line in a terminal)."""
    from kvchat.cache import compiled
    from kvchat.ui.display import LoadProgress
    from kvchat.weights.model import load_model

    os.environ.update(compiled.cache_directory())  # (before anything compiles; the process's own setting)
    line = LoadProgress(sys.stderr) if progress is None else None
    try:
        loaded = load_model(settings.model, settings.device, settings.dtype, progress=progress or line,
                            weights=settings.weights)
    finally:
        if line is not None:
            line.close()
    return loaded


def load_engine(settings: Settings, progress: Any = None) -> Engine:
    """Load the configured model and wrap it in an engine."""
    from kvchat.cache.kv_forms import KVForm
    from kvchat.chat.engine import Engine

    loaded = load(settings, progress)
    return Engine(loaded, prefill_chunk=settings.prefill_chunk, reuse=settings.reuse,
                  max_context=settings.max_context, window_cache=settings.window_cache, compile=settings.compile,
                  kv_form=KVForm(settings.kv_form))


def read_stdin_text(stream: Any) -> str:
    """All of stdin as text; binary or invalid UTF-8 is a user error."""
    data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    if b"\x00" in data:
        raise InputError("stdin contains NUL bytes; kvchat reads text, not binary data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"stdin is not valid UTF-8 (byte {exc.start})") from None


def run_turns(chat: Chat, messages: Iterable[str], settings: Settings, persister: Persister | None, out: TextIO,
              err: TextIO,
              line_numbers: list[int] | None = None) -> int:
    """Scripting mode: send each message, print only the replies to `out`, statistics to `err`.

    With `line_numbers` (--lines), a message that cannot be sent, or whose turn fails, is reported with its
    line number and the script goes on; returns how many failed. Without, the first failure raises
    (a KvchatError: one line).
    """
    from kvchat.chat.engine import Token, TurnEnd, turn_notices

    failed = 0
    for index, text in enumerate(messages):
        try:
            events = chat.send(text)
            for event in persister.journaled(events) if persister is not None else events:
                if isinstance(event, Token):
                    out.write(visible(event.text) if out.isatty() else event.text)
                    out.flush()
                elif isinstance(event, TurnEnd):
                    out.write("\n")
                    out.flush()
                    for line in turn_notices(event.stats, chat.engine.max_context):
                        err.write(f"kvchat: {line}\n")
                    if settings.stats:
                        err.write(json.dumps(stats_record(event)) + "\n")
                        err.flush()
        except (KvchatError, RuntimeError, ValueError) as exc:  # a refused message, out of memory, sampling
            reason = str(exc) if isinstance(exc, KvchatError) else f"{type(exc).__name__}: {one_line(exc)}"
            if line_numbers is None:
                if isinstance(exc, KvchatError):
                    raise
                raise KvchatError(f"the turn failed ({reason})") from None
            err.write(f"kvchat: line {line_numbers[index]}: {reason}; skipped\n")
            err.flush()
            failed += 1
        finally:
            if persister is not None:
                failed += _save_turn(persister, chat, err, None if line_numbers is None else line_numbers[index])
    return failed


def _save_turn(persister: Persister, chat: Chat, err: TextIO, line_number: int | None) -> int:
    """Autosave after a turn (an interrupted one too: the chat is consistent). With --lines (`line_number`), a
    save that fails is one line and the script goes on (the next turn's save writes it all); returns 1 then."""
    try:
        notice = persister.after_turn(chat)
    except KvchatError as exc:
        if line_number is None:
            raise
        err.write(f"kvchat: line {line_number}: {exc}; the next turn's save tries again\n")
        err.flush()
        return 1
    if notice:
        print(f"kvchat: {visible(notice)}", file=err)
    return 0


def stats_record(end: TurnEnd) -> dict[str, Any]:
    """The --stats JSON object for one turn."""
    record = end.stats.as_dict()
    for key in ("ttft_ms", "decode_tok_s", "prefill_ms"):
        record[key] = round(record[key], 2)
    return record


def chat(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings, config_file = settings_from_args(args)
    store = open_store(settings, config_file)
    if args.session is not None:
        usage_name(args.session)
        store.lock(args.session)  # a second process on this session fails now, not after loading the model
    interactive = args.prompt is None and sys.stdin.isatty()
    line_numbers: list[int] | None = None  # --lines: where each message stood in stdin
    if args.prompt is not None:
        messages = [args.prompt]
    elif not interactive:
        text = read_stdin_text(sys.stdin)
        if args.lines:
            numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            line_numbers, messages = [n for n, _ in numbered], [line for _, line in numbered]
        else:
            # `echo` adds a newline the user did not type; a small model answers it differently.
            messages = [text.lstrip("\n").rstrip()]
        if not messages or not any(message.strip() for message in messages):
            raise InputError("stdin is empty: nothing to send")
    if not interactive and line_numbers is None:
        for message in messages:
            check_message(message)  # refuse bad input before spending seconds on loading the model
    if interactive:  # at once: loading takes seconds
        print(f"kvchat {__version__} · starting {visible(settings.model)} · Ctrl-C to cancel", flush=True)
    try:
        if interactive:
            from kvchat.ui.repl import Pending, Repl

            history = private_history(private_home() / "history")
            if args.session is None or store.read_manifest(args.session) is None:
                # A new chat: the prompt is up at once, the model loads behind it; the first message waits.
                pending = Pending(lambda report: open_chat(settings, args, store, report))
                code = Repl(None, settings, history_path=history, pending=pending).run()
                if not pending.done:
                    leave_while_loading(code, store)
                return code
        chat, persister, notices = open_chat(settings, args, store)
        for notice in notices:
            print(f"kvchat: {visible(notice)}", file=sys.stderr)
        if interactive:
            return Repl(chat, settings, persister=persister, history_path=history).run()
        refused = run_turns(chat, messages, settings, persister, sys.stdout, sys.stderr, line_numbers)
        if refused:
            print(f"kvchat: {refused} of {len(messages)} lines failed (see above)", file=sys.stderr)
        return 1 if refused else 0
    finally:
        store.close()


def leave_while_loading(code: int, store: Store) -> None:
    """End the process now, the model still loading in its thread (/quit or Ctrl-D before it was ready): a
    thread inside torch cannot be stopped, and the interpreter's exit would tear torch down under it (an abort).
    Nothing of a chat exists yet; the store's locks are released; a conversion left half-way is removed by the
    next one."""
    sys.stdout.flush()
    sys.stderr.flush()
    store.close()
    os._exit(code)


def open_chat(settings: Settings, args: argparse.Namespace, store: Store,
              progress: Any = None) -> tuple[Chat, Persister, list[str]]:
    """Load the model, bind the store, open the session or start a chat. Returns the chat (sampling with the
    session's settings, except those given as flags), its persister, and notices for the user."""
    from kvchat.cache.chat_cache import MAX_CHECKPOINTS
    from kvchat.chat.chat import Chat
    from kvchat.chat.saving import Persister
    from kvchat.chat.saving import open_chat as open_saved
    from kvchat.weights.model import fingerprint

    engine = load_engine(settings, progress)
    notices = []
    warning = memory.memory_warning(memory.model_shape(engine.loaded, engine.max_context, engine.layout),
                                    memory.free_memory(engine.device), MAX_CHECKPOINTS)
    if warning:
        notices.append(f"warning: {warning}")
    if engine.loaded.weight_warning:
        notices.append(f"warning: {engine.loaded.weight_warning}")
    store.bind(engine.layout, fingerprint(engine.loaded), engine.loaded.name)
    persister = Persister(store, args.session)
    if args.session is not None:
        given = frozenset(key for key in ("temperature", "top_p", "top_k", "seed", "max_new_tokens")
                          if getattr(args, key, None) is not None)  # flags win over what the session kept
        resumed = open_saved(engine, store, args.session, settings.system, settings.sampling, given,
                             prefixes=settings.reuse)
        if resumed.notice:
            notices.append(resumed.notice)
        chat = resumed.chat
    else:
        chat = Chat.start(engine, settings.system, sampling=settings.sampling,
                          prefixes=store.longest_prefix if settings.reuse else None)
    return chat, persister, notices


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def sessions_command(argv: list[str]) -> int:
    parser = _Parser(prog="kvchat sessions", description="List, show or remove saved sessions.")
    parser.add_argument("action", choices=("list", "show", "rm"))
    parser.add_argument("name", nargs="?")
    _add_store_flags(parser)
    args = parser.parse_args(argv)
    settings, config_file = settings_from_args(args, ("sessions_dir",))
    store = open_catalog(settings, config_file)
    if args.action != "list" and not args.name:
        raise ConfigError(f"kvchat sessions {args.action} needs a session name")
    if args.name is not None:
        usage_name(args.name)
    if args.action == "list":
        rows = store.list_sessions()
        if not rows:
            print(f"no sessions in {visible(store.root)}")
        for row in rows:
            print(f"{visible(row['name']):24} {row['turns']:>5} turns {row['tokens']:>7} tokens "
                  f"{memory.human(row['bytes']):>10}  {_when(row['updated'])}" + ("  (damaged)" if row.get("damaged") else ""))
    elif args.action == "show":
        manifest = store.read_manifest(check_name(args.name))
        if manifest is None:
            raise KvchatError(f"no session named '{args.name}' in {store.root}")
        for message in manifest.messages:
            if isinstance(message, dict):
                print(f"[{visible(message.get('role'))}]\n{visible(message.get('content'))}\n")
    else:
        store.remove_session(args.name)
        print(f"removed session '{args.name}'")
    return 0


def cache_command(argv: list[str]) -> int:
    parser = _Parser(prog="kvchat cache", description="Show the KV store, or prune chunks nothing uses.")
    parser.add_argument("action", nargs="?", choices=("show", "prune"), default="show")
    _add_store_flags(parser)
    args = parser.parse_args(argv)
    settings, config_file = settings_from_args(args, ("sessions_dir",))
    store = open_catalog(settings, config_file)
    if args.action == "prune":
        removed, freed = store.prune()
        print(f"removed {removed} unused files, freed {memory.human(freed)}")
        return 0
    info = store.summary()
    print(f"store: {visible(info['root'])}")
    print(f"KV on disk: {memory.human(info['bytes'])} in {info['chunks']} chunks and {info['tails']} session tails "
          f"({info['unused_chunks']} chunks unused and {info['leftovers']} temporary files left by interrupted "
          "writes; `kvchat cache prune` removes them)")
    print(f"sessions: {info['sessions']}, shared prefixes: {len(info['prefixes'])}")
    for prefix in info["prefixes"]:
        print(f"  prefix {prefix['key'][:16]}  {prefix['tokens']:>6} tokens  last used {_when(prefix['last_used'])}")
    return 0


def info_command(argv: list[str]) -> int:
    parser = _Parser(prog="kvchat info", description="The model's KV cache arithmetic, and well-known models'.")
    for flag in ("--model", "--device", "--dtype", "--weights", "--compile", "--max-context", "--window-cache",
                 "--kv-dtype", "--kv-dtype-k", "--kv-dtype-v"):
        parser.add_argument(flag, dest=flag[2:].replace("-", "_"))
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)
    settings, _ = settings_from_args(args, ("model", "device", "dtype", "weights", "compile", "max_context",
                                            "window_cache", "kv_dtype", "kv_dtype_k", "kv_dtype_v"))
    from kvchat.cache import compiled, layers
    from kvchat.cache.chat_cache import MAX_CHECKPOINTS
    from kvchat.weights import direct, quant
    from kvchat.weights.model import weights_label

    loaded = load(settings)
    try:
        layout = layers.layout(loaded.model, loaded.device, settings.window_cache)
    except layers.Unsupported as exc:
        raise KvchatError(f"kvchat cannot keep the cache of model '{settings.model}': {exc}") from None
    layout.kv_form = settings.kv_form
    shape = memory.model_shape(loaded, settings.max_context, layout)
    lines = memory.info_lines(shape, loaded.device, loaded.dtype, MAX_CHECKPOINTS, weights_label(loaded))
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("KV cache at the full context")), len(lines))
    forms = [f"KV forms (--kv-dtype; in use: {settings.kv_form}), per token and at the full context:"]
    for name in dict.fromkeys((*KV_DTYPES, "q8/q4", settings.kv_form)):
        per_form = memory.model_shape(loaded, settings.max_context, dataclasses.replace(layout, kv_form=name))
        forms.append(f"  {name:<9} {memory.human(per_form.bytes_per_token):>10}/token  "
                     f"{memory.human(per_form.bytes_per_token * per_form.context):>10}")
    for line in lines[:at] + forms + lines[at:]:
        print(line)
    if loaded.weight_note:
        print(loaded.weight_note)
    not_direct = direct.refusal(loaded.model)
    refused = compiled.refusal(loaded.model) if not_direct is not None and compiled.wanted(settings.compile,
                                                                                           loaded.device) else None
    if loaded.device.type == "cpu":
        print(quant.KERNEL.describe())
    if not_direct is None:
        print("decode step: direct (one call a token into kvchat's kernel library)")
    elif not compiled.wanted(settings.compile, loaded.device):
        print(f"decode step: eager (compile = {settings.compile}; 'auto' compiles it on CUDA only)")
    elif refused is not None:
        print(f"decode step: eager (a compiled step needs a cache it can hold static: {refused})")
    else:
        graphs = ", captured as a CUDA graph" if loaded.device.type == "cuda" else ""
        print(f"decode step: compiled with torch.compile{graphs} (in the background when a chat starts)")
    if not_direct is not None and loaded.device.type == "cpu":
        print(f"direct decode step: off ({not_direct})")
    warning = memory.memory_warning(shape, memory.free_memory(loaded.device), MAX_CHECKPOINTS)
    if warning:
        print(f"warning: {warning}")
    return 0


class ProgressBar:
    """A one-line progress bar on stderr (a line per phase when stderr is not a terminal)."""

    def __init__(self, stream: TextIO):
        self.stream, self.tty, self.last = stream, stream.isatty(), None

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.tty:
            filled = int(24 * done / total) if total else 24
            self.stream.write(f"\r[{'#' * filled}{'.' * (24 - filled)}] {what} {done}/{total}\x1b[K")
            self.stream.flush()
        elif what != self.last:
            self.stream.write(f"bench: {what}\n")
            self.stream.flush()
        self.last = what

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def bench_command(argv: list[str]) -> int:
    parser = _Parser(prog="kvchat bench", description="Measure what the KV cache buys, side by side.")
    for flag in ("--model", "--device", "--dtype", "--weights", "--compile"):
        parser.add_argument(flag, dest=flag[2:])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--quick", action="store_true", help="every scenario small (under a minute on 2 CPU cores)")
    parser.add_argument("--repeat", type=int, help="repetitions per side (medians are reported)")
    parser.add_argument("--prompt-tokens", type=int, help="scenario 1 prompt length (default 512)")
    parser.add_argument("--new-tokens", type=int, help="scenario 1 tokens generated (default 128)")
    parser.add_argument("--turns", type=int, help="scenario 2 turns (default 20)")
    parser.add_argument("--levers", action="store_true",
                        help="only the decode levers: float32, packed blocks (transformers', direct and compiled "
                             "steps) and bfloat16 on the CPU, speed and greedy agreement (20 prompts at 512 and "
                             "2,048 tokens; --quick: 2 short ones)")
    parser.add_argument("--kv", action="store_true",
                        help="only the KV forms: memory and disk per token, perplexity over a fixed text, speed and "
                             "greedy agreement with auto (20 prompts at 512 and 2,048 tokens; --quick: 2 short ones)")
    parser.add_argument("--startup", action="store_true",
                        help="only start-up: a one-shot `kvchat -p` run, process start to first reply byte and peak "
                             "memory, beside llama.cpp's when it is installed, and kvchat's start-up step by step")
    parser.add_argument("--sizes", action="store_true",
                        help="only real model sizes: random models in Llama-3.2-1B's shape as GGUF files of four "
                             "block types and as bfloat16 safetensors (made once, by llama.cpp's quantizer and "
                             "transformers, in $KVCHAT_HOME/bench-models), decode, prefill, start-up and peak "
                             "memory beside llama.cpp's (needs llama-cpp-python; --quick: a tiny model of one type)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--plot", type=Path, help="write a PNG figure here (needs matplotlib: pip install kvchat[plot])")
    args = parser.parse_args(argv)
    settings, _ = settings_from_args(args, ("model", "device", "dtype", "weights", "compile"))
    from dataclasses import replace

    from kvchat.bench import suite

    plan = suite.BenchPlan.quick() if args.quick else suite.BenchPlan()
    sizes = {"repeat": args.repeat, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
             "turns": args.turns}
    for key, value in sizes.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
    plan = replace(plan, compile=settings.compile, **{key: value for key, value in sizes.items() if value is not None})
    if args.plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise KvchatError("--plot needs matplotlib: pip install matplotlib")
    if args.levers:
        return _levers(settings, args)
    if args.kv:
        return _kv_forms(settings, args)
    if args.startup:
        return _startup(settings, args, plan.repeat)
    if args.sizes:
        return _sizes(settings, args)
    loaded = load(settings)
    bar = ProgressBar(sys.stderr)
    try:
        results = suite.run(loaded, plan, bar, gguf=_gguf_of(settings.model))
    finally:
        bar.close()
    print(suite.markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot is not None:
        suite.plot(results, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _gguf_of(spec: str) -> Path | None:
    """The GGUF file a model spec comes from, when it comes from one (for bench's llama.cpp column)."""
    if spec == "default":
        from kvchat.weights.model import default_gguf_path

        return default_gguf_path()
    return Path(spec) if spec.endswith(".gguf") and Path(spec).is_file() else None


def _levers(settings: Settings, args: argparse.Namespace) -> int:
    """kvchat bench --levers: the same model loaded each way on the CPU, side by side."""
    from kvchat.bench import levers

    bar = ProgressBar(sys.stderr)
    try:
        results = levers.run(lambda weights, dtype: load(dataclasses.replace(settings, device="cpu", dtype=dtype,
                                                                              weights=weights), bar),
                             levers.LeverPlan.quick() if args.quick else levers.LeverPlan(), bar)
    finally:
        bar.close()
    return _bench_report(f"kvchat bench --levers · {settings.model} · cpu", levers.markdown(results), results, args)


def _kv_forms(settings: Settings, args: argparse.Namespace) -> int:
    """kvchat bench --kv: the same model with its cache in each KV form, side by side."""
    from kvchat.bench import kv

    bar = ProgressBar(sys.stderr)
    try:
        loaded = load(settings, bar)
        results = kv.run(loaded, kv.KVPlan.quick() if args.quick else kv.KVPlan(), bar)
    finally:
        bar.close()
    return _bench_report(f"kvchat bench --kv · {settings.model} · {loaded.device}", kv.markdown(results), results,
                         args)


def _sizes(settings: Settings, args: argparse.Namespace) -> int:
    """kvchat bench --sizes: models of real sizes as GGUF files, side by side with llama.cpp."""
    from kvchat.bench import peer, sizes
    from kvchat.config import home_dir

    if peer.unavailable():
        raise KvchatError(f"--sizes needs llama.cpp to make its files and to compare: {peer.unavailable()}")
    plan = sizes.SizesPlan.quick() if args.quick else sizes.SizesPlan()
    if args.repeat:
        plan = dataclasses.replace(plan, repeat=args.repeat)
    bar = ProgressBar(sys.stderr)
    try:
        results = sizes.run(home_dir("bench-models"), plan,
                            lambda path: load(dataclasses.replace(settings, model=str(path), device="cpu"), bar),
                            torch_threads(), bar)
    except RuntimeError as exc:
        raise KvchatError(one_line(str(exc))) from None
    finally:
        bar.close()
    return _bench_report("kvchat bench --sizes · cpu", sizes.markdown(results), results, args)


def _startup(settings: Settings, args: argparse.Namespace, repeat: int) -> int:
    """kvchat bench --startup: one-shot runs in fresh processes, kvchat's and llama.cpp's, alternating."""
    from kvchat.bench import peer, startup

    gguf = _gguf_of(settings.model)
    if gguf is not None and peer.unavailable():
        print(f"kvchat: {peer.unavailable()}", file=sys.stderr)
    bar = ProgressBar(sys.stderr)
    try:
        model = settings.model if settings.model == "default" or not Path(settings.model).exists() else \
            str(Path(settings.model).resolve())
        plan = startup.StartupPlan(repeat=args.repeat or (1 if args.quick else startup.StartupPlan.repeat))
        results = startup.run(model, gguf, torch_threads(), plan, bar, peer=peer.unavailable() is None)
    except RuntimeError as exc:
        raise KvchatError(one_line(str(exc))) from None
    finally:
        bar.close()
    return _bench_report(f"kvchat bench --startup · {settings.model} · cpu", startup.markdown(results), results,
                         args)


def _bench_report(title: str, table: str, results: dict[str, Any], args: argparse.Namespace) -> int:
    """Print a bench section's title (with the threads it ran on) and table; its figures to --json when asked."""
    print(f"{title} · {torch_threads()} threads")
    print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def models_command(argv: list[str]) -> int:
    _Parser(prog="kvchat models", description="The models on this machine: size and KV bytes per token.").parse_args(argv)
    from kvchat.weights.local import local_models

    rows = local_models()
    if not rows:
        print("no local models (the default model is converted on first use; --model org/name downloads one)")
    for row in rows:
        kv = f"{memory.human(row['kv_per_token'])}/token" if row["kv_per_token"] else "KV ?"
        print(f"{visible(row['name']):40} {memory.human(row['bytes']):>10}  {kv:>16}  {row['what']}")
    return 0


COMMANDS = {"sessions": sessions_command, "cache": cache_command, "info": info_command, "bench": bench_command,
            "models": models_command}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvchat` command."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return chat(argv)
    except KvchatError as exc:
        width = shutil.get_terminal_size().columns if sys.stderr.isatty() else None
        print(wrap(f"kvchat: error: {visible(exc)}", width), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `kvchat ... | head`); silence the flush at exit.
        sys.stdout = open(os.devnull, "w")
        return 141
    except OSError as exc:  # a full or read-only disk, a file made unreadable: one line, not a traceback
        what = f"{os.fsdecode(exc.filename)}: {exc.strerror}" if exc.filename and exc.strerror else one_line(exc)
        print(f"kvchat: error: {visible(what)}", file=sys.stderr)
        return 1
