"""A small TCP proxy on 127.0.0.1 that can cut one owner off from Redis (a partition).

It runs in the test process, in one thread, and forwards bytes between its clients and an
upstream address. ``mode`` switches at runtime:

- ``pass``: forward both ways;
- ``drop``: reset every open connection and every new one (the peer sees ECONNRESET or a
  closed connection: a partition that the client notices at once);
- ``blackhole``: keep connections open but forward nothing, silently discarding what either
  side sends, and let new connections hang (the client sees only timeouts). When the mode
  goes back to ``pass``, connections that lost bytes are reset (their byte stream is broken);
  untouched ones carry on.

Redis restarts, ``CLIENT KILL`` and the like pass through: when one side closes, the proxy
closes the other.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["BLACKHOLE", "DROP", "MODES", "PASS", "TcpProxy"]

PASS = "pass"
DROP = "drop"
BLACKHOLE = "blackhole"
MODES = (PASS, DROP, BLACKHOLE)
LOOPBACK = "127.0.0.1"
_CHUNK = 65536


def _reset(sock: Optional[socket.socket]) -> None:
    """Close with RST (SO_LINGER 0), so the peer sees a reset rather than a clean EOF."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: Optional[socket.socket] = None
    #: Bytes of this connection were discarded (blackhole): its stream is broken.
    tainted: bool = False
    closed: bool = field(default=False)

    def other(self, sock: socket.socket) -> Optional[socket.socket]:
        return self.upstream if sock is self.client else self.client


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    reset: int = 0
    discarded_bytes: int = 0
    forwarded_bytes: int = 0


class TcpProxy:
    """Forwards 127.0.0.1:`port` to ``upstream_host:upstream_port``; see the module doc."""

    def __init__(
        self, upstream_port: int, upstream_host: str = LOOPBACK, *, name: str = "proxy"
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.stats = ProxyStats()
        self._mode = PASS
        self._applied = threading.Condition()
        self._pending: Optional[str] = None
        self._closing = False
        self._pairs: set[_Pair] = set()
        self._sel = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name=f"chaos-{name}", daemon=True)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def set_mode(self, mode: str, timeout: float = 5.0) -> None:
        """Switch mode; returns once the proxy thread has applied it."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        with self._applied:
            self._pending = mode
            self._wake_w.send(b"x")
            if not self._applied.wait_for(lambda: self._pending is None, timeout):
                raise RuntimeError(f"proxy {self.name} did not switch to {mode} in {timeout} s")

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(5.0)
        for pair in list(self._pairs):
            self._close_pair(pair, rst=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(Exception):
            self._sel.close()

    def __repr__(self) -> str:
        return (
            f"<TcpProxy {self.name} :{self.port} -> {self.upstream[1]} mode={self._mode} "
            f"connections={len(self._pairs)}>"
        )

    # -- the proxy thread --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            for key, _mask in self._sel.select(timeout=0.2):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif key.data == "listen":
                    self._accept()
                elif isinstance(key.data, _Pair) and not key.data.closed:
                    self._readable(key.fileobj, key.data)  # type: ignore[arg-type]
            self._apply_mode()

    def _apply_mode(self) -> None:
        with self._applied:
            mode, self._pending = self._pending, None
            if mode is None:
                return
            self._mode = mode
            if mode == DROP:
                for pair in list(self._pairs):
                    self._close_pair(pair, rst=True)
            elif mode == PASS:
                for pair in list(self._pairs):
                    if pair.tainted or pair.upstream is None:
                        self._close_pair(pair, rst=True)
            self._applied.notify_all()

    def _accept(self) -> None:
        try:
            client, _addr = self._listener.accept()
        except OSError:
            return
        if self._mode == DROP:
            self.stats.refused += 1
            _reset(client)
            return
        pair = _Pair(client)
        if self._mode == PASS:
            try:
                pair.upstream = socket.create_connection(self.upstream, timeout=1.0)
            except OSError:
                self.stats.refused += 1
                _reset(client)  # upstream down: the client sees its connection refused
                return
            pair.upstream.settimeout(1.0)
            self._sel.register(pair.upstream, selectors.EVENT_READ, pair)
        else:
            pair.tainted = True  # a blackholed connect: it never reaches Redis
        client.settimeout(1.0)
        self._sel.register(client, selectors.EVENT_READ, pair)
        self._pairs.add(pair)
        self.stats.accepted += 1

    def _readable(self, sock: socket.socket, pair: _Pair) -> None:
        try:
            data = sock.recv(_CHUNK)
        except OSError:
            data = b""
        if not data:
            self._close_pair(pair, rst=False)
            return
        other = pair.other(sock)
        if self._mode != PASS or other is None:
            pair.tainted = True
            self.stats.discarded_bytes += len(data)
            return
        try:
            other.sendall(data)
            self.stats.forwarded_bytes += len(data)
        except OSError:
            self._close_pair(pair, rst=True)

    def _close_pair(self, pair: _Pair, *, rst: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        if rst:
            self.stats.reset += 1
        for sock in (pair.client, pair.upstream):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            if rst:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
