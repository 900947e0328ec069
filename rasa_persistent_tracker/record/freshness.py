"""Telling a replayed (older) hot record from the current one.

Whoever can write to Redis can put back an older record of a conversation
(still validly encrypted: it was genuine once), e.g. from before a session
was locked. Its ``next_seq`` (inside the authenticated payload) then lags
behind something newer that is known, and the record is treated as stale:

* the outbox holds rows numbered at or past the record's ``next_seq``
  (``HotEntry.outbox_seq``, read with the record, is a clear-text header:
  only when it says so are the entries read and authenticated);
* this process handed out or saved a later ``next_seq`` of the conversation
  (a bounded memory: free) - unless the conversation was erased since (its
  tombstone's floor is at or above the version seen then): the record is
  then a new conversation's under the same id, and the memory is dropped;
* otherwise, on the first read of a conversation by this process, the SQL
  log's highest seq (one indexed query, once per conversation and process).

What cannot be detected: a replay seen by a process that never read the
conversation, when every newer row is gone from both the outbox and the log.
"""
import collections
import time
from typing import Optional

from rasa_persistent_tracker.errors import EventLogUnavailable, HotStateUnavailable
from rasa_persistent_tracker.hot.protocol import HotState
from rasa_persistent_tracker.log.entries import Entries
from rasa_persistent_tracker.log.event_log import AsyncEventLog

# Conversations whose latest next_seq a process remembers (a few MB at most).
REMEMBERED = 50_000
# After the log failed to answer, first reads skip it this long: a retrieve
# must not wait on an unreachable SQL server (the hot state is the fast path).
LOG_BACKOFF = 30.0


class Freshness:
    """What one store knows about how far each conversation got."""

    def __init__(self, log: AsyncEventLog, hot: HotState, entries: Entries,
                 size: int = REMEMBERED) -> None:
        self._log = log
        self._hot = hot
        self._entries = entries
        self._size = size
        # conversation -> (highest next_seq seen, the version it was seen at)
        self._seen: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        self._log_down_until = 0.0

    def saw(self, conversation_id: str, next_seq: int, version: int = 0) -> None:
        """A tracker at ``next_seq`` (record ``version``) was handed out or saved."""
        known = self._seen.pop(conversation_id, (0, 0))
        self._seen[conversation_id] = max(known, (next_seq, version))
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)

    async def behind(self, conversation_id: str, next_seq: int,
                     outbox_seq: int) -> Optional[str]:
        """Why a record at ``next_seq`` is older than what is known, or None."""
        if outbox_seq >= next_seq:
            queued = await self._outbox_top(conversation_id)
            if queued >= next_seq:
                return f"the outbox already holds seq {queued}"
        known = self._seen.get(conversation_id)
        if known is not None:
            if next_seq < known[0]:
                if await self._erased_since(conversation_id, known[1]):
                    self._seen.pop(conversation_id, None)
                    self.saw(conversation_id, next_seq)
                    return None
                return f"this process already saw seq {known[0] - 1}"
            return None
        if time.monotonic() < self._log_down_until:
            return None  # nothing newer is known; checked on a later first read
        try:
            logged = await self._log.run(self._log.sync.next_seq, conversation_id)
        except EventLogUnavailable:
            self._log_down_until = time.monotonic() + LOG_BACKOFF
            return None
        if logged > next_seq:
            return f"the SQL log already holds seq {logged - 1}"
        self.saw(conversation_id, next_seq)
        return None

    async def _erased_since(self, conversation_id: str, version: int) -> bool:
        """Whether the conversation was erased after this process saw ``version``."""
        try:
            floor = await self._hot.tombstone(conversation_id)
        except HotStateUnavailable:
            return False
        return floor is not None and floor >= version

    async def _outbox_top(self, conversation_id: str) -> int:
        """The highest seq of the authentic outbox entries (0: none)."""
        try:
            pending = await self._hot.pending(conversation_id, 100_000)
        except HotStateUnavailable:
            return 0
        top = 0
        for entry in pending.entries:
            try:
                top = max(top, self._entries.parse(conversation_id, entry)[1][-1].seq)
            except (ValueError, TypeError, KeyError):
                continue  # delivery quarantines it
        return top


# After the hot state failed (a failover, a restart), records may have lost
# their latest writes for a while; during this window retrieve also checks the
# SQL snapshot and restores a newer one.
SUSPECT_SECONDS = 120.0


class Suspicion:
    """Whether hot records may lag behind SQL right now (see ``SUSPECT_SECONDS``).

    Raised by the store when the hot state fails, and by outbox delivery when
    it re-sequenced provisionally numbered rows (hot records still count from
    the provisional numbers)."""

    def __init__(self) -> None:
        self._until = 0.0

    def suspect(self) -> None:
        """The hot state just failed: check records against SQL for a while."""
        self._until = time.monotonic() + SUSPECT_SECONDS

    @property
    def active(self) -> bool:
        return time.monotonic() < self._until
