"""Delivery when the process exits: the turns of the last moments reach SQL.

Rasa never closes a tracker store: on SIGTERM/SIGINT (and when ``rasa shell``
quits) Sanic stops the event loop and the interpreter exits, leaving the
background delivery task abandoned. The rows are safe in the outbox, and the
next process delivers them at start-up, but an operator who stops the bot and
exports the log expects every answered turn to be there.

``deliver_on_exit`` registers a hook that runs when the interpreter shuts
down, before ``concurrent.futures`` stops its thread pools (so the SQL worker
threads still run): it delivers, on a fresh event loop and within 10 s in all,
whatever this process saved and did not deliver yet. ``kill -9`` skips it;
the next start-up delivers those rows instead.
"""
import asyncio
import logging
import threading
import time
import weakref
from typing import Any, Dict

logger = logging.getLogger("rasa_persistent_tracker.store")

EXIT_DELIVERY_TIMEOUT = 10.0
# Outboxes with a hook registered (weakly: a store that is gone needs none).
_HOOKED: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_HOT: Dict[int, Any] = {}
_registered = False


def deliver_on_exit(outbox: Any, hot: Any) -> None:
    """Deliver ``outbox``'s undelivered rows when the interpreter exits."""
    global _registered
    _HOOKED[id(outbox)] = outbox
    _HOT[id(outbox)] = weakref.ref(hot)
    weakref.finalize(outbox, _HOT.pop, id(outbox), None)
    if not _registered:
        try:
            # Runs before concurrent.futures shuts its executors down; a plain
            # atexit hook would run after, when no SQL work can be scheduled.
            threading._register_atexit(_deliver_all)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # another Python, or already exiting
            return
        _registered = True


def forget(outbox: Any) -> None:
    """The store was closed (it delivered already): no exit delivery."""
    _HOOKED.pop(id(outbox), None)
    _HOT.pop(id(outbox), None)


def _deliver_all() -> None:
    # One time budget for all stores: an exit must not hang on a server that
    # is gone (the rows stay queued for the next start).
    deadline = time.monotonic() + EXIT_DELIVERY_TIMEOUT
    for key, outbox in list(_HOOKED.items()):
        hot_ref = _HOT.get(key)
        hot = hot_ref() if hot_ref is not None else None
        left = deadline - time.monotonic()
        if hot is None or not outbox.undelivered() or left <= 0:
            continue
        try:
            moved = asyncio.run(_deliver(outbox, hot, left))
            logger.info("Delivered %d event(s) to the SQL log at exit.", moved)
        except Exception as exc:  # the rows stay in the outbox for the next start
            logger.warning("Could not deliver the last turns to the SQL log at exit (%s); "
                           "they stay queued and are delivered when the bot starts again.",
                           type(exc).__name__)


async def _deliver(outbox: Any, hot: Any, timeout: float) -> int:
    try:
        return await asyncio.wait_for(outbox.deliver_at_exit(), timeout)
    finally:
        await hot.close()
