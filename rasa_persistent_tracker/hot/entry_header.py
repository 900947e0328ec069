"""The clear-text header of an outbox entry: what the hot state reads of it.

An entry is ``<last seq>|<saved_at>|<body>`` (the body's format, the turn's
log rows, sealed with the codec: ``log/entries.py``). The hot state only ever
reads the leading sequence number: the Lua scripts match ``LUA_SEQ`` (to find
the outbox's last seq on load and to acknowledge delivered entries), the
embedded store keeps ``entry_seq`` in a column when it queues an entry.
Everything else reads an entry through ``split``.
"""
import re
from typing import Tuple

SEPARATOR = "|"
# The leading sequence number, as a Lua pattern (redis_scripts.py).
LUA_SEQ = "^(%d+)|"
_HEADER = re.compile(r"^\d+\|[^|]*\|")


def make_header(last_seq: int, saved_at: float) -> str:
    """The header of an entry whose last row has ``last_seq``."""
    return f"{last_seq}{SEPARATOR}{saved_at!r}"


def split(entry: str) -> Tuple[int, float, str, str]:
    """(last seq, saved_at, header text, body). Raises ValueError if the
    header is not ``<last seq>|<saved_at>|`` (the message never quotes it)."""
    try:
        last, saved_at, body = entry.split(SEPARATOR, 2)
        return int(last), float(saved_at), f"{last}{SEPARATOR}{saved_at}", body
    except ValueError:
        raise ValueError("entry header is not '<last seq>|<saved_at>|'") from None


def entry_seq(entry: str) -> int:
    """The last sequence number an entry carries. Raises ValueError."""
    return int(entry.split(SEPARATOR, 1)[0])


def body_of(entry: str) -> str:
    """The (possibly sealed) body of an entry, whatever its header holds."""
    return entry.split(SEPARATOR, 2)[-1]


def has_header(text: str) -> bool:
    """Whether ``text`` starts like an entry (``<digits>|<no bar>|``)."""
    return _HEADER.match(text) is not None
