"""A real ``redis-server`` on a free loopback port that tests can kill, restart and freeze.

Process management is built on ``mirakuru.TCPExecutor`` (the process runner
behind pytest-redis). mirakuru starts the server in its own session, waits for
readiness with a deadline, notices a server that exits during start-up, kills
the whole process group and reaps it, and at interpreter exit kills any server
a test forgot. On top of it this module adds what the chaos tests need and
mirakuru does not have: readiness means "answers PING" (not just "accepts TCP",
since a server loading its AOF accepts connections but replies LOADING),
restart on the *same* port with or without the AOF data, SIGSTOP/SIGCONT
freezing, free-port selection with retry, and the server log in every error.
pytest-redis itself was not used: its fixtures are session-scoped factories with
a fixed set of options and no restart-on-the-same-port or freeze.

This module imports nothing from pytest, so test subprocesses (the chaos
suite's owner processes) can import and use it too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Optional, Union

import redis
from mirakuru import TCPExecutor
from mirakuru.exceptions import AlreadyRunning, ProcessExitedWithError, TimeoutExpired
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "LOOPBACK",
    "RedisServer",
    "RedisServerError",
    "find_redis_server",
    "free_port",
    "poll",
    "proc_state",
    "redis_server_version",
]

LOOPBACK = "127.0.0.1"
LOG_NAME = "redis.log"
STDOUT_NAME = "redis.stdout"
ConfigValue = Union[str, int, Sequence[str]]

_ADDRESS_IN_USE = re.compile(r"Address already in use|Could not create server TCP listening socket")


class RedisServerError(RuntimeError):
    """The server could not be started, stopped or signalled; the message has the log tail."""


class _PortInUse(Exception):
    """Internal: the chosen port was taken by someone else."""


def find_redis_server() -> Optional[str]:
    """Path of the ``redis-server`` binary: ``$MUTEXOWNER_REDIS_SERVER`` or the one on PATH."""
    override = os.environ.get("MUTEXOWNER_REDIS_SERVER")
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("redis-server")


@functools.cache
def redis_server_version(executable: str) -> tuple[int, ...]:
    """Version of ``executable`` as a tuple, e.g. ``(7, 0, 15)``; ``()`` if unknown."""
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"v=(\d+(?:\.\d+)*)", out)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a server at host:port answers PING (``+PONG``, or ``-NOAUTH`` when it needs a
    password), not ``-LOADING`` and not silence."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return reply.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def proc_state(pid: int) -> Optional[str]:
    """The one-letter state of ``pid`` from /proc (``T`` = stopped), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # The command name is in parentheses and may contain spaces.
            return stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class _RedisExecutor(TCPExecutor):
    """mirakuru executor whose readiness check is a successful PING."""

    def after_start_check(self) -> bool:
        return _answers_ping(self.host, self.port)


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with persistence off unless asked.

    ``dir`` is the data directory (a fresh temporary one, removed by `close`, when
    omitted). ``port=None`` picks a free port, and on the first start retries with
    another one if it was taken meanwhile; `restart` always reuses the same port.
    ``appendonly``/``appendfsync`` configure AOF persistence; ``config`` adds any
    other ``--name value`` options (a sequence value gives several arguments).
    """

    host: str = LOOPBACK

    def __init__(
        self,
        dir: Union[str, os.PathLike[str], None] = None,
        *,
        port: Optional[int] = None,
        appendonly: bool = False,
        appendfsync: Optional[str] = None,
        config: Optional[Mapping[str, ConfigValue]] = None,
        executable: Optional[str] = None,
        startup_timeout: float = 30.0,
    ) -> None:
        found = executable or find_redis_server()
        if not found:
            raise RedisServerError(
                "redis-server not found on PATH; install it (apt-get install redis-server)"
            )
        self.executable: str = found
        self._owns_dir = dir is None
        self.dir: Path = (
            Path(tempfile.mkdtemp(prefix="mutexowner-redis-")) if dir is None else Path(dir)
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._port_fixed = port is not None
        self.port: int = port if port is not None else free_port(self.host)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.config: dict[str, ConfigValue] = dict(config or {})
        self.startup_timeout = startup_timeout
        self._executor: Optional[_RedisExecutor] = None
        self._started_once = False
        self._clients: list[redis.Redis] = []

    # -- read-only facts ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> Optional[int]:
        """Process id of the running (or frozen) server, None when it is not running."""
        process = self._executor.process if self._executor is not None else None
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive (a frozen server is still running)."""
        return self.pid is not None

    @property
    def frozen(self) -> bool:
        """True while the server process is stopped by SIGSTOP (see `freeze`)."""
        pid = self.pid
        return pid is not None and proc_state(pid) in ("T", "t")

    @property
    def log_path(self) -> Path:
        """The server's log file (kept across restarts; appended to)."""
        return self.dir / LOG_NAME

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log and of its stdout/stderr."""
        parts = []
        for path in (self.dir / STDOUT_NAME, self.log_path):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if text.strip():
                tail = "\n".join(text.splitlines()[-lines:])
                parts.append(f"--- {path} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts) or f"(no output in {self.dir})"

    def command(self) -> list[str]:
        """The ``redis-server`` command line used by `start`."""
        cmd = [
            self.executable,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.appendfsync is not None:
            cmd += ["--appendfsync", self.appendfsync]
        if redis_server_version(self.executable) >= (7,):
            # Lets chaos tests use DEBUG SLEEP / DEBUG SET-ACTIVE-EXPIRE from loopback.
            cmd += ["--enable-debug-command", "local"]
        for name, value in self.config.items():
            cmd.append(f"--{name}")
            if isinstance(value, (str, int)):
                cmd.append(str(value))
            else:
                cmd.extend(str(part) for part in value)
        return cmd

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` for this server: bytes replies, 2 s socket timeouts and no
        client-side retries by default (redis-py >= 6 otherwise retries 3 times with
        backoff, which hides faults and slows tests). ``kwargs`` override the defaults.

        Clients are closed when the server is stopped.
        """
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": 0,
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
            "decode_responses": False,
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(kwargs)
        client = redis.Redis(**options)
        self._clients.append(client)
        return client

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; return self.

        Raises `RedisServerError` (with the log tail) if it exits or does not become
        ready within ``startup_timeout``.
        """
        if self.running:
            raise RedisServerError(f"redis-server on port {self.port} is already running")
        may_move = not self._started_once and not self._port_fixed
        deadline = time.monotonic() + self.startup_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                self._spawn()
                break
            except _PortInUse:
                if may_move and attempt < 5:
                    self.port = free_port(self.host)
                    continue
                if self._started_once and time.monotonic() < deadline:
                    # Restart: the port must stay the same; wait for it to be released.
                    time.sleep(0.05)
                    continue
                raise RedisServerError(
                    f"port {self.host}:{self.port} is in use (attempt {attempt})\n"
                    + self.log_tail()
                ) from None
        self._started_once = True
        return self

    def _spawn(self) -> None:
        """One start attempt on the current port."""
        log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.dir / STDOUT_NAME, "ab") as out:
            executor = _RedisExecutor(
                self.command(),
                host=self.host,
                port=self.port,
                timeout=self.startup_timeout,
                sleep=0.02,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                executor.start()
            except AlreadyRunning:
                raise _PortInUse() from None
            except ProcessExitedWithError as exc:
                if _ADDRESS_IN_USE.search(self._log_since(log_size)):
                    raise _PortInUse() from None
                raise RedisServerError(
                    f"redis-server exited during start-up ({exc})\n{self.log_tail()}"
                ) from None
            except TimeoutExpired:
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{self.startup_timeout} s\n{self.log_tail()}"
                ) from None
        self._executor = executor

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def wait_until_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers PING (e.g. after `thaw` or while it loads the AOF)."""
        if not self.running:
            raise RedisServerError(f"redis-server on port {self.port} is not running")
        if not poll(lambda: _answers_ping(self.host, self.port), timeout, interval=0.02):
            raise RedisServerError(
                f"redis-server on port {self.port} did not answer PING within {timeout} s"
                f" (frozen={self.frozen})\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """Graceful stop (SIGTERM: no RDB save, AOF flushed), wait for exit, close clients.

        A frozen server is thawed first. Idempotent.
        """
        executor, self._executor = self._executor, None
        if executor is not None and executor.process is not None:
            pid = executor.process.pid
            if executor.process.poll() is None:
                os.kill(pid, signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
            try:
                executor.stop()
            except Exception:  # a non-zero exit status still means "stopped"
                executor.kill()
        self._close_clients()

    def kill(self) -> None:
        """SIGKILL the server (works while frozen too) and reap it. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.kill()

    def restart(self, persist: Optional[bool] = None) -> None:
        """Kill -9, then start again on the same port.

        ``persist=None`` keeps whatever the server persisted (its AOF when
        ``appendonly=True``, nothing otherwise); ``persist=False`` deletes the data
        files first, as if the disk were lost; ``persist=True`` requires ``appendonly``.
        """
        if persist is None:
            persist = self.appendonly
        elif persist and not self.appendonly:
            raise ValueError("restart(persist=True) needs a server started with appendonly=True")
        self.kill()
        if not persist:
            self.wipe_data()
        self.start()

    def wipe_data(self) -> None:
        """Delete the data files (AOF, RDB) in `dir`, keeping the logs. Server must be down."""
        if self.running:
            raise RedisServerError("wipe_data() needs the server to be stopped")
        for entry in self.dir.iterdir():
            if entry.name in (LOG_NAME, STDOUT_NAME):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP the server and wait until the kernel reports it stopped.

        Clients then see timeouts, not refused connections: the socket stays open.
        """
        pid = self._require_pid("freeze")
        os.kill(pid, signal.SIGSTOP)
        if not poll(lambda: proc_state(pid) in ("T", "t", None), timeout):
            raise RedisServerError(f"redis-server pid {pid} did not stop within {timeout} s")

    def thaw(self, timeout: float = 5.0) -> None:
        """SIGCONT a frozen server and wait until it is no longer stopped (not for PING)."""
        pid = self._require_pid("thaw")
        os.kill(pid, signal.SIGCONT)
        if not poll(lambda: proc_state(pid) not in ("T", "t"), timeout):
            raise RedisServerError(f"redis-server pid {pid} did not resume within {timeout} s")

    def close(self) -> None:
        """Stop the server and remove the data directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _require_pid(self, action: str) -> int:
        pid = self.pid
        if pid is None:
            raise RedisServerError(
                f"cannot {action}: redis-server on port {self.port} is not running"
            )
        return pid

    def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):  # closing a dead connection may fail
                client.close()

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state} pid={self.pid} dir={self.dir}>"
