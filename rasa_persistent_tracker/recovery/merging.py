"""Finding the new events of a tracker this store did not hand out.

A tracker built elsewhere (another tracker store, a copy of a tracker, a
history posted back) is merged into the stored conversation instead of
overwriting it: its new events are those after the stored last event, found
by fingerprint, or failing that the ones the stored window does not know.
"""
from typing import Any, Awaitable, Callable, Dict, List, NamedTuple, Optional

from rasa.shared.core.events import Event
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.errors import (
    CorruptRecordError,
    EventLogUnavailable,
    HotStateBusy,
    HotStateUnavailable,
)
from rasa_persistent_tracker.hot.protocol import HotEntry, HotState
from rasa_persistent_tracker.record.stored import RebuiltBase, StoredForms
from rasa_persistent_tracker.record.events import fingerprint
from rasa_persistent_tracker.record.trackers import Records
from rasa_persistent_tracker.recovery.history import History


class MergeBase(NamedTuple):
    """Where a foreign tracker's save starts from."""

    state: DialogueStateTracker  # the tracker the new record is built from
    new: List[Event]
    expected_version: int
    next_seq: int
    known: StoredForms
    previous: Optional[RebuiltBase]


class Merger:
    """Merges foreign trackers for one store.

    Args:
        quarantine: moves an unusable hot value aside (``Recovery.quarantine``).
    """

    def __init__(self, hot: HotState, history: History, records: Records,
                 quarantine: Callable[[str, str], Awaitable[Any]]) -> None:
        self._hot = hot
        self._history = history
        self._records = records
        self._quarantine = quarantine

    async def merge_base(self, tracker: DialogueStateTracker) -> MergeBase:
        """The stored state ``tracker``'s new events apply to, and those events."""
        sender_id = tracker.sender_id
        try:
            hot = await self._hot.load(sender_id)
        except HotStateBusy:
            raise
        except HotStateUnavailable:
            hot = HotEntry()  # down: merge against the log (the save goes to SQL)
        events = list(tracker.events)
        stored = await self._usable_record(sender_id, hot)
        if stored is not None:
            record, state, known, previous = stored
            new = after_fingerprint(events, record["last_event"])
            if new is None:
                new = unknown_tail(events, record["events"])
            for event in new:
                state.update(event)
            return MergeBase(state, new, hot.version, record["next_seq"], known, previous)
        next_seq = await self._history.next_seq(sender_id, hot.outbox_seq)
        return MergeBase(tracker, await self._after_logged(sender_id, events, next_seq), 0,
                         next_seq, {}, None)

    async def _usable_record(self, sender_id: str, hot: HotEntry) -> Optional[tuple]:
        """The decoded hot record, or None (an unusable one quarantined)."""
        if hot.problem:
            await self._quarantine(sender_id, hot.problem)
            return None
        if hot.payload is None:
            return None
        try:
            decoded = self._records.decode(sender_id, hot.payload)
            behind = await self._records.fresh.behind(sender_id, decoded[0]["next_seq"],
                                                      hot.outbox_seq)
            if behind:  # a replayed older record: never the base of a merge
                raise CorruptRecordError(f"record is stale: {behind}")
        except CorruptRecordError as exc:
            await self._quarantine(sender_id, str(exc))
            return None
        return decoded

    async def _after_logged(self, sender_id: str, events: List[Event],
                            next_seq: int) -> List[Event]:
        """Without a record: the events after the last logged one, if found."""
        if next_seq <= 1:
            return events
        try:
            last = await self._history.logged_event(sender_id, next_seq - 1)
        except EventLogUnavailable:
            last = None
        if last is None:
            return events
        after = after_fingerprint(events, fingerprint(last))
        return events if after is None else after


def unknown_tail(events: List[Event], stored: List[Dict[str, Any]]) -> List[Event]:
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


def after_fingerprint(events: List[Event], mark: Optional[str]) -> Optional[List[Event]]:
    """Events after the last one whose fingerprint is ``mark``; None if none is."""
    for i in range(len(events) - 1, -1, -1):
        if fingerprint(events[i].as_dict()) == mark:
            return events[i + 1:]
    return None
