"""Everything off the happy path of a read: bad bytes, lost records, outages.

* ``load`` retries a flapping hot state briefly and returns None if it stays
  down (the store then reads the SQL snapshot instead: degraded, never fresh).
* ``resume_after_quarantine`` moves an unreadable value aside, logs one
  WARNING (id and reason, never the payload) and resumes from the snapshot or
  a fresh tracker.
* ``restore_lost_record`` restores a record lost with Redis (restart,
  FLUSHALL, failover) from the snapshot, unless the conversation expired.
* ``read_while_down`` serves a read from SQL while the hot state is down.
* ``from_snapshot`` rebuilds a conversation from its SQL snapshot and the
  events after it, optionally writing the record back to the hot state.

Merging foreign trackers is ``merging.py``, reading the log ``history.py``,
the fallbacks of a save ``committing.py``.
"""
import asyncio
import logging
import time
from typing import List, NamedTuple, Optional

from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.errors import (
    CorruptRecordError,
    EventLogUnavailable,
    HotStateBusy,
    HotStateUnavailable,
)
from rasa_persistent_tracker.hot.protocol import HotEntry, HotState
from rasa_persistent_tracker.log.tables import LogRow, Snapshot
from rasa_persistent_tracker.logids import ConversationIds
from rasa_persistent_tracker.record import stored, window
from rasa_persistent_tracker.record.freshness import Suspicion
from rasa_persistent_tracker.record.trackers import Records
from rasa_persistent_tracker.record.turns import TurnEncoder
from rasa_persistent_tracker.recovery.history import History
from rasa_persistent_tracker.security.crypto import SNAPSHOT

logger = logging.getLogger("rasa_persistent_tracker.store")
_RETRY_DELAYS = (0.05, 0.2, 0.5)


class Resumed(NamedTuple):
    """A conversation rebuilt from SQL, before it is marked and handed out."""

    tracker: DialogueStateTracker
    known: stored.StoredForms
    next_seq: int
    previous: Optional[stored.RebuiltBase]


class Recovery:
    """Recovery paths of one store (see the module docstring)."""

    def __init__(self, hot: HotState, history: History, records: Records, turns: TurnEncoder,
                 config: StoreConfig, suspicion: Suspicion, ids: ConversationIds) -> None:
        self._hot = hot
        self._history = history
        self._records = records
        self._turns = turns
        self._config = config
        self._suspicion = suspicion
        self._id = ids

    def suspect(self) -> None:
        """The hot state just failed: check records against SQL for a while
        (counted as an outage when the last one is over)."""
        if not self._suspicion.active:
            metrics.HOT_STATE_OUTAGES.inc()
        self._suspicion.suspect()

    @property
    def suspecting(self) -> bool:
        return self._suspicion.active

    async def newer_snapshot(self, sender_id: str, next_seq: int,
                             version: int) -> Optional[DialogueStateTracker]:
        """A tracker from SQL if its snapshot is ahead of the hot record, else None."""
        try:
            snapshot = await self._history.snapshot(sender_id)
        except EventLogUnavailable:
            return None
        if snapshot is None or snapshot.next_seq <= next_seq:
            return None
        logger.warning("Conversation '%s': hot record is behind the SQL snapshot (a write was "
                       "lost, e.g. in a failover); restoring from the snapshot and log.",
                       self._id(sender_id))
        return await self.from_snapshot(sender_id, refill=True, snapshot=snapshot,
                                        expected=version)

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
        """Move the unusable hot value aside (one WARNING); return where it went."""
        where = await self._hot.quarantine(sender_id, self._config.quarantine_ttl)
        metrics.QUARANTINES.labels(metrics.quarantine_reason(reason)).inc()
        logger.warning("Conversation '%s': stored hot state is unreadable (%s); kept as %s.",
                       self._id(sender_id), reason,
                       self._id.in_text(where, sender_id) if where
                       else "nothing (already gone)")
        return where

    async def resume_after_quarantine(self, sender_id: str,
                                      reason: str) -> DialogueStateTracker:
        """Quarantine the value, then resume from the snapshot (or the log) or
        start afresh."""
        await self.quarantine(sender_id, reason)
        tracker = await self.from_snapshot(sender_id, refill=True)
        if tracker is not None:
            logger.warning("Conversation '%s' resumed from its SQL snapshot and log.",
                           self._id(sender_id))
            return tracker
        tracker = self._records.new_tracker(sender_id)
        hot = await self.load(sender_id)  # undelivered rows count too
        self._records.mark(tracker, 0, await self._history.next_seq(
            sender_id, hot.outbox_seq if hot else 0), {})
        metrics.RECOVERIES.labels("fresh").inc()
        logger.warning("Conversation '%s' has no usable snapshot: starting a fresh session.",
                       self._id(sender_id))
        return tracker

    async def restore_lost_record(self, sender_id: str) -> Optional[DialogueStateTracker]:
        """No record: restore it unless the conversation expired."""
        try:
            snapshot = await self._history.snapshot(sender_id)
        except EventLogUnavailable as exc:
            logger.warning("Conversation '%s' has no hot record and its snapshot cannot be read "
                           "(%s): treating it as a new session.", self._id(sender_id), exc)
            return None
        if snapshot is None:
            return None
        idle = time.time() - snapshot.saved_at
        if idle > max(self._config.record_exp, self._config.snapshot_resume_window):
            return None  # expired through inactivity: a new session, as Rasa would
        tracker = await self.from_snapshot(sender_id, refill=True, snapshot=snapshot)
        if tracker is not None:
            logger.warning("Conversation '%s': hot record was lost; restored from the SQL "
                           "snapshot.", self._id(sender_id))
        return tracker

    async def from_snapshot(self, sender_id: str, refill: bool,
                            snapshot: Optional[Snapshot] = None,
                            expected: Optional[int] = None) -> Optional[DialogueStateTracker]:
        """Snapshot + every event after it (log and outbox), optionally written
        back to the hot state. Without a usable snapshot, the log's last session
        is replayed instead. None if there is nothing to resume from.

        Raises HotStateUnavailable if SQL is needed but down too.
        """
        snapshot, tail = await self._snapshot_and_tail(sender_id, snapshot)
        resumed = self._restore(sender_id, snapshot)
        from_log = resumed is None
        if from_log:
            if snapshot is not None:  # unusable snapshot: replay the whole log
                tail = await self._history.all_rows(sender_id)
            if not tail:
                return None
            resumed = Resumed(self._records.new_tracker(sender_id), {}, 1, None)
        resumed = self._replay_tail(sender_id, resumed, tail)
        if resumed is None:
            return None
        if from_log:
            resumed = resumed._replace(tracker=window.last_session(resumed.tracker),
                                       previous=None)
        version = expected if expected is not None else (snapshot.version if snapshot else 0)
        if refill:  # a recovery (not a read while the hot state is down)
            metrics.RECOVERIES.labels("log_replay" if from_log else "snapshot").inc()
            version, resumed = await self._write_back(sender_id, version, resumed)
        self._records.mark(resumed.tracker, version, resumed.next_seq, resumed.known,
                           resumed.previous)
        return resumed.tracker

    async def _snapshot_and_tail(self, sender_id: str, snapshot: Optional[Snapshot]):
        """The snapshot (read unless given) and the rows after it."""
        try:
            snapshot = snapshot or await self._history.snapshot(sender_id)
            after = snapshot.next_seq - 1 if snapshot else 0
            return snapshot, await self._history.all_rows(sender_id, after_seq=after)
        except EventLogUnavailable as exc:
            raise HotStateUnavailable(
                f"Conversation '{self._id(sender_id)}': the hot state is unusable and the SQL "
                f"snapshot is unreachable ({exc})") from exc

    def _replay_tail(self, sender_id: str, resumed: Resumed,
                     tail: List[LogRow]) -> Optional[Resumed]:
        """``resumed`` with the ``tail`` rows applied; None if any is unreadable."""
        events = self._history.decode_rows(sender_id, tail)
        if len(events) < len(tail):
            # Resuming from a replay with holes could bring back an older value
            # as if it were current (and write it back): refuse it.
            logger.warning("Conversation '%s': %d event(s) after the snapshot are unreadable; "
                           "not resuming from an incomplete history.", self._id(sender_id),
                           len(tail) - len(events))
            return None
        for event in events:
            resumed.tracker.update(event)
        if tail:
            resumed = resumed._replace(next_seq=max(resumed.next_seq, tail[-1].seq + 1))
        return resumed

    async def _write_back(self, sender_id: str, version: int,
                          resumed: Resumed) -> "tuple[int, Resumed]":
        """Write the resumed conversation's record to the hot state."""
        built = self._turns.build(resumed.tracker, self._records.slots, resumed.next_seq,
                                  resumed.known, resumed.previous)
        payload, remembered = self._turns.encode(built)
        try:
            version = await self._hot.commit(sender_id, version, payload,
                                             self._config.record_exp, None, restoring=True)
            self._records.recent.put(sender_id, remembered)
        except HotStateUnavailable as exc:  # serve SQL's state; refill on a later read
            self.suspect()
            logger.warning("Conversation '%s': could not write the restored record back "
                           "to the hot state (%s).", sender_id, exc)
        return version, resumed._replace(known=built.forms, previous=built.previous)

    async def read_while_down(self, sender_id: str) -> Optional[DialogueStateTracker]:
        """``retrieve`` while the hot state is unreachable: from the SQL snapshot."""
        tracker = await self.from_snapshot(sender_id, refill=False)
        if tracker is None:
            if self._config.sync_log:
                return None  # every saved turn reaches SQL before save returns: new
            # Its latest turns may be in the unreachable outbox: it cannot be
            # told apart from a new conversation, so do not pretend it is one.
            raise HotStateUnavailable(
                f"Conversation '{self._id(sender_id)}': the hot state is unreachable and "
                f"the SQL log has nothing of it (yet).")
        return tracker

    def _restore(self, sender_id: str, snapshot: Optional[Snapshot]) -> Optional[Resumed]:
        """The conversation as its snapshot holds it; None if unusable."""
        if snapshot is None:
            return None
        try:
            record, tracker, known, previous = self._records.decode(
                sender_id, snapshot.payload, SNAPSHOT)
        except CorruptRecordError as exc:
            logger.warning("Conversation '%s': SQL snapshot is unreadable too (%s); "
                           "replaying the log instead.", self._id(sender_id), exc)
            return None
        # The snapshot row's next_seq may be past the record's: rows numbered
        # provisionally (SQL was down) were moved after the history.
        return Resumed(tracker, known, max(record["next_seq"], snapshot.next_seq), previous)
