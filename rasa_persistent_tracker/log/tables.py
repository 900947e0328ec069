"""The SQL event log's tables and row formats: the one definition of the schema.

``migrations.py`` creates these tables step by step (released migrations are
never edited); ``tests/test_schema.py`` checks that a migrated database has
exactly the columns, types, nullability, keys and indexes declared here, on
SQLite and PostgreSQL. A schema change is a change here plus a new migration.
"""
import dataclasses
from typing import Any, Dict, List, Optional

import sqlalchemy as sa


def _event_columns() -> List[sa.Column]:
    """An event's columns (after ``id``), as both shapes of the table hold them."""
    return [
        sa.Column("conversation_id", sa.String(255), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("type_name", sa.String(64), nullable=False),
        sa.Column("timestamp", sa.Float, nullable=True),
        sa.Column("intent_name", sa.String(255), nullable=True),
        sa.Column("action_name", sa.String(255), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
    ]


METADATA = sa.MetaData()
EVENTS = sa.Table(
    "rpt_events", METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    *_event_columns(),
    sa.UniqueConstraint("conversation_id", "seq", name="uq_rpt_events_conversation_seq"),
    # Analytics filter by type/intent/action over time; the unique constraint
    # already serves "one conversation in order".
    sa.Index("ix_rpt_events_type_time", "type_name", "timestamp"),
    sa.Index("ix_rpt_events_intent", "intent_name"),
    # Export by time (--since / --until) pages in (timestamp, id) order.
    sa.Index("ix_rpt_events_time", "timestamp", "id"),
)
SNAPSHOTS = sa.Table(
    "rpt_snapshots", METADATA,
    sa.Column("conversation_id", sa.String(255), primary_key=True),
    sa.Column("next_seq", sa.BigInteger, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("saved_at", sa.Float, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
)
# Facts about the stored data (``SQLEventLog.fact``), e.g. ``encrypted``.
FACTS = sa.Table(
    "rpt_facts", METADATA,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
# Tombstones of erased conversations (``erasure.py``): named by a digest of the
# id (``security.erasure``), never the id; ``floor`` is at or above every
# version the erased conversation had, so its late writes are told apart.
ERASED = sa.Table(
    "rpt_erased", METADATA,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("floor", sa.BigInteger, nullable=False),
    sa.Column("erased_at", sa.Float, nullable=False),
    sa.Index("ix_rpt_erased_erased_at", "erased_at"),
)

# ---------------------------------------------------------------- PostgreSQL
# On PostgreSQL ``rpt_events`` is partitioned by the month each row was
# written to the log (``log_month``, e.g. 202611, the database clock in UTC:
# never the event's own timestamp, which clients set and may leave out).
# Queries use ``EVENTS`` above on both databases: the columns they name are the
# same. A unique index on a partitioned table must hold the partition column,
# so the key is (conversation_id, seq, log_month) and a statement trigger
# keeps (conversation_id, seq) unique across partitions (``UNIQUE_SEQ_DDL``:
# one check per INSERT statement, not per row; it covers inserts through
# ``rpt_events``, not straight into a partition); ``id``
# stays, from the same sequence, for insertion order (export, rotation).
# docs/partitioning.md describes the layout; ``log/partitions.py`` keeps it.
PARTITION_COLUMN = "log_month"
DEFAULT_PARTITION = "rpt_events_default"
ID_SEQUENCE = "rpt_events_id_seq"
# The month a row is written in, by the database clock.
LOG_MONTH_NOW = "(to_char((now() AT TIME ZONE 'UTC'), 'YYYYMM'))::integer"
# Key space of the per-conversation lock that the trigger takes (two-int
# advisory locks never collide with the migrations' one-bigint lock).
SEQ_LOCK_CLASS = 0x52505432
UNIQUE_SEQ_TRIGGER = "rpt_events_unique_seq"
UNIQUE_SEQ_DDL = (
    f"""CREATE OR REPLACE FUNCTION {UNIQUE_SEQ_TRIGGER}() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key integer;
    clash record;
BEGIN
    -- Writers of one conversation take turns (keys in order: no deadlock);
    -- the second then sees the first's committed rows (a volatile function
    -- reads with a new snapshot).
    FOR key IN SELECT DISTINCT hashtext(conversation_id) FROM new_rows ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock({SEQ_LOCK_CLASS}, key);
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
$$""",
    f"""CREATE TRIGGER {UNIQUE_SEQ_TRIGGER} AFTER INSERT ON rpt_events
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {UNIQUE_SEQ_TRIGGER}()""",
)

PARTITIONED_METADATA = sa.MetaData()
sa.Sequence(ID_SEQUENCE, metadata=PARTITIONED_METADATA)
PARTITIONED_EVENTS = sa.Table(
    "rpt_events", PARTITIONED_METADATA,
    sa.Column("id", sa.BigInteger, nullable=False,
              server_default=sa.text(f"nextval('{ID_SEQUENCE}'::regclass)")),
    *_event_columns(),
    sa.Column(PARTITION_COLUMN, sa.Integer, nullable=False,
              server_default=sa.text(LOG_MONTH_NOW)),
    sa.PrimaryKeyConstraint("conversation_id", "seq", PARTITION_COLUMN, name="rpt_events_pkey"),
    sa.Index("ix_rpt_events_type_time", "type_name", "timestamp"),
    sa.Index("ix_rpt_events_intent", "intent_name"),
    # Insertion order (export without --conversation, key rotation's batches).
    sa.Index("ix_rpt_events_id", "id"),
    sa.Index("ix_rpt_events_time", "timestamp", "id"),
    postgresql_partition_by=f"RANGE ({PARTITION_COLUMN})",
)
for _statement in (f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF rpt_events DEFAULT",
                   *UNIQUE_SEQ_DDL):
    sa.event.listen(PARTITIONED_EVENTS, "after_create", sa.DDL(_statement))
for _table in (SNAPSHOTS, FACTS, ERASED):
    _table.to_metadata(PARTITIONED_METADATA)


def metadata_for(dialect_name: str) -> sa.MetaData:
    """The declared tables on this database: partitioned on PostgreSQL."""
    return PARTITIONED_METADATA if dialect_name == "postgresql" else METADATA


@dataclasses.dataclass
class LogRow:
    """One event as stored: ``data`` is serialiser output (JSON or ciphertext)."""

    seq: int
    type_name: str
    timestamp: Optional[float]
    intent_name: Optional[str]
    action_name: Optional[str]
    data: str

    def as_dict(self) -> Dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every field (a hot path).
        return {"seq": self.seq, "type_name": self.type_name, "timestamp": self.timestamp,
                "intent_name": self.intent_name, "action_name": self.action_name,
                "data": self.data}


# A LogRow as a dict (``LogRow.as_dict()``): the form rows travel in from the
# outbox to the log.
RowDict = Dict[str, Any]
ROW_FIELDS = frozenset(f.name for f in dataclasses.fields(LogRow))


@dataclasses.dataclass
class Snapshot:
    """The latest hot record of a conversation, kept in SQL."""

    next_seq: int
    version: int
    saved_at: float
    payload: str


# Lengths of the log's string columns, as the tables declare them: what
# parsing, row building and save() check values against.
COLUMN_LIMITS = {c.name: c.type.length for c in EVENTS.columns
                 if isinstance(c.type, sa.String) and c.type.length}
# Conversation ids up to this length, without NUL.
MAX_ID_LENGTH = COLUMN_LIMITS["conversation_id"]


def loggable(conversation_id: str) -> bool:
    """Whether the log can hold this conversation id (``save`` refuses others):
    at most ``MAX_ID_LENGTH`` characters, no NUL, valid Unicode (no lone
    surrogate, which no database driver can encode)."""
    if len(conversation_id) > MAX_ID_LENGTH or "\x00" in conversation_id:
        return False
    try:
        conversation_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


