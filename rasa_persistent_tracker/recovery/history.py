"""A conversation's history as stored: SQL log rows plus undelivered outbox rows.

``History`` reads what recovery and merging need from both stores, in
sequence order, and decodes rows into Rasa events, skipping (and naming)
corrupt ones.
"""
import logging
from typing import Any, Dict, List, Optional

from rasa.shared.core.events import Event
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.errors import (
    CorruptRecordError,
    EventLogUnavailable,
    HotStateUnavailable,
)
from rasa_persistent_tracker.hot.protocol import HotState
from rasa_persistent_tracker.log.entries import Entries
from rasa_persistent_tracker.log.event_log import AsyncEventLog
from rasa_persistent_tracker.log.tables import LogRow, Snapshot
from rasa_persistent_tracker.logids import ConversationIds
from rasa_persistent_tracker.record.events import EVENT_ERRORS, parse_event
from rasa_persistent_tracker.record.trackers import Records
from rasa_persistent_tracker.security.codec import Codec

logger = logging.getLogger("rasa_persistent_tracker.store")


class History:
    """Reads one store's log and outbox (see the module docstring)."""

    def __init__(self, hot: HotState, log: AsyncEventLog, codec: Codec, entries: Entries,
                 records: Records, ids: ConversationIds) -> None:
        self._hot = hot
        self._log = log
        self._codec = codec
        self._entries = entries
        self._records = records
        self._id = ids

    async def snapshot(self, sender_id: str) -> Optional[Snapshot]:
        """The conversation's SQL snapshot. Raises EventLogUnavailable."""
        return await self._log.run(self._log.sync.snapshot, sender_id)

    async def all_rows(self, sender_id: str, after_seq: int = 0) -> List[LogRow]:
        """Log rows plus outbox rows not delivered yet, in sequence order."""
        # Outbox first, log second: an entry delivered between the two reads is
        # then in the log, never in neither.
        undelivered = await self._undelivered(sender_id)
        rows = await self._log.run(self._log.sync.read, sender_id, after_seq)
        logged = {r.seq for r in rows}
        rows.extend(r for seq, r in sorted(undelivered.items())
                    if seq > after_seq and seq not in logged)
        rows.sort(key=lambda r: r.seq)
        return rows

    async def _undelivered(self, sender_id: str) -> Dict[int, LogRow]:
        undelivered: Dict[int, LogRow] = {}
        try:
            pending = await self._hot.pending(sender_id, 100_000)
        except HotStateUnavailable:
            logger.warning("Conversation '%s': hot state unreachable; undelivered events "
                           "are missing from this read.", self._id(sender_id))
            return undelivered
        for entry in pending.entries:
            try:
                undelivered.update((r.seq, r) for r in self._entries.parse(sender_id, entry)[1])
            except (ValueError, TypeError, KeyError):
                logger.warning("Conversation '%s': skipped an unreadable outbox entry.",
                               self._id(sender_id))
        return undelivered

    def decode_rows(self, sender_id: str, rows: List[LogRow]) -> List[Event]:
        """Events of ``rows``; corrupt rows are skipped with a warning naming them."""
        events: List[Event] = []
        for row in rows:
            try:
                event = parse_event(self._codec.loads_event(row.data, sender_id, row.seq))
                if event is None:
                    raise CorruptRecordError("unknown event type")
            except (CorruptRecordError, *EVENT_ERRORS) as exc:
                logger.warning("Conversation '%s': skipped corrupt log row seq=%d (%s).",
                               self._id(sender_id), row.seq, exc)
                continue
            events.append(event)
        return events

    async def next_seq(self, sender_id: str, outbox_seq: int) -> int:
        """The seq a new event of the conversation gets (past log and outbox)."""
        try:
            logged = await self._log.run(self._log.sync.next_seq, sender_id)
        except EventLogUnavailable:
            # Number provisionally; delivery re-sequences on collision (event_log.append).
            logger.warning("Conversation '%s': event log unreachable, numbering new events "
                           "provisionally.", self._id(sender_id))
            logged = 1
        return max(logged, outbox_seq + 1)

    async def logged_event(self, sender_id: str, seq: int) -> Optional[Dict[str, Any]]:
        """The stored dict of event ``seq`` (log or outbox), None if absent or corrupt."""
        rows = [r for r in await self.all_rows(sender_id, after_seq=seq - 1) if r.seq == seq]
        if not rows:
            return None
        try:
            return self._codec.loads_event(rows[0].data, sender_id, seq)
        except CorruptRecordError:
            return None

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
        return self._records.from_events(sender_id, events + list(new))
