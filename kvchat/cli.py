"""Command line: parse arguments, wire config, model, engine and terminal together. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

from kvchat import __version__
from kvchat.config import Settings, load_config
from kvchat.conversation import Conversation
from kvchat.engine import Engine, Token, TurnEnd, check_message
from kvchat.errors import ConfigError, InputError, KvchatError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvchat", description="Chat with a local model; the KV cache is kept across turns.")
    parser.add_argument("--version", action="version", version=f"kvchat {__version__}")
    parser.add_argument("-p", "--prompt", help="send one message and print the reply (stdin is not read)")
    parser.add_argument("--lines", action="store_true", help="scripting: each non-empty stdin line is one turn")
    parser.add_argument("--model", help="'default', a model directory, a .gguf file, or a cached hub id")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", help="0 for greedy decoding")
    parser.add_argument("--top-p", dest="top_p")
    parser.add_argument("--top-k", dest="top_k", help="0 disables top-k")
    parser.add_argument("--seed")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens")
    parser.add_argument("--prefill-chunk", dest="prefill_chunk", help="tokens per prefill forward pass")
    parser.add_argument("--device", help="auto, cpu, cuda or mps")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--config", type=Path, help="config file (default: ./config.toml if present)")
    parser.add_argument("--stats", action="store_const", const=True, help="one JSON line of statistics per turn on stderr")
    parser.add_argument("--no-reuse", dest="reuse", action="store_const", const=False,
                        help="baseline: re-prefill the whole conversation every turn")
    return parser


def config_path(given: Path | None) -> Path | None:
    """--config, else $KVCHAT_CONFIG, else ./config.toml when it exists."""
    if given is not None:
        return given
    if os.environ.get("KVCHAT_CONFIG"):
        return Path(os.environ["KVCHAT_CONFIG"])
    local = Path("config.toml")
    return local if local.is_file() else None


def settings_from_args(args: argparse.Namespace) -> Settings:
    keys = ("model", "system", "temperature", "top_p", "top_k", "seed", "max_new_tokens",
            "prefill_chunk", "device", "dtype", "stats", "reuse")
    return load_config(config_path(args.config), {key: getattr(args, key) for key in keys})


def load_engine(settings: Settings) -> Engine:
    """Load the configured model (progress on stderr) and wrap it in an engine."""
    from kvchat.model import load_model

    loaded = load_model(settings.model, settings.device, settings.dtype,
                        progress=lambda message: print(message, file=sys.stderr, flush=True))
    return Engine(loaded, prefill_chunk=settings.prefill_chunk, reuse=settings.reuse)


def read_stdin_text(stream: Any) -> str:
    """All of stdin as text; binary or invalid UTF-8 is a user error."""
    data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")
    if b"\x00" in data:
        raise InputError("stdin contains NUL bytes; kvchat reads text, not binary data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"stdin is not valid UTF-8 (byte {exc.start})") from None


def run_turns(engine: Engine, conv: Conversation, messages: Iterable[str], settings: Settings,
              out: TextIO, err: TextIO) -> None:
    """Scripting mode: send each message, print only the replies to `out`, statistics to `err`."""
    for text in messages:
        for event in engine.send(conv, text, settings.sampling):
            if isinstance(event, Token):
                out.write(event.text)
                out.flush()
            elif isinstance(event, TurnEnd):
                out.write("\n")
                out.flush()
                if settings.stats:
                    err.write(json.dumps(stats_record(event)) + "\n")
                    err.flush()


def stats_record(end: TurnEnd) -> dict[str, Any]:
    """The --stats JSON object for one turn."""
    record = end.stats.as_dict()
    for key in ("ttft_ms", "decode_tok_s", "prefill_ms"):
        record[key] = round(record[key], 2)
    return record


def chat(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    interactive = args.prompt is None and sys.stdin.isatty()
    if args.prompt is not None:
        messages = [args.prompt]
    elif not interactive:
        text = read_stdin_text(sys.stdin)
        if args.lines:
            messages = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            # `echo` adds a newline the user did not type; a small model answers it differently.
            messages = [text.lstrip("\n").rstrip()]
        if not messages or not any(message.strip() for message in messages):
            raise InputError("stdin is empty: nothing to send")
    if not interactive:
        for message in messages:
            check_message(message)  # refuse bad input before spending seconds on loading the model
    engine = load_engine(settings)
    conv = Conversation.start(settings.system)
    if interactive:
        from kvchat.repl import Repl

        return Repl(engine, conv, settings).run()
    run_turns(engine, conv, messages, settings, sys.stdout, sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvchat` command."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return chat(argv)
    except KvchatError as exc:
        print(f"kvchat: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `kvchat ... | head`); silence the flush at exit.
        sys.stdout = open(os.devnull, "w")
        return 141
