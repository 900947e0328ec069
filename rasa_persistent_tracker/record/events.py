"""Single events: parsing without Rasa's per-call class walk, private copies, and
fingerprints."""
import copy
import hashlib
import json
from typing import Any, Dict, Optional

from rasa.shared.core.events import Event, UserUttered
from rasa.shared.exceptions import RasaException
from rasa.shared.utils.common import all_subclasses

from rasa_persistent_tracker.security.serde import encode_extra

# What parsing a malformed event dict can raise inside Rasa.
EVENT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RasaException)

_EVENT_TYPES: Dict[str, type] = {}
# Event class -> how ``own_copy`` copies it: None (not a user message:
# shared), "dict" or "slots" (a subclass that keeps attributes in __slots__);
# a class not seen yet reads as "?".
# Cached: isinstance on Rasa's ABC-based events costs more than the copy.
_USER_TYPES: Dict[type, Optional[str]] = {}


def _user_kind(cls: type) -> Optional[str]:
    if not issubclass(cls, UserUttered):
        return None
    slotted = any(vars(c).get("__slots__") for c in cls.__mro__)  # ABC has empty ones
    return "slots" if slotted else "dict"


def parse_event(event_dict: Dict[str, Any]) -> Optional[Event]:
    """``Event.from_parameters`` without its per-call class-tree walk.

    Rasa resolves the event class by scanning every subclass of ``Event`` for
    each event (the biggest cost of rebuilding a tracker); the map is built
    once, keeping Rasa's first-match order, and unknown names (custom events
    defined later, legacy names) still go through Rasa's own resolution.
    """
    if not _EVENT_TYPES:
        for cls in all_subclasses(Event):
            _EVENT_TYPES.setdefault(cls.type_name, cls)
    cls = _EVENT_TYPES.get(event_dict.get("event"))
    if cls is None:
        return Event.from_parameters(event_dict)
    return cls._from_parameters(event_dict)


def own_copy(event: Event) -> Event:
    """``event`` as one tracker may own it while others hold the original.

    Rasa treats stored events as immutable except the latest user message,
    which it edits in place: ``EntitiesAdded`` appends to its entity list (the
    same list as its ``parse_data["entities"]``) and
    ``DefinePrevUserUtteredFeaturization`` sets ``use_text_for_featurization``.
    A user message therefore gets a shallow copy with its own entity list and
    ``parse_data`` dict (keeping the two shared, as parsing makes them); every
    other event is returned as it is. The copy reads exactly like a message
    parsed again from its stored form, at a fraction of the cost.
    """
    cls = type(event)
    kind = _USER_TYPES.get(cls, "?")
    if kind == "?":
        kind = _USER_TYPES[cls] = _user_kind(cls)
    if kind is None:
        return event
    if kind == "slots":  # a custom message with __slots__: copy.copy keeps them
        copied = copy.copy(event)
    else:
        copied = object.__new__(cls)
        copied.__dict__.update(event.__dict__)
    entities = list(event.entities) if event.entities is not None else None
    copied.entities = entities
    if isinstance(event.parse_data, dict):
        parse_data = dict(event.parse_data)
        if event.parse_data.get("entities") is event.entities:
            parse_data["entities"] = entities
        copied.parse_data = parse_data
    return copied


def _canonical(value: Any) -> Any:
    try:
        return encode_extra(value)
    except TypeError:
        return repr(value)


def fingerprint(event_dict: Dict[str, Any]) -> str:
    """Stable identity of one event (type, timestamp and content).

    Computed on the stored form, so an event and its copy read back from
    storage (numpy values become lists, etc.) have the same fingerprint.
    """
    raw = json.dumps(event_dict, sort_keys=True, default=_canonical, separators=(",", ":"))
    return hashlib.blake2b(raw.encode("utf-8"), digest_size=12).hexdigest()
