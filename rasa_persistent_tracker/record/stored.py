"""What a store knows of the events of a tracker it handed out or saved.

``Loaded`` is a tracker's position (record version, next sequence number,
its last stored event, found again by identity), ``StoredForms`` the stored
form of each event already serialised (so unchanged events are not
serialised again), and ``RebuiltBase`` the base it was rebuilt from, with
the base's stored forms for the next compaction (``base_forms``).
``new_events_after`` finds a tracker's new events by that last event.
``window`` builds records with them; ``replay`` and ``trackers`` make them.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from rasa.shared.core.events import Event, UserUttered


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
    forms: "StoredForms" = dataclasses.field(default_factory=dict)
    previous: Optional["RebuiltBase"] = None


# ``id(event) -> (event, stored dict, its JSON text or None)`` for events whose
# stored form is known, so unchanged events are not serialised again. Stored
# events are treated as immutable, as Rasa does (it deep-copies an event
# before editing it).
StoredForms = Dict[int, Tuple[Event, Dict[str, Any], Optional[str]]]
# Serialises an event the cache does not know: (JSON text, dict as read back).
Encoder = Callable[[Event], Tuple[str, Dict[str, Any]]]


@dataclasses.dataclass
class RebuiltBase:
    """The base a tracker was rebuilt from, how many events it occupies and,
    if known, its JSON text and parsed events (head, summary, applied).
    ``checked``: how many of the raw window's first events the compaction that
    made the base saw (a revert among them is accounted for in the base).
    ``packed``: the compressed segment of exactly ``text``, if known (the
    codec reuses it instead of compressing the base again)."""

    base: Dict[str, Any]
    length: int
    first: Optional[Event]
    text: Optional[str] = None
    slot_events: Optional[List[Event]] = None
    checked: int = 0
    packed: Optional[bytes] = None

    def stored_forms(self) -> "StoredForms":
        """``base_forms`` of this base, made when a compaction first asks."""
        forms = self.__dict__.get("_forms")
        if forms is None:
            forms = self.__dict__["_forms"] = (base_forms(self.base, self.slot_events)
                                               if self.slot_events is not None else {})
        return forms


def base_forms(base: Dict[str, Any], events: Sequence[Event]) -> "StoredForms":
    """The stored forms of a base's events (head, summary, applied; ``events``
    parsed from them, in order), so a compaction that keeps them does not
    serialise them again. User messages are left out: a rebuilt tracker holds
    its own copy of each (``EntitiesAdded`` edits the latest in place), which
    must be serialised as it is now."""
    if not base or "head" not in base:
        return {}
    dicts = base["head"] + base["summary"] + base["applied"]
    if len(dicts) != len(events):
        return {}
    return {id(e): (e, d, None) for e, d in zip(events, dicts)
            if not isinstance(e, UserUttered)}


def new_events_after(events: List[Event], marker: Loaded) -> Optional[List[Event]]:
    """Events appended after the last loaded one (by identity); None if lost."""
    if marker.last_event is None:
        return list(events)
    for i in range(len(events) - 1, -1, -1):
        if events[i] is marker.last_event:
            return events[i + 1:]
    return None
