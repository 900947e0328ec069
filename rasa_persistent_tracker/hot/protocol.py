"""The hot-state boundary: what the store needs from a hot-state backend.

``HotState`` is the protocol; ``redis_state.RedisHotState`` implements it on
Redis (standalone, Sentinel or Cluster) and ``embedded.SQLiteHotState`` on a
local SQLite file. tests/test_hot_state_conformance.py runs the same contract
against every backend. Of an outbox entry a backend reads only the header
(``entry_header``).
"""
import dataclasses
import hashlib
from typing import AsyncIterator, Callable, List, Optional, Protocol

from rasa_persistent_tracker.security.compressed import Payload, stored_bytes


class UnusableValue(Exception):
    """A key holds a value the scripts cannot update in place (wrong type).

    Internal to the package: the store quarantines the value and retries.
    """


class RecordMissing(Exception):
    """A commit that expected a record (``expect_record``) found none: the hot
    state lost it (a Redis wipe) while the turn was being handled, and with it
    maybe undelivered outbox entries. Nothing was written.

    Internal to the package: the store re-logs what it can and commits again.
    """


class Erased(Exception):
    """A commit would bring back an erased conversation: its record is gone
    and its tombstone says the tracker in hand was read before the erasure
    (or the commit expected the record). Nothing was written.

    Internal to the package: the store drops the save with a warning.
    """

    def __init__(self, conversation_id: str, floor: int) -> None:
        super().__init__(conversation_id)
        self.conversation_id = conversation_id
        self.floor = floor


def read_before_erasure(floor: int, expected_version: Optional[int], expect_record: bool,
                        restoring: bool) -> bool:
    """Whether a commit onto a missing record with a tombstone at ``floor``
    comes from before the erasure (the rule ``redis_scripts.COMMIT`` spells
    in Lua): it expected the record, or was read at a version at or below
    the floor, or restores a record from SQL data at or below it."""
    expected = expected_version or 0
    return expect_record or 0 < expected <= floor or (restoring and expected <= floor)


@dataclasses.dataclass
class Removed:
    """What ``HotState.erase`` removed of one conversation.

    ``floor``: the version the tombstone holds (every version the erased
    conversation had is at or below it); None when the erase was skipped
    because the record's version was not ``only_at_version``.
    """

    floor: Optional[int]
    record: bool = False
    outbox_entries: int = 0


@dataclasses.dataclass
class HotEntry:
    """What ``load`` found for a conversation.

    ``payload`` is None when no record exists (stored bytes as text:
    ``compressed.stored_text``); ``problem`` names why a present
    value is unusable (wrong Redis type, unreadable version) and is None when fine.
    ``outbox_seq`` is the highest sequence number still waiting in the outbox
    (Redis leaves it 0 when ``unchanged``: recovery does not need it then).
    ``unchanged`` means the stored payload's digest is the one the caller
    already knows (``load(..., known=)``), computed over the stored bytes at
    every load: ``payload`` is then not sent and stays None.
    """

    version: int = 0
    payload: Optional[str] = None
    problem: Optional[str] = None
    outbox_seq: int = 0
    unchanged: bool = False


def payload_digest(payload: Payload) -> str:
    """Content id of a stored payload: SHA-1 hex, as Redis' ``redis.sha1hex``
    computes it over the stored bytes (a content id, not a security check)."""
    return hashlib.sha1(stored_bytes(payload)).hexdigest()


@dataclasses.dataclass
class Pending:
    """Outbox entries of one conversation and the record they lead to."""

    entries: List[str]
    payload: Optional[str]
    version: int
    complete: bool


class HotState(Protocol):
    """Versioned, expiring per-conversation records plus an outbox."""

    async def load(self, conversation_id: str, known: Optional[str] = None) -> HotEntry:
        """Read the record and the outbox position; the payload is left out
        (``unchanged``) if its ``payload_digest`` is ``known``.
        Raises HotStateUnavailable."""

    async def commit(self, conversation_id: str, expected_version: Optional[int],
                     payload: Payload, ttl: float, outbox_entry: Optional[str],
                     expect_record: bool = False, restoring: bool = False) -> int:
        """Write ``payload`` (stored as ``compressed.stored_bytes``) if the
        stored version is ``expected_version`` (None: any) and append
        ``outbox_entry``, atomically. Returns the new version.
        A missing record counts as ``expected_version`` unless ``expect_record``.
        A missing record with a tombstone (``erase``): refused with Erased if
        ``expect_record``, or ``expected_version`` is at or below its floor
        (for a record ``restoring`` from SQL, also 0: its data was read
        before the erasure), else the new record's version starts above it.
        Raises ConcurrentSaveError, RecordMissing, Erased, HotStateUnavailable."""

    async def quarantine(self, conversation_id: str, ttl: float) -> Optional[str]:
        """Move the current value aside under a quarantine key; return its name."""

    async def quarantine_entry(self, conversation_id: str, entry: str, ttl: float) -> str:
        """Move one unreadable outbox entry out of the outbox, atomically, to a
        quarantine key; return its name. The entries around it stay queued."""

    async def pending(self, conversation_id: str, limit: int) -> Pending:
        """Oldest ``limit`` outbox entries and the current record."""

    async def ack(self, conversation_id: str, upto_seq: int) -> int:
        """Drop outbox entries whose last sequence number is <= ``upto_seq``."""

    async def touch(self, conversation_id: str, ttl: float) -> None:
        """Refresh the record's TTL."""

    async def erase(self, conversation_id: str, floor: int, ttl: float,
                    only_at_version: Optional[int] = None) -> Removed:
        """Atomically: write the tombstone (kept ``ttl`` seconds, floor at least
        ``floor`` and the record's version), delete the record and the outbox.
        With ``only_at_version``, do nothing unless the record's version is
        that (0: no record). Quarantined copies are not touched."""

    async def tombstone(self, conversation_id: str) -> Optional[int]:
        """The floor of the conversation's tombstone; None if there is none."""

    def bind_erasure(self, digests: Callable[[str], List[str]]) -> None:
        """How tombstones are named (``security.erasure.ErasureIds``)."""

    def conversations(self) -> AsyncIterator[str]:
        """Ids of all conversations with a record (SCAN, never KEYS)."""

    def outboxes(self) -> AsyncIterator[str]:
        """Ids of all conversations with a non-empty outbox."""

    async def ping(self) -> None:
        """Raise HotStateUnavailable unless the server answers."""

    async def close(self) -> None:
        """Release connections."""
