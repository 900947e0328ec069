"""The hot record: what a conversation needs to resume, bounded in size.

A tracker rebuilt from the record must be, for everything Rasa reads, the
tracker of the full history (docs/contract.md). Rasa reads the *applied*
events (``applied_events``: reverts undone, loops' happy paths collapsed), a
few raw events, and some tracker attributes. A record therefore holds the
current session as

* ``base.loops``: every loop name seen, replayed as an activation and a
  deactivation before the session head (Rasa's collapse depends on them);
* ``base.head``: the session's ``action_session_start`` / ``SessionStarted``;
* ``base.summary``: the state where the verbatim applied events begin, as
  events that replay to it (``applied.summary``);
* ``base.applied``: the applied events from the cut point on, verbatim, as
  far back as the policies' states, a revert or a loop's collapse can reach
  (``applied.cut_point``);
* ``base.latest_bot``: the latest bot message where the raw window begins;
* ``events``: the raw window: from the ``action_listen`` before the third last
  user message, verbatim (reverts, fallbacks and all);
* ``state``: slots / loop / latest action / followup / paused / last user
  message time, checked against the replay on load (a mismatch: corrupt).

Its size is bounded by ``max_history`` and the turns kept, not by the
conversation's length (docs/contract.md states the bound). A record without
base holds the whole session raw. ``replay`` reads records back (schema 1 too).
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from rasa.shared.core.constants import ACTION_SESSION_START_NAME
from rasa.shared.core.events import (
    ActionExecuted,
    ActionReverted,
    Event,
    Restarted,
    SessionStarted,
    UserUttered,
    UserUtteranceReverted,
)
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.record import applied
from rasa_persistent_tracker.record.events import fingerprint, parse_event
from rasa_persistent_tracker.record.stored import Encoder, RebuiltBase, StoredForms

SCHEMA_VERSION = 2
# Raw user messages the window keeps verbatim (the two-stage fallback reads
# the last three user messages and reverts as they happened).
RAW_USER_MESSAGES = 3


def _loop_dict(tracker: DialogueStateTracker) -> Optional[Dict[str, Any]]:
    # Shallow: the record is serialised, and read back from its text, before
    # anything keeps it (``Codec.encode_record``); ``dataclasses.asdict``
    # deep-copied the trigger message on every save.
    loop = tracker.active_loop
    if not loop:
        return None
    return {field.name: getattr(loop, field.name) for field in dataclasses.fields(loop)}


def slack(max_history: int) -> int:
    """User turns the raw window may grow by before it is compacted again.

    Memory against CPU: each user turn adds its events to the window on
    every save until the next compaction, which costs a few tenths of a ms.
    At ``max_history: 10``, 3 (one compaction in four turns) keeps a record
    of the benchmark's shape within 4 KB of Redis on every turn; 5 (one in
    six) took 4.4 KB on a quarter of them (docs/benchmarks.md)."""
    return max(2, (max_history + 2) // 4)


def _is_action(event: Event, name: Optional[str] = None) -> bool:
    return isinstance(event, ActionExecuted) and (name is None or event.action_name == name)


_RESETTING = (UserUtteranceReverted, ActionReverted, Restarted, SessionStarted)


def session_start(events: Sequence[Event]) -> int:
    """Index where the last session's head begins (its ``action_session_start``
    and ``SessionStarted``); 0 if there is none."""
    for i in range(len(events) - 1, -1, -1):
        if isinstance(events[i], SessionStarted):
            return i - 1 if i and _is_action(events[i - 1], ACTION_SESSION_START_NAME) else i
    return 0


@functools.lru_cache(maxsize=None)
def _kind(cls: type) -> str:
    """``reset``, ``action``, ``user`` or ``other``: what ``_reusable_base``
    asks of an event, once per event class (``isinstance`` on Rasa's abstract
    ``Event`` classes goes through ``ABCMeta`` each time, and this runs over
    the window on every save)."""
    if issubclass(cls, _RESETTING):
        return "reset"
    if issubclass(cls, ActionExecuted):
        return "action"
    return "user" if issubclass(cls, UserUttered) else "other"


def _reusable_base(events: List[Event], previous: Optional[RebuiltBase],
                   max_history: int) -> Optional[RebuiltBase]:
    if previous is None or not previous.base:
        return None
    users = 0
    # The window's first ``checked`` events were there when the base was made:
    # a revert among them is accounted for (otherwise each fallback would
    # compact the next turns again, until its revert leaves the window).
    for i, event in enumerate(events[previous.length:]):
        kind = _kind(type(event))
        if i >= previous.checked and (kind == "reset" or (
                kind == "action" and event.action_name == ACTION_SESSION_START_NAME)):
            return None  # undone or restarted: what the base must hold changes
        users += kind == "user"
    if users > RAW_USER_MESSAGES + slack(max_history):
        return None
    return previous


def _compact(tracker: DialogueStateTracker, events: List[Event], slot_list: List[Slot],
             max_history: int, previous: Optional[RebuiltBase],
             as_dict: Callable[[Event], Dict[str, Any]]) -> Tuple[Dict[str, Any], int, bool]:
    """A new base, the index where the raw window begins, and whether the
    tracker lacks history the base should hold (see ``Built.short``)."""
    reused = previous.stored_forms() if previous is not None else {}
    if reused:
        encode_fresh = as_dict

        def as_dict(event: Event) -> Dict[str, Any]:  # noqa: F811 - the base's forms first
            hit = reused.get(id(event))
            return hit[1] if hit is not None and hit[0] is event else encode_fresh(event)
    start = session_start(events)
    floor = previous.length if previous is not None and previous.base else 0
    if start >= floor:
        floor, previous = 0, None  # a new session began after the base
    w = applied.window_start(events, start, floor, RAW_USER_MESSAGES)
    if w is None:
        if floor:  # the base already holds all that is not raw
            return previous.base, previous.length, False
        return {}, start, False
    names = applied.loop_names(events, previous.base.get("loops", ()) if floor else ())
    if isinstance(events[start], SessionStarted):
        head = events[start:start + 1]
    elif (_is_action(events[start], ACTION_SESSION_START_NAME) and start + 1 < len(events)
          and isinstance(events[start + 1], SessionStarted)):
        head = events[start:start + 2]
    else:
        # No session start at all (a tracker begun by ``get_or_create_tracker``
        # or the HTTP API: ``action_listen`` first): a marker stands for it,
        # and every event from the first is in ``done``, none in the head.
        head = [SessionStarted(timestamp=events[0].timestamp)]
    done = applied.fold(tracker.sender_id, events[:w], names)
    # Reverts in the raw window undo applied events before it: the margins
    # are measured on the whole tracker's applied events, whose first
    # ``shared`` events are those of ``done``.
    whole = applied.fold(tracker.sender_id, events, names)
    shared = 0
    while shared < min(len(done), len(whole)) and whole[shared] is done[shared]:
        shared += 1
    cut = applied.cut_point(whole, max_history, names, applied.REVERT_KEPT)
    cut = None if cut is None else min(cut, shared)
    # The old summary stands for history this tracker no longer has: needing
    # a cut inside it means reverts consumed the margin (``Built.short``).
    kept = len(previous.base["summary"]) if floor else 0
    need = applied.cut_point(whole, max_history, names)
    short = bool(kept) and (need is None or min(need, shared) < kept)
    cut = kept if cut is None or cut < kept else cut
    summary = applied.summary(tracker.sender_id, done[:cut], slot_list,
                                                applied.slot_cap(max_history)) if cut else []
    stored = previous.base.get("latest_bot") if floor else None
    bot = applied.bot_at(tracker.sender_id, events, w, names, floor,
                         parse_event(stored) if stored else None)
    return {
        "loops": names,
        "head": [as_dict(e) for e in head],
        "summary": [as_dict(e) for e in summary],
        "applied": [as_dict(e) for e in done[cut:]],
        "latest_bot": as_dict(bot) if bot is not None else None,
    }, w, short


@dataclasses.dataclass
class Built:
    """A new hot record and what the store keeps about it.

    ``event_jsons[i]`` is the JSON text of ``record["events"][i]`` if known (None:
    not serialised yet), ``base_json`` that of ``record["base"]`` if known
    (reused unchanged), ``forms`` the stored forms of the events the record holds,
    ``previous`` the base to reuse for this same tracker next time (None after
    a compaction), ``base_packed`` the compressed segment of ``base_json`` if
    known (``RebuiltBase.packed``). ``short``: reverts undid more turns than the tracker holds
    beyond its base (thousands of ``/back``); the record then keeps the old
    summary, and the store rebuilds it from the log (``store.save``).
    """

    record: Dict[str, Any]
    event_jsons: List[Optional[str]]
    forms: StoredForms
    previous: Optional[RebuiltBase]
    base_json: Optional[str] = None
    short: bool = False
    base_packed: Optional[bytes] = None


def build_record(
    tracker: DialogueStateTracker,
    slots: Iterable[Slot],
    max_history: int,
    next_seq: int,
    encode: Encoder,
    forms: Optional[StoredForms] = None,
    previous: Optional[RebuiltBase] = None,
) -> Built:
    """Compact ``tracker`` into a hot record (a JSON-ready dict).

    Compaction (a new base from Rasa's applied events) runs when the raw
    window has grown ``slack(max_history)`` user turns past what it must hold,
    or after a revert, restart or session start the base does not account for
    yet (``RebuiltBase.checked``, the record's ``base_checked``); in between,
    the previous base is kept as it was.

    Args:
        tracker: the conversation state after the turn.
        slots: the domain's slots (to replay the state at the window's start).
        max_history: dialogue states the policies look back on.
        next_seq: sequence number the next logged event will get.
        encode: serialises an event missing from ``forms``; its errors propagate.
        forms: the stored forms of events known already.
        previous: the base the tracker was rebuilt from, if any.

    Returns:
        The record with what the store keeps about it (``Built``).
    """
    events = list(tracker.events)
    known = forms or {}

    def as_dict(event: Event) -> Dict[str, Any]:
        hit = known.get(id(event))
        return hit[1] if hit is not None and hit[0] is event else encode(event)[1]
    if previous is not None and previous.length and (
            len(events) < previous.length or events[0] is not previous.first):
        previous = None  # events were dropped (max_event_history): compact afresh
    reused = _reusable_base(events, previous, max_history)
    short = False
    if reused is not None:
        base, cut, checked = reused.base, reused.length, reused.checked
    else:
        base, cut, short = _compact(tracker, events, list(slots), max_history, previous,
                                    as_dict)
        # A base made now accounts for every event of the window; one kept as
        # it was (too few user messages to compact) only for what it did before.
        checked = len(events) - cut if base else 0
        if previous is not None and base is previous.base:
            reused = previous
            checked = previous.checked
    kept_forms: StoredForms = {}
    window = []
    event_jsons: List[Optional[str]] = []
    for event in events[cut:]:
        hit = known.get(id(event))
        if hit is None or hit[0] is not event:
            text, as_dict = encode(event)
            hit = (event, as_dict, text)
        kept_forms[id(event)] = hit
        window.append(hit[1])
        event_jsons.append(hit[2])
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
        "base_checked": checked,
    }
    return Built(record, event_jsons, kept_forms, reused,
                 reused.text if reused is not None else None, short,
                 reused.packed if reused is not None and reused.text is not None else None)


def last_session(tracker: DialogueStateTracker) -> DialogueStateTracker:
    """A tracker holding only the events of ``tracker``'s last session."""
    events = list(tracker.events)
    start = session_start(events)
    if start == 0:
        return tracker
    return DialogueStateTracker.from_events(
        tracker.sender_id, events[start:], tracker.slots.values(),
        max_event_history=tracker._max_event_history)
