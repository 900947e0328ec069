"""Tombstones of erased conversations in the SQL log, and the erasing itself.

An erased conversation leaves one ``rpt_erased`` row, named by a digest of
its id (``security.erasure``), holding a version *floor*: every version the
conversation had is at or below it. Writes that carry the version they were
made at (outbox delivery: the record's version; a direct save: the version
the tracker was read at) and are at or below the floor come from before the
erasure, and are refused; a new conversation under the same id counts its
versions on from the floor, so its writes pass.

Check and write must not interleave with an erasure: ``ErasureGuard.guard``
takes a per-conversation lock first in the writing transaction (PostgreSQL:
a transaction-level advisory lock; SQLite: the database's write lock, taken
by a no-op UPDATE as the first statement, so the check reads what the write
will follow). Writers take it exclusively too, not only the erasure: two
deliverers of one conversation's rows then take turns, and the second finds
the rows the first committed instead of racing it to the unique key.
"""
import time
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import sqlalchemy as sa

from rasa_persistent_tracker.log.tables import ERASED, EVENTS, SNAPSHOTS, loggable
from rasa_persistent_tracker.security.erasure import ErasureIds

# Arbitrary constant: the advisory lock class of conversation erasure locks
# (the migrations' lock uses the one-number form, a separate key space).
_LOCK_CLASS = 0x52505445
# Ids per IN (...) statement: under every backend's limit on bound parameters.
CHUNK = 400


def _lock_id(conversation_id: str) -> int:
    """A signed 32-bit lock number; a collision only serialises two conversations."""
    value = zlib.crc32(conversation_id.encode("utf-8", "surrogatepass"))
    return value - (1 << 32) if value >= 1 << 31 else value


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


class ErasureGuard:
    """Tombstone reads and writes for one event log.

    Args:
        digests: conversation id -> tombstone names (``ErasureIds``).
    """

    def __init__(self, digests: Callable[[str], List[str]] = ErasureIds()) -> None:
        self._digests = digests

    def lock(self, conn: sa.engine.Connection, conversation_ids: Iterable[str]) -> None:
        """Take the conversations' locks (exclusive) for the rest of the transaction."""
        if conn.dialect.name == "postgresql":
            locks = sorted({_lock_id(cid) for cid in conversation_ids})
            if not locks:
                return
            # One statement for a whole batch, taking the locks in order (no
            # deadlock between two batches that share conversations).
            conn.execute(sa.text(
                "SELECT count(pg_advisory_xact_lock(:c, o)) FROM (SELECT o FROM "
                "unnest(CAST(:locks AS integer[])) AS o ORDER BY o) AS ordered"),
                {"c": _LOCK_CLASS, "locks": locks})
        elif conn.dialect.name == "sqlite":
            conn.execute(ERASED.update().where(ERASED.c.name == "").values(floor=ERASED.c.floor))

    def floors(self, conn: sa.engine.Connection,
               conversation_ids: Iterable[str]) -> Dict[str, int]:
        """Conversation -> its tombstone's floor, for those that have one."""
        owner = {name: cid for cid in conversation_ids for name in self._digests(cid)}
        found: Dict[str, int] = {}
        for names in _chunks(sorted(owner)):
            for name, floor in conn.execute(sa.select(ERASED.c.name, ERASED.c.floor).where(
                    ERASED.c.name.in_(names))):
                cid = owner[name]
                found[cid] = max(found.get(cid, 0), int(floor))
        return found

    def guard(self, conn: sa.engine.Connection,
              conversation_ids: Iterable[str]) -> Dict[str, int]:
        """``lock`` + ``floors``: call first in a writing transaction."""
        ids = list(conversation_ids)
        self.lock(conn, ids)
        return self.floors(conn, ids)

    def erase(self, conn: sa.engine.Connection, floors: Dict[str, int],
              now: Optional[float] = None) -> Dict[str, "tuple[int, bool]"]:
        """Tombstone and delete the conversations ``floors`` names (set-based:
        a few statements per ``CHUNK`` ids). Returns conversation -> (log rows
        deleted, snapshot deleted). Call in a transaction of its own."""
        ids = sorted(cid for cid in floors if loggable(cid))
        self.lock(conn, ids)
        self.tombstone(conn, {cid: floors[cid] for cid in ids}, now)
        removed: Dict[str, "tuple[int, bool]"] = {cid: (0, False) for cid in ids}
        for chunk in _chunks(ids):
            counts = dict(conn.execute(
                sa.select(EVENTS.c.conversation_id, sa.func.count()).where(
                    EVENTS.c.conversation_id.in_(chunk)).group_by(EVENTS.c.conversation_id)).all())
            snapped = set(conn.execute(sa.select(SNAPSHOTS.c.conversation_id).where(
                SNAPSHOTS.c.conversation_id.in_(chunk))).scalars())
            conn.execute(EVENTS.delete().where(EVENTS.c.conversation_id.in_(chunk)))
            conn.execute(SNAPSHOTS.delete().where(SNAPSHOTS.c.conversation_id.in_(chunk)))
            removed.update({cid: (int(counts.get(cid, 0)), cid in snapped) for cid in chunk})
        return removed

    def tombstone(self, conn: sa.engine.Connection, floors: Dict[str, int],
                  now: Optional[float] = None) -> None:
        """Write (or raise) the tombstones of the conversations ``floors``
        names, keeping a higher floor already there. The caller excludes
        writers of these conversations (``lock``, or a table lock on
        ``rpt_erased``: log/retention.py)."""
        ids = sorted(cid for cid in floors if loggable(cid))
        known = self.floors(conn, ids)
        stamp = time.time() if now is None else now
        tombstones = [{"name": name, "floor": max(floors[cid], known.get(cid, 0)),
                       "erased_at": stamp} for cid in ids for name in self._digests(cid)]
        for names in _chunks([t["name"] for t in tombstones]):
            conn.execute(ERASED.delete().where(ERASED.c.name.in_(names)))
        if tombstones:
            conn.execute(ERASED.insert(), tombstones)

    @staticmethod
    def forget_before(conn: sa.engine.Connection, moment: float) -> int:
        """Delete tombstones written before ``moment``; return how many."""
        return conn.execute(ERASED.delete().where(ERASED.c.erased_at < moment)).rowcount
