"""Work done while an awaited call waits for its reply (a Redis round trip).

``meanwhile(call, work)`` starts ``call`` as a task, lets it run up to its
first wait (for a script call: the request is sent, the reply awaited), runs
``work`` synchronously, then awaits the call. The work's result or exception
is kept (``Outcome``) and counts only where the caller uses it. The call is
never left running on its own: if the caller is cancelled or fails in
between, the task is cancelled too.
"""
import asyncio
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


async def meanwhile(call: Awaitable[Any], work: Callable[[], T]) -> Tuple[Any, Outcome[T]]:
    """``(await call, Outcome(work))``, the work done while the call waits."""
    task = asyncio.ensure_future(call)
    try:
        await asyncio.sleep(0)  # the call runs up to awaiting its reply
        done = Outcome(work)
        return await task, done
    except BaseException:
        task.cancel()  # (done already: no-op) never left running on its own
        raise
