"""``export``: the SQL log as JSON lines, in constant memory, resumable.

Each line is one event in the shape Rasa's event brokers receive
(``{"sender_id": ..., **event.as_dict()}``) plus the event's ``seq`` in its
conversation, decrypted and verified with the configured keys.

Rows are read in pages by keyset (never OFFSET, never the whole log): in log
order (``id``) for a whole export, in time order (``timestamp``, then ``id``:
the order ``rasa export`` publishes in) when ``--since`` / ``--until`` bound
it, which reads the ``(timestamp, id)`` index instead of the whole table. A
cursor file, rewritten atomically after each page reached its destination,
lets an interrupted export continue where it stopped (``--cursor``).

A row that does not open (corrupt, or under a key this process lacks) is
skipped with one warning naming its conversation and ``seq``, never its
content, and counted; the export goes on.
"""
import asyncio
import dataclasses
import json
import logging
import os
from typing import Any, Awaitable, Callable, Dict, List, NamedTuple, Optional, Tuple

import sqlalchemy as sa

from rasa_persistent_tracker.errors import ConfigError, CorruptRecordError
from rasa_persistent_tracker.log.tables import EVENTS
from rasa_persistent_tracker.security.codec import Codec

logger = logging.getLogger(__name__)

PAGE = 2000


@dataclasses.dataclass(frozen=True)
class Window:
    """What to export: a time range (unix seconds, ``until`` exclusive) and/or
    one conversation."""

    since: Optional[float] = None
    until: Optional[float] = None
    conversation_id: Optional[str] = None

    @property
    def by_time(self) -> bool:
        return self.since is not None or self.until is not None

    @property
    def order(self) -> str:
        """``time``: (timestamp, id); ``conversation``: seq; ``log``: id."""
        if self.by_time:
            return "time"
        return "conversation" if self.conversation_id is not None else "log"


@dataclasses.dataclass
class ExportReport:
    exported: int = 0
    unreadable: int = 0
    resumed_after: Optional[List[Any]] = None

    def summary(self) -> str:
        resumed = f" (resumed after {self.resumed_after})" if self.resumed_after else ""
        unreadable = (f"; {self.unreadable} unreadable row(s) skipped (see the warnings)"
                      if self.unreadable else "")
        return f"exported {self.exported} event(s){resumed}{unreadable}"


class Cursor:
    """Where an export stopped: the last exported row's ordering key, in a file."""

    def __init__(self, path: Optional[str], window: Window) -> None:
        self.path = path
        self.order = window.order
        self.window = dataclasses.asdict(window)
        self.after: Optional[List[Any]] = None
        if path and os.path.exists(path):
            self.after = self._read(path)

    def _read(self, path: str) -> Optional[List[Any]]:
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            after, order, window = saved["after"], saved["order"], saved["window"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"Cursor file '{self.path}' is unreadable ({type(exc).__name__}); "
                              f"remove it to export from the start.") from None
        if order != self.order or window != self.window:
            raise ConfigError(f"Cursor file '{self.path}' belongs to another export "
                              f"({window}); use another --cursor or remove it.")
        return after

    def advance(self, after: List[Any]) -> None:
        self.after = after
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"order": self.order, "window": self.window, "after": after}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _page_query(window: Window, after: Optional[List[Any]], limit: int) -> Any:
    columns = (EVENTS.c.id, EVENTS.c.conversation_id, EVENTS.c.seq, EVENTS.c.timestamp,
               EVENTS.c.data)
    query = sa.select(*columns)
    if window.conversation_id is not None:
        query = query.where(EVENTS.c.conversation_id == window.conversation_id)
    if window.since is not None:
        query = query.where(EVENTS.c.timestamp >= window.since)
    if window.until is not None:
        query = query.where(EVENTS.c.timestamp < window.until)
    if window.order == "time":
        if after is not None:
            query = query.where(sa.tuple_(EVENTS.c.timestamp, EVENTS.c.id) > sa.tuple_(*after))
        return query.order_by(EVENTS.c.timestamp, EVENTS.c.id).limit(limit)
    position = EVENTS.c.seq if window.order == "conversation" else EVENTS.c.id
    if after is not None:
        query = query.where(position > after[0])
    return query.order_by(position).limit(limit)


def page(engine: sa.engine.Engine, window: Window, after: Optional[List[Any]],
         limit: int = PAGE) -> List[Tuple[Any, ...]]:
    """The next ``(id, conversation_id, seq, timestamp, data)`` rows after ``after``."""
    with engine.connect() as conn:
        return conn.execute(_page_query(window, after, limit)).fetchall()


def key_of(row: Tuple[Any, ...], window: Window) -> List[Any]:
    """The ordering key of a row (``id, conversation_id, seq, timestamp, data``)."""
    return {"time": [row[3], row[0]], "conversation": [row[2]], "log": [row[0]]}[window.order]


class Exported(NamedTuple):
    """One row as the event-broker body and as its JSON line."""

    body: Dict[str, Any]
    line: str


def event_body(codec: Codec, row: Tuple[Any, ...]) -> Optional[Exported]:
    """One row as the event-broker body, or None (warned) if it does not open.

    The body is the stored JSON as it is: values JSON cannot hold natively
    (Decimal, dates, sets, bytes) keep the store's tagged form
    (``{"__rpt_type__": ..., "value": ...}``, security/serde.py), so every
    body can be written as JSON; the line is the stored text with
    ``sender_id`` and ``seq`` spliced in (no second serialisation).
    """
    _id, cid, seq, _timestamp, data = row
    try:
        text = codec.row_text(data, cid, seq)
        event = json.loads(text)
    except (CorruptRecordError, ValueError, RecursionError) as exc:
        logger.warning("Export: conversation %r, seq %d does not open (%s); skipped.",
                       cid, seq, exc if isinstance(exc, CorruptRecordError)
                       else f"invalid JSON, {type(exc).__name__}")
        return None
    if not isinstance(event, dict):
        logger.warning("Export: conversation %r, seq %d is not an event; skipped.", cid, seq)
        return None
    inner = text.strip()[1:-1].strip()
    line = (f'{{"sender_id":{json.dumps(cid)}{"," if inner else ""}{inner},'
            f'"seq":{int(seq)}}}')
    # An event holding its own "sender_id" or "seq": the body's precedence
    # (the event's sender_id, the log's seq) is what a JSON reader takes from
    # the line too (the last of duplicate keys).
    return Exported({"sender_id": cid, **event, "seq": seq}, line)


async def export(engine: sa.engine.Engine, codec: Codec, window: Window, cursor: Cursor,
                 emit: Callable[[List[Exported]], Awaitable[None]],
                 progress: Optional[Callable[[int], None]] = None,
                 limit: int = PAGE) -> ExportReport:
    """Stream the log through ``emit`` (one call per page; the page has
    reached its destination when it returns: the cursor moves past it then).
    Pages are read in a worker thread, so a broker's client keeps running."""
    report = ExportReport(resumed_after=cursor.after)
    loop = asyncio.get_running_loop()
    while True:
        rows = await loop.run_in_executor(None, page, engine, window, cursor.after, limit)
        if not rows:
            return report
        bodies: List[Exported] = []
        for row in rows:
            body = event_body(codec, row)
            if body is None:
                report.unreadable += 1
            else:
                bodies.append(body)
        await emit(bodies)
        report.exported += len(bodies)
        cursor.advance(key_of(rows[-1], window))
        if progress is not None:
            progress(report.exported + report.unreadable)
        if len(rows) < limit:
            return report


class JsonLinesSink:
    """Pages as JSON lines on a stream, flushed (and synced, for a file) per page."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def __call__(self, bodies: List[Exported]) -> None:
        self.stream.write("".join(b.line + "\n" for b in bodies))
        self.stream.flush()
        if self.stream.fileno() > 2:
            os.fsync(self.stream.fileno())


class BrokerSink:
    """Pages published to a Rasa event broker, as ``rasa export`` does."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    async def __call__(self, bodies: List[Exported]) -> None:
        for exported in bodies:
            self.broker.publish(exported.body)
        await asyncio.sleep(0)  # let the broker's client send what it queued


def count(engine: sa.engine.Engine, window: Window, cursor: Cursor) -> int:
    """How many rows are left to export (for a progress bar on a terminal)."""
    query = _page_query(window, cursor.after, 1).limit(None).order_by(None)
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar()
