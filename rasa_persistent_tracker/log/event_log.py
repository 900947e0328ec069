"""The SQL event log: every event, append-only, plus the latest snapshot.

``SQLEventLog`` is synchronous SQLAlchemy 1.4 Core; ``AsyncEventLog`` runs it on
a small thread pool so the event loop never blocks on SQL, and translates
driver errors into ``EventLogUnavailable``. Appends are idempotent: a row whose
``(conversation_id, seq)`` already exists is skipped, so replaying an outbox
entry after a crash writes each event exactly once.
"""
import asyncio
import dataclasses
import functools
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_errors

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.config import mask_url
from rasa_persistent_tracker.errors import CorruptRecordError, EventLogUnavailable
from rasa_persistent_tracker.files import private_file
from rasa_persistent_tracker.log import bulk, partitions
from rasa_persistent_tracker.log.bulk import sort_rows
from rasa_persistent_tracker.log.erasure import ErasureGuard
from rasa_persistent_tracker.log.migrations import migrate
from rasa_persistent_tracker.log.tables import (
    EVENTS,
    FACTS,
    SNAPSHOTS,
    LogRow,
    RowDict,
    Snapshot,
    loggable,
)

# The logger's name from before the layer packages: logging configs keep working.
logger = logging.getLogger("rasa_persistent_tracker.event_log")
T = TypeVar("T")


def make_engine(url: str, pool_size: int) -> sa.engine.Engine:
    """Create the engine; SQLite gets WAL and a busy timeout for many writers."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith(
                "file:"):
            try:
                private_file(parsed.database)
            except OSError as exc:
                raise EventLogUnavailable(f"SQLite event log file {parsed.database} cannot be "
                                          f"created: {exc.strerror}.") from exc
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                  hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    # hide_parameters: a failing statement's message must not carry event data.
    return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                            pool_pre_ping=True, pool_timeout=10, hide_parameters=True)


class SQLEventLog:
    """Synchronous access to the event log tables. See the module docstring."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.engine = engine
        self._bulk = bulk.for_engine(engine, EVENTS, SNAPSHOTS)
        self.bind_rows(lambda data, _cid, _seq, _new: data, lambda data, _cid, _seq: data)
        self.erasure = ErasureGuard()

    def bind_erasure(self, digests: Callable[[str], List[str]]) -> None:
        """How tombstones of erased conversations are named (``ErasureIds``)."""
        self.erasure = ErasureGuard(digests)

    def bind_rows(self, rebind: Callable[[str, str, int, int], str],
                  text_of: Callable[[str, str, int], str]) -> None:
        """How a row's ``data`` follows it to another seq (``rebind(data, cid,
        seq, new_seq)``) and what it says (``text_of(data, cid, seq)``), for
        rows whose data is bound to their seq (``Codec.rebind_row``/``row_text``)."""
        self._rebind, self._text_of = rebind, text_of

    def __repr__(self) -> str:
        return f"SQLEventLog({mask_url(str(self.engine.url))})"

    def migrate(self) -> List[int]:
        """Apply pending migrations, then (PostgreSQL) create the coming
        months' partitions of the log (``partitions.py``)."""
        applied = migrate(self.engine)
        partitions.ensure_at_start(self.engine)
        return applied

    def fact(self, name: str) -> Optional[str]:
        """A recorded fact about the stored data (None: never recorded)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(FACTS.c.value).where(FACTS.c.name == name)).scalar()

    def record_fact(self, name: str, value: str) -> None:
        """Record a fact, replacing an earlier value (racing writers: one wins)."""
        with self.engine.begin() as conn:
            if conn.execute(FACTS.update().where(FACTS.c.name == name).values(value=value)
                            ).rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(FACTS.insert().values(name=name, value=value))
                except sa_errors.IntegrityError:
                    pass  # another process recorded it first: same fact

    def sample_snapshot_payloads(self, limit: int) -> List[str]:
        """Up to ``limit`` snapshot payloads, any order (start-up checks)."""
        with self.engine.connect() as conn:
            payloads = conn.execute(sa.select(SNAPSHOTS.c.payload).limit(limit)).scalars()
            # A BLOB (SQLite keeps what is written, a forged one too) as text.
            return [_snapshot_text(p) for p in payloads]

    def append(self, rows: Dict[str, Sequence[RowDict]], snapshots: Dict[str, Snapshot]) -> int:
        """``deliver`` without the erasure check (imports, restores by an operator);
        returns the number of rows re-sequenced."""
        return self.deliver(rows, snapshots)[0]

    def deliver(self, rows: Dict[str, Sequence[RowDict]], snapshots: Dict[str, Snapshot],
                versions: Optional[Dict[str, int]] = None) -> Tuple[int, Set[str]]:
        """Insert rows and upsert snapshots of many conversations in one transaction.

        With ``versions`` (conversation -> the hot record's version the rows
        were read with), rows and snapshots of an erased conversation at or
        below its tombstone's floor are refused: they were queued before the
        erasure (``erasure.py``). Returns (rows re-sequenced, conversations
        refused).

        ``rows`` maps each conversation to its rows as ``LogRow.as_dict()`` gives
        them, in sequence order.

        Idempotent: a row already present with the same data is skipped (an
        outbox entry delivered twice). A row whose sequence number is taken by
        *different* data (numbered while SQL was unreachable, without knowing
        the log's end) is appended after the conversation's last row instead,
        in order: nothing is dropped. Returns the number of rows re-sequenced.
        """
        for attempt in range(5):
            try:
                repaired, refused = self._append_once(rows, snapshots, versions)
                break
            except sa_errors.IntegrityError:
                # Another writer inserted the same rows between our read and
                # our insert without taking the conversation's lock (writers
                # take turns: ``erasure.py``; an older version of this package
                # in a rolling upgrade does not); the next attempt sees them
                # as already there. Wait a random moment first.
                if attempt == 4:
                    raise
                time.sleep(random.uniform(0.0, 0.01 * (attempt + 1)))
        if repaired:
            logger.warning("Event log: %d event(s) numbered while the log was unreachable "
                           "were re-sequenced after the existing history.", repaired)
        return repaired, refused

    def _append_once(self, rows: Dict[str, Sequence[RowDict]], snapshots: Dict[str, Snapshot],
                     versions: Optional[Dict[str, int]]) -> Tuple[int, Set[str]]:
        # A constant number of statements per batch, whatever the number of
        # conversations in it (bulk.py).
        repaired = 0
        refused: Set[str] = set()
        with self.engine.begin() as conn:
            if versions is None:
                # Writers of a conversation take turns (``erasure.py``).
                self.erasure.lock(conn, set(rows) | set(snapshots))
            else:
                floors = self.erasure.guard(conn, sorted(set(rows) | set(snapshots)))
                refused = {cid for cid, floor in floors.items()
                           if versions.get(cid, 0) <= floor}
                if refused:
                    metrics.ERASED_WRITES.labels("delivery").inc(len(refused))
                    logger.warning("Event log: %d conversation(s) were erased after these "
                                   "rows were queued; not logged.", len(refused))
                    rows = {cid: r for cid, r in rows.items() if cid not in refused}
                    snapshots = {cid: s for cid, s in snapshots.items() if cid not in refused}
            existing = self._bulk.existing(conn, [
                (cid, r["seq"]) for cid, conv_rows in rows.items() for r in conv_rows])
            values: List[tuple] = []
            for cid, conv_rows in rows.items():
                fresh, moved = self._place(conn, cid, conv_rows, existing)
                values.extend(fresh)
                repaired += moved
                if moved and fresh and cid in snapshots:
                    # Rows numbered provisionally moved after the history: the
                    # snapshot must point past them, or it would never replace
                    # the one before (upserts never move backwards) and a lost
                    # hot record would come back from that stale snapshot.
                    top = max(value[1] for value in fresh)
                    snapshots = {**snapshots, cid: dataclasses.replace(
                        snapshots[cid], next_seq=max(snapshots[cid].next_seq, top + 1))}
            if values:
                self._bulk.insert(conn, sort_rows(values))
            if snapshots:
                self._bulk.upsert_snapshots(conn, [
                    (cid, s.next_seq, s.version, s.saved_at, s.payload)
                    for cid, s in sorted(snapshots.items())])
        return repaired, refused

    def _place(self, conn: Any, cid: str, conv_rows: Sequence[RowDict],
               existing: Dict[Any, str]) -> "tuple[List[tuple], int]":
        """(rows to insert, as ``ROW_COLUMNS`` tuples; how many were re-sequenced)."""
        # Same content under another seal is the same row (logged again from a
        # tracker after the hot state failed, then delivered from its outbox).
        clashing = [r for r in conv_rows
                    if (cid, r["seq"]) in existing and existing[cid, r["seq"]] != r["data"]
                    and self._text(existing[cid, r["seq"]], cid, r["seq"])
                    != self._text(r["data"], cid, r["seq"])]
        fresh = [r for r in conv_rows if (cid, r["seq"]) not in existing]
        if clashing:
            # Rows moved by an earlier delivery of this same batch (a crash before
            # its acknowledgement, or another process) are there already, after
            # the clash, with the same content: skip them, never move them twice.
            # Content, not bytes: a moved row's data was re-sealed for its new seq.
            since = min(r["seq"] for r in clashing)
            moved_before = {self._text(data, cid, seq) for seq, data in conn.execute(
                sa.select(EVENTS.c.seq, EVENTS.c.data).where(
                    EVENTS.c.conversation_id == cid, EVENTS.c.seq > since))}
            top = conn.execute(sa.select(sa.func.max(EVENTS.c.seq)).where(
                EVENTS.c.conversation_id == cid)).scalar() or 0
            pending = sorted((r for r in clashing + fresh
                              if self._text(r["data"], cid, r["seq"]) not in moved_before),
                             key=lambda r: r["seq"])
            fresh = [dict(row, seq=top + offset, data=self._moved(row, cid, top + offset))
                     for offset, row in enumerate(pending, 1)]
            clashing = [r for r in clashing
                        if self._text(r["data"], cid, r["seq"]) not in moved_before]
        return [(cid, r["seq"], r["type_name"], r["timestamp"], r["intent_name"],
                 r["action_name"], r["data"]) for r in fresh], len(clashing)

    def _text(self, data: str, cid: str, seq: int) -> str:
        try:
            return self._text_of(data, cid, seq)
        except CorruptRecordError:
            return data  # unreadable: equal only to the same bytes

    def _moved(self, row: RowDict, cid: str, new_seq: int) -> str:
        try:
            return self._rebind(row["data"], cid, row["seq"], new_seq)
        except CorruptRecordError:
            return row["data"]  # unreadable either way; a reader skips it, naming it

    def erased_floor(self, conversation_id: str) -> Optional[int]:
        """The floor of the conversation's tombstone; None if it was never erased."""
        with self.engine.connect() as conn:
            return self.erasure.floors(conn, [conversation_id]).get(conversation_id)

    def read(self, conversation_id: str, after_seq: int = 0) -> List[LogRow]:
        """All rows of one conversation with ``seq > after_seq``, in order."""
        if not loggable(conversation_id):
            return []
        query = sa.select(EVENTS.c.seq, EVENTS.c.type_name, EVENTS.c.timestamp,
                          EVENTS.c.intent_name, EVENTS.c.action_name, EVENTS.c.data).where(
            EVENTS.c.conversation_id == conversation_id, EVENTS.c.seq > after_seq,
        ).order_by(EVENTS.c.seq)
        with self.engine.connect() as conn:
            return [LogRow(*row) for row in conn.execute(query)]

    def next_seq(self, conversation_id: str) -> int:
        """One past the highest logged sequence number (1 for a new conversation)."""
        if not loggable(conversation_id):
            return 1
        with self.engine.connect() as conn:
            top = conn.execute(sa.select(sa.func.max(EVENTS.c.seq)).where(
                EVENTS.c.conversation_id == conversation_id)).scalar()
        return (top or 0) + 1

    def conversation_ids(self) -> List[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(EVENTS.c.conversation_id).distinct())]

    def snapshot(self, conversation_id: str) -> Optional[Snapshot]:
        if not loggable(conversation_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(
                SNAPSHOTS.c.next_seq, SNAPSHOTS.c.version, SNAPSHOTS.c.saved_at,
                SNAPSHOTS.c.payload).where(SNAPSHOTS.c.conversation_id == conversation_id)).first()
        if row is None:
            return None
        payload = row[3]
        return Snapshot(row[0], row[1], row[2], _snapshot_text(payload))

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))


def _snapshot_text(payload: Any) -> Any:
    """A snapshot payload as text: a BLOB (SQLite keeps whatever was written
    into the column, a forged value too) with its bytes kept exactly
    (``security.compressed.stored_text``), so readers refuse it as corrupt."""
    return payload.decode("utf-8", "surrogateescape") if isinstance(payload, bytes) else payload


_UNAVAILABLE = (sa_errors.OperationalError, sa_errors.InterfaceError,
                sa_errors.TimeoutError, sa_errors.DisconnectionError)


class AsyncEventLog:
    """Runs ``SQLEventLog`` calls on a bounded thread pool; translates errors."""

    def __init__(self, log: SQLEventLog, workers: int) -> None:
        self.sync = log
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpt-sql")

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except _UNAVAILABLE as exc:
            raise EventLogUnavailable(
                f"SQL event log at {mask_url(str(self.sync.engine.url))} is unavailable "
                f"({type(exc).__name__})."
            ) from exc
        except sa_errors.DBAPIError as exc:
            if exc.connection_invalidated:
                raise EventLogUnavailable(
                    f"SQL event log at {mask_url(str(self.sync.engine.url))} dropped the "
                    f"connection."
                ) from exc
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sync.engine.dispose()
