"""``PersistentTrackerStore``: Rasa's ``TrackerStore`` on a hot state + SQL log.

This module only orchestrates: the hot record format is in ``window``, storage
in ``hot_state`` / ``embedded`` / ``event_log``, delivery to SQL in ``outbox``,
encoding in ``codec`` / ``crypto`` / ``turns``, recovery in ``recovery``.
"""
import logging
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

from rasa.core.brokers.broker import EventBroker
from rasa.core.tracker_store import TrackerStore
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, Event
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import direct, lifecycle, replay, startup, window
from rasa_persistent_tracker.backends import Backends, open_backends
from rasa_persistent_tracker.crypto import HOT, SNAPSHOT
from rasa_persistent_tracker.errors import (
    CorruptRecordError,
    EventLogUnavailable,
    HotStateBusy,
    HotStateUnavailable,
    PersistentTrackerError,
)
from rasa_persistent_tracker.event_log import LogRow
from rasa_persistent_tracker.freshness import Freshness
from rasa_persistent_tracker.hot_state import RecordMissing, UnusableValue, payload_digest
from rasa_persistent_tracker.recent import RecentRecords, Remembered, shareable
from rasa_persistent_tracker.recovery import Recovery
from rasa_persistent_tracker.turns import TurnEncoder
from rasa_persistent_tracker.values import ENCODING_ERRORS, unstorable

logger = logging.getLogger(__name__)

# Attribute under which a tracker carries what the store knows about it.
MARK = "_rpt_loaded"


class PersistentTrackerStore(TrackerStore):
    """Tracker store with a bounded hot state and an append-only SQL event log.

    Configured from the ``tracker_store`` block of ``endpoints.yml`` (see the
    README's configuration table). ``retrieve`` reads one small record, never
    the log; ``save`` commits the turn's new events and the new record
    atomically (optimistic lock) and the log catches up in the background.

    Args:
        domain: the assistant's domain (Rasa sets ``store.domain`` later if None).
        host: the endpoint's ``url`` (Rasa passes it as ``host``).
        event_broker: optional broker; new events are streamed to it.
        backends: pre-built storage (tests); replaces ``url``/``sql_url``.
        environ: environment for ``REDIS_URL`` / ``DATABASE_URL`` (default os.environ).
        **kwargs: the remaining configuration keys.

    Raises:
        ConfigError: unknown or invalid configuration key.
        StorageUnavailable: a server is unreachable at start-up.
    """

    def __init__(
        self,
        domain: Optional[Domain] = None,
        host: Optional[str] = None,
        event_broker: Optional[EventBroker] = None,
        backends: Optional[Backends] = None,
        environ: Optional[Dict[str, str]] = None,
        **kwargs: Any,
    ) -> None:
        self._domain: Optional[Domain] = None
        self._checked_domain: Optional[Domain] = None
        super().__init__(domain, event_broker)
        self._backends = backends or open_backends({"host": host, **kwargs}, environ)
        self.config = self._backends.config
        self._hot = self._backends.hot
        self._log = self._backends.log
        self._codec = self._backends.codec
        self._ids = self._backends.ids  # conversation ids as log lines show them
        self._outbox = self._backends.outbox
        self._recovery = Recovery(self)
        self._recent = RecentRecords(self.config.record_cache_size)
        self._turns = TurnEncoder(self._codec, self._recent, self.config.max_history)
        self._fresh = Freshness(self._log, self._hot, self._outbox.entries)
        self._shape_ok, self._outbox.snapshot_payload = (self._outbox.snapshot_payload,
                                                         self._snapshot_payload)
        self._outbox.on_resequenced = self._recovery.suspect
        if self._backends.announce:
            logger.info(self._backends.announce)
        lifecycle.deliver_on_exit(self._outbox, self._hot)
        self._outbox.start()  # rows a previous process left are delivered now

    @property
    def domain(self) -> Optional[Domain]:
        """The assistant's domain; Rasa sets it after loading the model."""
        return self._domain

    @domain.setter
    def domain(self, value: Optional[Domain]) -> None:
        self._domain = value
        # Rasa creates the store with a placeholder domain and sets the model's
        # here once it is loaded: the moment to compare them with the config.
        if hasattr(self, "config"):  # not during TrackerStore.__init__
            self._check_domain(startup.policies_of_loading_agent())

    def _check_domain(self, policies: Iterable[Tuple[str, Dict[str, Any]]] = ()) -> None:
        """Warn once per loaded domain/model about settings that do not fit."""
        domain = self._domain
        if domain is None or domain is self._checked_domain:
            return
        self._checked_domain = domain
        for warning in (startup.domain_warnings(domain, self.config.record_exp)
                        + startup.policy_warnings(policies, self.config.max_history)):
            logger.warning(warning)

    def __repr__(self) -> str:
        return f"PersistentTrackerStore({self.config!r})"

    # ---------------------------------------------------------------- reading

    async def retrieve(self, sender_id: str) -> Optional[DialogueStateTracker]:
        """Rebuild the current session of ``sender_id`` from its hot record.

        Unreadable records are quarantined and the conversation resumes from the
        SQL snapshot (plus the log after it) or, without one, from a fresh
        tracker; a missing record is restored from the snapshot unless the
        conversation expired. Returns None for unknown or expired conversations.

        Raises:
            HotStateUnavailable: the hot state is unreachable and the SQL log is
                too, or holds nothing of the conversation yet (never a silent
                fresh tracker).
            HotStateBusy: no pooled Redis connection came free in time.
        """
        self._outbox.start()
        remembered = self._recent.get(sender_id)
        entry = await self._recovery.load(sender_id, remembered.digest if remembered else None)
        if entry is None:  # hot state down: degraded read from the snapshot
            tracker = await self._recovery.from_snapshot(sender_id, refill=False)
            if tracker is None:
                if self.config.sync_log:
                    return None  # every saved turn reaches SQL before save returns: new
                # Its latest turns may be in the unreachable outbox: it cannot be
                # told apart from a new conversation, so do not pretend it is one.
                raise HotStateUnavailable(
                    f"Conversation '{self._ids(sender_id)}': the hot state is unreachable and "
                    f"the SQL log has nothing of it (yet).")
            return tracker
        if entry.problem:
            return await self._recovery.quarantined(sender_id, entry.problem)
        if entry.unchanged and remembered is not None:
            # The record this process wrote last is still current: no decoding.
            rebuilt = self._rebuild_remembered(sender_id, remembered)
            if rebuilt is None:
                return await self.retrieve(sender_id)  # forgotten: read the stored one
            record, tracker, cache, previous = rebuilt
        elif entry.payload is None:
            return await self._recovery.missing(sender_id, entry.outbox_seq)
        else:
            try:
                record, tracker, cache, previous = self._decode(sender_id, entry.payload)
            except CorruptRecordError as exc:
                return await self._recovery.quarantined(sender_id, str(exc))
            behind = await self._fresh.behind(sender_id, record["next_seq"], entry.outbox_seq)
            if behind:  # a replayed older record: never believed
                return await self._recovery.quarantined(sender_id, f"record is stale: {behind}")
        if self._recovery.suspecting:
            newer = await self._recovery.newer_snapshot(
                sender_id, record["next_seq"], entry.version)
            if newer is not None:
                return newer
        self._mark(tracker, entry.version, record["next_seq"], cache, previous)
        return tracker

    def _rebuild_remembered(self, sender_id: str, remembered: Remembered) -> Optional[Tuple[
            Dict[str, Any], DialogueStateTracker, window.Known, window.Previous]]:
        """``_decode`` for the record this process remembers; None (and the
        memory forgotten) if it does not replay, which would be a bug."""
        record = remembered.replayable()
        try:
            tracker, cache, previous = replay.rebuild_tracker(
                record, self.domain.slots, self.max_event_history, remembered.texts,
                remembered.base_text, remembered.base_events, remembered.window_events)
        except CorruptRecordError as exc:
            logger.warning("Conversation '%s': the record this process remembers does not "
                           "replay (%s); reading the stored one.", self._ids(sender_id), exc)
            self._recent.forget(sender_id)
            return None
        remembered.base_events = previous.slot_events
        remembered.window_events = shareable(known[0] for known in cache.values())
        return record, tracker, cache, previous

    def _decode(self, sender_id: str, payload: str, kind: str = HOT) -> Tuple[
            Dict[str, Any], DialogueStateTracker, window.Known, window.Previous]:
        """A stored record (hot or snapshot: ``kind``) and the tracker rebuilt from it.

        Raises CorruptRecordError if it cannot be decoded, validated or replayed.
        """
        record = replay.validate_record(self._codec.loads_record(payload, sender_id, kind),
                                        sender_id)
        tracker, cache, previous = replay.rebuild_tracker(
            record, self.domain.slots, self.max_event_history)
        return record, tracker, cache, previous

    def _snapshot_payload(self, sender_id: str, payload: str, next_seq: int) -> Optional[str]:
        """A hot payload as the SQL snapshot at ``next_seq``, or None: it must
        decode, replay and be the record at ``next_seq`` (a record that only
        looks right, or an older one, must never replace the last good
        snapshot). The record this process wrote needs no replay."""
        remembered = self._recent.get(sender_id)
        if remembered is not None and remembered.digest == payload_digest(payload):
            record = remembered.record
        elif self.domain is None:  # cannot replay yet: check the shape only
            return self._shape_ok(sender_id, payload, next_seq)
        else:
            try:
                record = self._decode(sender_id, payload)[0]
            except CorruptRecordError:
                return None
            except Exception:  # e.g. a custom event failing to replay: keep the old snapshot
                logger.exception("Conversation '%s': hot record cannot be replayed; not taken "
                                 "as the SQL snapshot.", self._ids(sender_id))
                return None
        if record["next_seq"] != next_seq:
            return None
        try:
            return self._codec.reseal_record(payload, sender_id, SNAPSHOT)
        except CorruptRecordError:
            return None

    def _mark(self, tracker: DialogueStateTracker, version: int, next_seq: int,
              cache: window.Known, previous: Optional[window.Previous] = None) -> None:
        last = tracker.events[-1] if tracker.events else None
        self._fresh.saw(tracker.sender_id, next_seq)
        setattr(tracker, MARK, window.Loaded(tracker.sender_id, version, next_seq, last, cache,
                                              previous))

    async def retrieve_full_tracker(self, conversation_id: str) -> Optional[DialogueStateTracker]:
        """Every event of every session, from the SQL log (plus undelivered ones).

        Corrupt rows are skipped with a warning naming the conversation and seq.

        Raises:
            EventLogUnavailable: the SQL log is unreachable.
        """
        entry = await self._recovery.load(conversation_id)
        rows = await self._recovery.all_rows(conversation_id)
        if not rows:
            return None
        events = self._recovery.decode_rows(conversation_id, rows)
        tracker = DialogueStateTracker.from_events(
            conversation_id, events, self.domain.slots, self.max_event_history)
        version = entry.version if entry and entry.payload else 0
        self._mark(tracker, version, rows[-1].seq + 1, {})
        return tracker

    async def keys(self) -> Iterable[str]:
        """Conversation ids with a hot record or any logged event (SCAN, not KEYS)."""
        ids = {cid async for cid in self._hot.conversations()}
        ids.update(await self._log.run(self._log.sync.conversation_ids))
        return sorted(ids)

    async def exists(self, conversation_id: str) -> bool:
        """True if the conversation has a hot record or logged events."""
        entry = await self._hot.load(conversation_id)
        if entry.payload is not None or entry.problem or entry.outbox_seq:
            return True
        return await self._log.run(self._log.sync.next_seq, conversation_id) > 1

    # ---------------------------------------------------------------- writing

    async def save(self, tracker: DialogueStateTracker) -> None:
        """Append the tracker's new events to the log and commit its hot record.

        New events are found without reading the log: after the last event this
        store returned (trackers from ``retrieve``), else after the stored last
        event, else by merging (a fresh tracker never overwrites a conversation).

        Raises:
            ConcurrentSaveError: the conversation changed since this tracker was
                read; nothing was written.
            SlotValueError: a slot value cannot be stored; nothing was written.
            HotStateUnavailable: the hot state and the SQL log are both
                unreachable; nothing was written. (With only the hot state
                down, the turn is saved straight to SQL: ``direct``.)
            HotStateBusy: no pooled Redis connection came free in time; nothing
                was written.
        """
        sender_id = tracker.sender_id
        marker = getattr(tracker, MARK, None)
        new: Optional[List[Event]] = None
        if marker is not None and marker.sender_id == sender_id:
            new = window.new_events_after(list(tracker.events), marker)
        if new is not None:
            state, expected, next_seq = tracker, marker.version, marker.next_seq
            cache, previous = marker.cache, marker.previous
        else:
            state, new, expected, next_seq, cache, previous = await self._recovery.merge_base(
                tracker)
        if not new:
            if expected:
                await self._hot.touch(sender_id, self.config.record_exp)
            return
        base = state  # holds the events before this turn's (for _unlogged_rows)
        try:
            rows = self._turns.rows(sender_id, new, next_seq, cache)
            built = self._turns.build(state, self.domain.slots, next_seq + len(new), cache,
                                      previous)
            if built.short:
                full = await self._recovery.full_session(sender_id, next_seq, new)
                if full is not None:  # reverts reached past the record: rebuild it from the log
                    state = full
                    built = self._turns.build(full, self.domain.slots, next_seq + len(new),
                                              cache)
            payload, remembered = self._turns.encode(built)
        except PersistentTrackerError:
            raise
        except ENCODING_ERRORS as exc:
            raise unstorable(new, exc) from None
        entry = self._outbox.entries.make(sender_id, rows, time.time())
        try:
            try:
                version = await self._hot.commit(sender_id, expected, payload,
                                                 self.config.record_exp, entry,
                                                 expect_record=bool(expected))
            except RecordMissing:
                # Wiped while this turn ran: with the record went the outbox
                # entries not delivered yet. Log them again from this tracker.
                rows = await self._unlogged_rows(sender_id, base, len(new), next_seq,
                                                 cache) + rows
                entry = self._outbox.entries.make(sender_id, rows, time.time())
                version = await self._hot.commit(sender_id, expected, payload,
                                                 self.config.record_exp, entry)
        except HotStateBusy:
            raise  # overloaded: nothing was written, nothing to re-check
        except HotStateUnavailable as exc:
            # Redis is the fast path, SQL the record: the turn goes to SQL,
            # after the turns the unreachable (maybe emptied) outbox still holds.
            self._recovery.suspect()
            rows = await self._unlogged_rows(sender_id, base, len(new), rows[0].seq,
                                             cache) + rows
            version = await direct.save(self._log, sender_id, rows,
                                        self._codec.reseal_record(payload, sender_id, SNAPSHOT),
                                        expected or 0, exc)
            entry = None
        except UnusableValue as exc:
            await self._recovery.quarantine(sender_id, str(exc))
            try:
                version = await self._hot.commit(sender_id, expected, payload,
                                                 self.config.record_exp, entry)
            except UnusableValue as again:  # replaced again in between: give up this turn
                raise HotStateUnavailable(f"Conversation '{sender_id}': its hot record stays "
                                          f"unusable ({again}).") from again
        self._recent.put(sender_id, remembered)
        self._mark(tracker, version, next_seq + len(new), built.kept,
                   built.previous if state is tracker else None)
        if entry is not None:  # else it is in SQL already
            self._outbox.notify(sender_id)
            if self.config.sync_log or self._runs_sync_action(new):
                await direct.write_through(
                    self._outbox, self._log, sender_id, rows,
                    self._codec.reseal_record(payload, sender_id, SNAPSHOT), version,
                    lambda: self._unlogged_rows(sender_id, base, len(new), rows[0].seq,
                                                cache))
        if self.event_broker is not None:
            await self._stream_new_events(self.event_broker, new, sender_id)

    async def _unlogged_rows(self, sender_id: str, tracker: DialogueStateTracker,
                             new_count: int, next_seq: int,
                             cache: window.Known) -> List[LogRow]:
        """Rows for the events of ``tracker`` before its last ``new_count`` (this
        turn's) that the SQL log does not hold: between its end and
        ``next_seq``, turns whose outbox entries a wiped or unreachable hot
        state has not delivered. With them this turn's rows follow the log
        without a hole; a copy delivered later from a surviving outbox is
        skipped as already logged."""
        events = list(tracker.events)
        known = events[:len(events) - new_count]
        try:
            logged_next = await self._log.run(self._log.sync.next_seq, sender_id)
        except EventLogUnavailable:
            return []  # nothing can be written now anyway
        missing = next_seq - logged_next
        if missing <= 0:
            return []
        if missing > len(known):
            logger.warning("Conversation '%s': %d event(s) before this turn are neither in the "
                           "hot state nor in the SQL log, and the tracker no longer holds "
                           "them.", self._ids(sender_id), missing)
            return []
        logger.warning("Conversation '%s': %d event(s) before this turn were still in the "
                       "outbox of the failed hot state; logged again from the tracker.",
                       self._ids(sender_id), missing)
        return self._turns.rows(sender_id, known[-missing:], logged_next, cache)

    def _runs_sync_action(self, new: List[Event]) -> bool:
        """Whether the turn ran an action listed in ``sync_actions`` (written through)."""
        names = self.config.sync_actions
        return bool(names) and any(getattr(e, "action_name", None) in names for e in new
                                   if isinstance(e, ActionExecuted))

    # --------------------------------------------------------------- lifecycle

    async def flush(self) -> None:
        """Deliver every pending log write now (tests, shutdown, exports)."""
        await self._outbox.drain()

    async def close(self) -> None:
        """Flush pending log writes and release connections."""
        lifecycle.forget(self._outbox)
        try:
            await self._outbox.drain()
        finally:
            await self._outbox.stop()
            await self._hot.close()
            self._log.close()
