"""Key rotation: re-encrypt stored data under the newest key.

Hot records, every ``rpt_events`` row and ``rpt_snapshots`` payload that uses
another key (and sensitive rows written before encryption was on) are
rewritten in batches that commit on their own, so a run can be stopped and
started again; a rerun skips what is already under the newest key. Used by
``rasa-persistent-tracker rotate-keys`` (cli.py).
"""
import contextlib
import dataclasses
import logging
import pathlib
import re
import sqlite3
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import sqlalchemy as sa

from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.crypto import PREFIX, key_id_of
from rasa_persistent_tracker.errors import (
    ConcurrentSaveError,
    ConfigError,
    CorruptRecordError,
    EncryptionKeyMissing,
)
from rasa_persistent_tracker.event_log import EVENTS, SNAPSHOTS
from rasa_persistent_tracker.hot_state import UnusableValue
from rasa_persistent_tracker.outbox import parse_entry

logger = logging.getLogger(__name__)

PHASES = ("hot records", "rpt_events", "rpt_snapshots")
_COMMIT_ATTEMPTS = 5
_LISTED = 20  # unreadable values named one by one per phase; the rest are counted


@dataclasses.dataclass
class Progress:
    """One finished batch of ``rotate``: counts so far in ``phase``."""

    phase: str
    checked: int
    total: int
    rewritten: int


@dataclasses.dataclass
class RotationReport:
    """What ``rotate`` did, per phase, and what still uses an old key."""

    primary: str
    checked: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    rewritten: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    unreadable: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    old_key: Dict[str, int] = dataclasses.field(default_factory=dict)
    complete: bool = False

    @property
    def finished(self) -> bool:
        """True when the run was complete and nothing uses an old key any more."""
        return self.complete and not any(self.old_key.values())

    def summary(self) -> str:
        lines = [f"  {p}: {self.checked[p]} checked, {self.rewritten[p]} re-encrypted"
                 + (f", {self.unreadable[p]} unreadable" if self.unreadable[p] else "")
                 for p in PHASES]
        if not self.complete:
            head = "Key rotation stopped before the end: run rotate-keys again to finish."
        elif self.finished:
            head = (f"Key rotation complete: no row or record uses an old key; every key "
                    f"except '{self.primary}' can be removed.")
        else:
            left = ", ".join(f"{n} in {p}" for p, n in self.old_key.items() if n)
            head = (f"Key rotation done, but some data still uses a key other than "
                    f"'{self.primary}' ({left}): keep the other keys. Unreadable values are "
                    f"named in the warnings above (is a key missing from the keyring?).")
        return "\n".join([head, *lines])

    def unreadable_value(self, phase: str, what: str, reason: object) -> None:
        """Count one value that cannot be decoded; name the first few in a warning."""
        self.unreadable[phase] += 1
        if self.unreadable[phase] <= _LISTED:
            logger.warning("%s cannot be decoded (%s); not re-encrypted.", what, reason)
        if self.unreadable[phase] == _LISTED:
            logger.warning("Further unreadable values in %s are counted, not listed.", phase)


class _Stopped(Exception):
    """``max_batches`` reached."""


class RawHotAccess:
    """Reads the ``HotState`` protocol does not offer: remaining TTL, quarantine keys.

    Args:
        config: the store config (prefix, embedded path).
        redis_client: a redis.asyncio client on the hot state's server (None:
            the embedded hot state, read from its SQLite file).
    """

    def __init__(self, config: StoreConfig, redis_client: Any = None) -> None:
        self._config = config
        self._redis = redis_client

    def _hash_key(self, cid: str) -> str:
        return f"{self._config.key_prefix}:h:{{{cid}}}"

    def _sqlite(self, sql: str, args: Tuple) -> List[tuple]:
        uri = pathlib.Path(self._config.embedded_path).resolve().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            return conn.execute(sql, args).fetchall()

    async def ttl(self, cid: str) -> Optional[float]:
        """Seconds the record has left; None if gone, ``record_exp`` if unknown."""
        if self._redis is not None:
            ms = await self._redis.pttl(self._hash_key(cid))
            return None if ms == -2 else self._config.record_exp if ms < 0 else ms / 1000
        rows = self._sqlite("SELECT expires_at FROM rpt_hot WHERE conversation_id=?", (cid,))
        left = rows[0][0] - time.time() if rows else -1.0
        return left if left > 0 else None

    async def quarantined(self, cid: str) -> List[str]:
        if self._redis is not None:
            literal = re.sub(r"([\\*?\[\]])", r"\\\1", cid)  # SCAN glob syntax
            pattern = f"{self._config.key_prefix}:q:{{{literal}}}:*"
            return sorted([k.decode() if isinstance(k, bytes) else k
                           async for k in self._redis.scan_iter(match=pattern, count=1000)])
        rows = self._sqlite("SELECT id FROM rpt_quarantine WHERE conversation_id=? AND "
                            "expires_at>? ORDER BY id", (cid, time.time()))
        return [f"{self._config.embedded_path}#rpt_quarantine/{r[0]}" for r in rows]

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()


# ------------------------------------------------------------------ rotation


def primary_key_id(backends: Backends) -> str:
    kid = key_id_of(backends.codec.dumps_record({}))
    if kid is None:
        raise ConfigError(
            f"rotate-keys needs encryption keys: set {backends.config.encryption_keys_env} "
            f"or 'encryption_key_file', with the new key first.")
    return kid


def _reencode_event(backends: Backends, primary: str, data: str) -> Optional[str]:
    """New ``data`` for a log row, or None if it is fine as it is."""
    kid = key_id_of(data)
    if kid == primary:
        return None
    event = backends.codec.loads(data)
    if not isinstance(event, dict):
        raise CorruptRecordError("log row is not an event object")
    new = backends.codec.dumps_event(event)
    # Plaintext the config does not call sensitive stays as it is.
    return None if kid is None and key_id_of(new) is None else new


def _reencode_record(backends: Backends, primary: str, payload: str) -> Optional[str]:
    if key_id_of(payload) == primary:
        return None
    return backends.codec.dumps_record(backends.codec.loads_record(payload))


def _read_batch(engine: sa.engine.Engine, table: sa.Table, key: str, column: str,
                after: Any, limit: int) -> List[Tuple[Any, str]]:
    order = table.c[key]
    query = sa.select(order, table.c[column]).order_by(order).limit(limit)
    if after is not None:
        query = query.where(order > after)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def _write_batch(engine: sa.engine.Engine, table: sa.Table, key: str, column: str,
                 updates: List[Tuple[Any, str, str]]) -> int:
    # Compare-and-set on the old value: a row changed meanwhile is left alone.
    written = 0
    with engine.begin() as conn:
        for row_key, old, new in updates:
            written += conn.execute(table.update().where(
                table.c[key] == row_key, table.c[column] == old).values({column: new})).rowcount
    return written


def _count(engine: sa.engine.Engine, table: sa.Table, column: str,
           primary: Optional[str] = None) -> int:
    query = sa.select(sa.func.count()).select_from(table)
    if primary is not None:  # rows under a key other than ``primary``
        col = table.c[column]
        query = query.where(col.startswith(PREFIX, autoescape=True),
                            ~col.startswith(f"{PREFIX}{primary}:", autoescape=True))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


async def rotate(backends: Backends, batch_size: int = 500,
                 progress: Optional[Callable[[Progress], None]] = None,
                 max_batches: Optional[int] = None,
                 ttl_of: Optional[Callable[[str], Awaitable[Optional[float]]]] = None,
                 ) -> RotationReport:
    """Re-encrypt every hot record, log row and snapshot under the primary key.

    Args:
        backends: the storage, opened with the new keyring (new key first).
        batch_size: rows (or records) per batch; each batch commits on its own.
        progress: called after every batch (may raise to stop the run).
        max_batches: stop after this many batches (None: run to the end).
        ttl_of: remaining TTL of a conversation's hot record in seconds (None:
            gone); without it records keep ``record_exp``.

    Returns:
        The report; ``report.finished`` says whether old keys can be removed.

    Raises:
        ConfigError: no encryption key is configured.
        StorageUnavailable: a server failed; completed batches stay done.
    """
    primary = primary_key_id(backends)
    report = RotationReport(primary)
    batches = 0

    def batch_done(phase: str, total: int) -> None:
        nonlocal batches
        batches += 1
        if progress is not None:
            progress(Progress(phase, report.checked[phase], total, report.rewritten[phase]))
        if max_batches is not None and batches >= max_batches:
            raise _Stopped()

    await backends.outbox.drain()  # pending rows go to SQL first, then get rotated
    try:
        ids = sorted({cid async for cid in backends.hot.conversations()})
        for start in range(0, len(ids), batch_size):
            for cid in ids[start:start + batch_size]:
                await _rotate_record(backends, primary, cid, report, ttl_of)
            batch_done("hot records", len(ids))
        for phase, table, key, column, encode in (
                ("rpt_events", EVENTS, "id", "data", _reencode_event),
                ("rpt_snapshots", SNAPSHOTS, "conversation_id", "payload", _reencode_record)):
            await _rotate_table(backends, primary, report, phase, table, key, column, encode,
                                batch_size, batch_done)
        report.complete = True
    except _Stopped:
        pass
    engine = backends.log.sync.engine
    report.old_key = {
        "rpt_events": await backends.log.run(_count, engine, EVENTS, "data", primary),
        "rpt_snapshots": await backends.log.run(_count, engine, SNAPSHOTS, "payload", primary),
        "hot records": report.old_key.get("hot records", 0),
        "outbox": await _old_key_outbox_rows(backends, primary),
    }
    return report


async def _rotate_record(backends: Backends, primary: str, cid: str, report: RotationReport,
                         ttl_of: Optional[Callable[[str], Awaitable[Optional[float]]]]) -> None:
    phase = "hot records"
    report.checked[phase] += 1
    for _ in range(_COMMIT_ATTEMPTS):
        entry = await backends.hot.load(cid)
        if entry.payload is None:
            if entry.problem:
                report.unreadable_value(phase, f"Hot record of '{cid}'", entry.problem)
            return
        try:
            new = _reencode_record(backends, primary, entry.payload)
        except (CorruptRecordError, EncryptionKeyMissing) as exc:
            report.unreadable_value(phase, f"Hot record of '{cid}'", exc)
            if key_id_of(entry.payload) not in (None, primary):
                report.old_key[phase] = report.old_key.get(phase, 0) + 1
            return
        if new is None:
            return
        ttl = await ttl_of(cid) if ttl_of is not None else backends.config.record_exp
        if ttl is None:
            return  # expired meanwhile
        try:
            await backends.hot.commit(cid, entry.version, new, ttl, None)
        except ConcurrentSaveError:
            continue  # a turn saved meanwhile (with the keys it has): look again
        except UnusableValue as exc:
            report.unreadable_value(phase, f"Hot record of '{cid}'", exc)
            return
        report.rewritten[phase] += 1
        return
    report.old_key[phase] = report.old_key.get(phase, 0) + 1


async def _rotate_table(backends: Backends, primary: str, report: RotationReport, phase: str,
                        table: sa.Table, key: str, column: str,
                        encode: Callable[[Backends, str, str], Optional[str]],
                        batch_size: int, batch_done: Callable[[str, int], None]) -> None:
    log, engine = backends.log, backends.log.sync.engine
    total = await log.run(_count, engine, table, column)
    after = None
    while True:
        rows = await log.run(_read_batch, engine, table, key, column, after, batch_size)
        if not rows:
            return
        updates = []
        for row_key, value in rows:
            try:
                new = encode(backends, primary, value)
            except (CorruptRecordError, EncryptionKeyMissing) as exc:
                report.unreadable_value(phase, f"{phase} {key}={row_key}", exc)
                continue
            if new is not None:
                updates.append((row_key, value, new))
        if updates:
            report.rewritten[phase] += await log.run(
                _write_batch, engine, table, key, column, updates)
        report.checked[phase] += len(rows)
        after = rows[-1][0]
        batch_done(phase, max(total, report.checked[phase]))


async def _old_key_outbox_rows(backends: Backends, primary: str) -> int:
    count = 0
    async for cid in backends.hot.outboxes():
        for entry in (await backends.hot.pending(cid, 100_000)).entries:
            try:
                rows = parse_entry(entry)[1]
            except (ValueError, TypeError, KeyError):
                continue
            count += sum(key_id_of(r.data) not in (None, primary) for r in rows)
    return count


# ------------------------------------------------------------------ inspect
