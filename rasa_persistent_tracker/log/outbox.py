"""Delivers outbox entries from the hot state into the SQL log.

``save`` commits the hot record and an outbox entry (the turn's log rows) in
one atomic step, then returns; this flusher moves entries into SQL in batches
across conversations, in sequence order per conversation, together with the
latest snapshot, and only then removes them from the outbox. If SQL is down,
entries wait (durably, in Redis) and are retried with backoff; a periodic scan
picks up entries left by a process that died. Inserts skip existing
``(conversation_id, seq)`` pairs, so every event lands exactly once. After a
save the flusher waits ``linger`` seconds before delivering, so one transaction
carries the rows of many turns.

Entry format: ``entries.py``.
"""
import asyncio
import logging
import time
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.errors import EventLogUnavailable, HotStateUnavailable
from rasa_persistent_tracker.hot import entry_header
from rasa_persistent_tracker.hot.protocol import HotState, Pending
from rasa_persistent_tracker.log.entries import PLAIN_ENTRIES, Entries
from rasa_persistent_tracker.log.event_log import AsyncEventLog
from rasa_persistent_tracker.log.tables import RowDict, Snapshot

# The logger's name from before the layer packages: logging configs keep working.
logger = logging.getLogger("rasa_persistent_tracker.outbox")


class Outbox:
    """Background delivery of outbox entries. One per store and event loop."""

    def __init__(self, hot: HotState, log: AsyncEventLog, batch_size: int,
                 scan_interval: float, quarantine_ttl: float,
                 snapshot_payload: Callable[[str, str, int], Optional[str]] = (
                     lambda _cid, payload, _next_seq: payload),
                 linger: float = 0.0, entries: Optional[Entries] = None,
                 ids: Callable[[str], str] = lambda cid: cid,
                 on_resequenced: Callable[[], None] = lambda: None) -> None:
        self._hot = hot
        self._ids = ids  # what log lines show for a conversation id
        self._linger = linger
        self.entries = entries or PLAIN_ENTRIES
        # A hot payload as the SQL snapshot at ``next_seq``, or None if it must
        # not become one (``record.trackers.Records.snapshot_payload``).
        self._snapshot_payload = snapshot_payload
        # Called when a delivery moved provisionally numbered rows: hot records
        # still count from the provisional numbers (the store re-checks them).
        self._on_resequenced = on_resequenced
        self._log = log
        self._batch_size = batch_size
        self._scan_interval = scan_interval
        self._quarantine_ttl = quarantine_ttl
        self._dirty: Set[str] = set()
        self._in_flight: Set[str] = set()
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock: Optional[asyncio.Lock] = None
        self._stopping = False
        self._outage_logged = False
        self._saved = False
        self.delivered = 0
        self.quarantined = 0
        # When each conversation's oldest undelivered entry was saved (as far
        # as this process knows): the outbox age metric.
        self._since: Dict[str, float] = {}
        metrics.track_outbox(self)

    def start(self) -> None:
        """Start delivery on the running loop, if any: entries a previous
        process left behind are delivered at start-up, not after the next turn."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the first notify or retrieve starts it
        if self._task is not None and not self._task.done():
            return  # delivering already (maybe on another loop: never steal it from there)
        self._ensure_running()

    def undelivered(self) -> Set[str]:
        """Conversations this process saved whose entries are not in SQL yet."""
        return self._dirty | self._in_flight

    async def deliver_at_exit(self) -> int:
        """Deliver ``undelivered()`` on the current (new) loop, without starting
        the background task; used when the process exits after its loop stopped."""
        self._loop, self._lock = asyncio.get_running_loop(), asyncio.Lock()
        ids, moved = list(self.undelivered()), 0
        async with self._lock:
            for start in range(0, len(ids), 50):
                moved += await self._deliver_batch(ids[start:start + 50])
        return moved

    def notify(self, conversation_id: str) -> None:
        """Mark a conversation as having fresh entries and start delivery."""
        self._dirty.add(conversation_id)
        self._since.setdefault(conversation_id, time.time())
        self._saved = True
        self._ensure_running()
        self._wake.set()

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        self._loop = loop
        self._stopping = False
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = loop.create_task(self._run(), name="rpt-outbox")

    async def _run(self) -> None:
        backoff = 0.1
        next_scan = 0.0
        # A task another loop replaced (notify or deliver from a thread with its
        # own loop) stops by itself, so that loop can finish: its cancellation
        # alone is not enough when redis-py swallows one.
        while not self._stopping and self._task is asyncio.current_task():
            # Cleared before delivering: a save during delivery sets it again.
            self._wake.clear()
            try:
                if time.monotonic() >= next_scan:
                    await self._scan()
                    next_scan = time.monotonic() + self._scan_interval
                if self._dirty and self._linger and self._saved:
                    # Let more turns (of any conversation) join this batch: one
                    # SQL transaction for many, instead of one per save. A
                    # backlog (retries, entries found by a scan) goes at once.
                    self._saved = False
                    await asyncio.sleep(self._linger)
                if self._dirty:
                    await self.deliver(list(self._dirty))
                backoff = 0.1
                if self._outage_logged:
                    logger.warning("Event log reachable again; outbox delivery resumed.")
                    self._outage_logged = False
                if not self._dirty:
                    await self._sleep(self._scan_interval)
            except (EventLogUnavailable, HotStateUnavailable) as exc:
                if not self._outage_logged:
                    logger.warning("Outbox delivery paused, will retry: %s", exc)
                    self._outage_logged = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not silently stop delivery forever
                logger.exception("Unexpected error in outbox delivery; retrying.")
                await asyncio.sleep(1.0)

    async def _sleep(self, timeout: float) -> None:
        # Not asyncio.wait_for: on Python 3.10 it can swallow a cancellation.
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()

    def pending_since(self) -> Dict[str, float]:
        """Conversation -> when its oldest undelivered entry was saved."""
        return dict(self._since)

    async def _scan(self) -> None:
        async for conversation_id in self._hot.outboxes():
            self._dirty.add(conversation_id)
            self._since.setdefault(conversation_id, time.time())

    async def deliver(self, conversation_ids: Iterable[str]) -> int:
        """Move pending entries of these conversations into SQL; return rows moved.

        Raises EventLogUnavailable / HotStateUnavailable (entries stay queued).
        """
        ids = list(conversation_ids)
        if self._lock is None or self._loop is not asyncio.get_running_loop():
            self._ensure_running()
        moved = 0
        # One delivery at a time per process: concurrent deliveries of the same
        # rows would only contend (and deadlock) in the database.
        async with self._lock:
            for start in range(0, len(ids), 50):
                moved += await self._deliver_batch(ids[start:start + 50])
        return moved

    async def _deliver_batch(self, ids: List[str]) -> int:
        # Taken now, so a save made while this batch is in flight marks its
        # conversation dirty again instead of being forgotten.
        self._dirty.difference_update(ids)
        self._in_flight.update(ids)
        try:
            return await self._deliver_taken(ids)
        except BaseException:
            self._dirty.update(ids)
            raise
        finally:
            self._in_flight.difference_update(ids)

    async def _deliver_taken(self, ids: List[str]) -> int:
        rows: Dict[str, List[RowDict]] = {}
        snapshots: Dict[str, Snapshot] = {}
        versions: Dict[str, int] = {}
        unfinished: List[str] = []
        for cid in ids:
            pending = await self._hot.pending(cid, self._batch_size)
            versions[cid] = pending.version
            self._note_oldest(cid, pending.entries)
            if not pending.complete:
                unfinished.append(cid)
            saved_at, good = await self._readable_rows(cid, pending.entries)
            if not good:
                continue
            rows[cid] = good
            snapshot = self._snapshot(cid, pending, good[-1]["seq"] + 1, saved_at)
            if snapshot is not None:
                snapshots[cid] = snapshot
        if rows:
            with metrics.timed(metrics.DELIVERY_SECONDS):
                repaired, refused = await self._log.run(self._log.sync.deliver, rows,
                                                        snapshots, versions)
                if repaired:
                    self._on_resequenced()
            # Refused rows were read before their conversation was erased (its
            # outbox went with it): never acknowledged, which could drop a new
            # conversation's entries under the same numbers.
            for cid in refused:
                rows.pop(cid)
            for cid, conv_rows in rows.items():
                await self._hot.ack(cid, conv_rows[-1]["seq"])
        self._dirty.update(unfinished)
        for cid in ids:
            if cid not in self._dirty:  # all delivered, and no save since
                self._since.pop(cid, None)
        moved = sum(len(r) for r in rows.values())
        self.delivered += moved
        metrics.DELIVERED_ROWS.inc(moved)
        return moved

    def _note_oldest(self, cid: str, entries: List[str]) -> None:
        if not entries:
            return
        try:
            saved_at = entry_header.split(entries[0])[1]
        except ValueError:
            return  # unreadable: quarantined below
        self._since[cid] = min(saved_at, self._since.get(cid, saved_at))

    async def _readable_rows(self, cid: str,
                             entries: List[str]) -> Tuple[float, List[RowDict]]:
        """(saved_at of the last readable entry, the rows of the readable
        entries, each seq once); unreadable entries are moved to quarantine."""
        good: List[RowDict] = []
        saved_at = 0.0
        seen: Dict[int, str] = {}
        for entry in entries:
            try:
                saved_at, entry_rows = self.entries.parse_dicts(cid, entry)
                if any(seen.get(r["seq"], r["data"]) != r["data"] for r in entry_rows):
                    # Only corruption gives two entries of one outbox the same
                    # numbers with different events.
                    raise ValueError("entry reuses sequence numbers of an earlier one")
            except (ValueError, TypeError, KeyError) as exc:
                # Moved out of the outbox; the entries around it stay queued
                # (none is acknowledged before SQL holds it).
                key = await self._hot.quarantine_entry(cid, entry, self._quarantine_ttl)
                self.quarantined += 1
                metrics.QUARANTINES.labels("entry").inc()
                logger.warning("Conversation '%s': unreadable outbox entry (%s) moved to %s.",
                               self._ids(cid), exc, key.replace(cid, self._ids(cid)))
                continue
            good.extend(r for r in entry_rows if r["seq"] not in seen)  # copies: once
            seen.update((r["seq"], r["data"]) for r in entry_rows)
        return saved_at, good

    def _snapshot(self, cid: str, pending: Pending, next_seq: int,
                  saved_at: float) -> Optional[Snapshot]:
        """The hot record as the snapshot at ``next_seq``, if it is that record."""
        # Never let an unreadable (or older) hot value replace the last good
        # snapshot; with more entries queued, the record is past this batch.
        if not pending.complete or pending.payload is None:
            return None
        payload = self._snapshot_payload(cid, pending.payload, next_seq)
        if payload is None:
            return None
        return Snapshot(next_seq=next_seq, version=pending.version, saved_at=saved_at,
                        payload=payload)

    async def drain(self) -> None:
        """Deliver everything this process knows of, plus a scan; used by close()."""
        await self._scan()
        # In flight too: a batch the background task is writing right now is
        # not in SQL yet (deliver waits for it, then finds nothing left).
        while self._dirty or self._in_flight:
            quarantined = self.quarantined
            moved = await self.deliver(self._dirty | self._in_flight)
            if not moved and self.quarantined == quarantined:
                break  # no progress (cannot happen while every pass moves or quarantines)

    async def stop(self) -> None:
        """Stop the background task (entries stay safe in the outbox)."""
        task, self._task = self._task, None
        self._stopping = True
        if task is None or task.done():
            return
        if task.get_loop() is not asyncio.get_running_loop():
            return  # its loop is gone or elsewhere; nothing to wait for here
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
