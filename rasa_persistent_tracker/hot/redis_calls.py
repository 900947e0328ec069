"""Running one Lua script on Redis, with redis-py's errors translated.

Every redis-py (or Cluster) exception becomes one of the package's errors:

* pool exhaustion - ``No connection available.`` (blocking pool),
  ``Too many connections`` (plain pool), ``MaxConnectionsError`` (Cluster) -
  is waited out, polling for a free connection up to ``busy_wait`` seconds,
  then ``HotStateBusy``: Redis is fine, so no fallback to SQL;
* anything else is ``HotStateUnavailable`` with the driver's reason in the
  message (its class and text: server addresses and Redis' own words, never
  a key's value or a script argument).
"""
import asyncio
import time
from typing import Any, Callable, List

from redis import exceptions as redis_errors

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.errors import HotStateBusy, HotStateUnavailable
from rasa_persistent_tracker.redis_client import PooledRedis

# Raised when the connection itself failed: the call may not have run.
TRANSIENT = (redis_errors.ConnectionError, redis_errors.TimeoutError,
             redis_errors.BusyLoadingError, OSError, asyncio.TimeoutError)
_POOL_EXHAUSTED = ("No connection available.", "Too many connections")
# Failover in progress (replica answering, cluster resharding): also transient.
_RETRYABLE_RESPONSES = ("READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


class Disconnected(HotStateUnavailable):
    """The call failed on the connection (broken, refused, timed out): it may
    or may not have run. Safe to retry for reads and for token-checked commits."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exhausted(exc: BaseException) -> bool:
    return isinstance(exc, redis_errors.MaxConnectionsError) or str(exc) in _POOL_EXHAUSTED


class RedisCaller:
    """Calls scripts on the client ``client()`` returns; see the module docstring."""

    def __init__(self, client: Callable[[], Any], description: str,
                 busy_wait: float = 1.0) -> None:
        self._client = client
        self._description = description
        self._busy_wait = busy_wait

    async def eval(self, script: str, keys: List[str], *args: object) -> Any:
        deadline = time.monotonic() + self._busy_wait
        delay = 0.01
        while True:
            try:
                client = self._client()
                if isinstance(client, PooledRedis):  # not wrappers (tests), Sentinel, Cluster
                    return await client.run_script(script, len(keys), *keys, *args)
                return await client.eval(script, len(keys), *keys, *args)
            except Exception as exc:  # every driver error is translated below
                if not _exhausted(exc):
                    raise self.translate(exc) from exc
                if delay == 0.01:  # the first wait of this call
                    metrics.POOL_WAITS.inc()
                if time.monotonic() + delay > deadline:
                    raise HotStateBusy(
                        f"Redis at {self._description}: no pooled connection came free in "
                        f"{self._busy_wait:g}s (every one busy; see redis_max_connections)."
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)

    def translate(self, exc: BaseException) -> HotStateUnavailable:
        """The package error for a redis-py exception."""
        where = f"Redis at {self._description}"
        if _exhausted(exc):
            return HotStateBusy(f"{where}: no pooled connection came free ({_reason(exc)}).")
        if isinstance(exc, TRANSIENT):
            return Disconnected(f"{where} is unreachable ({_reason(exc)}).")
        if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(
                _RETRYABLE_RESPONSES):
            return Disconnected(f"{where} cannot take writes now ({_reason(exc)}).")
        return HotStateUnavailable(f"{where} refused the call ({_reason(exc)}).")
