"""Retention by the month on the partitioned log: erase a month by dropping it.

``purge`` (admin/erasing.py) erases inactive conversations. On PostgreSQL a
past month can be erased whole, its partition dropped instead of its rows
deleted, when every conversation in it is inactive and none has rows in
another partition (dropping it then removes whole conversations, never part
of a history, so what stays is still numbered 1..n without gaps).

``plan`` says, for every partition of a month before the current one,
whether it qualifies: its newest event is older than the cut-off (the same
test purge applies to a conversation, ``coalesce(timestamp, 0) < cut-off``:
a NaN or infinite time never qualifies) and none of its conversations has
rows in another partition. Purge then erases the month's conversations in
the hot state (their tombstones, conditional on the version seen, as for
any purge) and calls ``drop``: in one transaction it checks again, writes
their SQL tombstones, deletes their snapshots and drops the partition. If
the check fails (a conversation came back since the plan), nothing is
written and purge erases the month's conversations row by row instead.

Why a table lock instead of the erasure's per-conversation locks
(``erasure.py``): a month holds tens of thousands of conversations, more
advisory locks than one transaction may hold. Every writer of the log reads
``rpt_erased`` (its tombstone check) before it writes, and holds that read
until it commits; ``drop`` takes ``rpt_erased`` in ``ACCESS EXCLUSIVE``
mode first, so it waits for the writers that checked already, and the ones
after it see the new tombstones. Writes wait for the transaction (a second
or two: index probes, no scan), reads of the log for the detach.
"""
import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple

import sqlalchemy as sa
from sqlalchemy import exc as sa_errors
from sqlalchemy.engine import Connection, Engine

from rasa_persistent_tracker.log import partitions
from rasa_persistent_tracker.log.erasure import CHUNK, ErasureGuard
from rasa_persistent_tracker.log.tables import SNAPSHOTS

# SQLSTATE of a lock not granted in lock_timeout.
_LOCK_NOT_AVAILABLE = "55P03"


@dataclasses.dataclass(frozen=True)
class Month:
    """A past month's partition, and whether purge may erase it whole."""

    name: str
    month: int
    rows: int
    conversation_ids: Tuple[str, ...]  # sorted; empty unless it qualifies
    reason: str = ""  # why it must stay ("": it qualifies)


def plan(engine: Engine, cutoff: float) -> List[Month]:
    """Every partition of a month before the current one (by the database
    clock), oldest first, with whether its conversations are all inactive
    before ``cutoff`` (epoch seconds) and only in it. [] on SQLite."""
    with engine.connect() as conn:
        if not partitions.is_partitioned(conn):
            return []
        current = partitions.current_month(conn)
        names = partitions.partition_names(conn)
        found: List[Month] = []
        for name in names:
            month = partitions.month_in(name)
            if month is None or month >= current:
                continue
            if not _old(conn, name, cutoff):
                found.append(Month(name, month, 0, (), "events after the cut-off"))
                continue
            counts = conn.execute(sa.text(
                f'SELECT conversation_id, count(*) FROM "{name}" GROUP BY 1')).all()
            ids = sorted(cid for cid, _ in counts)
            elsewhere = _elsewhere(conn, ids, [n for n in names if n != name])
            reason = f"{elsewhere} conversation(s) with rows in another partition" \
                if elsewhere else ""
            found.append(Month(name, month, sum(n for _, n in counts),
                               () if reason else tuple(ids), reason))
    return sorted(found, key=lambda m: m.month)


def drop(engine: Engine, guard: ErasureGuard, month: Month, cutoff: float,
         floors: Dict[str, int], now: Optional[float] = None) -> str:
    """Erase ``month`` whole: tombstones of ``floors`` (conversation -> version
    floor, from the hot state's erasure: every conversation of the month),
    their snapshots deleted, the partition dropped; one transaction. Returns
    "" when done, else why the month must stay (then nothing was written),
    also when a lock was not granted in ``partitions.LOCK_TIMEOUT``."""
    try:
        return _drop(engine, guard, month, cutoff, floors, now)
    except sa_errors.OperationalError as exc:
        if getattr(exc.orig, "pgcode", None) != _LOCK_NOT_AVAILABLE:
            raise
        return f"a lock was not granted in {partitions.LOCK_TIMEOUT} (a long query on the log?)"


def _drop(engine: Engine, guard: ErasureGuard, month: Month, cutoff: float,
          floors: Dict[str, int], now: Optional[float]) -> str:
    missing = set(month.conversation_ids) - set(floors)
    stamp = time.time() if now is None else now
    with engine.begin() as conn:
        partitions.maintenance(conn)
        # In this order: the log's writers read rpt_erased before they write.
        conn.execute(sa.text("LOCK TABLE rpt_erased IN ACCESS EXCLUSIVE MODE"))
        conn.execute(sa.text("LOCK TABLE rpt_events IN SHARE ROW EXCLUSIVE MODE"))
        conn.execute(sa.text("LOCK TABLE rpt_snapshots IN SHARE ROW EXCLUSIVE MODE"))
        names = partitions.partition_names(conn)
        if month.name not in names:
            return "no longer a partition of rpt_events"
        if missing:
            return f"{len(missing)} conversation(s) not erased"
        if not _old(conn, month.name, cutoff):
            return "events after the cut-off"
        # Rows go to the month they are written in (or the default
        # partition), never to an earlier one: only later months can have
        # received rows of these conversations since the plan.
        later = [n for n in names if (partitions.month_in(n) or month.month + 1) > month.month]
        elsewhere = _elsewhere(conn, month.conversation_ids, later)
        if elsewhere:
            return f"{elsewhere} conversation(s) with rows in another partition"
        guard.tombstone(conn, {cid: floors[cid] for cid in month.conversation_ids}, stamp)
        ids = month.conversation_ids
        for start in range(0, len(ids), CHUNK):
            conn.execute(SNAPSHOTS.delete().where(
                SNAPSHOTS.c.conversation_id.in_(ids[start:start + CHUNK])))
        conn.execute(sa.text(f'ALTER TABLE rpt_events DETACH PARTITION "{month.name}"'))
        conn.execute(sa.text(f'DROP TABLE "{month.name}"'))
    return ""


def _old(conn: Connection, name: str, cutoff: float) -> bool:
    """Every row's ``coalesce(timestamp, 0)`` is before ``cutoff`` (the time
    index answers; NaN sorts above every number, NULLs are left out)."""
    newest = conn.execute(sa.text(f'SELECT max(timestamp) FROM "{name}"')).scalar()
    return newest is None or newest < cutoff  # NaN < x is False too


def _elsewhere(conn: Connection, ids: Sequence[str], others: List[str]) -> int:
    """How many of ``ids`` have a row in one of the partitions ``others``
    (one primary-key probe per id and partition)."""
    if not ids or not others:
        return 0
    probes = " OR ".join(f'EXISTS (SELECT 1 FROM "{name}" o WHERE o.conversation_id = i.cid)'
                         for name in others)
    return conn.execute(sa.text(
        f"SELECT count(*) FROM unnest(CAST(:ids AS text[])) AS i(cid) WHERE {probes}"),
        {"ids": list(ids)}).scalar()
