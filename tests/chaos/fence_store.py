"""A downstream store that enforces fencing tokens, kept in a Redis that is *not* under test.

It models what the library asks users to do with ``ctx.fencing_token``: the store remembers
the highest token it has seen and rejects a write that carries a lower one, so a worker
that was paused past its lease cannot overwrite a newer holder's work. Every change of
writer (token, identity) and every rejection is appended to a log list, which the checker
reads to prove that no stale write was ever accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["FenceLogEntry", "FenceStore"]

PREFIX = "chaos:fence"

# KEYS[1] highest token   KEYS[2] last writer "token identity"   KEYS[3] log list
# KEYS[4] accepted-write counter   ARGV[1] token   ARGV[2] identity
# Reply 1: accepted, 0: rejected (token lower than the highest seen).
WRITE_LUA = """
local hi = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(ARGV[1])
local entry = ARGV[1] .. ' ' .. ARGV[2]
if tok < hi then
  redis.call('RPUSH', KEYS[3], 'R ' .. entry)
  return 0
end
if tok > hi then redis.call('SET', KEYS[1], ARGV[1]) end
if redis.call('GET', KEYS[2]) ~= entry then
  redis.call('SET', KEYS[2], entry)
  redis.call('RPUSH', KEYS[3], 'A ' .. entry)
end
redis.call('INCR', KEYS[4])
return 1
"""


@dataclass(frozen=True)
class FenceLogEntry:
    """One log line: a new accepted writer, or a rejected write."""

    accepted: bool
    token: int
    identity: str


class FenceStore:
    """Client side of the fencing store (one per process; thread-safe like redis-py)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._write = client.register_script(WRITE_LUA)
        self._keys = [f"{PREFIX}:{name}" for name in ("high", "last", "log", "writes")]

    def write(self, token: int, identity: str) -> bool:
        """One fenced write; True when accepted."""
        reply: Any = self._write(keys=self._keys, args=[str(token), identity])
        return bool(int(reply))

    def log(self) -> list[FenceLogEntry]:
        entries = []
        for raw in self._client.lrange(self._keys[2], 0, -1):
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            kind, token, identity = text.split(" ", 2)
            entries.append(FenceLogEntry(kind == "A", int(token), identity))
        return entries

    def accepted_writes(self) -> int:
        return int(self._client.get(self._keys[3]) or 0)
