"""The event log's three batch statements, per database driver.

A delivery batch (rows and snapshots of up to 50 conversations) is written
with three statements whatever its size: look up which of its keys are
logged already, insert the rows, upsert the snapshots. Rows and snapshots
arrive as tuples in column order (``ROW_COLUMNS``, ``SNAPSHOT_COLUMNS``).

``CoreBulk`` is SQLAlchemy Core and works everywhere (SQLite, the embedded
default). ``Psycopg2Bulk`` hands the tuples to psycopg2 on the same
transaction: its C adaptation replaces SQLAlchemy's per-row parameter
processing, which ran in the SQL worker thread while the event loop waited
for the GIL, and an upsert of distinct keys goes in one statement where
SQLAlchemy would send one per row.
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


class Psycopg2Bulk:
    """The same statements through psycopg2, inside the SQLAlchemy transaction."""

    def __init__(self, events: sa.Table, snapshots: sa.Table) -> None:
        from psycopg2.extras import execute_values

        self._execute_values = execute_values
        ev, sn = events.name, snapshots.name
        self._lookup = (f"SELECT conversation_id, seq, data FROM {ev} "
                        f"WHERE (conversation_id, seq) IN %s")
        self._insert = f"INSERT INTO {ev} ({', '.join(ROW_COLUMNS)}) VALUES %s"
        updates = ", ".join(f"{c} = excluded.{c}" for c in SNAPSHOT_COLUMNS[1:])
        self._upsert = (f"INSERT INTO {sn} ({', '.join(SNAPSHOT_COLUMNS)}) VALUES %s "
                        f"ON CONFLICT (conversation_id) DO UPDATE SET {updates} "
                        f"WHERE {sn}.next_seq <= excluded.next_seq")

    def existing(self, conn: Any, keys: Sequence[Key]) -> Dict[Key, str]:
        found: Dict[Key, str] = {}
        with conn.connection.cursor() as cursor:
            for start in range(0, len(keys), KEYS_PER_LOOKUP):
                cursor.execute(self._lookup, (tuple(keys[start:start + KEYS_PER_LOOKUP]),))
                found.update(((cid, seq), data) for cid, seq, data in cursor.fetchall())
        return found

    def insert(self, conn: Any, rows: Sequence[tuple]) -> None:
        self._values(conn, self._insert, rows)

    def upsert_snapshots(self, conn: Any, rows: Sequence[tuple]) -> None:
        # One statement: the keys are distinct (a batch has one snapshot per
        # conversation), which ON CONFLICT DO UPDATE requires.
        self._values(conn, self._upsert, rows)

    def _values(self, conn: Any, statement: str, rows: Sequence[tuple]) -> None:
        with conn.connection.cursor() as cursor:
            self._execute_values(cursor, statement, list(rows), page_size=max(len(rows), 1))


def for_engine(engine: sa.engine.Engine, events: sa.Table, snapshots: sa.Table) -> Any:
    """The batch statements for this engine's driver."""
    if engine.dialect.driver == "psycopg2":
        return Psycopg2Bulk(events, snapshots)
    from sqlalchemy.dialects import postgresql, sqlite

    upsert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(engine.dialect.name)
    return CoreBulk(events, snapshots, upsert)


def sort_rows(rows: List[tuple]) -> List[tuple]:
    """Key order: concurrent writers lock index entries in the same order, so
    they wait for each other instead of deadlocking."""
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows
