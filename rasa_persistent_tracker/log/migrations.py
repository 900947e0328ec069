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


MIGRATIONS: List[Migration] = [
    Migration(1, "create rpt_events and rpt_snapshots", _v1_create_log),
    Migration(2, "indexes for querying by type, time and intent", _v2_query_indexes),
    Migration(3, "create rpt_facts", _v3_facts),
    Migration(4, "create rpt_erased (tombstones of erased conversations)", _v4_erased),
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
