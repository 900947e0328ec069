"""Embedded hot state: ``HotState`` on a local SQLite file, no server needed.

The default when no Redis is configured (the demo runs on it). Same contract as
``RedisHotState``: versioned records with a sliding expiry, an outbox written in
the same transaction, quarantine for unreadable values, tombstones of erased
conversations (``rpt_erased``, named by a digest of the id). Expired rows count as
absent; a commit at most every ``PURGE_INTERVAL`` seconds deletes up to
``PURGE_LIMIT`` expired records and quarantined copies, so the file does not
grow forever and no commit pays for a large purge. Calls run on a worker thread; one connection
guarded by a lock is plenty for one bot process (WAL lets several processes share
the file).
"""
import asyncio
import sqlite3
import threading
import time
from typing import Any, AsyncIterator, Callable, List, Optional, TypeVar

from rasa_persistent_tracker.errors import ConcurrentSaveError, HotStateUnavailable
from rasa_persistent_tracker.files import private_file
from rasa_persistent_tracker.hot.entry_header import entry_seq
from rasa_persistent_tracker.hot.protocol import (
    Erased,
    HotEntry,
    Pending,
    RecordMissing,
    Removed,
    payload_digest,
    read_before_erasure,
)
from rasa_persistent_tracker.security.compressed import Payload, stored_bytes, stored_text
from rasa_persistent_tracker.security.erasure import ErasureIds

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rpt_hot (
  conversation_id TEXT PRIMARY KEY, version INTEGER NOT NULL,
  payload BLOB, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rpt_outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
  last_seq INTEGER NOT NULL, entry TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ix_rpt_outbox_conversation ON rpt_outbox (conversation_id, id);
CREATE TABLE IF NOT EXISTS rpt_quarantine (
  id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
  payload BLOB, created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rpt_erased (
  name TEXT PRIMARY KEY, floor INTEGER NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ix_rpt_hot_expires ON rpt_hot (expires_at);
CREATE INDEX IF NOT EXISTS ix_rpt_quarantine_expires ON rpt_quarantine (expires_at);
"""
PURGE_INTERVAL = 60.0
PURGE_LIMIT = 500


class SQLiteHotState:
    """``HotState`` stored in a SQLite file at ``path``."""

    def __init__(self, path: str, outbox_ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._outbox_ttl = outbox_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._next_purge = 0.0
        self._digests: Callable[[str], List[str]] = ErasureIds()
        try:
            private_file(path)
            self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30,
                                         isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise HotStateUnavailable(f"Embedded hot state at {path} cannot be opened: {exc}") from exc

    def __repr__(self) -> str:
        return f"SQLiteHotState({self.path!r})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._lock:
                try:
                    return fn(*args)
                except sqlite3.OperationalError as exc:
                    raise HotStateUnavailable(f"Embedded hot state at {self.path}: {exc}") from exc
        return await asyncio.get_running_loop().run_in_executor(None, locked)

    def bind_erasure(self, digests: Callable[[str], List[str]]) -> None:
        self._digests = digests

    def _floor(self, cid: str) -> Optional[int]:
        names = self._digests(cid)
        if not names:
            return None
        row = self._conn.execute(
            f"SELECT MAX(floor) FROM rpt_erased WHERE expires_at>? AND name IN "
            f"({','.join('?' * len(names))})", (self._clock(), *names)).fetchone()
        return None if row[0] is None else int(row[0])

    def _row(self, cid: str) -> Optional[tuple]:
        return self._conn.execute(
            "SELECT version, payload FROM rpt_hot WHERE conversation_id=? AND expires_at>?",
            (cid, self._clock())).fetchone()

    def _outbox_seq(self, cid: str) -> int:
        row = self._conn.execute("SELECT MAX(last_seq) FROM rpt_outbox WHERE conversation_id=?",
                                 (cid,)).fetchone()
        return int(row[0] or 0)

    async def load(self, conversation_id: str, known: Optional[str] = None) -> HotEntry:
        def load() -> HotEntry:
            row = self._row(conversation_id)
            seq = self._outbox_seq(conversation_id)
            if row is None:
                return HotEntry(outbox_seq=seq)
            version, stored = row
            if not isinstance(version, int):
                return HotEntry(problem="version field unreadable", outbox_seq=seq)
            # Any bytes (compressed records are binary): the codec judges them.
            payload = stored_text(stored) if isinstance(stored, bytes) else stored
            if not isinstance(payload, str):
                return HotEntry(version=version, problem="payload field missing", outbox_seq=seq)
            if known is not None and payload_digest(stored) == known:
                return HotEntry(version=version, outbox_seq=seq, unchanged=True)
            return HotEntry(version=version, payload=payload, outbox_seq=seq)
        return await self._run(load)

    async def commit(self, conversation_id: str, expected_version: Optional[int],
                     payload: Payload, ttl: float, outbox_entry: Optional[str],
                     expect_record: bool = False, restoring: bool = False) -> int:
        def commit() -> int:
            now = self._clock()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._row(conversation_id)
                current = row[0] if row else 0
                if expected_version is not None and row and current != expected_version:
                    raise ConcurrentSaveError(conversation_id, expected_version, current)
                floor = None if row else self._floor(conversation_id)
                if floor is not None and read_before_erasure(floor, expected_version,
                                                             expect_record, restoring):
                    raise Erased(conversation_id, floor)
                if expected_version is not None and not row:
                    if expect_record:
                        raise RecordMissing(conversation_id)
                    current = expected_version
                if floor is not None:  # an erased id counts on from the floor
                    current = max(current, floor)
                new = int(current) + 1
                self._conn.execute(
                    "INSERT INTO rpt_hot VALUES (?,?,?,?) ON CONFLICT(conversation_id) DO UPDATE "
                    "SET version=excluded.version, payload=excluded.payload, "
                    "expires_at=excluded.expires_at",
                    (conversation_id, new, stored_bytes(payload), now + ttl))
                if outbox_entry:
                    self._conn.execute(
                        "INSERT INTO rpt_outbox (conversation_id, last_seq, entry, expires_at) "
                        "VALUES (?,?,?,?)", (conversation_id, entry_seq(outbox_entry),
                                             outbox_entry, now + self._outbox_ttl))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if now >= self._next_purge:
                self._next_purge = now + PURGE_INTERVAL
                self._purge(now)
            return new
        return await self._run(commit)

    def _purge(self, now: float) -> None:
        """Delete up to ``PURGE_LIMIT`` expired records and quarantined copies."""
        for table in ("rpt_hot", "rpt_quarantine", "rpt_erased"):
            self._conn.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                f"WHERE expires_at<=? LIMIT ?)", (now, PURGE_LIMIT))

    async def quarantine(self, conversation_id: str, ttl: float) -> Optional[str]:
        def move() -> Optional[str]:
            now = self._clock()
            row = self._conn.execute("SELECT payload FROM rpt_hot WHERE conversation_id=?",
                                     (conversation_id,)).fetchone()
            if row is None:
                return None
            cur = self._conn.execute(
                "INSERT INTO rpt_quarantine (conversation_id, payload, created_at, expires_at) "
                "VALUES (?,?,?,?)", (conversation_id, row[0], now, now + ttl))
            self._conn.execute("DELETE FROM rpt_hot WHERE conversation_id=?", (conversation_id,))
            return f"{self.path}#rpt_quarantine/{cur.lastrowid}"
        return await self._run(move)

    async def quarantine_entry(self, conversation_id: str, entry: str, ttl: float) -> str:
        def keep() -> str:
            now = self._clock()
            self._conn.execute("BEGIN IMMEDIATE")  # autocommit connection: one transaction
            try:
                cur = self._conn.execute(
                    "INSERT INTO rpt_quarantine (conversation_id, payload, created_at, "
                    "expires_at) VALUES (?,?,?,?)", (conversation_id, entry, now, now + ttl))
                self._conn.execute(
                    "DELETE FROM rpt_outbox WHERE id = (SELECT MIN(id) FROM rpt_outbox "
                    "WHERE conversation_id=? AND entry=?)", (conversation_id, entry))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return f"{self.path}#rpt_quarantine/{cur.lastrowid}"
        return await self._run(keep)

    async def pending(self, conversation_id: str, limit: int) -> Pending:
        def pending() -> Pending:
            # One read transaction: a commit by another process between the
            # two reads would pair these entries with a record that already
            # holds a later turn (a snapshot replaying that turn twice).
            self._conn.execute("BEGIN")
            try:
                entries = [r[0] for r in self._conn.execute(
                    "SELECT entry FROM rpt_outbox WHERE conversation_id=? ORDER BY id LIMIT ?",
                    (conversation_id, limit))]
                row = self._row(conversation_id)
            finally:
                self._conn.execute("COMMIT")
            payload = row[1] if row else None
            if isinstance(payload, bytes):
                payload = stored_text(payload)
            return Pending(entries=entries, payload=payload, version=row[0] if row else 0,
                           complete=len(entries) < limit)
        return await self._run(pending)

    async def ack(self, conversation_id: str, upto_seq: int) -> int:
        def ack() -> int:
            # last_seq was read from the entry's header when it was queued.
            ids: List[int] = []
            for row_id, last_seq in self._conn.execute(
                    "SELECT id, last_seq FROM rpt_outbox WHERE conversation_id=? ORDER BY id",
                    (conversation_id,)):
                if last_seq > upto_seq:
                    break
                ids.append(row_id)
            self._conn.executemany("DELETE FROM rpt_outbox WHERE id=?", [(i,) for i in ids])
            return len(ids)
        return await self._run(ack)

    async def touch(self, conversation_id: str, ttl: float) -> None:
        await self._run(lambda: self._conn.execute(
            "UPDATE rpt_hot SET expires_at=? WHERE conversation_id=?",
            (self._clock() + ttl, conversation_id)))

    async def erase(self, conversation_id: str, floor: int, ttl: float,
                    only_at_version: Optional[int] = None) -> Removed:
        def erase() -> Removed:
            now = self._clock()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # Expired rows too: erasing means no byte is left, not "absent".
                row = self._conn.execute("SELECT version, expires_at FROM rpt_hot WHERE "
                                         "conversation_id=?", (conversation_id,)).fetchone()
                live = row is not None and row[1] > now
                version = row[0] if live and isinstance(row[0], int) else 0
                if only_at_version is not None and (version != only_at_version
                                                    or (only_at_version == 0 and live)):
                    self._conn.execute("ROLLBACK")
                    return Removed(floor=None)
                top = max(floor, version, self._floor(conversation_id) or 0)
                self._conn.executemany(
                    "INSERT INTO rpt_erased VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET "
                    "floor=excluded.floor, expires_at=excluded.expires_at",
                    [(name, top, now + ttl) for name in self._digests(conversation_id)])
                self._conn.execute("DELETE FROM rpt_hot WHERE conversation_id=?",
                                   (conversation_id,))
                entries = self._conn.execute("DELETE FROM rpt_outbox WHERE conversation_id=?",
                                             (conversation_id,)).rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return Removed(floor=top, record=live, outbox_entries=entries)
        return await self._run(erase)

    async def tombstone(self, conversation_id: str) -> Optional[int]:
        return await self._run(self._floor, conversation_id)

    async def _ids(self, sql: str) -> AsyncIterator[str]:
        for (cid,) in await self._run(lambda: self._conn.execute(sql, (self._clock(),)).fetchall()):
            yield cid

    def conversations(self) -> AsyncIterator[str]:
        return self._ids("SELECT conversation_id FROM rpt_hot WHERE expires_at>?")

    def outboxes(self) -> AsyncIterator[str]:
        return self._ids("SELECT DISTINCT conversation_id FROM rpt_outbox WHERE expires_at>?")

    async def ping(self) -> None:
        await self._run(lambda: self._conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        with self._lock:
            self._conn.close()
