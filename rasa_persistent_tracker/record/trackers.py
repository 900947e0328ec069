"""Stored records as Rasa trackers, and what a store knows of each tracker.

``Records`` decodes a hot or snapshot payload and rebuilds the tracker from it
(or from the record this process remembers writing), checks a hot payload
before it becomes the SQL snapshot, and remembers, per tracker handed out or
saved, the record version and position it was read at (``stored.Loaded``).

That knowledge is kept here, keyed by the tracker object's identity (held
weakly), never on Rasa's tracker itself. A copy of a tracker
(``tracker.copy()``, ``copy.deepcopy``) is a different object: the store did
not hand it out, so its save finds its new events by merging against the
stored record (``recovery.merging.Merger``), exactly like any foreign tracker.
"""
import logging
import weakref
from typing import Any, Dict, List, Optional, Tuple

from rasa.shared.core.domain import Domain
from rasa.shared.core.events import Event
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.errors import CorruptRecordError, EncryptionKeyMissing
from rasa_persistent_tracker.hot.protocol import payload_digest
from rasa_persistent_tracker.logids import ConversationIds
from rasa_persistent_tracker.record import replay, stored
from rasa_persistent_tracker.record.events import EVENT_ERRORS, parse_event
from rasa_persistent_tracker.record.freshness import Freshness
from rasa_persistent_tracker.record.recent import RecentRecords, Remembered
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.crypto import HOT, SNAPSHOT

logger = logging.getLogger("rasa_persistent_tracker.store")

# A decoded record and the tracker rebuilt from it, with the stored forms of
# its window's events and the base it was rebuilt from.
Decoded = Tuple[Dict[str, Any], DialogueStateTracker, stored.StoredForms, stored.RebuiltBase]


class LoadedTrackers:
    """``stored.Loaded`` per live tracker object, by identity (see module docstring)."""

    def __init__(self) -> None:
        self._by_id: Dict[int, Tuple["weakref.ref[DialogueStateTracker]", stored.Loaded]] = {}

    def set(self, tracker: DialogueStateTracker, loaded: stored.Loaded) -> None:
        key = id(tracker)
        known = self._by_id.get(key)
        if known is not None and known[0]() is tracker:
            self._by_id[key] = (known[0], loaded)
            return
        by_id = self._by_id

        def forget(ref: "weakref.ref[DialogueStateTracker]") -> None:
            if by_id.get(key, (None,))[0] is ref:
                del by_id[key]
        self._by_id[key] = (weakref.ref(tracker, forget), loaded)

    def get(self, tracker: DialogueStateTracker) -> Optional[stored.Loaded]:
        known = self._by_id.get(id(tracker))
        if known is None or known[0]() is not tracker:
            return None
        return known[1]

    def __len__(self) -> int:
        return len(self._by_id)


class Records:
    """Record <-> tracker for one store.

    Args:
        codec: the store's codec (decrypts and checks payloads).
        recent: the per-process memory of records this process wrote.
        fresh: what the store knows about how far each conversation got.
        ids: what log lines show for a conversation id.

    ``domain`` and ``max_event_history`` are set by the store (Rasa sets them
    after the store exists); without a domain, records are checked, not replayed.
    """

    def __init__(self, codec: Codec, recent: RecentRecords, fresh: Freshness,
                 ids: ConversationIds) -> None:
        self._codec = codec
        self.recent = recent
        self.fresh = fresh
        self._ids = ids
        self._loaded = LoadedTrackers()
        self.domain: Optional[Domain] = None
        self.max_event_history: Optional[int] = None

    @property
    def slots(self) -> List[Any]:
        return self.domain.slots

    def new_tracker(self, sender_id: str) -> DialogueStateTracker:
        """An empty tracker (as Rasa's ``TrackerStore.init_tracker``)."""
        return DialogueStateTracker(sender_id, self.domain.slots,
                                    max_event_history=self.max_event_history)

    def from_events(self, sender_id: str, events: List[Event]) -> DialogueStateTracker:
        return DialogueStateTracker.from_events(sender_id, events, self.domain.slots,
                                                self.max_event_history)

    def decode(self, sender_id: str, payload: str, kind: str = HOT) -> Decoded:
        """A stored record (hot or snapshot: ``kind``) and the tracker rebuilt from it.

        Raises CorruptRecordError if it cannot be decoded, validated or replayed.
        """
        loaded, packed = self._codec.loads_record_parts(payload, sender_id, kind)
        record = replay.validate_record(loaded, sender_id)
        if record["schema"] == 1:
            packed = None  # its base is rebuilt in another form
        tracker, known, previous, _, _ = replay.rebuild_tracker(
            record, self.domain.slots, self.max_event_history,
            base_json=packed.text if packed else None,
            base_packed=packed.segment if packed else None)
        return record, tracker, known, previous

    def rebuild_remembered(self, sender_id: str, remembered: Remembered) -> Optional[Decoded]:
        """``decode`` for the record this process remembers; None (and the
        memory forgotten) if it does not replay, which would be a bug."""
        record = remembered.record
        try:
            tracker, known, previous, parsed, base_state = replay.rebuild_tracker(
                record, self.domain.slots, self.max_event_history, remembered.event_jsons,
                remembered.base_json, remembered.base_events, remembered.window_events,
                remembered.base_packed, remembered.base_state, keep_state=True,
                ready=remembered.take_ready())
        except CorruptRecordError as exc:
            logger.warning("Conversation '%s': the record this process remembers does not "
                           "replay (%s); reading the stored one.", self._ids(sender_id), exc)
            self.recent.forget(sender_id)
            return None
        remembered.base_events = previous.slot_events
        remembered.window_events = parsed
        remembered.base_state = base_state
        return record, tracker, known, previous

    def prepare(self, remembered: Remembered) -> None:
        """Work of the next ``rebuild_remembered`` done ahead (the store calls
        this while a commit's reply is in flight): the window's new events
        parsed, and a tracker cloned from the base's state if it fits this
        record, or, for a new base, the base replayed (its events parsed and
        its state captured). Nothing of it is handed out before that rebuild
        checks it."""
        record = remembered.record
        window = remembered.window_events
        if window is not None and len(window) == len(record["events"]):
            for i, event in enumerate(window):
                if event is None:
                    try:
                        window[i] = parse_event(record["events"][i])
                    except EVENT_ERRORS:
                        return  # the rebuild reports it
        state = remembered.base_state
        if self.domain is None or remembered.ready:
            return
        if state is not None and state.fits(
                record["base"], remembered.base_events, record["events"][0].get("timestamp"),
                self.domain.slots, self.max_event_history):
            remembered.ready.append((state, state.clone(record["sender_id"])))
            return
        if not remembered.new_base:
            return  # its state is captured by the next rebuild from memory
        # A new base (this save compacted): replayed now, not by the next
        # retrieve, whose load round trip is too short to hide it.
        try:
            ahead = replay.base_ahead(record, self.domain.slots, self.max_event_history,
                                      remembered.base_events)
        except (CorruptRecordError, *EVENT_ERRORS):
            return  # the rebuild reports it
        if ahead is not None:
            remembered.base_events, remembered.base_state, tracker = ahead
            remembered.ready.append((remembered.base_state, tracker))

    def snapshot_payload(self, sender_id: str, payload: str, next_seq: int) -> Optional[str]:
        """A hot payload as the SQL snapshot at ``next_seq``, or None: it must
        decode, replay and be the record at ``next_seq`` (a record that only
        looks right, or an older one, must never replace the last good
        snapshot). The record this process wrote needs no replay; without a
        domain (the CLI, or before Rasa set it) only its shape is checked."""
        remembered = self.recent.get(sender_id)
        if remembered is not None and remembered.digest == payload_digest(payload):
            record = remembered.record
        elif self.domain is None:
            return self._checked_shape(sender_id, payload, next_seq)
        else:
            try:
                record = self.decode(sender_id, payload)[0]
            except CorruptRecordError:
                return None
            except Exception:  # e.g. a custom event failing to replay: keep the old snapshot
                logger.exception("Conversation '%s': hot record cannot be replayed; not taken "
                                 "as the SQL snapshot.", self._ids(sender_id))
                return None
        if record["next_seq"] != next_seq:
            return None
        try:
            return self._codec.reseal_record(payload, sender_id, SNAPSHOT)
        except CorruptRecordError:
            return None

    def _checked_shape(self, sender_id: str, payload: str, next_seq: int) -> Optional[str]:
        try:
            record = replay.validate_record(self._codec.loads_record(payload, sender_id),
                                            sender_id)
            if record["next_seq"] != next_seq:
                return None
            return self._codec.reseal_record(payload, sender_id, SNAPSHOT)
        except (CorruptRecordError, EncryptionKeyMissing):
            return None

    def mark(self, tracker: DialogueStateTracker, version: int, next_seq: int,
             known: stored.StoredForms, previous: Optional[stored.RebuiltBase] = None) -> None:
        """Remember that ``tracker`` stands at record ``version`` / ``next_seq``."""
        last = tracker.events[-1] if tracker.events else None
        self.fresh.saw(tracker.sender_id, next_seq, version)
        self._loaded.set(tracker, stored.Loaded(tracker.sender_id, version, next_seq, last,
                                                known, previous))

    def loaded(self, tracker: DialogueStateTracker) -> Optional[stored.Loaded]:
        """What ``mark`` remembered of this very tracker object (None for a copy)."""
        return self._loaded.get(tracker)
