"""What key rotation does to one stored value.

Each function returns the value as it must be stored under the primary key,
or None if it already is; it raises ``CorruptRecordError`` for a value that
cannot be read (tampered, moved, under a key missing from the keyring, or
plaintext/legacy while ``accept_plaintext`` is off: rotation must not make a
forged value authentic).
"""
import json
import re
from typing import Optional

from rasa_persistent_tracker.errors import CorruptRecordError
from rasa_persistent_tracker.security import crypto
from rasa_persistent_tracker.security.codec import Codec

_ENTRY = re.compile(r"^(\d+)\|([^|]*)\|")


def label(value: str) -> str:
    """How a value is stored, for the report: its key id, ``plaintext``, or the
    key id with ``(legacy)`` for the unbound ``rpt-enc:1`` form."""
    kid = crypto.key_id_of(value)
    if kid is None:
        return "plaintext"
    return f"{kid} (legacy)" if value.startswith(crypto.LEGACY_PREFIX) else kid


def current(value: str, primary: str) -> bool:
    """True if ``value`` is in the current format under ``primary``."""
    return value.startswith((f"{crypto.PREFIX}{primary}:", f"{crypto.MAC_PREFIX}{primary}:",
                             f"{crypto.BINARY_PREFIX}{primary}:"))


def event(codec: Codec, primary: str, cid: str, seq: int, data: str) -> Optional[str]:
    """A log row's ``data``, sealed for (cid, seq)."""
    if current(data, primary):
        return None
    text = codec.row_text(data, cid, seq)
    value = json.loads(text)
    if not isinstance(value, dict):
        raise CorruptRecordError("log row is not an event object")
    return codec.protect_event(value, text, cid, seq)


def record(codec: Codec, primary: str, cid: str, payload: str, kind: str) -> Optional[str]:
    """A hot record or snapshot (``kind``), sealed for cid."""
    if current(payload, primary):
        return None
    return codec.dumps_record(codec.loads_record(payload, cid, kind), kind)


def quarantine_copy(codec: Codec, primary: str, cid: str, value: str) -> Optional[str]:
    """A quarantine copy, sealed whole as one (kind ``quarantine``).

    Copies are never believed by the store, so their content is taken as it
    is (plaintext too); ciphertext inside (a moved record, an entry's body and
    rows) is opened with any configured key, so no old key is needed later.
    """
    if value.startswith(crypto.PREFIX):
        try:  # sealed by an earlier rotation
            clear = codec.unwrap(value, crypto.QUARANTINE, cid)
            return None if current(value, primary) else codec.seal_quarantine(clear, cid)
        except CorruptRecordError:
            pass
    if value.startswith((crypto.PREFIX, crypto.LEGACY_PREFIX, crypto.MAC_PREFIX,
                         crypto.BINARY_PREFIX)):
        return codec.seal_quarantine(codec.unwrap(value, crypto.HOT, cid), cid)
    match = _ENTRY.match(value)
    if match is None:
        if "rpt-enc:" in value or "rpt-mac:" in value:
            raise CorruptRecordError("quarantine copy holds ciphertext it cannot open")
        return codec.seal_quarantine(value, cid)  # plaintext as it was moved aside
    header, body = value[:match.end() - 1], value[match.end():]
    body = codec.unwrap(body, crypto.OUTBOX, cid, header)
    try:
        rows = json.loads(body)
        for row in rows:
            row["data"] = codec.unwrap(row["data"], crypto.ROW, cid, row["seq"])
        body = json.dumps(rows, separators=(",", ":"))
    except (ValueError, TypeError, KeyError, AttributeError):
        if "rpt-enc:" in body or "rpt-mac:" in body:
            raise CorruptRecordError("quarantined entry holds rows it cannot open") from None
    return codec.seal_quarantine(f"{header}|{body}", cid)
