"""Everything off the happy path: bad bytes, lost records, outages, merges.

* ``load`` retries a flapping hot state briefly and returns None if it stays
  down (the store then reads the SQL snapshot instead: degraded, never fresh).
* ``quarantined`` moves an unreadable value aside, logs one WARNING (id and
  reason, never the payload) and resumes from the snapshot or a fresh tracker.
* ``missing`` restores a record lost with Redis (restart, FLUSHALL, failover)
  from the snapshot, unless the conversation expired through inactivity.
* ``merge_base`` finds a tracker's new events when it did not come from this
  store, merging instead of overwriting.
"""
import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from rasa.shared.core.events import Event
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import window
from rasa_persistent_tracker.crypto import SNAPSHOT
from rasa_persistent_tracker.errors import (
    CorruptRecordError,
    EventLogUnavailable,
    HotStateBusy,
    HotStateUnavailable,
)
from rasa_persistent_tracker.event_log import LogRow, Snapshot
from rasa_persistent_tracker.events import EVENT_ERRORS, fingerprint, parse_event
from rasa_persistent_tracker.hot_state import HotEntry

if TYPE_CHECKING:
    from rasa_persistent_tracker.store import PersistentTrackerStore

logger = logging.getLogger("rasa_persistent_tracker.store")
_RETRY_DELAYS = (0.05, 0.2, 0.5)
# After the hot state failed (a failover, a restart), records may have lost
# their latest writes for a while; during this window retrieve also checks the
# SQL snapshot and restores a newer one.
SUSPECT_SECONDS = 120.0


class Recovery:
    """Recovery paths of one store (see the module docstring)."""

    def __init__(self, store: "PersistentTrackerStore") -> None:
        self._store = store
        self._suspect_until = 0.0

    def _id(self, sender_id: str) -> str:
        """What log lines show for a conversation (``log_conversation_ids``)."""
        return self._store._ids(sender_id)

    def suspect(self) -> None:
        """The hot state just failed: check records against SQL for a while."""
        self._suspect_until = time.monotonic() + SUSPECT_SECONDS

    @property
    def suspecting(self) -> bool:
        return time.monotonic() < self._suspect_until

    async def newer_snapshot(self, sender_id: str, next_seq: int,
                             version: int) -> Optional[DialogueStateTracker]:
        """A tracker from SQL if its snapshot is ahead of the hot record, else None."""
        try:
            snapshot = await self._snapshot(sender_id)
        except EventLogUnavailable:
            return None
        if snapshot is None or snapshot.next_seq <= next_seq:
            return None
        logger.warning("Conversation '%s': hot record is behind the SQL snapshot (a write was "
                       "lost, e.g. in a failover); restoring from the snapshot and log.",
                       self._id(sender_id))
        return await self.from_snapshot(sender_id, refill=True, snapshot=snapshot,
                                        expected=version)

    @property
    def _hot(self):
        return self._store._hot

    @property
    def _log(self):
        return self._store._log

    async def load(self, sender_id: str, known: Optional[str] = None) -> Optional[HotEntry]:
        """The hot entry (see ``HotState.load``), or None if the hot state
        stayed unreachable."""
        for delay in _RETRY_DELAYS + (None,):
            try:
                return await self._hot.load(sender_id, known)
            except HotStateBusy:
                raise  # overloaded, not down: the snapshot would only be staler
            except HotStateUnavailable as exc:
                self.suspect()
                if delay is None:
                    logger.error("Conversation '%s': %s Reading the SQL snapshot instead.",
                                 self._id(sender_id), exc)
                    return None
                await asyncio.sleep(delay)
        return None

    async def quarantine(self, sender_id: str, reason: str) -> Optional[str]:
        where = await self._hot.quarantine(sender_id, self._store.config.quarantine_ttl)
        logger.warning("Conversation '%s': stored hot state is unreadable (%s); kept as %s.",
                       self._id(sender_id), reason,
                       self._store._ids.in_text(where, sender_id) if where
                       else "nothing (already gone)")
        return where

    async def quarantined(self, sender_id: str, reason: str) -> DialogueStateTracker:
        """Quarantine the value, then resume from the snapshot (or the log) or
        start afresh."""
        await self.quarantine(sender_id, reason)
        tracker = await self.from_snapshot(sender_id, refill=True)
        if tracker is not None:
            logger.warning("Conversation '%s' resumed from its SQL snapshot and log.",
                           self._id(sender_id))
            return tracker
        tracker = self._store.init_tracker(sender_id)
        entry = await self.load(sender_id)  # undelivered rows count too
        self._store._mark(tracker, 0, await self._next_seq(
            sender_id, entry.outbox_seq if entry else 0), {})
        logger.warning("Conversation '%s' has no usable snapshot: starting a fresh session.",
                       self._id(sender_id))
        return tracker

    async def missing(self, sender_id: str, outbox_seq: int) -> Optional[DialogueStateTracker]:
        """No record: restore it unless the conversation expired."""
        try:
            snapshot = await self._snapshot(sender_id)
        except EventLogUnavailable as exc:
            logger.warning("Conversation '%s' has no hot record and its snapshot cannot be read "
                           "(%s): treating it as a new session.", self._id(sender_id), exc)
            return None
        if snapshot is None:
            return None
        config = self._store.config
        idle = time.time() - snapshot.saved_at
        if idle > max(config.record_exp, config.snapshot_resume_window):
            return None  # expired through inactivity: a new session, as Rasa would
        tracker = await self.from_snapshot(sender_id, refill=True, snapshot=snapshot)
        if tracker is not None:
            logger.warning("Conversation '%s': hot record was lost; restored from the SQL "
                           "snapshot.", self._id(sender_id))
        return tracker

    async def _snapshot(self, sender_id: str) -> Optional[Snapshot]:
        return await self._log.run(self._log.sync.snapshot, sender_id)

    async def from_snapshot(self, sender_id: str, refill: bool,
                            snapshot: Optional[Snapshot] = None,
                            expected: Optional[int] = None) -> Optional[DialogueStateTracker]:
        """Snapshot + every event after it (log and outbox), optionally written
        back to the hot state. Without a usable snapshot, the log's last session
        is replayed instead. None if there is nothing to resume from.

        Raises HotStateUnavailable if SQL is needed but down too.
        """
        try:
            snapshot = snapshot or await self._snapshot(sender_id)
            after = snapshot.next_seq - 1 if snapshot else 0
            tail = await self.all_rows(sender_id, after_seq=after)
        except EventLogUnavailable as exc:
            raise HotStateUnavailable(
                f"Conversation '{self._id(sender_id)}': the hot state is unusable and the SQL "
                f"snapshot is unreachable ({exc})") from exc
        restored = self._restore(sender_id, snapshot)
        from_log = restored is None
        if from_log:
            if snapshot is not None:  # unusable snapshot: replay the whole log
                tail = await self.all_rows(sender_id)
            if not tail:
                return None
            restored = (self._store.init_tracker(sender_id), {}, 1, None)
        tracker, cache, next_seq, previous = restored
        events = self.decode_rows(sender_id, tail)
        if len(events) < len(tail):
            # Resuming from a replay with holes could bring back an older value
            # as if it were current (and write it back): refuse it.
            logger.warning("Conversation '%s': %d event(s) after the snapshot are unreadable; "
                           "not resuming from an incomplete history.", self._id(sender_id),
                           len(tail) - len(events))
            return None
        for event in events:
            tracker.update(event)
        if tail:
            next_seq = max(next_seq, tail[-1].seq + 1)
        if from_log:
            tracker, previous = window.last_session(tracker), None
        version = expected if expected is not None else (snapshot.version if snapshot else 0)
        if refill:
            built = self._store._turns.build(tracker, self._store.domain.slots, next_seq,
                                             cache, previous)
            payload, remembered = self._store._turns.encode(built)
            try:
                version = await self._hot.commit(sender_id, version, payload,
                                                 self._store.config.record_exp, None)
                self._store._recent.put(sender_id, remembered)
            except HotStateUnavailable as exc:  # serve SQL's state; refill on a later read
                self.suspect()
                logger.warning("Conversation '%s': could not write the restored record back "
                               "to the hot state (%s).", sender_id, exc)
            cache, previous = built.kept, built.previous
        self._store._mark(tracker, version, next_seq, cache, previous)
        return tracker

    def _restore(self, sender_id: str, snapshot: Optional[Snapshot]) -> Optional[Tuple]:
        """(tracker, event cache, next seq) from a snapshot; None if unusable."""
        if snapshot is None:
            return None
        try:
            record, tracker, cache, previous = self._store._decode(
                sender_id, snapshot.payload, SNAPSHOT)
        except CorruptRecordError as exc:
            logger.warning("Conversation '%s': SQL snapshot is unreadable too (%s); "
                           "replaying the log instead.", self._id(sender_id), exc)
            return None
        # The snapshot row's next_seq may be past the record's: rows numbered
        # provisionally (SQL was down) were moved after the history.
        return tracker, cache, max(record["next_seq"], snapshot.next_seq), previous

    async def merge_base(self, tracker: DialogueStateTracker) -> Tuple[
            DialogueStateTracker, List[Event], int, int, Dict, Optional[window.Previous]]:
        """For a tracker this store did not hand out: (state, new events,
        expected version, next seq, event cache, previous base)."""
        sender_id = tracker.sender_id
        try:
            entry = await self._hot.load(sender_id)
        except HotStateBusy:
            raise
        except HotStateUnavailable:
            entry = HotEntry()  # down: merge against the log (the save goes to SQL)
        events = list(tracker.events)
        record = None
        if entry.problem:
            await self.quarantine(sender_id, entry.problem)
        elif entry.payload is not None:
            try:
                record, stored, cache, previous = self._store._decode(sender_id, entry.payload)
                behind = await self._store._fresh.behind(sender_id, record["next_seq"],
                                                         entry.outbox_seq)
                if behind:  # a replayed older record: never the base of a merge
                    raise CorruptRecordError(f"record is stale: {behind}")
            except CorruptRecordError as exc:
                await self.quarantine(sender_id, str(exc))
                record = None
        if record is not None:
            new = self._after_fingerprint(events, record["last_event"])
            if new is None:
                new = self._unknown_tail(events, record["events"])
            for event in new:
                stored.update(event)
            return stored, new, entry.version, record["next_seq"], cache, previous
        next_seq = await self._next_seq(sender_id, entry.outbox_seq)
        new = events
        if next_seq > 1:
            try:
                last = await self._last_logged(sender_id, next_seq - 1)
            except EventLogUnavailable:
                last = None
            if last is not None:
                after = self._after_fingerprint(events, fingerprint(last))
                new = events if after is None else after
        return tracker, new, 0, next_seq, {}, None

    @classmethod
    def _unknown_tail(cls, events: List[Event], stored: List[Dict[str, Any]]) -> List[Event]:
        """Events of a tracker that does not end with the stored last event
        (e.g. a history sent back without its last turn): those after the last
        one the stored window knows, minus known ones. If it knows none, events
        older than the window are logged already, never appended again."""
        known = {fingerprint(d) for d in stored}
        prints = [fingerprint(e.as_dict()) for e in events]
        last_known = max((i for i, p in enumerate(prints) if p in known), default=None)
        if last_known is not None:
            tail = list(zip(events, prints))[last_known + 1:]
        else:
            start = min((d.get("timestamp") or 0.0 for d in stored), default=0.0)
            tail = [(e, p) for e, p in zip(events, prints) if (e.timestamp or 0.0) > start]
        return [e for e, p in tail if p not in known]

    @staticmethod
    def _after_fingerprint(events: List[Event], mark: Optional[str]) -> Optional[List[Event]]:
        for i in range(len(events) - 1, -1, -1):
            if fingerprint(events[i].as_dict()) == mark:
                return events[i + 1:]
        return None

    async def _next_seq(self, sender_id: str, outbox_seq: int) -> int:
        try:
            logged = await self._log.run(self._log.sync.next_seq, sender_id)
        except EventLogUnavailable:
            # Number provisionally; delivery re-sequences on collision (event_log.append).
            logger.warning("Conversation '%s': event log unreachable, numbering new events "
                           "provisionally.", self._id(sender_id))
            logged = 1
        return max(logged, outbox_seq + 1)

    async def _last_logged(self, sender_id: str, seq: int) -> Optional[Dict[str, Any]]:
        rows = [r for r in await self.all_rows(sender_id, after_seq=seq - 1) if r.seq == seq]
        if not rows:
            return None
        try:
            return self._store._codec.loads_event(rows[0].data, sender_id, seq)
        except CorruptRecordError:
            return None

    async def all_rows(self, sender_id: str, after_seq: int = 0) -> List[LogRow]:
        """Log rows plus outbox rows not delivered yet, in sequence order."""
        # Outbox first, log second: an entry delivered between the two reads is
        # then in the log, never in neither.
        undelivered: Dict[int, LogRow] = {}
        try:
            pending = await self._hot.pending(sender_id, 100_000)
            for entry in pending.entries:
                try:
                    undelivered.update((r.seq, r) for r in
                                       self._store._outbox.entries.parse(sender_id, entry)[1])
                except (ValueError, TypeError, KeyError):
                    logger.warning("Conversation '%s': skipped an unreadable outbox entry.",
                                   self._id(sender_id))
        except HotStateUnavailable:
            logger.warning("Conversation '%s': hot state unreachable; undelivered events "
                           "are missing from this read.", self._id(sender_id))
        rows = await self._log.run(self._log.sync.read, sender_id, after_seq)
        logged = {r.seq for r in rows}
        rows.extend(r for seq, r in sorted(undelivered.items())
                    if seq > after_seq and seq not in logged)
        rows.sort(key=lambda r: r.seq)
        return rows

    async def full_session(self, sender_id: str, next_seq: int,
                           new: List[Event]) -> Optional[DialogueStateTracker]:
        """The conversation from its log (seq 1 .. next_seq - 1) plus ``new``,
        for a record whose tracker lost history to reverts; None (with a
        warning) if the log is unreachable or incomplete."""
        try:
            rows = await self.all_rows(sender_id)
        except EventLogUnavailable as exc:
            logger.warning("Conversation '%s': reverted past its hot record and the log is "
                           "unreachable (%s); older states stay summarised.", sender_id, exc)
            return None
        events = self.decode_rows(sender_id, [r for r in rows if r.seq < next_seq])
        if len(events) != next_seq - 1:
            logger.warning("Conversation '%s': reverted past its hot record and the log is "
                           "incomplete; older states stay summarised.", sender_id)
            return None
        return DialogueStateTracker.from_events(
            sender_id, events + list(new), self._store.domain.slots,
            self._store.max_event_history)

    def decode_rows(self, sender_id: str, rows: List[LogRow]) -> List[Event]:
        """Events of ``rows``; corrupt rows are skipped with a warning naming them."""
        events: List[Event] = []
        for row in rows:
            try:
                event = parse_event(self._store._codec.loads_event(row.data, sender_id,
                                                                   row.seq))
                if event is None:
                    raise CorruptRecordError("unknown event type")
            except (CorruptRecordError, *EVENT_ERRORS) as exc:
                logger.warning("Conversation '%s': skipped corrupt log row seq=%d (%s).",
                               self._id(sender_id), row.seq, exc)
                continue
            events.append(event)
        return events
