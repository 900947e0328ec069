"""Naming the value that made a turn unstorable.

Encoding a turn can fail on values no JSON can carry faithfully, in ways the
encoder does not translate itself (``10**5000`` exceeds Python's integer-to-text
limit: ``ValueError``; a cycle: ``ValueError``; very deep nesting:
``RecursionError``). ``unstorable`` turns such a failure into the package's
error naming the slot, never the value.
"""
import json
from typing import Iterable

from rasa.shared.core.events import Event, SlotSet

from rasa_persistent_tracker.errors import PersistentTrackerError, SlotValueError

# What encoding raises for a value it cannot write (beyond the package's own).
ENCODING_ERRORS = (ValueError, OverflowError, RecursionError)


def unstorable(events: Iterable[Event], exc: BaseException) -> PersistentTrackerError:
    """The error to raise when encoding ``events`` failed with ``exc``."""
    for event in events:
        if isinstance(event, SlotSet):
            try:
                json.dumps(event.value, default=str)
            except ENCODING_ERRORS:
                return SlotValueError(event.key, f"{type(event.value).__name__} that cannot "
                                                 f"be encoded ({type(exc).__name__})")
    return PersistentTrackerError(
        f"The turn holds a value that cannot be encoded ({type(exc).__name__}). "
        f"Nothing was saved.")
