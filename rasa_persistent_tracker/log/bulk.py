"""The event log's three batch statements, per database driver.

A delivery batch (rows and snapshots of up to 50 conversations) is written
with three statements whatever its size: look up which of its keys are
logged already, insert the rows, upsert the snapshots. Rows and snapshots
arrive as tuples in column order (``ROW_COLUMNS``, ``SNAPSHOT_COLUMNS``).

``CoreBulk`` is SQLAlchemy Core and works everywhere (SQLite, the embedded
default). ``PostgresBulk`` (psycopg2) sends each column as one array: the
driver's C adaptation replaces SQLAlchemy's per-row parameter processing,
which ran in the SQL worker thread while the event loop waited for the GIL,
and an upsert of distinct keys goes in one statement where SQLAlchemy would
send one per row.
"""
from typing import Any, Dict, List, Sequence, Tuple

import sqlalchemy as sa

ROW_COLUMNS = ("conversation_id", "seq", "type_name", "timestamp", "intent_name",
               "action_name", "data")
SNAPSHOT_COLUMNS = ("conversation_id", "next_seq", "version", "saved_at", "payload")
# Keys per lookup statement: under every backend's limit on bound parameters.
KEYS_PER_LOOKUP = 400

Key = Tuple[str, int]


class CoreBulk:
    """SQLAlchemy Core statements; ``upsert`` is the dialect's insert, if it has one."""

    def __init__(self, events: sa.Table, snapshots: sa.Table, upsert: Any = None) -> None:
        self._events = events
        self._snapshots = snapshots
        self._lookup = sa.select(events.c.conversation_id, events.c.seq, events.c.data).where(
            sa.tuple_(events.c.conversation_id, events.c.seq).in_(
                sa.bindparam("keys", expanding=True)))
        self._upsert = None
        if upsert is not None:
            stmt = upsert(snapshots)
            # Never moves a snapshot backwards (an older batch delivered late).
            self._upsert = stmt.on_conflict_do_update(
                index_elements=["conversation_id"],
                set_={k: stmt.excluded[k] for k in SNAPSHOT_COLUMNS[1:]},
                where=snapshots.c.next_seq <= stmt.excluded.next_seq)

    def existing(self, conn: Any, keys: Sequence[Key]) -> Dict[Key, str]:
        found: Dict[Key, str] = {}
        for start in range(0, len(keys), KEYS_PER_LOOKUP):
            found.update(((cid, seq), data) for cid, seq, data in conn.execute(
                self._lookup, {"keys": list(keys[start:start + KEYS_PER_LOOKUP])}))
        return found

    def insert(self, conn: Any, rows: Sequence[tuple]) -> None:
        conn.execute(self._events.insert(), [dict(zip(ROW_COLUMNS, r)) for r in rows])

    def upsert_snapshots(self, conn: Any, rows: Sequence[tuple]) -> None:
        values = [dict(zip(SNAPSHOT_COLUMNS, r)) for r in rows]
        if self._upsert is not None:
            conn.execute(self._upsert, values)
            return
        table = self._snapshots
        for row in values:
            updated = conn.execute(table.update().where(
                table.c.conversation_id == row["conversation_id"],
                table.c.next_seq <= row["next_seq"],
            ).values(row)).rowcount
            if not updated and not conn.execute(sa.select(table.c.conversation_id).where(
                    table.c.conversation_id == row["conversation_id"])).first():
                conn.execute(table.insert().values(row))


class PostgresBulk:
    """The same statements as PostgreSQL text: each column goes as one array
    parameter, expanded with ``unnest``. psycopg2 adapts the arrays in C, and
    SQLAlchemy still executes them, so its error translation (integrity,
    disconnects) and connection invalidation apply as for any statement."""

    def __init__(self, events: sa.Table, snapshots: sa.Table) -> None:
        ev, sn = events.name, snapshots.name
        row_arrays = _unnest(events, ROW_COLUMNS)
        self._lookup = (f"SELECT conversation_id, seq, data FROM {ev} WHERE (conversation_id, "
                        f"seq) IN (SELECT * FROM {_unnest(events, ROW_COLUMNS[:2])})")
        self._insert = f"INSERT INTO {ev} ({', '.join(ROW_COLUMNS)}) SELECT * FROM {row_arrays}"
        updates = ", ".join(f"{c} = excluded.{c}" for c in SNAPSHOT_COLUMNS[1:])
        self._upsert = (f"INSERT INTO {sn} ({', '.join(SNAPSHOT_COLUMNS)}) "
                        f"SELECT * FROM {_unnest(snapshots, SNAPSHOT_COLUMNS)} "
                        f"ON CONFLICT (conversation_id) DO UPDATE SET {updates} "
                        f"WHERE {sn}.next_seq <= excluded.next_seq")

    def existing(self, conn: Any, keys: Sequence[Key]) -> Dict[Key, str]:
        found: Dict[Key, str] = {}
        for start in range(0, len(keys), KEYS_PER_LOOKUP):
            found.update(((cid, seq), data) for cid, seq, data in
                         self._run(conn, self._lookup, keys[start:start + KEYS_PER_LOOKUP], 2))
        return found

    def insert(self, conn: Any, rows: Sequence[tuple]) -> None:
        self._run(conn, self._insert, rows, len(ROW_COLUMNS))

    def upsert_snapshots(self, conn: Any, rows: Sequence[tuple]) -> None:
        # One statement: the keys are distinct (a batch has one snapshot per
        # conversation), which ON CONFLICT DO UPDATE requires.
        self._run(conn, self._upsert, rows, len(SNAPSHOT_COLUMNS))

    @staticmethod
    def _run(conn: Any, statement: str, rows: Sequence[tuple], width: int) -> Any:
        columns = tuple(list(column) for column in zip(*rows)) or ([],) * width
        return conn.exec_driver_sql(statement, [columns])


def _unnest(table: sa.Table, names: Sequence[str]) -> str:
    """``unnest(%s::<type>[], ...)`` for these columns of ``table``."""
    types = {sa.BigInteger: "bigint", sa.Float: "float8"}
    casts = (types.get(type(table.c[name].type), "text") for name in names)
    return "unnest(" + ", ".join(f"%s::{cast}[]" for cast in casts) + ")"


def for_engine(engine: sa.engine.Engine, events: sa.Table, snapshots: sa.Table) -> Any:
    """The batch statements for this engine's driver."""
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg2":
        return PostgresBulk(events, snapshots)
    from sqlalchemy.dialects import postgresql, sqlite

    upsert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(engine.dialect.name)
    return CoreBulk(events, snapshots, upsert)


def sort_rows(rows: List[tuple]) -> List[tuple]:
    """Key order: concurrent writers lock index entries in the same order, so
    they wait for each other instead of deadlocking."""
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows
