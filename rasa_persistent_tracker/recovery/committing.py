"""Encoding and committing a turn, also when the hot state fails under it.

``TurnCommitter.encode_turn`` turns a turn into log rows and a hot record
(rebuilt from the log when reverts reached past the record);
``writes_through`` says whether it goes to SQL at once (``sync_log``,
``sync_actions``). ``TurnCommitter.commit_turn`` writes the record and the turn's outbox entry
atomically; when the hot state is down the turn goes straight to SQL
(``direct.save``), when its value is unusable it is quarantined and the
commit retried, and when the record was wiped while the turn ran, the rows
the wiped outbox lost are logged again from the tracker (``unlogged_rows``).
"""
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, List, Optional, Tuple

from rasa.shared.core.events import ActionExecuted, Event
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.errors import (
    EventLogUnavailable,
    HotStateBusy,
    HotStateUnavailable,
    PersistentTrackerError,
)
from rasa_persistent_tracker.hot.protocol import Erased, HotState, RecordMissing, UnusableValue
from rasa_persistent_tracker.log import direct
from rasa_persistent_tracker.log.entries import Entries
from rasa_persistent_tracker.log.event_log import AsyncEventLog
from rasa_persistent_tracker.log.tables import LogRow
from rasa_persistent_tracker.logids import ConversationIds
from rasa_persistent_tracker.record import window
from rasa_persistent_tracker.record.recent import Remembered
from rasa_persistent_tracker.record.turns import TurnEncoder
from rasa_persistent_tracker.recovery.merging import MergeBase
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.crypto import SNAPSHOT
from rasa_persistent_tracker.values import ENCODING_ERRORS, unstorable

logger = logging.getLogger("rasa_persistent_tracker.store")


class TurnCommitter:
    """Commits the turns of one store (see the module docstring).

    Args:
        quarantine: moves an unusable hot value aside (``Recovery.quarantine``).
        suspect: the hot state failed (``Recovery.suspect``).
        full_session: the session from the log (``History.full_session``).
    """

    def __init__(self, hot: HotState, log: AsyncEventLog, codec: Codec, entries: Entries,
                 turns: TurnEncoder, config: StoreConfig, ids: ConversationIds,
                 quarantine: Callable[[str, str], Awaitable[Any]],
                 suspect: Callable[[], None],
                 full_session: Callable[..., Awaitable[Optional[DialogueStateTracker]]]
                 ) -> None:
        self._full_session = full_session
        self._hot = hot
        self._log = log
        self._codec = codec
        self._entries = entries
        self._turns = turns
        self._config = config
        self._id = ids
        self._quarantine = quarantine
        self._suspect = suspect

    async def encode_turn(self, sender_id: str, base: MergeBase, slots: Iterable[Slot]
                          ) -> Tuple[List[LogRow], DialogueStateTracker, window.Built, bytes,
                                     Callable[[], Remembered]]:
        """The turn's log rows, the tracker the record is built from, the
        record, its payload and what makes the record as it reads back
        (``TurnEncoder.encode_parts``). Raises SlotValueError (nothing written)."""
        state, new, next_seq = base.state, base.new, base.next_seq
        slots = list(slots)
        try:
            rows = self._turns.rows(sender_id, new, next_seq, base.known)
            built = self._turns.build(state, slots, next_seq + len(new), base.known,
                                      base.previous)
            if built.short:
                full = await self._full_session(sender_id, next_seq, new)
                if full is not None:  # reverts reached past the record: rebuild it from the log
                    state = full
                    built = self._turns.build(full, slots, next_seq + len(new), base.known)
            payload, remember = self._turns.encode_parts(built)
        except PersistentTrackerError:
            raise
        except ENCODING_ERRORS as exc:
            raise unstorable(new, exc) from None
        return rows, state, built, payload, remember

    def writes_through(self, new: List[Event]) -> bool:
        """Whether the turn goes to SQL before ``save`` returns: ``sync_log``,
        or it ran an action listed in ``sync_actions``."""
        names = self._config.sync_actions
        return self._config.sync_log or bool(names) and any(
            getattr(e, "action_name", None) in names for e in new
            if isinstance(e, ActionExecuted))

    async def commit_turn(self, sender_id: str, base: MergeBase, payload: bytes,
                          rows: List[LogRow]) -> Tuple[int, bool, List[LogRow]]:
        """Commit a turn's record and its rows' outbox entry: (new version,
        whether the entry is queued in the outbox rather than written to SQL
        already, the rows written).

        The record wiped while the turn ran: the rows its outbox lost are
        logged again from the tracker (``unlogged_rows``) with this turn's.
        The hot state down: the turn goes straight to SQL (``direct.save``).
        An unusable stored value: quarantined, then the commit is retried once.
        Erased after the tracker was read: refused (Erased), nothing written.
        Raises ConcurrentSaveError, Erased, HotStateBusy, HotStateUnavailable."""
        expected, ttl = base.expected_version, self._config.record_exp
        outbox_entry = self._entries.make(sender_id, rows, time.time())
        try:
            try:
                version = await self._hot.commit(sender_id, expected, payload, ttl, outbox_entry,
                                                 expect_record=bool(expected))
            except RecordMissing:
                # Wiped while this turn ran: with the record went the outbox
                # entries not delivered yet. Log them again from this tracker -
                # unless it was erased (a wipe took its hot tombstone too).
                await self._refuse_if_erased(sender_id, expected)
                rows = await self.unlogged_rows(sender_id, base, base.next_seq) + rows
                outbox_entry = self._entries.make(sender_id, rows, time.time())
                version = await self._hot.commit(sender_id, expected, payload, ttl, outbox_entry)
        except HotStateBusy:
            raise  # overloaded: nothing was written, nothing to re-check
        except HotStateUnavailable as exc:
            # Redis is the fast path, SQL the record: the turn goes to SQL,
            # after the turns the unreachable (maybe emptied) outbox still holds.
            self._suspect()
            metrics.DIRECT_SAVES.inc()
            rows = await self.unlogged_rows(sender_id, base, rows[0].seq) + rows
            version = await direct.save(self._log, sender_id, rows,
                                        self._codec.reseal_record(payload, sender_id, SNAPSHOT),
                                        expected or 0, exc)
            return version, False, rows
        except UnusableValue as exc:
            await self._quarantine(sender_id, str(exc))
            try:
                version = await self._hot.commit(sender_id, expected, payload, ttl, outbox_entry)
            except UnusableValue as again:  # replaced again in between: give up this turn
                raise HotStateUnavailable(f"Conversation '{sender_id}': its hot record stays "
                                          f"unusable ({again}).") from again
        return version, True, rows

    async def _refuse_if_erased(self, sender_id: str, expected: Optional[int]) -> None:
        try:
            floor = await self._log.run(self._log.sync.erased_floor, sender_id)
        except EventLogUnavailable:
            return  # cannot tell; the hot state's tombstone was gone already
        if floor is not None and (expected or 0) <= floor:
            raise Erased(sender_id, floor)

    async def unlogged_rows(self, sender_id: str, base: MergeBase,
                            next_seq: int) -> List[LogRow]:
        """Rows for the events of ``base.state`` before this turn's that the
        SQL log does not hold: between its end and ``next_seq``, turns whose
        outbox entries a wiped or unreachable hot state has not delivered.
        With them this turn's rows follow the log without a hole; a copy
        delivered later from a surviving outbox is skipped as already logged."""
        events = list(base.state.events)
        before = events[:len(events) - len(base.new)]
        try:
            logged_next = await self._log.run(self._log.sync.next_seq, sender_id)
        except EventLogUnavailable:
            return []  # nothing can be written now anyway
        missing = next_seq - logged_next
        if missing <= 0:
            return []
        if missing > len(before):
            logger.warning("Conversation '%s': %d event(s) before this turn are neither in the "
                           "hot state nor in the SQL log, and the tracker no longer holds "
                           "them.", self._id(sender_id), missing)
            return []
        logger.warning("Conversation '%s': %d event(s) before this turn were still in the "
                       "outbox of the failed hot state; logged again from the tracker.",
                       self._id(sender_id), missing)
        return self._turns.rows(sender_id, before[-missing:], logged_next, base.known)
