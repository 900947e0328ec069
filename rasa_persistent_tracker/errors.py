"""Exceptions raised by rasa_persistent_tracker.

Every error the package raises derives from one base, so callers can catch the
whole family at once::

    PersistentTrackerError
    ├── ConfigError              bad or unknown configuration key (start-up)
    ├── EncryptionKeyMissing     stored data is encrypted with a key this
    │                            process does not have (never taken for
    │                            corruption: nothing is quarantined or replaced)
    ├── StorageUnavailable       a server could not be reached
    │   ├── HotStateUnavailable  Redis (or the embedded hot store) is down
    │   │   └── HotStateBusy     every pooled Redis connection stayed busy
    │   └── EventLogUnavailable  the SQL event log is down
    ├── ConcurrentSaveError      optimistic lock lost: the tracker is stale
    ├── SlotValueError           a slot value cannot be stored faithfully
    └── CorruptRecordError       stored bytes cannot be decoded (internal: the
                                 store turns it into a quarantine + fallback)

Errors from redis-py, SQLAlchemy and cryptography are translated at the module
boundary (``raise HotStateUnavailable(...) from exc``), so no driver exception
reaches Rasa.
"""
from typing import Optional


class PersistentTrackerError(Exception):
    """Base class of every error raised by this package."""


class ConfigError(PersistentTrackerError, ValueError):
    """A configuration key is unknown or its value is invalid.

    The message always names the key and the offending value (secrets masked).
    """


class EncryptionKeyMissing(PersistentTrackerError):
    """Stored data is encrypted with a key this process was not given.

    A configuration error, not corruption: the value is left exactly as it is
    (never quarantined, never replaced by a fresh session). Raised at start-up
    when the event log is known to hold ciphertext and no key is configured,
    and by any read of a value under a key id that is not configured.
    """


class StorageUnavailable(PersistentTrackerError, ConnectionError):
    """A storage server could not be reached or failed mid-call."""


class HotStateUnavailable(StorageUnavailable):
    """The hot-state store (Redis or the embedded store) is unreachable."""


class HotStateBusy(HotStateUnavailable):
    """Redis is up, but no pooled connection came free in time (overload).

    Nothing about the stored state is in doubt, so the store neither falls back
    to the SQL snapshot nor re-checks records afterwards; the turn fails.
    """


class EventLogUnavailable(StorageUnavailable):
    """The SQL event log is unreachable."""


class ConcurrentSaveError(PersistentTrackerError):
    """A save lost the optimistic lock: another turn committed first.

    Nothing was written: neither the hot record nor the event log changed.

    Attributes:
        conversation_id: the conversation whose save was rejected.
        expected_version: the version the tracker was read at.
        stored_version: the version found in storage at save time.
    """

    def __init__(
        self, conversation_id: str, expected_version: int, stored_version: Optional[int]
    ) -> None:
        self.conversation_id = conversation_id
        self.expected_version = expected_version
        self.stored_version = stored_version
        super().__init__(
            f"Conversation '{conversation_id}' was saved concurrently: this tracker "
            f"was read at version {expected_version}, storage is at version "
            f"{stored_version}. Nothing was written; retrieve the tracker again."
        )


class SlotValueError(PersistentTrackerError, TypeError):
    """A slot value has a type that cannot be stored faithfully.

    Raised before anything is written, so the stored state stays consistent.
    """

    def __init__(self, slot_name: str, value_type: str) -> None:
        self.slot_name = slot_name
        self.value_type = value_type
        super().__init__(
            f"Slot '{slot_name}' holds a value of type {value_type}, which cannot be "
            f"stored. Use a JSON type, Decimal, date/datetime/time, UUID, set/tuple "
            f"or a numpy scalar/array. Nothing was saved."
        )


class CorruptRecordError(PersistentTrackerError):
    """Stored bytes could not be decoded into a valid record.

    The message carries the reason only; never the payload.
    """
