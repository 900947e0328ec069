"""The hot record: what a conversation needs to resume, bounded in size.

A record holds the current session only, compacted to

* ``base``: the dialogue state where the window begins (the session's slot
  events in order, the active loop with its flags, the paused flag), replayed as
  synthetic events;
* ``events``: the recent events verbatim, at least ``max_history + 1`` actions
  (so the last ``max_history`` dialogue states are exactly those of the full
  history), cut only at an ``action_listen`` boundary, always including the
  latest user message (Rasa's session expiry reads its timestamp) and, while a
  form is active, reaching back to the form's activation;
* ``state``: the resulting slots / active loop / requested slot / latest action
  / followup / paused / last user message time, checked against the replay on
  load (a mismatch means the record is corrupt).

Record layout (schema 1) as documented in the README's "Storage" section.
"""
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from rasa.shared.core.constants import ACTION_LISTEN_NAME, ACTION_SESSION_START_NAME
from rasa.shared.core.events import (
    ActionExecuted,
    ActionReverted,
    ActiveLoop,
    AllSlotsReset,
    ConversationPaused,
    Event,
    SlotSet,
    Restarted,
    SessionStarted,
    UserUttered,
    UserUtteranceReverted,
)
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker, TrackerActiveLoop

from rasa_persistent_tracker.errors import CorruptRecordError
from rasa_persistent_tracker.events import (  # noqa: F401  (EVENT_ERRORS re-exported)
    EVENT_ERRORS,
    fingerprint,
    parse_event,
)

SCHEMA_VERSION = 1
# While a form is active the window reaches back to its activation, up to this
# many times the normal window; beyond that the normal cut applies.
LOOP_REACH_FACTOR = 4


@dataclasses.dataclass
class Loaded:
    """What the store remembers on a tracker it returned or saved.

    ``version`` is the hot-record version the tracker was read at (0: none
    existed), ``next_seq`` the sequence number of the next new event, and
    ``last_event`` the last event already stored (found again by identity).
    """

    sender_id: str
    version: int
    next_seq: int
    last_event: Optional[Event]
    cache: "Known" = dataclasses.field(default_factory=dict)
    previous: Optional["Previous"] = None


# ``id(event) -> (event, stored dict, its JSON text or None)`` for events whose
# stored form is known, so unchanged events are not serialised again. Stored
# events are treated as immutable, as Rasa does (it deep-copies an event
# before editing it).
Known = Dict[int, Tuple[Event, Dict[str, Any], Optional[str]]]
# Serialises an event the cache does not know: (JSON text, dict as read back).
Encoder = Callable[[Event], Tuple[str, Dict[str, Any]]]


def slot_cap(max_history: int) -> int:
    """How many slot events the base keeps before dropping superseded ones."""
    return 4 * (max_history + 1)


_UNDOING = (ActionReverted, UserUtteranceReverted, Restarted, SessionStarted, AllSlotsReset)


def _slot_history(tracker: DialogueStateTracker, dropped: List[Event],
                  cap: int) -> List[Dict[str, Any]]:
    """The session's applied slot events, in order.

    Rasa carries slots into a new session by replaying exactly these events
    (``ActionSessionStart``), so keeping them keeps the log identical to
    Rasa's. Past ``cap`` events, values later overwritten are dropped (the state
    stays exact; only a session-start carry-over would list fewer events).
    """
    if any(isinstance(e, _UNDOING) for e in dropped):
        events = [e for e in tracker.applied_events() if isinstance(e, SlotSet)]
    else:  # nothing undone: the applied slot events are simply all of them
        events = [e for e in dropped if isinstance(e, SlotSet)]
    if len(events) > cap:
        last = {e.key: i for i, e in enumerate(events)}
        events = [e for i, e in enumerate(events) if last[e.key] == i]
    return [e.as_dict() for e in events]


def _loop_dict(tracker: DialogueStateTracker) -> Optional[Dict[str, Any]]:
    return dataclasses.asdict(tracker.active_loop) if tracker.active_loop else None


def _is_action(event: Event, name: Optional[str] = None) -> bool:
    return isinstance(event, ActionExecuted) and (name is None or event.action_name == name)


def _session_start(events: Sequence[Event]) -> int:
    for i in range(len(events) - 1, -1, -1):
        if _is_action(events[i], ACTION_SESSION_START_NAME):
            return i
    return 0


def _cut_index(events: Sequence[Event], start: int, max_history: int, loop: Optional[str]) -> int:
    """Where the verbatim window begins (``start`` keeps the whole session)."""
    last_user = next(
        (i for i in range(len(events) - 1, start - 1, -1) if isinstance(events[i], UserUttered)),
        None,
    )
    limit = len(events) if last_user is None else last_user
    needed = max_history + 1
    actions = 0
    cut = start
    for i in range(len(events) - 1, start, -1):
        if isinstance(events[i], ActionExecuted):
            actions += 1
            if i <= limit and events[i].action_name == ACTION_LISTEN_NAME and actions >= needed:
                cut = i
                break
    if cut == start or not loop:
        return cut
    # Keep a running form's activation inside the window: Rasa collapses a
    # form's happy-path turns in `applied_events`, so the turns before the cut
    # would otherwise change the states the policies see.
    activation = next(
        (i for i in range(cut - 1, start - 1, -1)
         if isinstance(events[i], ActiveLoop) and events[i].name == loop),
        None,
    )
    if activation is None:
        return cut
    budget = needed * LOOP_REACH_FACTOR
    actions = 0
    for i in range(len(events) - 1, start, -1):
        if isinstance(events[i], ActionExecuted):
            actions += 1
            if actions > budget:
                return cut
            if i <= activation and events[i].action_name == ACTION_LISTEN_NAME:
                return i
    return start


@dataclasses.dataclass
class Previous:
    """The base a tracker was rebuilt from, how many events it occupies and,
    if known, its JSON text and parsed slot events."""

    base: Dict[str, Any]
    length: int
    first: Optional[Event]
    text: Optional[str] = None
    slot_events: Optional[List[Event]] = None


def slack(max_history: int) -> int:
    """Extra actions the window may hold before it is compacted again."""
    return max(3, (max_history + 1) // 2)


def _reusable_base(events: List[Event], previous: Optional[Previous],
                   max_history: int) -> Optional[Previous]:
    if previous is None or len(events) < previous.length:
        return None
    if previous.length and events[0] is not previous.first:
        return None  # events were dropped (max_event_history): compact afresh
    window = events[previous.length:]
    if any(_is_action(e, ACTION_SESSION_START_NAME) for e in window):
        return None
    actions = sum(isinstance(e, ActionExecuted) for e in window)
    if actions > max_history + 1 + slack(max_history):
        return None
    return previous


def _compact(tracker: DialogueStateTracker, events: List[Event], slot_list: List[Slot],
             max_history: int) -> Tuple[Dict[str, Any], int]:
    start = _session_start(events)
    cut = _cut_index(events, start, max_history, tracker.active_loop_name)
    known = {s.name for s in slot_list}
    if cut > start and any(
        isinstance(e, SlotSet) and e.key not in known for e in events[start:cut]
    ):
        # Replaying without the slot's declaration would drop its value: keep
        # the whole session verbatim rather than lose state.
        cut = start
    if cut == start:
        return {}, cut
    dropped = events[start:cut]
    before = DialogueStateTracker.from_events(tracker.sender_id, dropped, slot_list)
    return {
        "slot_events": _slot_history(before, dropped, slot_cap(max_history)),
        "active_loop": _loop_dict(before),
        "paused": before.is_paused(),
    }, cut


@dataclasses.dataclass
class Built:
    """A new hot record and what the store keeps about it.

    ``texts[i]`` is the JSON text of ``record["events"][i]`` if known (None:
    not serialised yet), ``base_text`` that of ``record["base"]`` if known
    (reused unchanged), ``kept`` the cache for the events the record holds,
    ``previous`` the base to reuse for this same tracker next time (None after
    a compaction).
    """

    record: Dict[str, Any]
    texts: List[Optional[str]]
    kept: Known
    previous: Optional[Previous]
    base_text: Optional[str] = None


def build_record(
    tracker: DialogueStateTracker,
    slots: Iterable[Slot],
    max_history: int,
    next_seq: int,
    encode: Encoder,
    cache: Optional[Known] = None,
    previous: Optional[Previous] = None,
) -> Built:
    """Compact ``tracker`` into a hot record (a JSON-ready dict).

    Compaction (replaying the dropped events into a new base) runs only when
    the window has grown ``slack(max_history)`` actions past what the policies
    need; in between, the previous base is kept as it was.

    Args:
        tracker: the conversation state after the turn.
        slots: the domain's slots (to replay the state at the window's start).
        max_history: dialogue states the policies look back on.
        next_seq: sequence number the next logged event will get.
        encode: serialises an event missing from ``cache``; its errors propagate.
        cache: the stored forms of events known already.
        previous: the base the tracker was rebuilt from, if any.

    Returns:
        The record with what the store keeps about it (``Built``).
    """
    events = list(tracker.events)
    reused = _reusable_base(events, previous, max_history)
    if reused is not None:
        base, cut = reused.base, reused.length
    else:
        base, cut = _compact(tracker, events, list(slots), max_history)
    known = cache or {}
    kept: Known = {}
    window = []
    texts: List[Optional[str]] = []
    for event in events[cut:]:
        hit = known.get(id(event))
        if hit is None or hit[0] is not event:
            text, as_dict = encode(event)
            hit = (event, as_dict, text)
        kept[id(event)] = hit
        window.append(hit[1])
        texts.append(hit[2])
    last_user = next((e for e in reversed(events) if isinstance(e, UserUttered)), None)
    record = {
        "schema": SCHEMA_VERSION,
        "sender_id": tracker.sender_id,
        "next_seq": next_seq,
        "base": base,
        "events": window,
        "state": {
            "slots": {n: s.value for n, s in tracker.slots.items() if s.value != s.initial_value},
            "active_loop": _loop_dict(tracker),
            "latest_action": dict(tracker.latest_action or {}),
            "followup_action": tracker.followup_action,
            "paused": tracker.is_paused(),
            "latest_message_at": last_user.timestamp if last_user else None,
        },
        "last_event": fingerprint(window[-1]) if window else None,
    }
    return Built(record, texts, kept, reused, reused.text if reused is not None else None)


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


def last_session(tracker: DialogueStateTracker) -> DialogueStateTracker:
    """A tracker holding only the events of ``tracker``'s last session."""
    events = list(tracker.events)
    start = _session_start(events)
    if start == 0:
        return tracker
    return DialogueStateTracker.from_events(
        tracker.sender_id, events[start:], tracker.slots.values(),
        max_event_history=tracker._max_event_history)


def new_events_after(events: List[Event], marker: Loaded) -> Optional[List[Event]]:
    """Events appended after the last loaded one (by identity); None if lost."""
    if marker.last_event is None:
        return list(events)
    for i in range(len(events) - 1, -1, -1):
        if events[i] is marker.last_event:
            return events[i + 1:]
    return None
