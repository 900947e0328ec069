"""The SQL event log's tables and row formats: the one definition of the schema.

``migrations.py`` creates these tables step by step (released migrations are
never edited); ``tests/test_schema.py`` checks that a migrated database has
exactly the columns, types, nullability, keys and indexes declared here, on
SQLite and PostgreSQL. A schema change is a change here plus a new migration.
"""
import dataclasses
from typing import Any, Dict, Optional

import sqlalchemy as sa

METADATA = sa.MetaData()
EVENTS = sa.Table(
    "rpt_events", METADATA,
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
    # Analytics filter by type/intent/action over time; the unique constraint
    # already serves "one conversation in order".
    sa.Index("ix_rpt_events_type_time", "type_name", "timestamp"),
    sa.Index("ix_rpt_events_intent", "intent_name"),
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


