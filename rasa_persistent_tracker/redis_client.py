"""The standalone Redis client the hot state runs its scripts on.

redis-py's ``execute_command`` does work on every command that a hot-state
script call does not need: a timeout around taking a pooled connection, a
one-byte probe read (with its own timeout) to see whether the connection
holds stale data or was closed, a retry wrapper, and the script's whole text
sent with ``EVAL``. Measured on one machine (``benchmarks/per_turn.py``
setup, uvloop): 71 us per script call through ``eval``, 46 us through
``run_script``, two calls per turn.

``run_script`` keeps every guarantee those steps give:

* a connection is only taken if it is idle and connected, and its stream has
  not seen the server close it (what the probe read checks for a closed
  connection; such a connection is disconnected, so it is opened afresh);
  otherwise redis-py's own path takes, opens or waits for one;
* stale data cannot be on an idle connection: redis-py's ``read_response``
  disconnects on any error or cancellation before the reply is read whole,
  as it does for every command;
* ``EVALSHA`` falls back to ``EVAL`` (which loads the script) when Redis does
  not know the script (restarted, ``SCRIPT FLUSH``);
* errors are redis-py's own, translated by ``redis_calls`` as before;
* a URL asking for ``health_check_interval`` keeps redis-py's path, which
  runs the checks;
* the command is written without ``asyncio.wait_for`` (``_send``), which on
  Python 3.10 can lose the calling task's cancellation;
* once the request is written, the work of the caller's
  ``inflight.meanwhile`` runs (``inflight.sent``) before the reply is
  awaited; should it raise anything but an ``Exception`` (which it keeps),
  the connection is disconnected, as its reply is never read;
* the command is packed by ``pack_script_call``: the same RESP bytes as
  redis-py's ``pack_command``, with its encoder for anything but bytes,
  text and integers (a bool or None is refused as redis-py refuses it).

Replies are parsed by redis-py's parser: hiredis's when it is installed (a
dependency of this package), which reads an array reply in one call.
"""
import asyncio
import hashlib
from typing import Any, Dict, Optional, Sequence

import redis.asyncio as aioredis
from redis.asyncio.connection import async_timeout
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rasa_persistent_tracker import inflight, metrics

_SHAS: Dict[str, str] = {}


def script_sha(script: str) -> str:
    """The SHA1 Redis names ``script`` by (``EVALSHA``)."""
    sha = _SHAS.get(script)
    if sha is None:
        sha = _SHAS[script] = hashlib.sha1(script.encode("utf-8")).hexdigest()
    return sha


class CountingPool(aioredis.BlockingConnectionPool):
    """A blocking pool that counts the calls that have to wait (the metric
    ``rpt_pool_waits_total``): its queue of free slots is empty when asked."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.pool.empty():
            metrics.POOL_WAITS.inc()
        return await super().get_connection(*args, **kwargs)

    async def idle_connection(self) -> Optional[Any]:
        """A connected idle connection whose stream is open, taken from the
        pool (give it back with ``release``), or None: then ``get_connection``
        decides (it opens, reconnects or waits). One the server closed (a
        restart) is disconnected first, so it is opened afresh."""
        try:
            connection = self.pool.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if connection is None or not connection.is_connected or getattr(
                connection, "health_check_interval", 0):
            # Not open yet, or health checks asked for (``health_check_interval``
            # in the URL): redis-py's own path does those.
            self.pool.put_nowait(connection)  # back on top: get_connection takes it next
            return None
        reader = getattr(connection, "_reader", None)
        if reader is None or reader.at_eof() or reader.exception() is not None:
            try:
                await connection.disconnect()
            finally:
                self.pool.put_nowait(connection)
            return None
        return connection


class PooledRedis(aioredis.Redis):
    """A client on a ``CountingPool`` that closes the pool when it is closed,
    with ``run_script`` (module docstring)."""

    async def close(self, close_connection_pool: Optional[bool] = None) -> None:
        await super().close(close_connection_pool=True)

    async def run_script(self, script: str, numkeys: int, *args: Any) -> Any:
        """``EVAL script numkeys *args``, on an idle connection when there is one."""
        pool = self.connection_pool
        connection = await pool.idle_connection() if isinstance(pool, CountingPool) else None
        if connection is None:
            return await self.eval(script, numkeys, *args)
        try:
            await _send(connection, [pack_script_call(connection.encoder, script_sha(script),
                                                      numkeys, args)])
            try:
                inflight.sent()  # work of the caller's ``meanwhile``, during the round trip
            except BaseException:
                await connection.disconnect(nowait=True)  # its reply is never read
                raise
            return await connection.read_response()
        except NoScriptError:
            pass  # the connection is fine; Redis lost its script cache
        finally:
            await pool.release(connection)
        return await self.eval(script, numkeys, *args)


def pack_script_call(encoder: Any, sha: str, numkeys: int, args: Sequence[Any]) -> bytes:
    """``EVALSHA sha numkeys *args`` as RESP bytes, as ``pack_command`` packs
    it: text in the connection's encoding, integers in decimal, anything else
    as the connection's ``encoder`` has it (which refuses what Redis cannot
    take, e.g. a bool)."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (len(args) + 3, sha.encode("ascii")),
             b"$%d\r\n%d\r\n" % (len(str(numkeys)), numkeys)]
    encoding, errors = encoder.encoding, encoder.encoding_errors
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode(encoding, errors)
        elif kind is int:
            data = b"%d" % arg
        else:
            data = encoder.encode(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


async def _send(connection: Any, packed: Any) -> None:
    """``connection.send_packed_command`` without ``asyncio.wait_for``: on
    Python 3.10 ``wait_for`` loses a cancellation that arrives as the write
    completes (bpo-42130), and a task that ignores its cancellation keeps
    ``asyncio.run`` from ever returning. The write is buffered at once; only
    a full buffer is waited for, within the socket timeout. Failures
    disconnect and raise as redis-py's own send does."""
    writer = connection._writer
    try:
        writer.writelines(packed)
        if writer.transport.get_write_buffer_size():
            async with async_timeout(connection.socket_timeout):
                await writer.drain()
    except asyncio.TimeoutError:
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await connection.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while writing to socket: {exc}.") from exc
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
