"""Reading quarantined copies: what a copy holds, and whether it can be restored.

A copy is a hot record or an outbox entry moved aside because it did not
read; ``rotate-keys`` may have sealed it whole (kind quarantine). These
functions open it with the store's codec and check it the way the store
would, for ``quarantine.QuarantineAdmin``.
"""
from typing import Any, Dict, List, Optional

from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.errors import CorruptRecordError, EncryptionKeyMissing
from rasa_persistent_tracker.hot.entry_header import has_header
from rasa_persistent_tracker.log.entries import PLAIN_ENTRIES, Entries
from rasa_persistent_tracker.log.tables import RowDict
from rasa_persistent_tracker.record.replay import validate_record
from rasa_persistent_tracker.security import crypto
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.serde import JsonSerializer

HOT_RECORD, OUTBOX_ENTRY, UNKNOWN = "hot record", "outbox entry", "unreadable value"


def _unsealed(codec: Codec, cid: str, text: str) -> str:
    """A copy's content: ``rotate-keys`` seals copies whole (kind quarantine)."""
    if text.startswith(crypto.PREFIX):
        try:
            return codec.unwrap(text, crypto.QUARANTINE, cid)
        except (CorruptRecordError, EncryptionKeyMissing):
            pass  # not sealed as a copy (a record moved aside as it was), or no key yet
    return text


def record_of(codec: Codec, cid: str, text: str) -> Dict[str, Any]:
    """The hot record a copy holds, checked. Raises CorruptRecordError /
    EncryptionKeyMissing."""
    clear = _unsealed(codec, cid, text)
    try:
        record = codec.loads_record(clear, cid)
    except CorruptRecordError:
        if clear is text or clear[:1] != "{":
            raise
        record = JsonSerializer().loads(clear)  # opened from a rotated copy: its clear JSON
    return validate_record(record, cid)


def rows_of(codec: Codec, cid: str, text: str) -> List[RowDict]:
    """An outbox entry's rows with ``data`` sealed for the log. Raises
    CorruptRecordError / EncryptionKeyMissing / ValueError."""
    clear = _unsealed(codec, cid, text)
    try:
        rows = [r.as_dict() for r in Entries(codec).parse(cid, clear)[1]]
    except (ValueError, TypeError, KeyError):
        if clear is text:
            raise
        rows = [r.as_dict() for r in PLAIN_ENTRIES.parse(cid, clear)[1]]  # a rotated copy
    for row in rows:
        try:
            codec.row_text(row["data"], cid, row["seq"])
            continue  # sealed for its place already: kept byte for byte (the log
            # recognises a row it holds only by identical data)
        except CorruptRecordError:
            if clear is text:
                raise
        event_text = row["data"]  # a rotated copy holds the rows' clear JSON
        row["data"] = codec.protect_event(JsonSerializer().loads(event_text), event_text,
                                          cid, row["seq"])
    return rows


def check(backends: Backends, cid: str, kind: str, payload: str) -> Optional[str]:
    """None if ``payload`` reads with the configured keys, else why not."""
    try:
        if kind == HOT_RECORD:
            record_of(backends.codec, cid, payload)
        elif kind == OUTBOX_ENTRY:
            rows_of(backends.codec, cid, payload)
        else:
            return "not a record or an outbox entry: cannot be restored"
    except EncryptionKeyMissing as exc:
        return f"needs a key this process lacks ({exc})"
    except (CorruptRecordError, ValueError, TypeError, KeyError) as exc:
        return f"does not read ({exc})"
    return None


def kind_of(codec: Codec, cid: str, text: str, stored_as_hash: bool) -> str:
    """What a copy was: Redis keeps moved records as hashes; otherwise an
    outbox entry has the header ``<seq>|<time>|``."""
    if stored_as_hash:
        return HOT_RECORD
    clear = _unsealed(codec, cid, text)
    return OUTBOX_ENTRY if has_header(clear) else HOT_RECORD
