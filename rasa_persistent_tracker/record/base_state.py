"""A rebuilt tracker's state right after its record's base, kept to be copied.

``replay.rebuild_tracker`` replays a record's base (loop markers, session
head, summary, applied events: often 40-80 events) and then its raw window.
The base changes only when a save compacts the record, so a process that
remembers the record (``Remembered.base_state``) replays the base once and,
on later rebuilds, copies the state it left instead:

* the events as the replay left them (``own_copy`` of each: a replayed
  ``EntitiesAdded`` or ``DefinePrevUserUtteredFeaturization`` edits the
  latest user message in place, so the stored forms alone would lose it),
  each copied again for each new tracker;
* each slot as a copy;
* the tracker's attributes with the identities the replay gives them: the
  latest message is the new tracker's copy of that event, the active loop's
  trigger message is that copy's ``parse_data``; the latest bot message is a
  copy of the one parsed from the base.

Only a state whose every attribute is one of those is kept (``capture``
returns None otherwise: an event type that sets anything else is replayed
every time), and it is used only for the very same base, window start,
slots and ``max_event_history`` (``BaseState.fits``). The rebuild's check of
the replayed slots against the recorded state runs either way.
"""
import copy
from typing import Any, Dict, List, Optional, Sequence

from rasa.shared.core.events import BotUttered, Event, UserUttered
from rasa.shared.core.slots import Slot
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker.record.events import own_copy

# The attributes of a Rasa 3.6 tracker (``DialogueStateTracker.__init__``).
_ATTRIBUTES = frozenset({
    "_max_event_history", "events", "sender_id", "slots", "sender_source",
    "is_rule_tracker", "_paused", "followup_action", "latest_action", "latest_message",
    "latest_bot_utterance", "active_loop", "model_id", "assistant_id"})


class BaseState:
    """What ``capture`` keeps; ``clone`` makes a tracker in that state."""

    __slots__ = ("base", "source", "stamp", "slot_list", "max_event_history", "replayed",
                 "slots", "paused", "followup_action", "latest_action", "latest_message",
                 "bot", "active_loop", "trigger")

    def fits(self, base: Dict[str, Any], source: Sequence[Event], stamp: Any,
             slot_list: List[Slot], max_event_history: Optional[int]) -> bool:
        """Whether this is the state of the same base, replayed the same way."""
        return (self.base is base and self.source is source and self.stamp == stamp
                and type(self.stamp) is type(stamp)
                and self.max_event_history == max_event_history
                and len(self.slot_list) == len(slot_list)
                and all(a is b for a, b in zip(self.slot_list, slot_list)))

    def clone(self, sender_id: str) -> DialogueStateTracker:
        """A new tracker in this state, owning what the replay would give it."""
        tracker = DialogueStateTracker(sender_id, (), self.max_event_history)
        copies = [own_copy(event) for event in self.replayed]
        tracker.events.extend(copies)
        tracker.slots = {name: copy.copy(slot) for name, slot in self.slots.items()}
        tracker._paused = self.paused
        tracker.followup_action = self.followup_action
        tracker.latest_action = (dict(self.latest_action) if self.latest_action is not None
                                 else None)
        if self.latest_message is not None:  # else the new tracker's own empty one
            tracker.latest_message = copies[self.latest_message]
        # Its own object, as a replay parses one (nested values shared, as then).
        tracker.latest_bot_utterance = (copy.copy(self.bot) if self.bot is not None
                                        else BotUttered.empty())
        if self.active_loop is not None:
            loop = copy.copy(self.active_loop)
            if self.trigger is not None:
                loop.trigger_message = copies[self.trigger].parse_data
            tracker.active_loop = loop
        return tracker


def _fresh_empty(message: Any) -> bool:
    """Whether ``message`` is what ``UserUttered.empty()`` makes (as a tracker's
    reset leaves it), apart from its timestamp."""
    if type(message) is not UserUttered:
        return False
    fresh = UserUttered.empty()
    ours = dict(message.__dict__, timestamp=None)
    return ours == dict(fresh.__dict__, timestamp=None)


def capture(tracker: DialogueStateTracker, replayed: List[Event], base: Dict[str, Any],
            source: Sequence[Event], stamp: Any, slot_list: List[Slot],
            max_event_history: Optional[int], bot: Optional[BotUttered]) -> Optional[BaseState]:
    """The state of ``tracker`` right after replaying ``replayed`` (the events
    as given to the replay) from a fresh tracker, or None
    if it cannot be copied faithfully (module docstring). ``bot``: the latest
    bot message parsed from the base, of which each copy gets its own (None:
    the base has none, each copy gets an empty one)."""
    if (set(vars(tracker)) != _ATTRIBUTES or tracker.model_id or tracker.assistant_id
            or tracker.sender_source is not None or tracker.is_rule_tracker
            or type(tracker.slots) is not dict):
        return None
    events = list(tracker.events)
    if len(events) != len(replayed):  # max_event_history dropped some
        return None
    state = BaseState()
    positions = {id(event): i for i, event in enumerate(events)}
    state.latest_message = positions.get(id(tracker.latest_message))
    if state.latest_message is None and not _fresh_empty(tracker.latest_message):
        return None
    if bot is not None and (tracker.latest_bot_utterance is not bot
                            or not isinstance(bot, Event)):
        return None  # (a stored latest bot message that did not parse)
    if bot is None and not (type(tracker.latest_bot_utterance) is BotUttered
                            and tracker.latest_bot_utterance.text is None):
        return None
    state.trigger = None
    loop = tracker.active_loop
    if loop is not None and loop.trigger_message is not None:
        state.trigger = next((i for i, event in enumerate(events)
                              if getattr(event, "parse_data", None) is loop.trigger_message),
                             None)
        if state.trigger is None:
            return None
    state.base, state.source, state.stamp = base, source, stamp
    state.slot_list, state.max_event_history = list(slot_list), max_event_history
    # As the replay left them: a replayed ``EntitiesAdded`` edits the latest
    # user message in place, so the events as stored would lose that edit.
    state.replayed = [own_copy(event) for event in events]
    state.slots = {name: copy.copy(slot) for name, slot in tracker.slots.items()}
    state.paused, state.followup_action = tracker._paused, tracker.followup_action
    state.latest_action = (dict(tracker.latest_action) if tracker.latest_action is not None
                           else None)
    state.bot = bot
    state.active_loop = copy.copy(loop) if loop is not None else None
    return state
