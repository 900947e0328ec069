"""The outbox entry format: one turn's log rows, as queued in the hot state.

``<last seq>|<saved_at>|<body>``. The header is ``hot/entry_header.py`` (all
the hot state reads of an entry); the body is the JSON list of the turn's
``LogRow`` dicts, with an encryption key encrypted whole, bound to the
conversation and to the header (``Codec.seal_entry``), so only the header (a
sequence number and a time) is in clear.
"""
import json
from typing import Callable, List, Tuple

from rasa_persistent_tracker.errors import CorruptRecordError
from rasa_persistent_tracker.hot.entry_header import make_header, split
from rasa_persistent_tracker.log.tables import COLUMN_LIMITS, ROW_FIELDS, LogRow, RowDict
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.serde import JsonSerializer, compact_json


# What each field of an entry row must hold, within the SQL columns' limits
# (anything else would fail in SQL, over and over, instead of being
# quarantined once).
_ROW_TYPES = (("seq", int), ("type_name", str), ("timestamp", (int, float, type(None))),
              ("intent_name", (str, type(None))), ("action_name", (str, type(None))),
              ("data", str))


class Entries:
    """Makes and reads outbox entries (module docstring) with a store's codec."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec

    def make(self, conversation_id: str, rows: List[LogRow], saved_at: float) -> str:
        """Serialise one turn's rows into an outbox entry."""
        header = make_header(rows[-1].seq, saved_at)
        body = compact_json([r.as_dict() for r in rows])
        return f"{header}|{self._codec.seal_entry(body, conversation_id, header)}"

    def parse(self, conversation_id: str, entry: str) -> Tuple[float, List[LogRow]]:
        """Inverse of ``make``. Raises ValueError/TypeError/KeyError if malformed,
        forged or moved."""
        saved_at, rows = self.parse_dicts(conversation_id, entry)
        return saved_at, [LogRow(**row) for row in rows]

    def parse_dicts(self, conversation_id: str, entry: str) -> Tuple[float, List[RowDict]]:
        """``parse`` with the rows left as the dicts JSON gives (what delivery
        passes to the log). Dicts of plain values are not tracked by the garbage
        collector, so a batch in flight does not age into the old generation."""
        return _parse(entry, lambda body, header: self._codec.open_entry(
            body, conversation_id, header))


PLAIN_ENTRIES = Entries(Codec(JsonSerializer()))


def make_entry(rows: List[LogRow], saved_at: float) -> str:
    """An entry without encryption (``Entries.make``)."""
    return PLAIN_ENTRIES.make("", rows, saved_at)


def parse_entry(entry: str) -> Tuple[float, List[LogRow]]:
    """Read an entry without encryption (``Entries.parse``)."""
    return PLAIN_ENTRIES.parse("", entry)


def parse_entry_dicts(entry: str) -> Tuple[float, List[RowDict]]:
    """Read an entry without encryption (``Entries.parse_dicts``)."""
    return PLAIN_ENTRIES.parse_dicts("", entry)


def _parse(entry: str, open_body: Callable[[str, str], str]) -> Tuple[float, List[RowDict]]:
    # Error messages name what is wrong, never the entry's content.
    try:
        entry.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("entry is not UTF-8 text") from None
    last_seq, saved, header, body = split(entry)
    try:
        rows = json.loads(open_body(body, header))
    except CorruptRecordError as exc:
        raise ValueError(f"entry body refused: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError("entry holds no rows")
    for row in rows:
        if not isinstance(row, dict):
            raise TypeError(f"entry row is a {type(row).__name__}, not an object")
        if row.keys() != ROW_FIELDS:
            raise KeyError(f"entry row lacks {sorted(ROW_FIELDS - row.keys())} and has "
                           f"{len(row.keys() - ROW_FIELDS)} unknown field(s)")
        for field, kinds in _ROW_TYPES:
            value = row[field]
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise TypeError(f"entry row field {field!r} is a {type(value).__name__}")
            if isinstance(value, str) and ("\x00" in value or len(value) > COLUMN_LIMITS.get(
                    field, len(value))):
                raise ValueError(f"entry row field {field!r} is too long or holds NUL")
        if not 1 <= row["seq"] < 2 ** 63:
            raise ValueError("entry row seq is out of range")
    if rows[-1]["seq"] != last_seq:
        raise ValueError("entry header does not match its rows")
    return saved, rows
