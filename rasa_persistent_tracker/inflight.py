"""Work done while an awaited call waits for its reply (a Redis round trip).

``meanwhile(call, work)`` awaits ``call`` and runs ``work`` once the call's
request is on its way: the Redis client says so by calling ``sent()`` right
after writing a request, before it awaits the reply, and ``work`` then runs
there, synchronously, in the caller's task. A call that never says so (the
embedded hot state, a client without that fast path, a failover to SQL)
runs first and the work after it. The work's result or exception is kept
(``Outcome``) and counts only where the caller uses it; it runs at most once,
even if the call sends several requests (a retry).

The call is awaited in the caller's own task (no task is started): a
cancelled caller cancels the call as any await does, and nothing is left
running on its own.
"""
import contextvars
from typing import Any, Awaitable, Callable, Generic, Optional, Tuple, TypeVar

T = TypeVar("T")


class Outcome(Generic[T]):
    """What ``work()`` returned, or raised: given by ``result()`` (raised only then)."""

    __slots__ = ("_value", "_error")

    def __init__(self, work: Callable[[], T]) -> None:
        self._value: Optional[T] = None
        self._error: Optional[BaseException] = None
        try:
            self._value = work()
        except Exception as exc:  # raised where the work's result is used
            self._error = exc

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class _Pending:
    """The work of one ``meanwhile``, run once (``run``)."""

    __slots__ = ("work", "outcome")

    def __init__(self, work: Callable[[], Any]) -> None:
        self.work = work
        self.outcome: Optional[Outcome[Any]] = None

    def run(self) -> None:
        if self.outcome is None:
            self.outcome = Outcome(self.work)


_PENDING: "contextvars.ContextVar[Optional[_Pending]]" = contextvars.ContextVar(
    "rpt_inflight_pending", default=None)


def sent() -> None:
    """A request is written and its reply not awaited yet: run the work of the
    enclosing ``meanwhile`` now, if it has not run. Called by the Redis client."""
    pending = _PENDING.get()
    if pending is not None:
        pending.run()


async def meanwhile(call: Awaitable[Any], work: Callable[[], T]) -> Tuple[Any, Outcome[T]]:
    """``(await call, Outcome(work))``, the work done while the call waits."""
    pending = _Pending(work)
    token = _PENDING.set(pending)
    try:
        result = await call
    finally:
        _PENDING.reset(token)
    pending.run()  # (no-op if it ran during the call)
    return result, pending.outcome  # type: ignore[return-value]
