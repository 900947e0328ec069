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
