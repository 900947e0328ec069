"""Turning a saved tracker into what is stored: log rows and the hot record.

``TurnEncoder`` serialises each new event once (the text serves the log row,
the record and the next turn), assembles the record payload from parts
already serialised, and returns the record as it reads back, for the
per-process memory (``recent``). Values that cannot be stored faithfully are
refused here, naming the slot, before anything is written.
"""
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from rasa.shared.core.events import ActionExecuted, Event, SlotSet, UserUttered
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.errors import (
    CorruptRecordError,
    PersistentTrackerError,
    SlotValueError,
)
from rasa_persistent_tracker.hot.protocol import payload_digest
from rasa_persistent_tracker.log.tables import COLUMN_LIMITS, MAX_ID_LENGTH, LogRow, loggable
from rasa_persistent_tracker.record import stored, window
from rasa_persistent_tracker.record.recent import RecentRecords, Remembered
from rasa_persistent_tracker.security.codec import Codec, Encoded


class TurnEncoder:
    """Encodes turns for one store (its codec, memory and ``max_history``)."""

    def __init__(self, codec: Codec, recent: RecentRecords, max_history: int) -> None:
        self._codec = codec
        self._recent = recent
        self._max_history = max_history

    def rows(self, sender_id: str, events: List[Event], first_seq: int,
             forms: stored.StoredForms) -> List[LogRow]:
        """The log rows of new ``events``; their stored forms go into ``forms``.

        Raises:
            SlotValueError / PersistentTrackerError: a value cannot be stored.
        """
        if not loggable(sender_id):
            raise PersistentTrackerError(
                f"Conversation id of {len(sender_id)} characters"
                f"{' containing NUL' if chr(0) in sender_id else ''} cannot be logged "
                f"(at most {MAX_ID_LENGTH}, no NUL). Nothing was saved.")
        rows: List[LogRow] = []
        for offset, event in enumerate(events):
            text, as_dict = self._event(sender_id, event)
            forms[id(event)] = (event, as_dict, text)
            intent = event.intent_name if isinstance(event, UserUttered) else None
            action = event.action_name if isinstance(event, ActionExecuted) else None
            rows.append(LogRow(first_seq + offset, _column("type_name", event.type_name),
                               event.timestamp, _column("intent_name", intent),
                               _column("action_name", action),
                               self._codec.protect_event(as_dict, text, sender_id,
                                                         first_seq + offset)))
        return rows

    def _event(self, sender_id: str, event: Event) -> Tuple[str, Dict[str, Any]]:
        try:
            return self._codec.event_text(event.as_dict())
        except (TypeError, CorruptRecordError) as exc:  # not writable, or not read back
            if isinstance(event, SlotSet):
                raise SlotValueError(event.key, str(exc)) from None
            raise PersistentTrackerError(
                f"Event '{event.type_name}' of conversation '{sender_id}' holds a value "
                f"of type {exc} that cannot be stored. Nothing was saved.") from None

    def build(self, tracker: DialogueStateTracker, slots: Iterable[Slot], next_seq: int,
              forms: Optional[stored.StoredForms] = None,
              previous: Optional[stored.RebuiltBase] = None) -> window.Built:
        """``window.build_record`` with this encoder's serialiser and ``max_history``."""
        return window.build_record(
            tracker, slots, self._max_history, next_seq,
            lambda event: self._event(tracker.sender_id, event), forms, previous)

    def encode(self, built: window.Built) -> Tuple[bytes, Remembered]:
        """The payload of a built record (its stored bytes), and the record as
        it reads back.

        Raises:
            SlotValueError: a slot value cannot be stored (names the slot).
            PersistentTrackerError: another value cannot be stored.
        """
        payload, remember = self.encode_parts(built)
        return payload, remember()

    def encode_parts(self, built: window.Built) -> Tuple[bytes, Callable[[], Remembered]]:
        """``encode``, with the record as it reads back made only when
        ``remember()`` is called (the store calls it while the payload's
        commit is in flight; before the memory of this conversation changes).
        Raises as ``encode``."""
        encoded = self._encoded(built)
        event_jsons = encoded.event_jsons
        if None in built.event_jsons and len(built.forms) == len(event_jsons):
            # keep the texts made just now
            for (key, (event, as_dict, _)), text in zip(list(built.forms.items()), event_jsons):
                built.forms[key] = (event, as_dict, text)
        if built.previous is not None:
            built.previous.text, built.previous.packed = encoded.base_json, encoded.base_segment
        return encoded.payload, lambda: self._remembered(built, encoded)

    def _encoded(self, built: window.Built) -> Encoded:
        """``Codec.encode_record`` of the built record; a value that cannot be
        stored raises SlotValueError naming its slot, else PersistentTrackerError."""
        record = built.record
        try:
            return self._codec.encode_record(record, built.event_jsons, built.base_json,
                                             built.base_packed)
        except (TypeError, CorruptRecordError) as exc:  # not writable, or not read back
            for name, value in record["state"]["slots"].items():
                try:
                    self._codec.event_text({"v": value})
                except (TypeError, CorruptRecordError):
                    raise SlotValueError(name, str(exc)) from None
            raise PersistentTrackerError(
                f"The state of conversation '{record['sender_id']}' holds a value of type "
                f"{exc} that cannot be stored. Nothing was saved.") from None

    def _remembered(self, built: window.Built, encoded: Encoded) -> Remembered:
        """The record as it reads back, for the per-process memory."""
        # Events parsed for the remembered record carry over, found by their
        # stored form (the dict the new record keeps, in its window or in a
        # new base); the caller's own new events, and a new base's summary,
        # are parsed from their stored form next time.
        before = self._recent.get(built.record["sender_id"])
        window = base = None
        if built.previous is not None:
            base = built.previous.slot_events
        if before is not None:
            # The base kept: only the window's events can move (into the window).
            by_form = _parsed_by_form(before, with_base=base is None)
            if len(built.forms) == len(encoded.event_jsons):
                window = [by_form.get(id(d)) for _, d, _ in built.forms.values()]
            if base is None and built.record["base"].get("head") is not None:
                new = built.record["base"]
                base = [by_form.get(id(d)) for d in new["head"] + new["summary"] + new["applied"]]
        remembered = Remembered.of(
            payload_digest(encoded.payload), encoded.record, encoded.event_jsons,
            encoded.base_json, base, window, encoded.base_segment)
        remembered.new_base = built.previous is None
        if before is not None and base is not None and base is before.base_events:
            # The same base: its state stays good (``BaseState.fits`` checks).
            remembered.base_state = before.base_state
        return remembered


def _parsed_by_form(remembered: Remembered, with_base: bool = True) -> Dict[int, Any]:
    """``id(stored dict) -> parsed event`` for the events of a remembered
    record parsed so far (window, and base if ``with_base``; their dicts are
    alive in it)."""
    pairs = list(zip(remembered.record["events"], remembered.window_events or ()))
    base = remembered.record["base"]
    if with_base and remembered.base_events is not None and base.get("head") is not None:
        pairs += zip(base["head"] + base["summary"] + base["applied"], remembered.base_events)
    return {id(d): e for d, e in pairs if e is not None}


def _column(name: str, value: Optional[str]) -> Optional[str]:
    """An analytics column's value: NUL removed, cut to the column's length.
    Intent names can come from users ("/<intent>" messages); the whole event
    is in ``data`` either way."""
    if value is None:
        return None
    return value.replace("\x00", "")[:COLUMN_LIMITS[name]]
