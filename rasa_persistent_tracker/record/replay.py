"""Reading a hot record back: shape checks and the replay into a tracker.

The record layout is ``window``'s (see its docstring); this module only
trusts what it has checked. Everything it rejects raises
``CorruptRecordError``, which the store turns into quarantine and recovery.
Records of schema 1 (before 0.2: a base of slot events, loop and paused flag)
are converted on read into the same events a schema-2 base replays; the next
save writes schema 2.
"""
from typing import Any, Dict, Iterable, List, Optional, Tuple

from rasa.shared.core.events import (
    ActionExecutionRejected,
    ActiveLoop,
    BotUttered,
    ConversationPaused,
    Event,
    LoopInterrupted,
    SlotSet,
    UserUttered,
)
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.record import applied
from rasa_persistent_tracker.record.base_state import BaseState, capture

from rasa_persistent_tracker.errors import CorruptRecordError
from rasa_persistent_tracker.record.events import (
    EVENT_ERRORS,
    fingerprint,
    own_copy,
    parse_event,
)
from rasa_persistent_tracker.record.stored import RebuiltBase, StoredForms
from rasa_persistent_tracker.record.window import SCHEMA_VERSION


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
    if schema not in (1, SCHEMA_VERSION) or isinstance(schema, bool):
        raise CorruptRecordError(f"unsupported schema version {schema!r}")
    if record.get("sender_id") != sender_id:
        raise CorruptRecordError("record belongs to another conversation")
    if _require(record, "next_seq", int) < 1:
        raise CorruptRecordError("field 'next_seq' is not positive")
    base = _require(record, "base", dict)
    if base and schema == 1:
        if not (isinstance(base.get("slot_events"), list)
                and isinstance(base.get("paused"), bool)
                and isinstance(base.get("active_loop"), (dict, type(None)))):
            raise CorruptRecordError("field 'base' is malformed")
        lists = [base["slot_events"]]
    elif base:
        lists = [base.get(k) for k in ("head", "summary", "applied")]
        if not (all(isinstance(v, list) for v in lists)
                and isinstance(base.get("loops"), list)
                and all(isinstance(n, str) for n in base["loops"])
                and isinstance(base.get("latest_bot"), (dict, type(None)))):
            raise CorruptRecordError("field 'base' is malformed")
        if base["latest_bot"] is not None:
            lists.append([base["latest_bot"]])
    events = _require(record, "events", list)
    if not events or not all(_well_formed(e) for e in events):
        raise CorruptRecordError("field 'events' is empty or holds malformed events")
    if base and not all(_well_formed(e) for part in lists for e in part):
        raise CorruptRecordError("field 'base' holds malformed events")
    state = _require(record, "state", dict)
    if not isinstance(state.get("slots"), dict):
        raise CorruptRecordError("field 'state.slots' is malformed")
    if record.get("last_event") != fingerprint(events[-1]):
        raise CorruptRecordError("last event fingerprint does not match")
    checked = record.get("base_checked", 0)  # absent in older records: nothing checked
    if not isinstance(checked, int) or isinstance(checked, bool) or not 0 <= checked <= len(
            events):
        raise CorruptRecordError("field 'base_checked' is not a count of window events")
    return record


def rebuild_tracker(
    record: Dict[str, Any],
    slots: Iterable[Slot],
    max_event_history: Optional[int],
    event_jsons: Optional[List[str]] = None,
    base_json: Optional[str] = None,
    base_events: Optional[List[Event]] = None,
    window_events: Optional[List[Optional[Event]]] = None,
    base_packed: Optional[bytes] = None,
    base_state: Optional[BaseState] = None,
    keep_state: bool = False,
    ready: Optional[Tuple[BaseState, DialogueStateTracker]] = None,
) -> Tuple[DialogueStateTracker, StoredForms, RebuiltBase, List[Optional[Event]],
           Optional[BaseState]]:
    """Rebuild a tracker from a validated record.

    Returns the tracker, the stored forms of its window events, the
    ``RebuiltBase`` base (both for ``build_record``, with the events' and the
    base's JSON texts if known: ``event_jsons``, ``base_json``) and the window's
    events as parsed, for the next rebuild (``window_events``).

    ``base_packed`` is the compressed segment of ``base_json``
    (``RebuiltBase.packed``). ``base_events`` are the base's events parsed
    before (``RebuiltBase.slot_events``) and ``window_events`` (aligned with
    ``record["events"]``, None: parse it) window events parsed before. They
    are never handed out themselves: the tracker gets ``own_copy`` of each,
    which is the event itself except for user messages, the one kind Rasa
    edits in place. So parsed events can serve every later rebuild.
    ``base_state``: the state a rebuild of this record's base left before
    (``base_state.capture``), copied instead of replaying the base if it
    ``fits``. The last value returned is the base state for the next rebuild
    (a replay captures one only if ``keep_state``: a record nobody remembers
    would not use it). ``ready``: a tracker ``base_state.clone`` made ahead
    (``Records.prepare``), used instead of cloning now if it is of this very
    state and the state fits.

    Raises ``CorruptRecordError`` if an event cannot be parsed or the replayed
    slots disagree with the recorded state.
    """
    slot_list = list(slots)
    base = record["base"]
    stamp = record["events"][0].get("timestamp")
    try:
        # ``is None``, not ``None in``: that compares every event with ``==``
        # (Rasa's ``__eq__``, an ABC ``isinstance`` each), a tenth of a rebuild.
        if base_events is None or any(event is None for event in base_events):
            base_events = _base_events(record, base_events)
        if base_state is not None and base_state.fits(base, base_events, stamp, slot_list,
                                                      max_event_history):
            tracker = (ready[1] if ready is not None and ready[0] is base_state
                       else base_state.clone(record["sender_id"]))
        else:
            tracker, base_state = _replay_base(record, base_events, stamp, slot_list,
                                               max_event_history, keep_state)
        previous = RebuiltBase(base if record["schema"] != 1 else {}, len(tracker.events),
                            tracker.events[0] if tracker.events else None, base_json,
                            base_events, record.get("base_checked", 0),
                            base_packed if base_json is not None else None)
        forms: StoredForms = {}
        parsed: List[Optional[Event]] = []
        for i, event_dict in enumerate(record["events"]):
            event = window_events[i] if window_events else None
            if event is None:
                event = parse_event(event_dict)
            if event is None:
                raise CorruptRecordError(f"unknown event type {event_dict.get('event')!r}")
            parsed.append(event)
            event = own_copy(event)
            _apply(tracker, event)
            forms[id(event)] = (event, event_dict, event_jsons[i] if event_jsons else None)
    except EVENT_ERRORS as exc:
        raise CorruptRecordError(f"event cannot be parsed ({type(exc).__name__})") from None
    known = {s.name for s in slot_list}
    expected = {k: v for k, v in record["state"]["slots"].items() if k in known}
    actual = {n: s.value for n, s in tracker.slots.items() if s.value != s.initial_value}
    if expected != actual:
        raise CorruptRecordError("replayed slots do not match the recorded state")
    return tracker, forms, previous, parsed, base_state


def base_ahead(record: Dict[str, Any], slots: Iterable[Slot],
               max_event_history: Optional[int],
               known: Optional[List[Optional[Event]]] = None
               ) -> Optional[Tuple[List[Event], BaseState, DialogueStateTracker]]:
    """The base of a (schema 2) record replayed ahead of its rebuild: its
    events (``known``: those parsed before, as in ``_base_events``), the
    state to copy and a fresh tracker in that state, which is exactly what
    ``rebuild_tracker`` would replay for this record. None if the record has
    no base or its state cannot be copied. Raises ``CorruptRecordError`` (or
    one of ``EVENT_ERRORS``) as the rebuild would."""
    if not record["base"] or record["schema"] == 1:
        return None
    slot_list = list(slots)
    base_events = _base_events(record, known)
    tracker, state = _replay_base(record, base_events, record["events"][0].get("timestamp"),
                                  slot_list, max_event_history, keep_state=True)
    return None if state is None else (base_events, state, tracker)


def _replay_base(record: Dict[str, Any], base_events: List[Event], stamp: Any,
                 slot_list: List[Slot], max_event_history: Optional[int], keep_state: bool
                 ) -> Tuple[DialogueStateTracker, Optional[BaseState]]:
    """A fresh tracker with the record's base replayed into it, and its state
    to copy next time (None if it cannot be copied, or there is no base)."""
    tracker = DialogueStateTracker(record["sender_id"], slot_list, max_event_history)
    base = record["base"]
    if not base or record["schema"] == 1:
        for event in base_events:
            _apply(tracker, own_copy(event))
        return tracker, None
    # stamped like the record's first event, not with the time of reading
    markers = applied.markers(base["loops"], stamp)
    for event in markers:
        tracker.update(event)
    for event in base_events:
        _apply(tracker, own_copy(event))
    stored_bot = base.get("latest_bot")
    tracker.latest_bot_utterance = parse_event(stored_bot) if stored_bot else BotUttered.empty()
    if not keep_state:
        return tracker, None
    return tracker, capture(tracker, markers + list(base_events), base, base_events, stamp,
                            slot_list, max_event_history,
                            tracker.latest_bot_utterance if stored_bot else None)


def _apply(tracker: DialogueStateTracker, event: Event) -> None:
    """``tracker.update(event)`` for a tracker without ``model_id`` or
    ``assistant_id`` (a fresh one, as here) and an event known to be one:
    what Rasa 3.6's ``update`` does then, without its ABC ``isinstance``
    check, which costs a third of a rebuild's time."""
    if tracker.model_id or tracker.assistant_id:  # not fresh after all: Rasa's own way
        tracker.update(event)
        return
    tracker.events.append(event)
    event.apply_to(tracker)


def _base_events(record: Dict[str, Any],
                 known: Optional[List[Optional[Event]]] = None) -> List[Event]:
    """The events a record's base replays (after the loop markers); ``known``
    (schema 2): those parsed before, aligned with them, None where not.

    Schema 1 kept the active loop as fields; they become the events a
    schema-2 summary uses (the trigger message as a user message, then the
    activation and its flags), so the loop survives the next compaction.
    """
    base = record["base"]
    if not base:
        return []
    if record["schema"] != 1:
        dicts = base["head"] + base["summary"] + base["applied"]
        if known is None or len(known) != len(dicts):
            known = [None] * len(dicts)
        out = [parse_event(d) if e is None else e for d, e in zip(dicts, known)]
        if any(e is None for e in out):
            raise CorruptRecordError("base holds an unknown event type")
        return out
    out = [parse_event(d) for d in base.get("slot_events") or []]
    if not all(isinstance(e, SlotSet) for e in out):
        raise CorruptRecordError("base holds a non-slot event")
    loop = base.get("active_loop")
    if loop and loop.get("name"):
        trigger = dict(loop.get("trigger_message") or {})
        out += [UserUttered(trigger.get("text"), trigger.get("intent"),
                            trigger.get("entities"), trigger), ActiveLoop(loop["name"])]
        if loop.get("is_interrupted"):
            out.append(LoopInterrupted(True))
        if loop.get("rejected"):
            out.append(ActionExecutionRejected(loop["name"]))
    if base.get("paused"):
        out.append(ConversationPaused())
    stamp = record["events"][0].get("timestamp")
    for event in out:
        event.timestamp = stamp
    return out
