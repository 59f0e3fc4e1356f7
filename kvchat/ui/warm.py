"""The `kvchat` command's entry, and its warm process: a one-shot or piped run that starts where torch and
transformers are already imported.

Importing torch, transformers and kvchat takes seconds, more than the rest of a one-shot reply. So after a
one-shot (`-p`) or piped run, kvchat leaves a warm process behind: a background process of this user that has
imported them, listening on a socket in $KVCHAT_HOME/warm (a folder private to the user; the socket 0600, and
a peer of another user refused). The next such run connects to it, hands over its argument list, working
folder, environment, umask and its standard input, output and error, and the warm process forks a child that
runs the command exactly as a fresh process would (reading and writing the client's own streams), then
reports the child's exit status, which the client exits with. Signals the client gets (Ctrl-C) are passed on
to the child; a client that dies takes the child with it.

A warm process serves only runs it would run identically: the same interpreter and its flags, environment,
resource limits and installed code (a digest of these, of every `sys.path` folder's modification time and of
kvchat's own files names it; a client's first path folder must not shadow a module it imported), started with
no interpreter options. It never computes anything itself (no thread pools to break in a fork), and it ends after
`KVCHAT_WARM` seconds without a run (default 600). `KVCHAT_WARM=0` turns it off; an interactive chat never
uses it (its terminal belongs to the client's session).

This module imports only the standard library and kvchat.config until it runs a command or serves.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import io
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from kvchat.config import home_dir, kvchat_home
from kvchat.errors import KvchatError

IDLE_S = 600  # how long a warm process waits for a run, unless KVCHAT_WARM says otherwise
# kvchat.ui.cli.COMMANDS and `kvchat warm`: never run warm
SUBCOMMANDS = frozenset({"sessions", "cache", "info", "bench", "models", "warm"})
VOLATILE = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "KVCHAT_WARM_REPORT"})  # left out of the environment's digest
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
MAX_HEADER = 4 * 1024 * 1024
# What a run needs imported: the warm process imports these once (the model's own modelling code is imported by
# the run that loads it; the default model's family is here).
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
           "kvchat.ui.cli", "kvchat.ui.display", "kvchat.chat.chat", "kvchat.chat.engine", "kvchat.chat.saving",
           "kvchat.weights.model", "kvchat.weights.quant", "kvchat.weights.direct", "kvchat.cache.chat_cache",
           "kvchat.cache.layers", "kvchat.cache.compiled", "kvchat.store.sessions")


def idle_seconds() -> float | None:
    """How long a warm process waits for a run ($KVCHAT_WARM), or None when warm runs are off."""
    value = os.environ.get("KVCHAT_WARM", "").strip().lower()
    if value in ("", "on", "1", "yes", "true"):
        return IDLE_S
    if value in ("0", "off", "no", "false"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # (a value kvchat does not know: off, the safe reading)
    return seconds if seconds > 0 else None


def eligible(argv: list[str]) -> bool:
    """Whether this run may go to a warm process: a chat that is not interactive (a `-p` prompt, or a standard
    input that is not a terminal), on Linux, with warm runs on."""
    if sys.platform != "linux" or idle_seconds() is None or (argv and argv[0] in SUBCOMMANDS):
        return False
    if any(arg in ("-h", "--help", "--version") for arg in argv) or not _plain_interpreter():
        return False
    prompted = any(arg in ("-p", "--prompt") or arg.startswith("--prompt=") for arg in argv)
    try:
        return prompted or not os.isatty(0)
    except OSError:
        return False


def _plain_interpreter() -> bool:
    """Whether Python was started with no options of its own (`python -m kvchat ...` or a script): a warm
    process is started without any."""
    original = getattr(sys, "orig_argv", [])
    return len(original) > 1 and (original[1] == "-m" or not original[1].startswith("-"))


def _limits() -> str:
    """The resource limits a run inherits (a warm process's child has its parent's)."""
    import resource

    names = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_NOFILE", "RLIMIT_STACK", "RLIMIT_CPU", "RLIMIT_FSIZE",
             "RLIMIT_CORE", "RLIMIT_NPROC", "RLIMIT_MEMLOCK")
    return ";".join(f"{name}={resource.getrlimit(getattr(resource, name))}" for name in names
                    if hasattr(resource, name))


def _code_state(digest: Any) -> None:
    """Adds what the imported code depends on: every sys.path folder's modification time (a package installed
    or removed changes it) and each of kvchat's own files (an edit in a checkout changes it). The first folder,
    the script's or the working one, is checked per run instead (see `_shadows`)."""
    for entry in sys.path[1:]:
        try:
            digest.update(f"{entry}:{os.stat(entry or '.').st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{entry}:-\n".encode())
    package = Path(__file__).resolve().parent.parent
    for root, folders, files in os.walk(package):
        folders[:] = sorted(folder for folder in folders if folder != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".c", ".so")):
                status = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}:{status.st_mtime_ns}:{status.st_size}\n".encode())


def key(environment: dict[str, str]) -> str:
    """The name of the warm process that may serve a run in `environment` (see the module's docstring)."""
    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\n{sys.version}\n{sys.flags}\n{os.getuid()}\n{_limits()}\n".encode())
    for name in sorted(environment):
        if name not in VOLATILE:
            digest.update(f"{name}={environment[name]}\0".encode("utf-8", "surrogateescape"))
    _code_state(digest)
    return digest.hexdigest()[:24]


def _folder() -> Path | None:
    """$KVCHAT_HOME/warm, checked (a real folder of this user, 0700); None when it cannot be had."""
    try:
        if not kvchat_home().is_dir():
            return None  # (no home yet: the first cold run makes it)
        return home_dir("warm")
    except (KvchatError, OSError):
        return None  # a home kvchat cannot use: no warm run (a cold run says why)


def _connect(folder: Path, name: str) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(folder)  # a relative address: a socket's path is limited to 107 bytes
        client.connect(f"{name}.sock")
    except OSError:
        client.close()
        return None
    finally:
        os.fchdir(here)
        os.close(here)
    return client


def _send(connection: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    connection.sendall(struct.pack("<I", len(data)) + data)


def _receive(connection: socket.socket, limit: int = MAX_HEADER) -> dict[str, Any] | None:
    """One length-prefixed JSON message; None at the end of the connection."""
    head = _exactly(connection, 4)
    if head is None:
        return None
    (length,) = struct.unpack("<I", head)
    if length > limit:
        return None
    body = _exactly(connection, length)
    return None if body is None else json.loads(body)


def _exactly(connection: socket.socket, count: int) -> bytes | None:
    chunks, have = [], 0
    while have < count:
        chunk = connection.recv(count - have)
        if not chunk:
            return None
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def run_warm(argv: list[str]) -> int | None:
    """Run `argv` in a warm process; its exit status, or None when no warm process took it (nothing ran)."""
    folder = _folder()
    if folder is None:
        return None
    environment = dict(os.environ)
    name = key(environment)
    connection = _connect(folder, name)
    if connection is None:
        return None
    with connection:
        try:
            streams = [(stream.encoding, stream.errors) if stream is not None else (None, None)
                       for stream in (sys.stdin, sys.stdout, sys.stderr)]
            umask = os.umask(0o077)
            os.umask(umask)
            socket.send_fds(connection, [b"\0"], [0, 1, 2])  # (the streams ride on one byte of their own)
            _send(connection, {"key": name, "argv0": sys.argv[0], "path0": sys.path[0], "argv": argv,
                               "cwd": os.getcwd(), "env": environment, "umask": umask, "streams": streams})
            started = _receive(connection)
        except (OSError, ValueError):
            return None
        if not started or "pid" not in started:
            return None  # refused (another key, a stale process): run here instead
        child = int(started["pid"])

        def forward(number: int, _frame: Any) -> None:
            try:
                os.kill(child, number)
            except OSError:
                pass  # (it has ended)

        for number in FORWARDED:
            signal.signal(number, forward)
        try:
            ended = _receive(connection)
        except (OSError, ValueError):
            ended = None
    report = os.environ.get("KVCHAT_WARM_REPORT")
    if report and ended is not None:
        Path(report).write_text(json.dumps({"pid": child, "server": started.get("server"), **ended}))
    if ended is None or "exit" not in ended:
        print("kvchat: error: the warm process running this command ended before it did", file=sys.stderr)
        return 1
    return int(ended["exit"])


def start_warm(environment: dict[str, str]) -> None:
    """Start a warm process for runs in `environment` (this process's as it started: a run may add to it),
    unless one is there or starting (its lock is held)."""
    folder = _folder()
    if folder is None:
        return
    name = key(environment)
    lock = _lock(folder, name)
    if lock is None:
        return  # one is running (or starting)
    os.close(lock)
    subprocess.Popen([sys.executable, "-m", "kvchat.ui.warm", "--serve", json.dumps(sys.path)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder,
                     start_new_session=True, close_fds=True, env=environment)


def _lock(folder: Path, name: str) -> int | None:
    """The warm process's lock for `name`, taken (a file descriptor); None when another process holds it."""
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def main() -> int:
    """The `kvchat` command: a warm run where one can serve it, else this process runs it (and leaves a warm
    process for the next one-shot or piped run)."""
    argv = sys.argv[1:]
    if argv[:1] == ["--serve"] and len(argv) == 2:
        sys.path[:] = json.loads(argv[1])  # the client's: the same modules, and the same key
        return serve()
    if argv[:1] == ["warm"]:
        return command(argv[1:])
    warm, environment = eligible(argv), dict(os.environ)
    if warm:
        code = run_warm(argv)
        if code is not None:
            return code
    from kvchat.ui import cli

    code = cli.main(argv)
    if warm:
        try:
            start_warm(environment)
        except OSError:
            pass  # (no warm process: the next run is a cold one, as this was)
    return code


def command(argv: list[str]) -> int:
    """`kvchat warm`: this user's warm processes (in $KVCHAT_HOME), a line each; `kvchat warm stop` ends them."""
    if argv not in ([], ["stop"]):
        print("kvchat: error: usage: kvchat warm [stop]", file=sys.stderr)
        return 2
    folder = _folder()
    running = []
    for lock in sorted(folder.glob("*.lock")) if folder is not None else []:
        name = lock.name[:-len(".lock")]
        if not _held(folder, name):  # nobody holds it: no process (a stale socket goes)
            (folder / f"{name}.sock").unlink(missing_ok=True)
            continue
        pid = lock.read_text(errors="replace").strip()
        running.append((name, pid if pid.isdigit() else "?"))
    if argv == ["stop"]:
        for name, _ in running:
            (folder / f"{name}.sock").unlink(missing_ok=True)  # (it sees its socket gone and ends)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_held(folder, name) for name, _ in running):
            time.sleep(0.1)
        print(f"stopped {len(running)} warm process{'es' if len(running) != 1 else ''}")
        return 0
    if not running:
        print("no warm process (warm runs are off: KVCHAT_WARM)" if idle_seconds() is None
              else "no warm process: the next one-shot or piped run leaves one")
        return 0
    for name, pid in running:
        print(f"warm process {pid}: {_resident(pid)}, for runs of key {name}")
    return 0


def _held(folder: Path, name: str) -> bool:
    """Whether a warm process holds the lock for `name` (it is running, or starting)."""
    free = _lock(folder, name)
    if free is None:
        return True
    os.close(free)
    return False


def _resident(pid: str) -> str:
    """A process's resident memory, in words."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return f"{int(line.split()[1]) / 1024:.0f} MiB resident"
    except (OSError, ValueError):
        pass
    return "memory unknown"


# ---- the warm process ----

def serve() -> int:
    """Import what a run needs, then serve runs until idle for `idle_seconds()` (see the module's docstring)."""
    idle = idle_seconds()
    folder = _folder()
    if idle is None or folder is None:
        return 1
    name = key(dict(os.environ))
    lock = _lock(folder, name)
    if lock is None:
        return 0  # another one serves this key
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())  # (who serves: tests and people can stop it)
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    os.chdir(folder)
    staging = f".{name}.{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(staging)
    os.chmod(staging, 0o600)
    os.rename(staging, f"{name}.sock")  # ready: a client sees the socket only once it listens
    listener.listen(16)
    mine = os.stat(f"{name}.sock").st_ino
    try:
        _serve(listener, name, idle, mine, lock)
    finally:
        try:
            if os.stat(f"{name}.sock").st_ino == mine:
                os.unlink(f"{name}.sock")
        except OSError:
            pass
    return 0


def _serve(listener: socket.socket, name: str, idle: float, inode: int, lock: int) -> None:
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # child pid -> its client's connection
    last = time.monotonic()
    while True:
        for event, _ in selector.select(timeout=0.1):
            if event.fileobj is listener:
                connection, _ = listener.accept()
                inherited = [listener, selector, *children.values()]  # what a child must not keep
                pid = _start(connection, name, inherited, lock)
                if pid is None:
                    connection.close()
                else:
                    children[pid] = connection
                    selector.register(connection, selectors.EVENT_READ, pid)
            else:  # a client's connection readable: it went away; its run goes with it
                pid = event.data
                if children.get(pid) is event.fileobj:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
                    selector.unregister(event.fileobj)
        while children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            connection = children.pop(pid, None)
            if connection is not None:
                try:
                    selector.unregister(connection)
                except (KeyError, ValueError):
                    pass
                try:
                    _send(connection, {"exit": _exit_status(status), "peak_rss": usage.ru_maxrss * 1024})
                except OSError:
                    pass
                connection.close()
        if children:
            last = time.monotonic()
        elif time.monotonic() - last > idle:
            return
        try:
            if os.stat(f"{name}.sock").st_ino != inode:
                return  # the socket was removed or replaced: this process is no longer the one
        except OSError:
            return


def _shadows(folder: str) -> bool:
    """Whether `folder` (a client's first sys.path entry) holds a module or package named as one this process has
    imported: a fresh process would import that one instead."""
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return True
    imported = {module.partition(".")[0] for module in sys.modules}
    return any(name.partition(".")[0] in imported for name in names
               if name.endswith((".py", ".pyc", ".so", ".pth")) or os.path.isdir(os.path.join(folder or ".", name)))


def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def _start(connection: socket.socket, name: str, inherited: list[Any], lock: int) -> int | None:
    """Read a client's run and fork its child (which closes `inherited` and the `lock` descriptor, the warm
    process's own); the child's pid, or None when the run is refused."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", credentials)
    if uid != os.getuid():
        return None
    connection.settimeout(10)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(connection, 1, 3)
        if data != b"\0" or len(fds) != 3:
            raise ValueError("no streams")
        run = _receive(connection)
        if run is None:
            raise ValueError("a short or oversized run")
        if run.get("key") != name or key(run["env"]) != name or _shadows(run["path0"]):
            raise ValueError("another environment or other code")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # (a run not a JSON object: refused)
        for fd in fds:
            os.close(fd)
        return None
    connection.settimeout(None)
    pid = os.fork()
    if pid == 0:
        for thing in inherited:
            thing.close()
        os.close(lock)
        _child(connection, run, fds)  # never returns
    for fd in fds:
        os.close(fd)
    try:
        _send(connection, {"pid": pid, "server": os.getpid()})
    except OSError:
        pass
    return pid


def _child(connection: socket.socket, run: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the client's run, as a fresh process would start it, and exit with it."""
    code = 1
    try:
        connection.close()
        for number in (*FORWARDED, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # (as Python starts: EPIPE raises BrokenPipeError)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(run["cwd"])
        os.umask(int(run["umask"]))
        os.environ.clear()
        os.environ.update(run["env"])
        sys.argv = [run["argv0"], *run["argv"]]
        sys.path[0] = run["path0"]
        _streams(run["streams"])
        import random

        random.seed()  # (a fresh process seeds from the system; a fork would repeat its parent's sequence)
        from kvchat.ui import cli

        code = cli.main(list(run["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a crash is reported as Python would report it, then the child exits
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        end_process(code)


def end_process(code: int) -> NoReturn:
    """End this process with `code` once its work is done: the exit handlers run and the output is flushed, but
    the interpreter's teardown of torch and of every object (most of a second with a 1B model loaded) is
    skipped. Everything kvchat keeps is written before this (the store is crash-safe: a process killed at any
    point loses nothing saved)."""
    try:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:  # noqa: BLE001 - (an output gone away: nothing left to tell)
        pass
    os._exit(code)


def _streams(streams: list[list[str | None]]) -> None:
    """sys.stdin, stdout and stderr on descriptors 0-2, as Python makes them at start (line-buffered on a
    terminal, stderr always), in the client's encodings."""
    (in_encoding, in_errors), (out_encoding, out_errors), (err_encoding, err_errors) = streams
    sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding=in_encoding, errors=in_errors)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding=out_encoding, errors=out_errors,
                                  line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), encoding=err_encoding,
                                  errors=err_errors or "backslashreplace", line_buffering=True, write_through=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


if __name__ == "__main__":
    raise SystemExit(main())
