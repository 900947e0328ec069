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

Record layout (schema 1) as documented in the README's "Storage" section;
``replay`` reads records back.
"""
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from rasa.shared.core.constants import ACTION_LISTEN_NAME, ACTION_SESSION_START_NAME
from rasa.shared.core.events import (
    ActionExecuted,
    ActionReverted,
    ActiveLoop,
    AllSlotsReset,
    Event,
    SlotSet,
    Restarted,
    SessionStarted,
    UserUttered,
    UserUtteranceReverted,
)
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.events import fingerprint

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
