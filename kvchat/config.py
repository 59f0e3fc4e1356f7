"""Settings: built-in defaults < config.toml < command-line flags, validated at the edge."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from kvchat.errors import ConfigError, KvchatError


def kvchat_home() -> Path:
    """Where kvchat keeps its own files outside the project (converted models, input history, digests)."""
    return Path(os.environ.get("KVCHAT_HOME") or Path.home() / ".cache" / "kvchat")


def private_dir(path: Path) -> None:
    """Make directory `path` (and missing parents) with mode 0700; tighten it to 0700 when it is looser."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)  # never through a link
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def dir_problem(path: Path) -> str | None:
    """Why `path` cannot be one of kvchat's own directories (a symbolic link, not a directory, another user's),
    as the end of a sentence about it; None when it can be, or does not exist yet."""
    import stat

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.geteuid():
        return f"belongs to another user (uid {info.st_uid})"
    return None


def check_own_dir(path: Path, where: str) -> None:
    """Refuse, in one line (KvchatError), a `path` that `dir_problem` finds wrong; `where` names what it is for."""
    problem = dir_problem(path)
    if problem is not None:
        raise KvchatError(f"{path} {problem}; kvchat does not follow links in {where} nor use other users' "
                          "folders there (give the real directory of your own, or set KVCHAT_HOME)")


def private_home() -> Path:
    """`kvchat_home()`, checked (see `check_own_dir`) and made private to this user (0700) before anything is
    written in it; KvchatError when it is a link, not a directory or another user's."""
    home = kvchat_home()
    check_own_dir(home, "its home ($KVCHAT_HOME)")
    try:
        private_dir(home)
    except OSError:
        pass  # a read-only home: what is written there later says so in its own message
    return home


def home_dir(name: str) -> Path:
    """`name`, a directory of kvchat's own in its home (models, packed weights, compiled code, warm sockets, bench
    models), checked as the home is; made (0700) when it can be."""
    path = private_home() / name
    check_own_dir(path, f"its home's {name} folder")
    try:
        private_dir(path)
    except OSError:
        pass  # (read-only: reported by what writes there)
    return path


def read_regular(path: Path, limit: int = 64 * 1024 * 1024) -> bytes | None:
    """The contents of `path` when it is a regular file of at most `limit` bytes, opened without following a link
    or blocking on a FIFO; None otherwise."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None

def write_private(path: Path, data: bytes) -> None:
    """Replace `path` by a file holding `data`, private to this user (0600), through a temporary file created
    exclusively (never through a planted link) and renamed over it; raises OSError, leaving no temporary."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS = ("auto", "full", "int8")
COMPILE = ("auto", "on", "off")
KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "q8", "q4")  # (kvchat.cache.kv_forms.NAMES)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    seed: int | None = None
    max_new_tokens: int = 512


@dataclass(frozen=True)
class Settings:
    """Everything the CLI wires together; one object, passed down."""

    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    weights: str = "auto"  # packed blocks on the CPU where exact ("auto"), always ("int8"), never ("full")
    compile: str = "auto"  # the one-token decode step through torch.compile: on CUDA ("auto"), always, never
    system: str | None = None
    prefill_chunk: int = 512
    window_cache: str = "full"  # sliding-window layers: "full" keeps every token, "window" only the window
    kv_dtype: str = "auto"  # what the cache keeps keys and values in: as computed, a float type, q8 or q4 blocks
    kv_dtype_k: str | None = None  # the keys' form, when not kv_dtype's (None)
    kv_dtype_v: str | None = None  # the values' form, when not kv_dtype's
    max_context: int | None = None  # None: the model's own maximum
    reuse: bool = True
    stats: bool = False
    plain: bool = False  # replies as raw text in a terminal (not rendered as Markdown)
    sessions_dir: str | None = None  # None: sessions/ beside the config file in use, else $KVCHAT_HOME/sessions
    cache_max_mb: int = 0  # cap on the store's KV bytes; least recently used prefixes are evicted (0: no cap)
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def kv_form(self) -> str:
        """The KV form in use: kv_dtype, with a side set apart by kv_dtype_k or kv_dtype_v ("KEYS/VALUES" when the
        two differ)."""
        keys, _, values = self.kv_dtype.partition("/")
        keys, values = self.kv_dtype_k or keys, self.kv_dtype_v or values or keys
        return keys if keys == values else f"{keys}/{values}"


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, str):
            value = value.strip()
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is float and not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError(f"expected an integer, got {value!r}")
        if low is not None and (number < low or (low_open and number == low)):
            raise ValueError(f"must be {'>' if low_open else '>='} {low:g}, got {value!r}")
        if high is not None and number > high:
            raise ValueError(f"must be <= {high:g}, got {value!r}")
        return number

    return parse


def _choice(options: tuple[str, ...]):
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {value!r}")
        return value

    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _nonempty_text(value: Any) -> str:
    if not _text(value).strip():
        raise ValueError("must not be empty")
    return value


def _kv_form(value: Any) -> str:
    """One of KV_DTYPES, or "KEYS/VALUES" (two of them: keys in one form, values in another)."""
    sides = value.split("/") if isinstance(value, str) else [value]
    if not 1 <= len(sides) <= 2 or any(side not in KV_DTYPES for side in sides):
        raise ValueError(f"expected one of {', '.join(KV_DTYPES)}, or KEYS/VALUES (e.g. q8/q4), got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


def _optional(parse: Callable[[Any], Any]):
    def parse_optional(value: Any) -> Any:
        return None if value is None else parse(value)

    return parse_optional


# Every key a config file or flag may set, and how to check it.
_TOP_LEVEL: dict[str, Callable[[Any], Any]] = {
    "model": _nonempty_text,
    "device": _choice(DEVICES),
    "dtype": _choice(DTYPES),
    "weights": _choice(WEIGHTS),
    "compile": _choice(COMPILE),
    "system": _optional(_text),
    "prefill_chunk": _number(int, 1),
    "window_cache": _choice(("full", "window")),
    "kv_dtype": _kv_form,
    "kv_dtype_k": _optional(_choice(KV_DTYPES)),
    "kv_dtype_v": _optional(_choice(KV_DTYPES)),
    "max_context": _optional(_number(int, 16)),
    "reuse": _boolean,
    "stats": _boolean,
    "plain": _boolean,
    "sessions_dir": _optional(_nonempty_text),
    "cache_max_mb": _number(int, 0),
}
_SAMPLING: dict[str, Callable[[Any], Any]] = {
    "temperature": _number(float, 0),
    "top_p": _number(float, 0, 1, low_open=True),
    "top_k": _number(int, 0),
    "seed": _optional(_number(int, 0)),
    "max_new_tokens": _number(int, 1),
}


def _apply(settings: Settings, values: dict[str, Any], describe: Callable[[str], str]) -> Settings:
    top: dict[str, Any] = {}
    sampling: dict[str, Any] = {}
    for key, value in values.items():
        parse = _TOP_LEVEL.get(key) or _SAMPLING.get(key)
        if parse is None:
            raise ConfigError(f"unknown setting {describe(key)}")
        try:
            parsed = parse(value)
        except ValueError as exc:
            raise ConfigError(f"invalid {describe(key)}: {exc}") from None
        (top if key in _TOP_LEVEL else sampling)[key] = parsed
    return dataclasses.replace(
        settings, **top, sampling=dataclasses.replace(settings.sampling, **sampling)
    )


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a config.toml into a flat dict of settings; a missing or malformed file is a ConfigError."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"unknown section [{key}] in {path}")
    return data


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults, then the TOML file at `path` (if any), then `overrides` (flag name -> raw value; None = not given)."""
    settings = Settings()
    if path is not None:
        settings = _apply(settings, read_config_file(path), lambda key: f"'{key}' in {path}")
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    return _apply(settings, given, lambda key: f"--{key.replace('_', '-')}")


def adopt_sampling(sampling: Sampling, saved: Any, keep: Iterable[str] = ()) -> Sampling:
    """`sampling` with the values a session saved (read from disk: each checked, a bad one ignored), except
    the keys in `keep` (given on the command line, which wins)."""
    values = {}
    for key, value in (saved.items() if isinstance(saved, dict) else ()):
        if key in _SAMPLING and key not in keep:
            try:
                values[key] = _SAMPLING[key](value)
            except (ValueError, TypeError):
                continue
    return dataclasses.replace(sampling, **values)


def set_sampling(sampling: Sampling, key: str, value: str) -> Sampling:
    """Change one sampling setting from text (as typed at the REPL); raises ConfigError with a hint."""
    parse = _SAMPLING.get(key)
    if parse is None:
        raise ConfigError(f"unknown setting '{key}' (one of {', '.join(_SAMPLING)})")
    try:
        parsed = parse(None if value.strip().lower() == "none" and key == "seed" else value)
    except ValueError as exc:
        raise ConfigError(f"invalid {key}: {exc}") from None
    return dataclasses.replace(sampling, **{key: parsed})
