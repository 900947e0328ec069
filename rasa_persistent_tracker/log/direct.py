"""Saving a turn straight to the SQL log while the hot state is unreachable.

Redis is the fast path and SQL the record: when a commit to the hot state
fails (after its retries), the store writes the turn's rows and its record
(as the snapshot) to SQL in one transaction instead, and the turn succeeds.
The optimistic lock is kept, in SQL: the turn's rows take the sequence
numbers after the history the tracker was read with, so a turn committed
concurrently from the same history finds them taken (the log's unique
``(conversation_id, seq)``) or the snapshot already past them, and is refused
with ``ConcurrentSaveError``, writing nothing.

The snapshot's version moves past the version the tracker was read at, so
when Redis returns with an older record (empty, restarted, or a failover that
lost writes), ``retrieve`` finds the SQL snapshot ahead of it and restores
from SQL (newer wins, never the other way round).
"""
import logging
import time
from typing import Awaitable, Callable, List, Optional

import sqlalchemy as sa
from sqlalchemy import exc as sa_errors

from rasa_persistent_tracker.errors import (
    ConcurrentSaveError,
    EventLogUnavailable,
    HotStateUnavailable,
)
from rasa_persistent_tracker.hot.protocol import Erased
from rasa_persistent_tracker.log.event_log import AsyncEventLog, SQLEventLog
from rasa_persistent_tracker.log.tables import EVENTS, SNAPSHOTS, LogRow, Snapshot

from rasa_persistent_tracker.log.outbox import Outbox

logger = logging.getLogger("rasa_persistent_tracker.store")


def commit(log: SQLEventLog, conversation_id: str, rows: List[LogRow], snapshot: Snapshot,
           expected_version: int) -> int:
    """Append ``rows`` and replace the snapshot, atomically, if nothing was
    logged at or after the first row's number. Returns the new version.

    An erased conversation (``erasure.py``): a tracker read before the
    erasure is refused, a new one counts its versions on from the floor.

    Raises:
        ConcurrentSaveError: the log or snapshot is past this turn's history.
        Erased: the conversation was erased after the tracker was read.
    """
    first = rows[0].seq
    try:
        with log.engine.begin() as conn:
            floor = log.erasure.guard(conn, [conversation_id]).get(conversation_id)
            if floor is not None and 0 < expected_version <= floor:
                raise Erased(conversation_id, floor)  # read before the erasure
            current = conn.execute(
                sa.select(SNAPSHOTS.c.next_seq, SNAPSHOTS.c.version).where(
                    SNAPSHOTS.c.conversation_id == conversation_id).with_for_update()).first()
            if current is not None and current.next_seq > first:
                raise ConcurrentSaveError(conversation_id, expected_version, current.version)
            conn.execute(EVENTS.insert(), [
                {"conversation_id": conversation_id, **row.as_dict()} for row in rows])
            version = max(expected_version, current.version if current else 0,
                          floor or 0) + 1
            values = {"next_seq": snapshot.next_seq, "version": version,
                      "saved_at": snapshot.saved_at, "payload": snapshot.payload}
            if current is None:
                conn.execute(SNAPSHOTS.insert().values(conversation_id=conversation_id,
                                                       **values))
            else:
                conn.execute(SNAPSHOTS.update().where(
                    SNAPSHOTS.c.conversation_id == conversation_id).values(**values))
    except sa_errors.IntegrityError as exc:
        # Rows at these numbers exist already (a concurrent turn), or another
        # writer inserted the first snapshot first.
        raise ConcurrentSaveError(conversation_id, expected_version, None) from exc
    return version


async def save(log: AsyncEventLog, conversation_id: str, rows: List[LogRow], payload: str,
               expected_version: int, cause: HotStateUnavailable) -> int:
    """``commit`` off the event loop. Raises ConcurrentSaveError, or
    HotStateUnavailable (naming both causes) if SQL is unreachable too."""
    snapshot = Snapshot(next_seq=rows[-1].seq + 1, version=0, saved_at=time.time(),
                        payload=payload)
    try:
        version = await log.run(commit, log.sync, conversation_id, rows, snapshot,
                                expected_version)
    except EventLogUnavailable as exc:
        raise HotStateUnavailable(f"{cause} The SQL log is unreachable too ({exc}); the turn "
                                  f"was not stored.") from exc
    logger.warning("Conversation '%s': hot state unreachable (%s); turn saved straight to the "
                   "SQL log.", conversation_id, cause)
    return version


async def write_through(outbox: Outbox, log: AsyncEventLog, conversation_id: str,
                        rows: List[LogRow], payload: str, version: int,
                        unlogged: Optional[Callable[[], Awaitable[List[LogRow]]]] = None
                        ) -> None:
    """Put a turn just committed to the hot state (and the turns queued before
    it) into SQL before save returns (``sync_log``, ``sync_actions``).

    The outbox delivers them. If that moved fewer rows than this turn has -
    the hot state failed right after the commit, or a restarted Redis handed
    back an empty outbox (so the turn reaches SQL only if the old Redis had
    not lost it) - the turn's own rows and record are appended from memory
    (idempotent: a later delivery of the same entry skips them), after
    ``unlogged()``: the rows of earlier turns the log lacks, whose entries
    the failed outbox held. If SQL is down, the rows wait in the outbox.
    """
    try:
        if await outbox.deliver([conversation_id]) >= len(rows):
            return
    except EventLogUnavailable as exc:
        logger.warning("Conversation '%s': event log unreachable, rows kept in the outbox "
                       "for delivery later (%s).", conversation_id, exc)
        return
    except HotStateUnavailable:
        pass  # the turn's rows are in memory: append them below
    if unlogged is not None:
        rows = await unlogged() + rows
    snapshot = Snapshot(next_seq=rows[-1].seq + 1, version=version, saved_at=time.time(),
                        payload=payload)
    try:
        await log.run(log.sync.deliver, {conversation_id: [r.as_dict() for r in rows]},
                      {conversation_id: snapshot}, {conversation_id: version})
    except EventLogUnavailable as exc:
        logger.warning("Conversation '%s': event log unreachable, rows kept in the outbox "
                       "for delivery later (%s).", conversation_id, exc)
