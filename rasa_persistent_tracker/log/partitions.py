"""Monthly partitions of ``rpt_events`` on PostgreSQL: create ahead, list, drop.

The table is partitioned by ``log_month`` (``tables.py``: the month, UTC, in
which the database wrote the row), one partition per month named
``rpt_events_pYYYYMM``, plus ``rpt_events_default`` for a row written in a
month that has no partition yet, so an insert never fails for lack of one.

``ensure_partitions`` creates the partitions of this month and the next ones
(the store calls it at start-up, the ``partitions`` CLI command too). If
rows already sit in the default partition for a month being created, they
are moved into the new partition in the same transaction (PostgreSQL refuses
to create a partition whose rows the default partition holds).

``drop_partitions_before`` drops, or only detaches, whole past partitions
whose conversations are all gone: none has rows in another partition, a
snapshot in ``rpt_snapshots``, or is live by the caller's check (the hot
state). It drops nothing else and reports what it did with every candidate.
``purge`` erases and drops months through ``retention.py`` instead, which
writes the month's tombstones in the dropping transaction.

On SQLite the log is one table: ``is_partitioned`` is False, ``ensure``
creates nothing, and ``list`` and ``drop`` find no partitions.
"""
import dataclasses
import datetime
import logging
import re
from typing import Callable, Iterable, List, Optional, Set

import sqlalchemy as sa
from sqlalchemy import exc as sa_errors
from sqlalchemy.engine import Connection, Engine

from rasa_persistent_tracker.errors import ConfigError
from rasa_persistent_tracker.log.tables import DEFAULT_PARTITION, PARTITION_COLUMN

logger = logging.getLogger("rasa_persistent_tracker.event_log")

MONTHS_AHEAD = 3
# Partition maintenance takes the parent table's lock briefly; it must not
# queue every writer behind a long query (start-up carries on without it).
LOCK_TIMEOUT = "5s"
# Serialises maintenance between processes (two-int advisory lock space).
_MAINTENANCE_LOCK = (0x52505433, 1)
_NAME = re.compile(r"^rpt_events_p(\d{6})$")


def month_of(moment: datetime.datetime) -> int:
    """``YYYYMM`` of an aware or UTC datetime."""
    return moment.year * 100 + moment.month


def next_month(month: int) -> int:
    _check_month(month)
    year, mon = divmod(month, 100)
    return (year + 1) * 100 + 1 if mon == 12 else month + 1


def partition_name(month: int) -> str:
    _check_month(month)
    return f"rpt_events_p{month}"


def _check_month(month: int) -> None:
    if not isinstance(month, int) or not 1 <= month % 100 <= 12 or not 1970 <= month // 100 <= 9999:
        raise ConfigError(f"A partition month is YYYYMM, e.g. 202611; got {month!r}.")


def is_partitioned(conn: Connection) -> bool:
    """Whether ``rpt_events`` is a partitioned table here (PostgreSQL, migrated)."""
    if conn.dialect.name != "postgresql":
        return False
    return conn.execute(sa.text(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass('rpt_events')")).scalar() == "p"


def current_month(conn: Connection) -> int:
    """This month by the database clock: the ``log_month`` a row written now gets."""
    return conn.execute(sa.text(
        "SELECT (to_char((now() AT TIME ZONE 'UTC'), 'YYYYMM'))::integer")).scalar()


@dataclasses.dataclass(frozen=True)
class Partition:
    name: str
    month: Optional[int]  # None: the default partition
    rows: int


def list_partitions(engine: Engine) -> List[Partition]:
    """Every partition with its exact row count, by month (default last)."""
    with engine.connect() as conn:
        if not is_partitioned(conn):
            return []
        names = partition_names(conn)
        found = [Partition(name, month_in(name), conn.execute(sa.text(
            f'SELECT count(*) FROM "{name}"')).scalar()) for name in names]
    return sorted(found, key=lambda p: (p.month is None, p.month or 0))


def ensure_partitions(engine: Engine, months_ahead: int = MONTHS_AHEAD,
                      month: Optional[int] = None) -> List[str]:
    """Create the partitions of ``month`` (default: this month, by the database
    clock) and of the ``months_ahead`` months after it, where missing. Returns
    the names created; idempotent. Does nothing unless the table is partitioned.

    Raises:
        ConfigError: ``month`` or ``months_ahead`` is out of range.
        sqlalchemy.exc.OperationalError: the table's lock was not granted in
            ``LOCK_TIMEOUT`` (e.g. behind a long export); the caller decides.
    """
    if not isinstance(months_ahead, int) or not 0 <= months_ahead <= 120:
        raise ConfigError(f"Months ahead is 0..120; got {months_ahead!r}.")
    created: List[str] = []
    with engine.begin() as conn:
        if not is_partitioned(conn):
            return created
        maintenance(conn)
        existing = set(partition_names(conn))
        wanted = month if month is not None else current_month(conn)
        for _ in range(months_ahead + 1):
            name = partition_name(wanted)
            if name not in existing:
                _create(conn, name, wanted)
                created.append(name)
            wanted = next_month(wanted)
    if created:
        logger.info("Event log: created partition(s) %s.", ", ".join(created))
    return created


def _create(conn: Connection, name: str, month: int) -> None:
    bounds = f"FROM ({month}) TO ({next_month(month)})"
    stray = f"{PARTITION_COLUMN} >= {month} AND {PARTITION_COLUMN} < {next_month(month)}"
    if conn.execute(sa.text(
            f"SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION} WHERE {stray})")).scalar():
        # Rows of this month went to the default partition (no partition yet):
        # move them into a table of their own, then attach it as the partition.
        conn.execute(sa.text(f'CREATE TABLE "{name}" (LIKE rpt_events INCLUDING DEFAULTS)'))
        moved = conn.execute(sa.text(
            f'WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE {stray} RETURNING *) '
            f'INSERT INTO "{name}" SELECT * FROM moved')).rowcount
        conn.execute(sa.text(f'ALTER TABLE rpt_events ATTACH PARTITION "{name}" '
                             f'FOR VALUES {bounds}'))
        logger.warning("Event log: %d row(s) of month %d moved from %s into the new partition "
                       "%s.", moved, month, DEFAULT_PARTITION, name)
        return
    conn.execute(sa.text(f'CREATE TABLE "{name}" PARTITION OF rpt_events FOR VALUES {bounds}'))


@dataclasses.dataclass(frozen=True)
class PartitionDrop:
    """What ``drop_partitions_before`` did with one partition."""

    name: str
    month: int
    rows: int
    conversations: int
    dropped: bool  # dropped, or detached with ``detach_only``
    reason: str  # why it was kept ("" if dropped)


def drop_partitions_before(
        engine: Engine, month: int,
        live: Optional[Callable[[List[str]], Iterable[str]]] = None,
        detach_only: bool = False) -> List[PartitionDrop]:
    """Drop (or only detach) each partition of a month before ``month`` whose
    conversations are all gone; keep the others. Returns one entry per
    partition considered, dropped or kept with the reason.

    A conversation of the partition keeps it if it has rows in any other
    partition (dropping would cut its history), a row in ``rpt_snapshots``,
    or is named by ``live(ids)`` (e.g. those with a hot record). A detached
    partition is renamed ``<name>_detached`` (a plain table, to archive and
    drop), so the month's name is free again. Writes to
    the log and snapshots wait while the check and the drop run (one
    transaction), so no row of such a conversation can arrive in between;
    ``live`` runs before that, so retention must make a conversation
    unreachable (erase its hot record) before dropping its rows.

    Raises:
        ConfigError: ``month`` is not YYYYMM or is after this month (the
            current month's partition still receives rows).
        sqlalchemy.exc.OperationalError: a lock was not granted in ``LOCK_TIMEOUT``.
    """
    _check_month(month)
    with engine.connect() as conn:
        if not is_partitioned(conn):
            return []
        if month > current_month(conn):
            raise ConfigError(f"Partitions can be dropped only before the current month "
                              f"({current_month(conn)}); got {month}.")
        candidates = [(name, m) for name in partition_names(conn)
                      for m in [month_in(name)] if m is not None and m < month]
        ids = {name: [r[0] for r in conn.execute(sa.text(
            f'SELECT DISTINCT conversation_id FROM "{name}"'))] for name, _ in candidates}
    alive: Set[str] = set(live(sorted({i for v in ids.values() for i in v}))) if live else set()
    results: List[PartitionDrop] = []
    with engine.begin() as conn:
        maintenance(conn)
        # Writers wait (readers go on) until the drop commits.
        conn.execute(sa.text("LOCK TABLE rpt_events IN SHARE ROW EXCLUSIVE MODE"))
        conn.execute(sa.text("LOCK TABLE rpt_snapshots IN SHARE ROW EXCLUSIVE MODE"))
        for name, part_month in candidates:
            rows, conversations, reason = _blockers(conn, name, alive.intersection(ids[name]))
            if reason:
                results.append(PartitionDrop(name, part_month, rows, conversations, False, reason))
                continue
            conn.execute(sa.text(f'ALTER TABLE rpt_events DETACH PARTITION "{name}"'))
            if detach_only:
                # Out of the partitions' names: the month could be made again.
                conn.execute(sa.text(f'ALTER TABLE "{name}" RENAME TO "{name}_detached"'))
            else:
                conn.execute(sa.text(f'DROP TABLE "{name}"'))
            results.append(PartitionDrop(name, part_month, rows, conversations, True, ""))
    for result in results:
        if result.dropped:
            logger.info("Event log: %s partition %s (%d rows, %d conversations).",
                        "detached" if detach_only else "dropped", result.name, result.rows,
                        result.conversations)
    return results


def _blockers(conn: Connection, name: str, live: Set[str]) -> "tuple[int, int, str]":
    """(rows, conversations, why the partition must stay or "")."""
    rows, conversations = conn.execute(sa.text(
        f'SELECT count(*), count(DISTINCT conversation_id) FROM "{name}"')).one()
    elsewhere = conn.execute(sa.text(
        f'SELECT count(DISTINCT p.conversation_id) FROM "{name}" p WHERE EXISTS ('
        f'SELECT 1 FROM rpt_events o WHERE o.conversation_id = p.conversation_id '
        f'AND o.tableoid <> to_regclass(:name))'), {"name": f'"{name}"'}).scalar()
    snapshots = conn.execute(sa.text(
        f'SELECT count(*) FROM rpt_snapshots WHERE conversation_id IN ('
        f'SELECT DISTINCT conversation_id FROM "{name}")')).scalar()
    reason = "; ".join(f"{count} conversation(s) {text}" for count, text in (
        (elsewhere, "with rows in another partition"), (snapshots, "with a snapshot"),
        (len(live), "live")) if count)
    return rows, conversations, reason


def maintenance(conn: Connection) -> None:
    """Start partition maintenance in ``conn``'s transaction: a lock wait of at
    most ``LOCK_TIMEOUT``, one maintainer at a time (across processes)."""
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:a, :b)"),
                 {"a": _MAINTENANCE_LOCK[0], "b": _MAINTENANCE_LOCK[1]})


def partition_names(conn: Connection) -> List[str]:
    """The names of ``rpt_events``' partitions, by name."""
    return [r[0] for r in conn.execute(sa.text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass('rpt_events') ORDER BY c.relname"))]


def month_in(name: str) -> Optional[int]:
    """The month of a partition named ``rpt_events_pYYYYMM``; None for others."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def ensure_at_start(engine: Engine) -> None:
    """``ensure_partitions`` for a starting store: a lock not granted in time
    (a long query on the log) is logged and start-up goes on; rows of a month
    without its partition go to the default partition meanwhile."""
    try:
        ensure_partitions(engine)
    except sa_errors.OperationalError as exc:
        logger.warning("Event log: could not create the coming months' partitions now (%s); "
                       "rows go to %s until 'rasa-persistent-tracker partitions' or the next "
                       "start creates them.", type(exc.orig).__name__, DEFAULT_PARTITION)
