"""Rasa's applied-event semantics, as the hot record needs them.

Everything here runs Rasa's own code (``DialogueStateTracker.applied_events``
and event ``apply_to``); this module only decides which events a record must
keep so that, replayed, they give what the full history gives:

* ``fold``: Rasa's ``applied_events`` of a prefix, with the loop names of the
  whole conversation (Rasa collapses a loop's happy path only for loops named
  by some ``ActiveLoop`` event, anywhere in ``tracker.events``).
* ``cut_point``: how far back the applied events must stay verbatim: the
  policies' states, the turns a revert (``/back``, fallbacks) may undo, and
  the last execution of every loop that a later execution may collapse to.
* ``summary``: the state before that point as events that replay to it
  (slot events in order, reminders, the active loop with its trigger
  message and flags, the latest bot message, the paused flag).
"""
from collections import deque
from typing import Any, Dict, Iterable, List, Optional, Sequence

from rasa.shared.core.constants import ACTION_LISTEN_NAME, ACTION_UNLIKELY_INTENT_NAME
from rasa.shared.core.events import (
    ActionExecuted,
    ActionExecutionRejected,
    ActionReverted,
    ActiveLoop,
    AllSlotsReset,
    BotUttered,
    ConversationPaused,
    Event,
    LoopInterrupted,
    ReminderScheduled,
    Restarted,
    SessionStarted,
    SlotSet,
    UserUttered,
    UserUtteranceReverted,
)
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker

# User turns one turn may undo before the next save: ``action_back`` reverts
# its own message and the one before it. A record keeps REVERT_KEPT of them,
# and is rebuilt from the log only when fewer than REVERT_MARGIN are left
# (so a conversation with a ``/back`` now and then reads its log once per
# REVERT_KEPT - REVERT_MARGIN + 1 of them, not at each).
REVERT_MARGIN = 2
REVERT_KEPT = 4


def slot_cap(max_history: int) -> int:
    """Slot events a summary lists as they happened; beyond, see ``_capped``."""
    return 4 * (max_history + 1)


def loop_names(events: Iterable[Event], known: Iterable[str] = ()) -> List[str]:
    """Names of the loops some ``ActiveLoop`` event names, in first-seen order."""
    names = dict.fromkeys(known)
    for event in events:
        if isinstance(event, ActiveLoop) and event.name:
            names.setdefault(event.name)
    return list(names)


def markers(names: Sequence[str], timestamp: Optional[float] = None) -> List[Event]:
    """Events naming each loop without changing any state (activate, deactivate),
    stamped ``timestamp`` (a rebuilt tracker is a function of its record alone)."""
    out: List[Event] = []
    for name in names:
        out += [ActiveLoop(name, timestamp=timestamp), ActiveLoop(None, timestamp=timestamp)]
    return out


def fold(sender_id: str, events: Sequence[Event], names: Sequence[str]) -> List[Event]:
    """Rasa's ``applied_events()`` of ``events``, with the loops ``names`` known."""
    shown = markers(names)
    tracker = DialogueStateTracker(sender_id, None)
    tracker.events = deque(shown + list(events))
    applied = tracker.applied_events()
    ids = {id(e) for e in shown}
    return [e for e in applied if id(e) not in ids]


def _countable(event: Event) -> bool:
    """An action whose state Rasa's policies keep (TED and Memoization drop
    ``action_unlikely_intent`` and rule-only turns before slicing)."""
    return (isinstance(event, ActionExecuted)
            and event.action_name != ACTION_UNLIKELY_INTENT_NAME
            and not event.hide_rule_turn)


def cut_point(applied: Sequence[Event], max_history: int, names: Sequence[str],
              margin: int = REVERT_MARGIN) -> Optional[int]:
    """Where the verbatim applied events must begin (None: the whole session).

    From the end (or from the earliest loop execution a later one may
    collapse to), skip ``margin`` user messages, then count
    ``max_history + 2`` countable actions (the first state of a replayed
    window lacks its previous action), then go back to an ``action_listen``.
    """
    end = len(applied)
    deactivated = max((i for i, e in enumerate(applied)
                       if isinstance(e, ActiveLoop) and e.name is None), default=-1)
    for name in names:
        last = max((i for i in range(deactivated + 1, end)
                    if isinstance(applied[i], ActionExecuted)
                    and applied[i].action_name == name), default=None)
        if last is not None:
            end = min(end, last)
    users = 0
    i = end - 1
    while i >= 0 and users < margin:
        if isinstance(applied[i], UserUttered):
            users += 1
        i -= 1
    if users < margin:
        return None
    needed = max_history + 2
    while i >= 0 and needed:
        if _countable(applied[i]):
            needed -= 1
        i -= 1
    while i >= 0 and not (isinstance(applied[i], ActionExecuted)
                          and applied[i].action_name == ACTION_LISTEN_NAME):
        i -= 1
    return i if i > 0 else None


def _capped(slot_events: List[Event], cap: int, stamp: Optional[float]) -> List[Event]:
    """Slot events to list; past ``cap``, the last value per slot
    (the same values on replay and in a session start's carry-over, which
    ignores ``AllSlotsReset``), then the reset and what was set after it."""
    if len(slot_events) <= cap:
        return slot_events
    resets = [i for i, e in enumerate(slot_events) if isinstance(e, AllSlotsReset)]

    def last_per_key(events: List[Event]) -> List[Event]:
        last = {e.key: i for i, e in enumerate(events) if isinstance(e, SlotSet)}
        return [e for i, e in enumerate(events) if isinstance(e, SlotSet) and last[e.key] == i]
    if not resets:
        return last_per_key(slot_events)
    return last_per_key(slot_events) + [AllSlotsReset(timestamp=stamp)] + last_per_key(
        slot_events[resets[-1] + 1:])


def summary(sender_id: str, applied: Sequence[Event], slots: Iterable[Slot],
            cap: int) -> List[Event]:
    """Events that replay to the state after ``applied`` (see the module doc).

    The events made here are stamped like the last of ``applied``: a record is
    a function of the conversation, whoever compacts it and when."""
    stamp = _last_stamp(applied)
    slot_list = list(slots)
    state = DialogueStateTracker(sender_id, slot_list)
    for event in applied:
        state.update(event)
    out: List[Event] = _capped(
        [e for e in applied if isinstance(e, (SlotSet, AllSlotsReset))], cap, stamp)
    reminders: Dict[str, Event] = {}
    for event in applied:
        if isinstance(event, ReminderScheduled):
            reminders.pop(event.name, None)
            reminders[event.name] = event
    out += list(reminders.values())
    bots = [e for e in applied if isinstance(e, BotUttered)]
    if bots:
        out.append(bots[-1])
    loop = state.active_loop
    if loop is not None and loop.name:
        trigger: Dict[str, Any] = dict(loop.trigger_message or {})
        out.append(UserUttered(trigger.get("text"), trigger.get("intent"),
                               trigger.get("entities"), trigger,
                               timestamp=stamp))
        out.append(ActiveLoop(loop.name, timestamp=stamp))
        if loop.is_interrupted:
            out.append(LoopInterrupted(True, timestamp=stamp))
        if loop.rejected:
            out.append(ActionExecutionRejected(loop.name, timestamp=stamp))
    if state.is_paused():
        out.append(ConversationPaused(timestamp=stamp))
    return out


def _last_stamp(events: Sequence[Event]) -> Optional[float]:
    return events[-1].timestamp if events else None


def window_start(events: Sequence[Event], start: int, floor: int, users: int) -> Optional[int]:
    """The ``action_listen`` before the ``users``-th last user message after
    ``max(start, floor)`` (None: there are fewer, keep them all)."""
    seen = 0
    for i in range(len(events) - 1, max(start, floor), -1):
        if isinstance(events[i], UserUttered):
            seen += 1
            if seen == users:
                for j in range(i - 1, max(start, floor), -1):
                    if (isinstance(events[j], ActionExecuted)
                            and events[j].action_name == ACTION_LISTEN_NAME):
                        return j
                return None
    return None


def bot_at(sender_id: str, events: Sequence[Event], w: int, names: Sequence[str],
           floor: int, stored: Optional[Event]) -> Optional[Event]:
    """``latest_bot_utterance`` of a tracker of ``events[:w]``: the last bot
    message since Rasa last reset the tracker (a revert replays the applied
    events; a restart or session start empties it). Events before ``floor``
    are a record's base, whose value there was ``stored``."""
    for i in range(w - 1, floor - 1, -1):
        event = events[i]
        if isinstance(event, BotUttered):
            return event
        if isinstance(event, (UserUtteranceReverted, ActionReverted)):
            bots = [e for e in fold(sender_id, events[:i + 1], names)
                    if isinstance(e, BotUttered)]
            return bots[-1] if bots else None
        if isinstance(event, (Restarted, SessionStarted)):
            return None
    return stored if floor else None
