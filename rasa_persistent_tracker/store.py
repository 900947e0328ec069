"""``PersistentTrackerStore``: Rasa's ``TrackerStore`` on a hot state + SQL log.

This module only orchestrates (docs/architecture.md draws the layers): the
record format and trackers are in ``record/``, the hot state in ``hot/``, the
SQL log and delivery to it in ``log/``, encoding and encryption in
``security/``, everything off the happy path in ``recovery/``.
"""
import logging
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from rasa.core.brokers.broker import EventBroker
from rasa.core.tracker_store import TrackerStore
from rasa.shared.core.domain import Domain
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import inflight, metrics, startup
from rasa_persistent_tracker.backends import Backends, open_backends
from rasa_persistent_tracker.errors import (
    ConcurrentSaveError,
    CorruptRecordError,
    HotStateBusy,
)
from rasa_persistent_tracker.hot.protocol import Erased
from rasa_persistent_tracker.log import direct, lifecycle
from rasa_persistent_tracker.record import stored
from rasa_persistent_tracker.record.recent import Remembered
from rasa_persistent_tracker.record.turns import TurnEncoder
from rasa_persistent_tracker.recovery.committing import TurnCommitter
from rasa_persistent_tracker.recovery.history import History
from rasa_persistent_tracker.recovery.merging import MergeBase, Merger
from rasa_persistent_tracker.recovery.restore import Recovery
from rasa_persistent_tracker.security.crypto import SNAPSHOT

logger = logging.getLogger(__name__)
# Restores of a hot record (from SQL) that may lose the race to another
# process's write before retrieve gives up with HotStateBusy.
_RESTORE_RACES = 5


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
        self._max_event_history: Optional[int] = None
        super().__init__(domain, event_broker)
        self._backends = backends or open_backends({"host": host, **kwargs}, environ)
        self.config = self._backends.config
        self._hot = self._backends.hot
        self._log = self._backends.log
        self._codec = self._backends.codec
        self._ids = self._backends.ids  # conversation ids as log lines show them
        self._outbox = self._backends.outbox
        self._records = self._backends.records
        self._records.domain, self._records.max_event_history = (self._domain,
                                                                 self._max_event_history)
        self._recent = self._records.recent
        self._fresh = self._records.fresh
        self._turns = TurnEncoder(self._codec, self._recent, self.config.max_history)
        self._history = History(self._hot, self._log, self._codec, self._outbox.entries,
                                self._records, self._ids)
        self._recovery = Recovery(self._hot, self._history, self._records, self._turns,
                                  self.config, self._backends.suspicion, self._ids)
        self._committer = TurnCommitter(self._hot, self._log, self._codec, self._outbox.entries,
                                        self._turns, self.config, self._ids,
                                        self._recovery.quarantine, self._recovery.suspect,
                                        self._history.full_session)
        self._merger = Merger(self._hot, self._history, self._records,
                              self._recovery.quarantine)
        if self._backends.announce:
            logger.info(self._backends.announce)
        lifecycle.deliver_on_exit(self._outbox, self._hot)
        if self.config.metrics_port is not None:
            metrics.serve(self.config.metrics_port, self.config.metrics_address)
        self._outbox.start()  # rows a previous process left are delivered now

    @property
    def domain(self) -> Optional[Domain]:
        """The assistant's domain; Rasa sets it after loading the model."""
        return self._domain

    @domain.setter
    def domain(self, value: Optional[Domain]) -> None:
        self._domain = value
        if hasattr(self, "_records"):  # not during TrackerStore.__init__
            self._records.domain = value
        # Rasa creates the store with a placeholder domain and sets the model's
        # here once it is loaded: the moment to compare them with the config.
        if hasattr(self, "config"):  # not during TrackerStore.__init__
            self._check_domain(startup.policies_of_loading_agent())

    @property
    def max_event_history(self) -> Optional[int]:
        """Rasa's cap on the events a tracker keeps (None: unlimited)."""
        return self._max_event_history

    @max_event_history.setter
    def max_event_history(self, value: Optional[int]) -> None:
        self._max_event_history = value
        if hasattr(self, "_records"):  # not during TrackerStore.__init__
            self._records.max_event_history = value

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

    @metrics.measured(metrics.RETRIEVE_SECONDS)
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
            HotStateBusy: no pooled Redis connection came free in time, or the
                conversation kept changing under a restore.
        """
        self._outbox.start()
        for _ in range(_RESTORE_RACES):
            try:
                return await self._read(sender_id)
            except ConcurrentSaveError:
                # A record restored from SQL lost the race to a newer write of
                # another process: read that one instead.
                continue
            except Erased:  # erased while its record was being restored from SQL
                return None
        raise HotStateBusy(f"Conversation '{self._ids(sender_id)}' changed during each of "
                           f"{_RESTORE_RACES} restores of its hot record.")

    async def _read(self, sender_id: str) -> Optional[DialogueStateTracker]:
        remembered = self._recent.get(sender_id)
        if remembered is None:
            hot, rebuilt = await self._recovery.load(sender_id), None
        else:
            # The load's round trip is spent rebuilding from the remembered
            # record: used only if the reply says it is unchanged.
            hot, rebuilt = await inflight.meanwhile(
                self._recovery.load(sender_id, remembered.digest),
                lambda: self._records.rebuild_remembered(sender_id, remembered))
        if hot is None:  # hot state down: degraded read from the snapshot
            return await self._recovery.read_while_down(sender_id)
        if hot.problem:
            return await self._recovery.resume_after_quarantine(sender_id, hot.problem)
        if hot.unchanged and rebuilt is not None:
            # The record this process wrote last is still current: no decoding.
            decoded = rebuilt.result()
            if decoded is None:
                return await self._read(sender_id)  # forgotten: read the stored one
        elif hot.payload is None:
            return await self._recovery.restore_lost_record(sender_id)
        else:
            try:
                decoded = self._records.decode(sender_id, hot.payload)
            except CorruptRecordError as exc:
                return await self._recovery.resume_after_quarantine(sender_id, str(exc))
            behind = await self._fresh.behind(sender_id, decoded[0]["next_seq"], hot.outbox_seq)
            if behind:  # a replayed older record: never believed
                return await self._recovery.resume_after_quarantine(
                    sender_id, f"record is stale: {behind}")
        record, tracker, known, previous = decoded
        if self._recovery.suspecting:
            newer = await self._recovery.newer_snapshot(
                sender_id, record["next_seq"], hot.version)
            if newer is not None:
                return newer
        self._records.mark(tracker, hot.version, record["next_seq"], known, previous)
        return tracker

    async def retrieve_full_tracker(self, conversation_id: str) -> Optional[DialogueStateTracker]:
        """Every event of every session, from the SQL log (plus undelivered ones).

        Corrupt rows are skipped with a warning naming the conversation and seq.

        Raises:
            EventLogUnavailable: the SQL log is unreachable.
        """
        hot = await self._recovery.load(conversation_id)
        rows = await self._history.all_rows(conversation_id)
        if not rows:
            return None
        events = self._history.decode_rows(conversation_id, rows)
        tracker = self._records.from_events(conversation_id, events)
        version = hot.version if hot and hot.payload else 0
        self._records.mark(tracker, version, rows[-1].seq + 1, {})
        return tracker

    async def keys(self) -> Iterable[str]:
        """Conversation ids with a hot record or any logged event (SCAN, not KEYS)."""
        ids = {cid async for cid in self._hot.conversations()}
        ids.update(await self._log.run(self._log.sync.conversation_ids))
        return sorted(ids)

    async def exists(self, conversation_id: str) -> bool:
        """True if the conversation has a hot record or logged events."""
        hot = await self._hot.load(conversation_id)
        if hot.payload is not None or hot.problem or hot.outbox_seq:
            return True
        return await self._log.run(self._log.sync.next_seq, conversation_id) > 1

    # ---------------------------------------------------------------- writing

    @metrics.measured(metrics.SAVE_SECONDS)
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

        A tracker read before its conversation was erased (``erase``/``purge``)
        is not saved: the turn is dropped with a WARNING, nothing is written.
        """
        sender_id = tracker.sender_id
        base = await self._base_of(tracker)
        if not base.new:
            if base.expected_version:
                await self._hot.touch(sender_id, self.config.record_exp)
            return
        rows, state, built, payload, remember = await self._committer.encode_turn(
            sender_id, base, self.domain.slots)
        try:  # the commit's round trip is spent on the memory
            (version, queued, rows), kept = await inflight.meanwhile(
                self._committer.commit_turn(sender_id, base, payload, rows),
                lambda: self._remembering(sender_id, remember))
        except Erased:  # never resurrect; Rasa saves after every turn, so no error
            metrics.ERASED_WRITES.labels("save").inc()
            logger.warning("Conversation '%s' was erased after this tracker was read: its "
                           "turn is not saved.", self._ids(sender_id))
            return
        remembered = kept.result()
        if remembered is not None:
            self._recent.put(sender_id, remembered)
        else:
            self._recent.forget(sender_id)
        self._records.mark(tracker, version, base.next_seq + len(base.new), built.forms,
                           built.previous if state is tracker else None)
        if queued:  # else it is in SQL already
            self._outbox.notify(sender_id)
            if self._committer.writes_through(base.new):
                await direct.write_through(
                    self._outbox, self._log, sender_id, rows,
                    self._codec.reseal_record(payload, sender_id, SNAPSHOT), version,
                    lambda: self._committer.unlogged_rows(sender_id, base, rows[0].seq))
        if self.event_broker is not None:
            await self._stream_new_events(self.event_broker, base.new, sender_id)

    def _remembering(self, sender_id: str, remember: Callable[[], Remembered]
                     ) -> Optional[Remembered]:
        """``remember()``, with the next rebuild's work prepared
        (``Records.prepare``); if that fails (a bug), the turn is saved all the
        same and the conversation is read from its stored record next time."""
        try:
            remembered = remember()
            self._records.prepare(remembered)
            return remembered
        except Exception:
            logger.exception("Conversation '%s': the record just written could not be kept "
                             "in memory; the next retrieve decodes the stored one.",
                             self._ids(sender_id))
            return None

    async def _base_of(self, tracker: DialogueStateTracker) -> MergeBase:
        """Where the tracker's new events start: after the last event this store
        returned for this very tracker object, else by merging."""
        loaded = self._records.loaded(tracker)
        if loaded is not None and loaded.sender_id == tracker.sender_id:
            new = stored.new_events_after(list(tracker.events), loaded)
            if new is not None:
                return MergeBase(tracker, new, loaded.version, loaded.next_seq, loaded.forms,
                                 loaded.previous)
        return await self._merger.merge_base(tracker)

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

