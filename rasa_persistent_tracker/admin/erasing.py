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
"""
import dataclasses
import re
import time
from typing import Callable, Dict, List, Optional, Sequence

import sqlalchemy as sa

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.errors import ConfigError
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


@dataclasses.dataclass
class Places:
    """Counts per place a conversation is stored in."""

    records: int = 0
    outbox_entries: int = 0
    quarantined: int = 0
    log_rows: int = 0
    snapshots: int = 0

    def text(self) -> str:
        return (f"hot record {self.records}, outbox entries {self.outbox_entries}, "
                f"quarantined copies {self.quarantined}, log rows {self.log_rows}, "
                f"snapshot {self.snapshots}")

    def add(self, other: "Places") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass
class Erasure:
    """What was (or, in a dry run, would be) removed of one conversation."""

    conversation_id: str
    places: Places = dataclasses.field(default_factory=Places)
    skipped: Optional[str] = None  # why it was left alone (purge: active again)

    @property
    def found(self) -> bool:
        return any(dataclasses.astuple(self.places))

    def line(self, dry_run: bool) -> str:
        if self.skipped:
            return f"skipped '{self.conversation_id}': {self.skipped}"
        if not self.found:
            return f"'{self.conversation_id}': nothing found (no hot record, outbox entries, " \
                   f"quarantined copies, log rows or snapshot)"
        verb = "would erase" if dry_run else "erased"
        return f"{verb} '{self.conversation_id}': {self.places.text()}"


@dataclasses.dataclass
class Totals:
    """Sums over many ``Erasure``s, for the summary line."""

    erased: int = 0
    missing: int = 0
    skipped: int = 0
    places: Places = dataclasses.field(default_factory=Places)

    def add(self, erasures: Sequence[Erasure]) -> None:
        for erasure in erasures:
            if erasure.skipped:
                self.skipped += 1
            elif not erasure.found:
                self.missing += 1
            else:
                self.erased += 1
                self.places.add(erasure.places)

    def summary(self, what: str, dry_run: bool) -> str:
        verb = "would erase" if dry_run else "erased"
        line = f"{what}: {verb} {self.erased} conversation(s) ({self.places.text()})"
        if self.missing:
            line += f"; {self.missing} not found"
        if self.skipped:
            line += f"; {self.skipped} skipped (active again)"
        return line + ("; dry run, nothing removed" if dry_run else "")


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
        self._ttl = tombstone_ttl(backends.config)

    def _sql(self, fn: Callable, *args: object):
        return self._backends.log.run(fn, *args)

    async def erase_batch(self, ids: Sequence[str], dry_run: bool = False,
                          only_at: Optional[Dict[str, int]] = None,
                          command: str = "erase") -> List[Erasure]:
        """Erase ``ids`` (dry run: only report). With ``only_at`` (id -> hot
        version, 0: no record), an id whose hot record is at another version
        now is skipped, untouched."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        hot = self._backends.hot
        found = {cid: Erasure(cid) for cid in ids}
        copies = await self._raw.copies_of(ids)
        logged, versions = await self._sql(_logged, self._backends.log.sync.engine, ids)
        for cid, e in found.items():
            entry = await hot.load(cid)
            rows, snapshot = logged.get(cid, (0, False))
            e.places = Places(
                int(entry.payload is not None or entry.problem is not None),
                len((await hot.pending(cid, _OUTBOX_COUNT_LIMIT)).entries),
                len(copies.get(cid, [])), rows, int(snapshot))
        if dry_run:
            return list(found.values())
        floors: Dict[str, int] = {}
        for cid, e in found.items():
            if not e.found and only_at is None:
                continue  # nothing stored: no tombstone for an id that never existed
            removed = await hot.erase(cid, versions.get(cid, 0), self._ttl,
                                      None if only_at is None else only_at.get(cid, 0))
            if removed.floor is None:
                e.skipped = "its hot record changed since it was selected"
                continue
            floors[cid] = removed.floor
            # What was there at the erasure itself (a turn may have come since the survey).
            e.places.records, e.places.outbox_entries = int(removed.record), \
                removed.outbox_entries
        if floors:
            sql_removed = await self._sql(self._erase_sql, floors)
            for cid, (rows, snapshot) in sql_removed.items():
                found[cid].places.log_rows, found[cid].places.snapshots = rows, int(snapshot)
            await self._raw.delete_copies([ref for cid in floors for ref in copies.get(cid, [])])
            erased = sum(found[cid].found for cid in floors)
            metrics.ERASURES.labels(command).inc(erased)
            if command == "purge":
                metrics.PURGED.inc(erased)
        return list(found.values())

    def _erase_sql(self, floors: Dict[str, int]) -> Dict[str, "tuple[int, bool]"]:
        with self._backends.log.sync.engine.begin() as conn:
            return self._guard.erase(conn, floors, self._clock())

    async def purge(self, inactive_for: float, batch: int, dry_run: bool = False,
                    report: Callable[[List[Erasure]], None] = lambda _batch: None) -> Totals:
        """Erase every conversation without an event for ``inactive_for`` seconds,
        ``batch`` at a time; ``report`` gets each batch's erasures."""
        cutoff = self._clock() - inactive_for
        totals, after = Totals(), ""
        engine = self._backends.log.sync.engine
        while True:
            ids = await self._sql(_inactive, engine, cutoff, after, batch, None)
            if not ids:
                break
            after = ids[-1]
            erasures = await self._purge_batch(engine, ids, cutoff, dry_run)
            totals.add(erasures)
            report(erasures)
        if not dry_run:  # tombstones past their time guard nothing any more
            await self._sql(self._forget_tombstones, self._clock() - self._ttl)
        return totals

    async def _purge_batch(self, engine: sa.engine.Engine, ids: List[str], cutoff: float,
                           dry_run: bool) -> List[Erasure]:
        seen: Dict[str, int] = {}
        skipped: List[Erasure] = []
        for cid in ids:
            entry = await self._backends.hot.load(cid)
            if entry.outbox_seq:
                skipped.append(Erasure(cid, skipped="turns waiting in its outbox"))
            else:
                seen[cid] = entry.version if (entry.payload is not None or entry.unchanged) else 0
        # Checked again after reading the versions: a turn logged between the
        # selection and the reads above shows here, one after them changes
        # the version the erasure is conditional on.
        still = set(await self._sql(_inactive, engine, cutoff, "", len(seen) or 1, list(seen)))
        skipped += [Erasure(cid, skipped="a newer event was logged") for cid in seen
                    if cid not in still]
        erasures = await self.erase_batch([cid for cid in seen if cid in still], dry_run,
                                          only_at=seen, command="purge")
        return erasures + skipped

    def _forget_tombstones(self, moment: float) -> int:
        with self._backends.log.sync.engine.begin() as conn:
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
