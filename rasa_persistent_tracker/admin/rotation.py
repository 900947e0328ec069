"""Key rotation: re-seal stored data under the newest key.

Hot records, every ``rpt_events`` row and ``rpt_snapshots`` payload and every
quarantine copy that is not in the current format under the newest key
(another key, the unbound legacy format, or plaintext: the latter two only
with ``accept_plaintext``) are rewritten in batches that commit on their own,
so a run can be stopped and started again; a rerun skips what is done. What
one value becomes is ``rekey``'s. The report counts every stored value per
key id. Used by ``rasa-persistent-tracker rotate-keys`` (cli.py).
"""
import logging
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import sqlalchemy as sa

from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.admin.rotation_report import Progress, RotationReport
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.errors import (
    ConcurrentSaveError,
    ConfigError,
    CorruptRecordError,
    EncryptionKeyMissing,
)
from rasa_persistent_tracker.hot.entry_header import body_of
from rasa_persistent_tracker.hot.protocol import Erased, UnusableValue
from rasa_persistent_tracker.log.tables import EVENTS, SNAPSHOTS
from rasa_persistent_tracker.security import rekey
from rasa_persistent_tracker.security.crypto import HOT, MAC_PREFIX, PREFIX, SNAPSHOT, key_id_of

# The logger's name from before the layer packages: logging configs keep working.
logger = logging.getLogger("rasa_persistent_tracker.rotation")

_COMMIT_ATTEMPTS = 5


class _Stopped(Exception):
    """``max_batches`` reached."""


def primary_key_id(backends: Backends) -> str:
    kid = key_id_of(backends.codec.dumps_record({}))
    if kid is None:
        raise ConfigError(
            f"rotate-keys needs encryption keys: set {backends.config.encryption_keys_env} "
            f"or 'encryption_key_file', with the new key first.")
    return kid


def _read_batch(engine: sa.engine.Engine, table: sa.Table, columns: Tuple[str, ...],
                after: Any, limit: int) -> List[tuple]:
    order = table.c[columns[0]]
    query = sa.select(*(table.c[c] for c in columns)).order_by(order).limit(limit)
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
    if primary is not None:  # values not in the current format under ``primary``
        col = table.c[column]
        query = query.where(~col.startswith(f"{PREFIX}{primary}:", autoescape=True),
                            ~col.startswith(f"{MAC_PREFIX}{primary}:", autoescape=True))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def _event(backends: Backends, primary: str, row: tuple) -> Optional[str]:
    _, cid, seq, data = row
    return rekey.event(backends.codec, primary, cid, seq, data)


def _snapshot(backends: Backends, primary: str, row: tuple) -> Optional[str]:
    cid, payload = row
    return rekey.record(backends.codec, primary, cid, payload, SNAPSHOT)


async def rotate(backends: Backends, batch_size: int = 500,
                 progress: Optional[Callable[[Progress], None]] = None,
                 max_batches: Optional[int] = None,
                 ttl_of: Optional[Callable[[str], Awaitable[Optional[float]]]] = None,
                 raw: Optional[RawHotAccess] = None) -> RotationReport:
    """Re-seal every hot record, log row, snapshot and quarantine copy under
    the primary key.

    Args:
        backends: the storage, opened with the new keyring (new key first).
        batch_size: rows (or records) per batch; each batch commits on its own.
        progress: called after every batch (may raise to stop the run).
        max_batches: stop after this many batches (None: run to the end).
        ttl_of: remaining TTL of a conversation's hot record in seconds (None:
            gone); without it records keep ``record_exp``.
        raw: direct access to the hot state's quarantine copies (without it
            they are neither rotated nor counted, and the run is not finished).

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
        for phase, table, columns, encode in (
                ("rpt_events", EVENTS, ("id", "conversation_id", "seq", "data"), _event),
                ("rpt_snapshots", SNAPSHOTS, ("conversation_id", "payload"), _snapshot)):
            await _rotate_table(backends, primary, report, phase, table, columns, encode,
                                batch_size, batch_done)
        if raw is not None:
            await _rotate_quarantine(backends, primary, report, raw)
        report.complete = True
    except _Stopped:
        pass
    engine = backends.log.sync.engine
    report.old_key = {
        "hot records": report.old_key.get("hot records", 0),
        "rpt_events": await backends.log.run(_count, engine, EVENTS, "data", primary),
        "rpt_snapshots": await backends.log.run(_count, engine, SNAPSHOTS, "payload", primary),
        "outbox": await _outbox_left(backends, primary, report),
        "quarantine": (sum(n for k, n in report.by_key["quarantine"].items() if k != primary)
                       if raw is not None else 0),
    }
    report.quarantine_checked = raw is not None
    return report


async def _rotate_record(backends: Backends, primary: str, cid: str, report: RotationReport,
                         ttl_of: Optional[Callable[[str], Awaitable[Optional[float]]]]) -> None:
    phase = "hot records"
    report.checked[phase] += 1
    for _ in range(_COMMIT_ATTEMPTS):
        entry = await backends.hot.load(cid)
        if entry.payload is None:
            if entry.problem:
                report.unreadable_value(phase, f"Hot record of '{backends.ids(cid)}'",
                                        entry.problem)
                report.old_key[phase] = report.old_key.get(phase, 0) + 1
            return
        try:
            new = rekey.record(backends.codec, primary, cid, entry.payload, HOT)
        except (CorruptRecordError, EncryptionKeyMissing) as exc:
            report.unreadable_value(phase, f"Hot record of '{backends.ids(cid)}'", exc)
            report.count(phase, entry.payload)
            report.old_key[phase] = report.old_key.get(phase, 0) + 1
            return
        if new is None:
            report.count(phase, entry.payload)
            return
        ttl = await ttl_of(cid) if ttl_of is not None else backends.config.record_exp
        if ttl is None:
            return  # expired meanwhile
        try:
            await backends.hot.commit(cid, entry.version, new, ttl, None)
        except ConcurrentSaveError:
            continue  # a turn saved meanwhile (with the keys it has): look again
        except Erased:
            return  # erased meanwhile: nothing left to re-encrypt
        except UnusableValue as exc:
            report.unreadable_value(phase, f"Hot record of '{backends.ids(cid)}'", exc)
            return
        report.rewritten[phase] += 1
        report.count(phase, new)
        return
    report.old_key[phase] = report.old_key.get(phase, 0) + 1


async def _rotate_table(backends: Backends, primary: str, report: RotationReport, phase: str,
                        table: sa.Table, columns: Tuple[str, ...],
                        encode: Callable[[Backends, str, tuple], Optional[str]],
                        batch_size: int, batch_done: Callable[[str, int], None]) -> None:
    log, engine = backends.log, backends.log.sync.engine
    key, column = columns[0], columns[-1]
    total = await log.run(_count, engine, table, column)
    after = None
    while True:
        rows = await log.run(_read_batch, engine, table, columns, after, batch_size)
        if not rows:
            return
        updates = []
        for row in rows:
            try:
                new = encode(backends, primary, row)
            except (CorruptRecordError, EncryptionKeyMissing) as exc:
                report.unreadable_value(phase, f"{phase} {key}={row[0]}", exc)
                new = None
            if new is not None:
                updates.append((row[0], row[-1], new))
            report.count(phase, new or row[-1])
        if updates:
            report.rewritten[phase] += await log.run(
                _write_batch, engine, table, key, column, updates)
        report.checked[phase] += len(rows)
        after = rows[-1][0]
        batch_done(phase, max(total, report.checked[phase]))


async def _rotate_quarantine(backends: Backends, primary: str, report: RotationReport,
                             raw: RawHotAccess) -> None:
    phase = "quarantine"
    async for where, cid, value in raw.copies():
        report.checked[phase] += 1
        try:
            new = rekey.quarantine_copy(backends.codec, primary, cid, value)
        except (CorruptRecordError, EncryptionKeyMissing) as exc:
            report.unreadable_value(phase, "Quarantine copy "
                                   f"{backends.ids.in_text(str(where), cid)!r}", exc)
            new = None
        if new is not None and await raw.replace_copy(where, value, new):
            report.rewritten[phase] += 1
            value = new
        report.count(phase, value)


async def _outbox_left(backends: Backends, primary: str, report: RotationReport) -> int:
    """Outbox entries (body and rows) not under ``primary``, counted per key."""
    left = 0
    async for cid in backends.hot.outboxes():
        for entry in (await backends.hot.pending(cid, 100_000)).entries:
            body = body_of(entry)
            report.count("outbox", body)
            left += not rekey.current(body, primary)
    return left
