"""``erase`` and ``purge``: the right to erasure, and retention (issue 16).

``erase_batch`` removes every trace of some conversations, per place: the
hot record and its outbox (with the tombstone written in the same atomic
step, ``HotState.erase``), then the SQL log rows and snapshot (with the SQL
tombstone, in one transaction, ``log.erasure.ErasureGuard.erase``), then
quarantined copies. The tombstones make sure nothing brings a conversation
back: a save from a tracker read before the erasure, or a delivery of outbox
rows queued before it, in any process, is refused. The sender's next
message starts a new conversation, as usual.

``purge`` erases, through the same ``erase_batch``, every conversation whose
newest logged event is older than a cut-off, in batches in id order. A
conversation that became active again since it was selected is skipped:
its outbox holds undelivered turns, its log has a newer event, or its hot
record's version moved between the check and the erasure (the erasure is
conditional on the version seen). A turn whose save comes after the erasure
is refused like any late write; its conversation is gone and the sender's
next message starts fresh. Interrupted, it is simply run again: the
conversations it erased are gone, the rest are selected again.

On the partitioned PostgreSQL log ``purge`` first erases whole past months
(``log/retention.py``): a month whose conversations are all inactive and have
no rows in another month has them erased in the hot state, batch by batch as
above, and then its partition dropped, with their SQL tombstones and
snapshots, in one transaction, instead of their rows deleted. If the month
cannot go whole after all (a conversation active again, or a lock not
granted), the conversations already erased in the hot state are erased row
by row and the partition stays. The current month, the default partition
and the months ahead are never dropped.
"""
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Set

import sqlalchemy as sa

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.admin.erasure_report import Erasure, MonthDrop, Places, Totals
from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.errors import ConfigError
from rasa_persistent_tracker.hot.protocol import HotEntry
from rasa_persistent_tracker.log import retention
from rasa_persistent_tracker.log.erasure import CHUNK, ErasureGuard
from rasa_persistent_tracker.log.tables import EVENTS, SNAPSHOTS, loggable

# How many outbox entries the survey counts per conversation (more is shown as this).
_OUTBOX_COUNT_LIMIT = 100_000
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0}
_DURATION = re.compile(r"^\s*(\d+)\s*([dhm])\s*$")


def parse_duration(text: str, option: str = "--inactive-for") -> float:
    """``90d``, ``12h``, ``30m`` as seconds. Raises ConfigError naming ``text``."""
    match = _DURATION.match(text or "")
    if not match or int(match.group(1)) == 0:
        raise ConfigError(f"{option} {text!r} is not a duration: use a positive whole "
                          f"number of days, hours or minutes, like 90d, 12h or 30m.")
    return int(match.group(1)) * _UNITS[match.group(2)]


def tombstone_ttl(config: StoreConfig) -> float:
    """How long a tombstone is kept: as long as an outbox entry or a hot record
    of the erased conversation could still be written back (``quarantine_ttl``
    is the outbox's TTL), whichever is longer."""
    return max(config.quarantine_ttl, config.record_exp)



class Eraser:
    """Erases conversations of one store (see the module docstring).

    Args:
        backends: the store's storage.
        raw: direct access to the hot state's quarantine copies.
        clock: the time tombstones are stamped with (tests).
    """

    def __init__(self, backends: Backends, raw: RawHotAccess,
                 clock: Callable[[], float] = time.time) -> None:
        self._backends = backends
        self._raw = raw
        self._clock = clock
        self._guard: ErasureGuard = backends.log.sync.erasure
        self._engine: sa.engine.Engine = backends.log.sync.engine
        self._ttl = tombstone_ttl(backends.config)

    def _sql(self, fn: Callable, *args: object):
        return self._backends.log.run(fn, *args)

    async def erase_batch(self, ids: Sequence[str], dry_run: bool = False,
                          only_at: Optional[Dict[str, int]] = None,
                          command: str = "erase",
                          loaded: Optional[Dict[str, HotEntry]] = None) -> List[Erasure]:
        """Erase ``ids`` (dry run: only report). With ``only_at`` (id -> hot
        version, 0: no record), an id whose hot record is at another version
        now is skipped, untouched. ``loaded``: the ids' hot entries, just read
        (purge), so the survey need not read them again."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        found, copies, versions = await self._survey(ids, loaded)
        if dry_run:
            return list(found.values())
        floors = await self._erase_hot(found, versions, only_at)
        if floors:
            sql_removed = await self._sql(self._erase_sql, floors)
            for cid, (rows, snapshot) in sql_removed.items():
                found[cid].places.log_rows, found[cid].places.snapshots = rows, int(snapshot)
            await self._finish(found, floors, copies, command)
        return list(found.values())

    async def _survey(self, ids: List[str], loaded: Optional[Dict[str, HotEntry]] = None
                      ) -> "tuple[Dict[str, Erasure], Dict[str, list], Dict[str, int]]":
        """(id -> what is stored of it, id -> its quarantined copies, id ->
        snapshot version)."""
        hot = self._backends.hot
        found = {cid: Erasure(cid) for cid in ids}
        copies = await self._raw.copies_of(ids)
        logged, versions = await self._sql(_logged, self._engine, ids)
        for cid, e in found.items():
            entry = loaded[cid] if loaded and cid in loaded else await hot.load(cid)
            # Purge read the entries just now and erases only those with no
            # turn waiting (outbox_seq 0); a turn since then moves the version
            # and the erasure skips it. Two round trips per conversation less.
            waiting = 0 if loaded and cid in loaded and not entry.outbox_seq else len(
                (await hot.pending(cid, _OUTBOX_COUNT_LIMIT)).entries)
            rows, snapshot = logged.get(cid, (0, False))
            e.places = Places(
                int(entry.payload is not None or entry.problem is not None), waiting,
                len(copies.get(cid, [])), rows, int(snapshot))
        return found, copies, versions

    async def _erase_hot(self, found: Dict[str, Erasure], versions: Dict[str, int],
                         only_at: Optional[Dict[str, int]]) -> Dict[str, int]:
        """The hot state's step (record, outbox, hot tombstone) for each of
        ``found``; returns id -> version floor for those erased."""
        floors: Dict[str, int] = {}
        for cid, e in found.items():
            if not e.found and only_at is None:
                continue  # nothing stored: no tombstone for an id that never existed
            removed = await self._backends.hot.erase(
                cid, versions.get(cid, 0), self._ttl,
                None if only_at is None else only_at.get(cid, 0))
            if removed.floor is None:
                e.skipped = "its hot record changed since it was selected"
                continue
            floors[cid] = removed.floor
            # What was there at the erasure itself (a turn may have come since the survey).
            e.places.records, e.places.outbox_entries = int(removed.record), \
                removed.outbox_entries
        return floors

    async def _finish(self, found: Dict[str, Erasure], floors: Dict[str, int],
                      copies: Dict[str, list], command: str) -> None:
        """The last step, after SQL's: quarantined copies; metrics."""
        await self._raw.delete_copies([ref for cid in floors for ref in copies.get(cid, [])])
        erased = sum(found[cid].found for cid in floors)
        metrics.ERASURES.labels(command).inc(erased)
        if command == "purge":
            metrics.PURGED.inc(erased)

    def _erase_sql(self, floors: Dict[str, int]) -> Dict[str, "tuple[int, bool]"]:
        with self._engine.begin() as conn:
            return self._guard.erase(conn, floors, self._clock())

    async def purge(self, inactive_for: float, batch: int, dry_run: bool = False,
                    report: Callable[[List[Erasure]], None] = lambda _batch: None,
                    report_month: Callable[[MonthDrop], None] = lambda _month: None
                    ) -> Totals:
        """Erase every conversation without an event for ``inactive_for`` seconds,
        ``batch`` at a time: first whole past months (partitioned log), then
        the rest. ``report`` gets each batch's erasures, ``report_month``
        what became of each past month's partition."""
        cutoff = self._clock() - inactive_for
        totals, after = Totals(), ""
        done: Set[str] = set()
        for month in await self._sql(retention.plan, self._engine, cutoff):
            erasures, outcome = await self._purge_month(month, cutoff, batch, dry_run)
            for start in range(0, len(erasures), batch):
                totals.add(erasures[start:start + batch])
                report(erasures[start:start + batch])
            done.update(e.conversation_id for e in erasures)
            totals.months.append(outcome)
            report_month(outcome)
        while True:
            ids = await self._sql(_inactive, self._engine, cutoff, after, batch, None)
            if not ids:
                break
            after = ids[-1]
            ids = [cid for cid in ids if cid not in done]  # met with its month above
            erasures = await self._purge_batch(ids, cutoff, dry_run) if ids else []
            totals.add(erasures)
            report(erasures)
        if not dry_run:  # tombstones past their time guard nothing any more
            await self._sql(self._forget_tombstones, self._clock() - self._ttl)
        return totals

    async def _purge_month(self, month: retention.Month, cutoff: float, batch: int,
                           dry_run: bool) -> "tuple[List[Erasure], MonthDrop]":
        """Erase a past month whole if it qualifies: its conversations in the
        hot state, batch by batch (conditional on the version seen, as any
        purge), then tombstones and the partition's drop in one SQL
        transaction (``log/retention.py``). If it cannot go whole after all,
        the conversations erased in the hot state are erased row by row."""
        ids = list(month.conversation_ids)
        if month.reason or dry_run:
            return [], MonthDrop(month.name, month.rows, len(ids), not month.reason,
                                 month.reason)
        found: Dict[str, Erasure] = {}
        copies: Dict[str, list] = {}
        floors: Dict[str, int] = {}
        skipped: List[Erasure] = []
        for start in range(0, len(ids), batch):
            seen, waiting, loaded = await self._hot_versions(ids[start:start + batch])
            skipped += waiting
            if not seen:
                continue
            part, part_copies, versions = await self._survey(list(seen), loaded)
            floors.update(await self._erase_hot(part, versions, seen))
            found.update(part)
            copies.update(part_copies)
        active = len(skipped) + sum(1 for e in found.values() if e.skipped)
        reason = f"{active} conversation(s) active again" if active else await self._sql(
            retention.drop, self._engine, self._guard, month, cutoff, floors, self._clock())
        if reason:
            erased = sorted(floors)
            for start in range(0, len(erased), batch):
                chunk = {cid: floors[cid] for cid in erased[start:start + batch]}
                for cid, (rows, snapshot) in (await self._sql(self._erase_sql, chunk)).items():
                    found[cid].places.log_rows = rows
                    found[cid].places.snapshots = int(snapshot)
        else:
            metrics.DROPPED_PARTITIONS.inc()
        await self._finish(found, floors, copies, "purge")
        return list(found.values()) + skipped, MonthDrop(month.name, month.rows, len(ids),
                                                          not reason, reason)

    async def _hot_versions(self, ids: List[str]
                            ) -> "tuple[Dict[str, int], List[Erasure], Dict[str, HotEntry]]":
        """(id -> hot version to erase at, 0: no record; those skipped because
        turns wait in their outbox; id -> the entry read)."""
        seen: Dict[str, int] = {}
        skipped: List[Erasure] = []
        loaded: Dict[str, HotEntry] = {}
        for cid in ids:
            entry = loaded[cid] = await self._backends.hot.load(cid)
            if entry.outbox_seq:
                skipped.append(Erasure(cid, skipped="turns waiting in its outbox"))
            else:
                seen[cid] = entry.version if (entry.payload is not None or entry.unchanged) else 0
        return seen, skipped, loaded

    async def _purge_batch(self, ids: List[str], cutoff: float,
                           dry_run: bool) -> List[Erasure]:
        seen, skipped, loaded = await self._hot_versions(ids)
        # Checked again after reading the versions: a turn logged between the
        # selection and the reads above shows here, one after them changes
        # the version the erasure is conditional on.
        still = set(await self._sql(_inactive, self._engine, cutoff, "", len(seen) or 1,
                                    list(seen)))
        skipped += [Erasure(cid, skipped="a newer event was logged") for cid in seen
                    if cid not in still]
        erasures = await self.erase_batch([cid for cid in seen if cid in still], dry_run,
                                          only_at=seen, command="purge", loaded=loaded)
        return erasures + skipped

    def _forget_tombstones(self, moment: float) -> int:
        with self._engine.begin() as conn:
            return self._guard.forget_before(conn, moment)


def _logged(engine: sa.engine.Engine, ids: Sequence[str]
            ) -> "tuple[Dict[str, tuple[int, bool]], Dict[str, int]]":
    """(id -> (log rows, has a snapshot), id -> snapshot version) for ``ids``."""
    rows: Dict[str, int] = {}
    versions: Dict[str, int] = {}
    ok = [cid for cid in ids if loggable(cid)]
    with engine.connect() as conn:
        for start in range(0, len(ok), CHUNK):
            chunk = ok[start:start + CHUNK]
            rows.update(conn.execute(sa.select(EVENTS.c.conversation_id, sa.func.count()).where(
                EVENTS.c.conversation_id.in_(chunk)).group_by(EVENTS.c.conversation_id)).all())
            versions.update(conn.execute(sa.select(SNAPSHOTS.c.conversation_id,
                                                   SNAPSHOTS.c.version).where(
                SNAPSHOTS.c.conversation_id.in_(chunk))).all())
    return {cid: (int(rows.get(cid, 0)), cid in versions) for cid in ok}, \
        {cid: int(v) for cid, v in versions.items()}


def _inactive(engine: sa.engine.Engine, cutoff: float, after: str, limit: int,
              among: Optional[List[str]]) -> List[str]:
    """Up to ``limit`` ids after ``after`` (or ``among``), in id order, whose
    newest logged event is older than ``cutoff``."""
    newest = sa.func.max(sa.func.coalesce(EVENTS.c.timestamp, 0.0))
    query = sa.select(EVENTS.c.conversation_id).group_by(EVENTS.c.conversation_id).having(
        newest < cutoff).order_by(EVENTS.c.conversation_id).limit(limit)
    if among is not None:
        if not among:
            return []
        query = query.where(EVENTS.c.conversation_id.in_(among))
    else:
        query = query.where(EVENTS.c.conversation_id > after)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())
