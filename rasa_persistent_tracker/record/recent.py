"""Per-process memory of the hot records this process wrote last, decoded.

The next turn of a conversation usually arrives at the process that handled
the last one. Keeping the record it wrote (exactly as it reads back from the
payload) lets ``retrieve`` skip moving and decoding it: the hot state is still
asked on every retrieve, with the payload's digest, and sends the payload only
if it changed (another process wrote, a restore, a rotation). So the memory can
be stale but never wrong. Bounded LRU. Remembered events are shared between
the trackers rebuilt from an entry (see ``Remembered``).
"""
import collections
import dataclasses
import threading
from typing import Any, Dict, List, Optional


@dataclasses.dataclass
class Remembered:
    """A hot record as written: its payload digest, its decoded form, the
    JSON texts of its events and base and the base's compressed segment
    (reused when the next record is written) and, once a retrieve parsed
    them, the base's events and the window's events
    (``replay.rebuild_tracker``; None where not parsed yet).

    The parsed events are never handed out: each rebuilt tracker gets
    ``events.own_copy`` of them, the event itself except for user messages,
    which Rasa edits in place (``EntitiesAdded``). Code that edits other
    events in place, or a user message's nested values, needs
    ``record_cache_size: 0``.
    """

    digest: str
    record: Dict[str, Any]
    event_jsons: List[str]
    base_json: Optional[str] = None
    base_events: Optional[List[Any]] = None
    window_events: Optional[List[Any]] = None
    base_packed: Optional[bytes] = None
    # ``base_state.BaseState`` of the base, once a rebuild captured it.
    base_state: Optional[Any] = None
    # ``(base_state, tracker)``: a tracker cloned from that state ahead of the
    # next rebuild (``Records.prepare``), for one rebuild only (``take_ready``).
    ready: List[Any] = dataclasses.field(default_factory=list)
    # Whether the save that wrote it made a new base (compacted): its state
    # is then replayed ahead (``Records.prepare``).
    new_base: bool = False

    def take_ready(self) -> Optional[Any]:
        """The ``(base_state, tracker)`` cloned ahead, once (thread-safe)."""
        try:
            return self.ready.pop()
        except IndexError:
            return None

    @classmethod
    def of(cls, digest: str, record: Dict[str, Any], event_jsons: List[str],
           base_json: Optional[str] = None, base_events: Optional[List[Any]] = None,
           window_events: Optional[List[Any]] = None,
           base_packed: Optional[bytes] = None) -> "Remembered":
        return cls(digest, record, event_jsons, base_json, base_events, window_events,
                   base_packed)


class RecentRecords:
    """LRU of ``conversation id -> Remembered``; ``size`` 0 remembers nothing.

    A record is admitted only if its conversation was also saved within the
    last ``size`` saves, i.e. if remembering it last time would have paid off.
    When more conversations take turns than the memory holds (round-robin
    load), entries would be evicted before their next use: remembering them
    anyway only creates long-lived garbage, which makes the process's full
    garbage collections more frequent (measured: 6 instead of 2 in 10 s).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: "collections.OrderedDict[str, Remembered]" = collections.OrderedDict()
        self._saved: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        # Stores may be shared by event loops in several threads.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, conversation_id: str) -> Optional[Remembered]:
        with self._lock:
            entry = self._entries.get(conversation_id)
            if entry is not None:
                self._entries.move_to_end(conversation_id)
            return entry

    def put(self, conversation_id: str, entry: Remembered) -> None:
        """Remember ``entry`` if its conversation is active enough (see above)."""
        if not self._size:
            return
        with self._lock:
            admit = conversation_id in self._saved or conversation_id in self._entries
            self._saved[conversation_id] = None
            self._saved.move_to_end(conversation_id)
            if len(self._saved) > self._size:
                self._saved.popitem(last=False)
            if not admit:
                return
            self._entries[conversation_id] = entry
            self._entries.move_to_end(conversation_id)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def forget(self, conversation_id: str) -> None:
        with self._lock:
            self._entries.pop(conversation_id, None)
