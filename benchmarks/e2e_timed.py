"""Tracker stores that time their own calls, for ``end_to_end.py``.

``rasa run`` loads one of these by its ``tracker_store: type:`` in the
benchmark's endpoints.yml. Each is the unchanged store class with its public
methods wrapped: the time spent inside ``retrieve``, ``retrieve_full_tracker``,
``save``, ``keys`` and ``exists`` (the outermost call only: Rasa's ``exists``
calls ``retrieve``) is appended as one line
``<method>\\t<sender>\\t<seconds>\\t<cpu seconds>`` to the file named by
``E2E_TIMING_FILE``. The CPU time is the calling thread's (``time.thread_time``):
work the store hands to another thread, or to Redis and PostgreSQL, is not in it.
The benchmark sends one request at a time, so the lines appended during a
request belong to that turn.

The line is written after the clock stops, with one ``os.write`` on an
``O_APPEND`` descriptor (a few microseconds, charged to the turn, not the store).
"""
import contextvars
import functools
import os
import sys
import time
from typing import Any, Callable

from rasa.core.tracker_store import RedisTrackerStore, SQLTrackerStore

from rasa_persistent_tracker import PersistentTrackerStore

TIMING_FILE_ENV = "E2E_TIMING_FILE"
TIMED_METHODS = ("retrieve", "retrieve_full_tracker", "save", "keys", "exists")

_inside = contextvars.ContextVar("e2e_inside_store", default=False)
_fd = None


def _write(method: str, sender: Any, seconds: float, cpu: float) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ[TIMING_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(_fd, f"{method}\t{sender}\t{seconds:.9f}\t{cpu:.9f}\n".encode())


def _timed(method: str, call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _inside.get():  # nested in a timed call: already counted
            return await call(self, *args, **kwargs)
        token = _inside.set(True)
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return await call(self, *args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            cpu = time.thread_time() - cpu_started
            _inside.reset(token)
            sender = args[0] if args else kwargs.get("sender_id", kwargs.get("tracker", ""))
            sender = getattr(sender, "sender_id", sender)
            _write(method, sender, elapsed, cpu)

    return wrapper


def _timed_class(base: type) -> type:
    body = {name: _timed(name, getattr(base, name)) for name in TIMED_METHODS}
    body["__doc__"] = f"``{base.__name__}`` with its calls timed (see module docstring)."
    body["__module__"] = __name__
    return type(f"Timed{base.__name__}", (base,), body)


TimedPersistentTrackerStore = _timed_class(PersistentTrackerStore)
TimedRedisTrackerStore = _timed_class(RedisTrackerStore)
TimedSQLTrackerStore = _timed_class(SQLTrackerStore)


STAGES_FILE_ENV = "E2E_STAGES_FILE"


def _time_stages(path: str) -> None:
    """With ``E2E_STAGES_FILE`` set, also time our store's own steps inside the
    server (the stages ``stages.py`` times; lines ``stage\\t<sender or ->\\t<seconds>``
    appended to that file), to see where a turn's store time goes in ``rasa run``."""
    import inspect

    from rasa_persistent_tracker.hot.redis_state import RedisHotState
    from rasa_persistent_tracker.log.entries import Entries
    from rasa_persistent_tracker.log.event_log import AsyncEventLog
    from rasa_persistent_tracker.record import window
    from rasa_persistent_tracker.record.trackers import Records
    from rasa_persistent_tracker.record.turns import TurnEncoder
    from rasa_persistent_tracker.redis_client import PooledRedis
    from rasa_persistent_tracker.security.codec import Codec

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def wrap(owner: Any, name: str, label: str) -> None:
        call = getattr(owner, name)
        if inspect.iscoroutinefunction(call):
            @functools.wraps(call)
            async def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                caller = sys._getframe(1).f_code.co_name
                try:
                    return await call(*args, **kwargs)
                finally:
                    os.write(fd, f"{label}\t{time.perf_counter() - started:.9f}\t{caller}\n"
                             .encode())
        else:
            @functools.wraps(call)
            def timed(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                started = time.perf_counter()
                caller = sys._getframe(1).f_code.co_name
                try:
                    return call(*args, **kwargs)
                finally:
                    os.write(fd, f"{label}\t{time.perf_counter() - started:.9f}\t{caller}\n"
                             .encode())
        setattr(owner, name, timed)

    for owner, name, label in (
            (RedisHotState, "load", "redis load"), (RedisHotState, "commit", "redis commit"),
            (Records, "rebuild_remembered", "rebuild (remembered)"),
            (Records, "decode", "decode (stored record)"),
            (TurnEncoder, "rows", "log rows"), (TurnEncoder, "build", "build record"),
            (TurnEncoder, "encode", "encode record"), (Entries, "make", "outbox entry"),
            (window, "_compact", "compaction (in build)"),
            (AsyncEventLog, "run", "SQL call (write-through or delivery)"),
            (PooledRedis, "run_script", "  run_script"), (PooledRedis, "eval", "  redis-py eval"),
            (TurnEncoder, "_remembered", "  _remembered"), (Codec, "_pack", "  codec _pack"),
            (Codec, "encode_record", "  codec encode_record")):
        wrap(owner, name, label)


if os.environ.get(STAGES_FILE_ENV):
    _time_stages(os.environ[STAGES_FILE_ENV])
