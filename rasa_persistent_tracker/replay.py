"""Reading a hot record back: shape checks and the replay into a tracker.

The record layout is ``window``'s (see its docstring); this module only
trusts what it has checked. Everything it rejects raises
``CorruptRecordError``, which the store turns into quarantine and recovery.
"""
from typing import Any, Dict, Iterable, List, Optional, Tuple

from rasa.shared.core.events import ActiveLoop, ConversationPaused, Event, SlotSet
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker, TrackerActiveLoop

from rasa_persistent_tracker.errors import CorruptRecordError
from rasa_persistent_tracker.events import EVENT_ERRORS, fingerprint, parse_event
from rasa_persistent_tracker.window import SCHEMA_VERSION, Known, Previous


def _require(record: Dict[str, Any], key: str, kinds: Any) -> Any:
    value = record.get(key)
    if not isinstance(value, kinds) or isinstance(value, bool) and kinds is int:
        raise CorruptRecordError(f"field '{key}' missing or of type {type(value).__name__}")
    return value


def _well_formed(event: Any) -> bool:
    """An event dict with a string type and a numeric timestamp."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return False
    stamp = event.get("timestamp")
    return isinstance(stamp, (int, float)) and not isinstance(stamp, bool)


def validate_record(record: Any, sender_id: str) -> Dict[str, Any]:
    """Check the shape of a decoded record. Raises ``CorruptRecordError``."""
    if not isinstance(record, dict):
        raise CorruptRecordError(f"record is a {type(record).__name__}, not an object")
    schema = record.get("schema")
    if schema != SCHEMA_VERSION:
        raise CorruptRecordError(f"unsupported schema version {schema!r}")
    if record.get("sender_id") != sender_id:
        raise CorruptRecordError("record belongs to another conversation")
    if _require(record, "next_seq", int) < 1:
        raise CorruptRecordError("field 'next_seq' is not positive")
    base = _require(record, "base", dict)
    if base and not (isinstance(base.get("slot_events"), list)
                     and isinstance(base.get("paused"), bool)
                     and isinstance(base.get("active_loop"), (dict, type(None)))):
        raise CorruptRecordError("field 'base' is malformed")
    events = _require(record, "events", list)
    if not events or not all(_well_formed(e) for e in events):
        raise CorruptRecordError("field 'events' is empty or holds malformed events")
    if base and not all(_well_formed(e) for e in base["slot_events"]):
        raise CorruptRecordError("field 'base.slot_events' holds malformed events")
    state = _require(record, "state", dict)
    if not isinstance(state.get("slots"), dict):
        raise CorruptRecordError("field 'state.slots' is malformed")
    if record.get("last_event") != fingerprint(events[-1]):
        raise CorruptRecordError("last event fingerprint does not match")
    return record


def rebuild_tracker(
    record: Dict[str, Any],
    slots: Iterable[Slot],
    max_event_history: Optional[int],
    texts: Optional[List[str]] = None,
    base_text: Optional[str] = None,
    base_events: Optional[List[Event]] = None,
    window_events: Optional[List[Optional[Event]]] = None,
) -> Tuple[DialogueStateTracker, Known, Previous]:
    """Rebuild a tracker from a validated record.

    Returns the tracker, the cache of its window events and the ``Previous``
    base, both for ``build_record``, with the events' and the base's JSON
    texts if known (``texts``, ``base_text``). ``base_events`` are the base's
    slot events parsed before (``Previous.slot_events``) and ``window_events``
    (aligned with ``record["events"]``, None: parse it) events parsed before:
    both are reused as they are. Rasa never edits an event once it is in a
    tracker, except the latest user message's featurisation flag, so user
    messages must not be passed in ``window_events``.
    Raises ``CorruptRecordError`` if an event cannot be parsed or the replayed
    slots disagree with the recorded state.
    """
    slot_list = list(slots)
    tracker = DialogueStateTracker(record["sender_id"], slot_list, max_event_history)
    base = record["base"]
    try:
        if base_events is None:
            base_events = [parse_event(d) for d in base.get("slot_events") or []]
            if not all(isinstance(e, SlotSet) for e in base_events):
                raise CorruptRecordError("base holds a non-slot event")
        for event in base_events:
            tracker.update(event)
        if base.get("active_loop"):
            tracker.update(ActiveLoop(base["active_loop"].get("name")))
            tracker.active_loop = TrackerActiveLoop(**base["active_loop"])
        if base.get("paused"):
            tracker.update(ConversationPaused())
        previous = Previous(base, len(tracker.events),
                            tracker.events[0] if tracker.events else None, base_text,
                            base_events)
        cache: Known = {}
        for i, event_dict in enumerate(record["events"]):
            event = window_events[i] if window_events else None
            if event is None:
                event = parse_event(event_dict)
            if event is None:
                raise CorruptRecordError(f"unknown event type {event_dict.get('event')!r}")
            tracker.update(event)
            cache[id(event)] = (event, event_dict, texts[i] if texts else None)
    except EVENT_ERRORS as exc:
        raise CorruptRecordError(f"event cannot be parsed ({type(exc).__name__})") from None
    known = {s.name for s in slot_list}
    expected = {k: v for k, v in record["state"]["slots"].items() if k in known}
    actual = {n: s.value for n, s in tracker.slots.items() if s.value != s.initial_value}
    if expected != actual:
        raise CorruptRecordError("replayed slots do not match the recorded state")
    return tracker, cache, previous
