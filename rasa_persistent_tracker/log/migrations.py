"""Versioned schema migrations for the SQL event log.

An append-only list: each entry has a version number, a description and the
DDL it runs. ``migrate`` applies every migration newer than the highest
version recorded in ``rpt_schema_version``, each in its own transaction,
serialised across processes (a PostgreSQL advisory lock; SQLite's write lock).
It is idempotent: running it again changes nothing.

Never edit a released migration; add a new one after it. The schema they
build is declared once, in ``tables.py``; ``tests/test_schema.py`` checks
that migrating an empty database yields exactly those tables. (Migrations
spell out their own DDL instead of importing the tables: a released step
must keep building what it built, whatever the tables declare later.)
"""
import logging
import time
from typing import Callable, List, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

# The logger's name from before the layer packages: logging configs keep working.
logger = logging.getLogger("rasa_persistent_tracker.migrations")

VERSION_TABLE = "rpt_schema_version"
# Arbitrary constant identifying this package's migration lock.
_ADVISORY_LOCK_ID = 0x52505431


class Migration(NamedTuple):
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_create_log(conn: Connection) -> None:
    meta = sa.MetaData()
    sa.Table(
        "rpt_events", meta,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("conversation_id", sa.String(255), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("type_name", sa.String(64), nullable=False),
        sa.Column("timestamp", sa.Float, nullable=True),
        sa.Column("intent_name", sa.String(255), nullable=True),
        sa.Column("action_name", sa.String(255), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.UniqueConstraint("conversation_id", "seq", name="uq_rpt_events_conversation_seq"),
    )
    sa.Table(
        "rpt_snapshots", meta,
        sa.Column("conversation_id", sa.String(255), primary_key=True),
        sa.Column("next_seq", sa.BigInteger, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("saved_at", sa.Float, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
    )
    meta.create_all(conn, checkfirst=True)


def _v2_query_indexes(conn: Connection) -> None:
    # Analytics filter by type/intent/action over time; the unique constraint
    # already serves "one conversation in order".
    meta = sa.MetaData()
    events = sa.Table("rpt_events", meta, autoload_with=conn)
    for name, columns in (
        ("ix_rpt_events_type_time", ("type_name", "timestamp")),
        ("ix_rpt_events_intent", ("intent_name",)),
    ):
        sa.Index(name, *(events.c[c] for c in columns)).create(conn, checkfirst=True)


def _v3_facts(conn: Connection) -> None:
    # Facts about the stored data that every process must agree on, such as
    # "this log holds ciphertext" (a process without the key then refuses to
    # start instead of taking ciphertext for corruption).
    meta = sa.MetaData()
    sa.Table(
        "rpt_facts", meta,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    meta.create_all(conn, checkfirst=True)


def _v4_erased(conn: Connection) -> None:
    # Tombstones of erased conversations (issue 16): a late write of an erased
    # conversation (a delivery or save from before the erasure) is refused.
    meta = sa.MetaData()
    erased = sa.Table(
        "rpt_erased", meta,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("floor", sa.BigInteger, nullable=False),
        sa.Column("erased_at", sa.Float, nullable=False),
    )
    meta.create_all(conn, checkfirst=True)
    sa.Index("ix_rpt_erased_erased_at", erased.c.erased_at).create(conn, checkfirst=True)


# The month a row was written in, for rows logged before partitioning: their
# event time if it is plausible (2000 until now), else the migration's month
# (NULL, NaN, infinite, negative or future timestamps come from clients).
_V5_MONTH_NOW = "(to_char((now() AT TIME ZONE 'UTC'), 'YYYYMM'))::integer"
_V5_MONTH_OF_ROW = (
    "CASE WHEN timestamp >= 946684800 AND timestamp < extract(epoch FROM now()) "
    "THEN (to_char((to_timestamp(timestamp) AT TIME ZONE 'UTC'), 'YYYYMM'))::integer "
    f"ELSE {_V5_MONTH_NOW} END")
_V5_COLUMNS = "id, conversation_id, seq, type_name, timestamp, intent_name, action_name, data"


def _v5_partition_by_month(conn: Connection) -> None:
    # PostgreSQL only: SQLite keeps one table. One transaction (the runner's):
    # writers and readers of rpt_events wait for the copy (docs/partitioning.md
    # has the time it takes); a failure leaves the old table as it was.
    if conn.dialect.name != "postgresql" or conn.execute(sa.text(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass('rpt_events')")).scalar() == "p":
        return  # SQLite; or a table created partitioned already (tables.py)

    def run(statement: str) -> None:
        conn.execute(sa.text(statement))

    run("LOCK TABLE rpt_events IN ACCESS EXCLUSIVE MODE")
    # The id sequence outlives the old table: ids go on from where they are.
    sequence = conn.execute(sa.text("SELECT pg_get_serial_sequence('rpt_events', 'id')")).scalar()
    run(f"ALTER SEQUENCE {sequence} OWNED BY NONE")
    if sequence.split(".")[-1].strip('"') != "rpt_events_id_seq":
        run(f"ALTER SEQUENCE {sequence} RENAME TO rpt_events_id_seq")
    run("""CREATE TABLE rpt_events_partitioned (
        id BIGINT NOT NULL DEFAULT nextval('rpt_events_id_seq'::regclass),
        conversation_id VARCHAR(255) NOT NULL,
        seq BIGINT NOT NULL,
        type_name VARCHAR(64) NOT NULL,
        timestamp FLOAT,
        intent_name VARCHAR(255),
        action_name VARCHAR(255),
        data TEXT NOT NULL,
        log_month INTEGER NOT NULL DEFAULT """ + _V5_MONTH_NOW + """
    ) PARTITION BY RANGE (log_month)""")
    run("CREATE TABLE rpt_events_default PARTITION OF rpt_events_partitioned DEFAULT")
    months = {row[0] for row in conn.execute(sa.text(
        f"SELECT DISTINCT {_V5_MONTH_OF_ROW} FROM rpt_events"))}
    months.add(conn.execute(sa.text(f"SELECT {_V5_MONTH_NOW}")).scalar())
    for month in sorted(months):
        year, mon = divmod(month, 100)
        after = (year + 1) * 100 + 1 if mon == 12 else month + 1
        run(f"CREATE TABLE rpt_events_p{month} PARTITION OF rpt_events_partitioned "
            f"FOR VALUES FROM ({month}) TO ({after})")
    run(f"INSERT INTO rpt_events_partitioned ({_V5_COLUMNS}, log_month) "
        f"SELECT {_V5_COLUMNS}, {_V5_MONTH_OF_ROW} FROM rpt_events")
    run("DROP TABLE rpt_events")
    run("ALTER TABLE rpt_events_partitioned RENAME TO rpt_events")
    # Keys and indexes after the copy: one sorted build each, not row by row.
    run("ALTER TABLE rpt_events ADD CONSTRAINT rpt_events_pkey "
        "PRIMARY KEY (conversation_id, seq, log_month)")
    run("CREATE INDEX ix_rpt_events_type_time ON rpt_events (type_name, timestamp)")
    run("CREATE INDEX ix_rpt_events_intent ON rpt_events (intent_name)")
    run("CREATE INDEX ix_rpt_events_id ON rpt_events (id)")
    # (conversation_id, seq) stays unique across partitions: writers of one
    # conversation take turns and a seq already logged anywhere is refused.
    run("""CREATE OR REPLACE FUNCTION rpt_events_unique_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key integer;
    clash record;
BEGIN
    -- Writers of one conversation take turns (keys in order: no deadlock);
    -- the second then sees the first's committed rows (a volatile function
    -- reads with a new snapshot).
    FOR key IN SELECT DISTINCT hashtext(conversation_id) FROM new_rows ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1380996146, key);
    END LOOP;
    SELECT n.seq INTO clash FROM new_rows n
     WHERE (SELECT count(*) FROM rpt_events e
             WHERE e.conversation_id = n.conversation_id AND e.seq = n.seq) > 1
     LIMIT 1;
    IF FOUND THEN
        RAISE unique_violation USING
            MESSAGE = 'rpt_events already holds seq ' || clash.seq || ' of this conversation',
            CONSTRAINT = 'uq_rpt_events_conversation_seq';
    END IF;
    RETURN NULL;
END
$$""")
    run("""CREATE TRIGGER rpt_events_unique_seq AFTER INSERT ON rpt_events
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rpt_events_unique_seq()""")


def _v6_time_index(conn: Connection) -> None:
    # Export by time (--since / --until) reads pages in (timestamp, id) order:
    # without this index each page was a scan and sort of the whole log (968
    # events/s at 10,000,000 rows, benchmarks/log_at_scale.py). On a
    # partitioned log the index is built on every partition.
    events = sa.Table("rpt_events", sa.MetaData(), autoload_with=conn)
    sa.Index("ix_rpt_events_time", events.c.timestamp, events.c.id).create(
        conn, checkfirst=True)


MIGRATIONS: List[Migration] = [
    Migration(1, "create rpt_events and rpt_snapshots", _v1_create_log),
    Migration(2, "indexes for querying by type, time and intent", _v2_query_indexes),
    Migration(3, "create rpt_facts", _v3_facts),
    Migration(4, "create rpt_erased (tombstones of erased conversations)", _v4_erased),
    Migration(5, "partition rpt_events by month on PostgreSQL", _v5_partition_by_month),
    Migration(6, "index on (timestamp, id) for export by time", _v6_time_index),
]


def _version_table(meta: sa.MetaData) -> sa.Table:
    return sa.Table(
        VERSION_TABLE, meta,
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("description", sa.String(255), nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
    )


def migrate(engine: Engine) -> List[int]:
    """Apply pending migrations; return the versions applied now."""
    applied: List[int] = []
    table = _version_table(sa.MetaData())
    for migration in MIGRATIONS:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
            elif engine.dialect.name == "sqlite":
                conn.execute(sa.text("SELECT 1"))  # open the transaction
            table.create(conn, checkfirst=True)
            done = conn.execute(
                sa.select(table.c.version).where(table.c.version == migration.version)
            ).first()
            if done:
                continue
            migration.apply(conn)
            conn.execute(table.insert().values(
                version=migration.version, description=migration.description,
                applied_at=time.time(),
            ))
            applied.append(migration.version)
            logger.info("Applied event-log migration %d: %s", migration.version,
                        migration.description)
    return applied
