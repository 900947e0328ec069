"""Serialisers: values to text and back, with a type tag on every payload.

A serialiser is a tiny protocol (``dumps``/``loads``). ``JsonSerializer`` writes
plain JSON (it always starts with ``{`` or ``[``); ``crypto.EncryptedSerializer``
seals its text as ``rpt-enc:2:<key id>:<token>`` (or authenticates it as
``rpt-mac:2:...``), bound to where the value belongs. Readers dispatch on the
prefix, so several key ids coexist; ``Codec`` decides what is believed.

Slot values that JSON cannot hold natively are stored faithfully:
Decimal, date/datetime/time, UUID, set/frozenset and bytes carry a small type
tag and come back as the same type; numpy scalars and arrays become the equal
Python numbers/lists (Rasa issues #2265, #5215).

User data cannot choose a stored type: a dict key that looks like the tag
(``__rpt_type__``, or it followed by ``~``s) gets one more ``~`` on the way
in and loses it on the way out, so a slot value such as
``{"__rpt_type__": "decimal", "value": "7.5"}`` comes back as that dict.
"""
import base64
import datetime
import decimal
import hashlib
import json
import uuid
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Tuple

from rasa_persistent_tracker import crypto
from rasa_persistent_tracker.errors import CorruptRecordError, EncryptionKeyMissing

TYPE_TAG = "__rpt_type__"
_ESCAPE = "~"


class Serializer(Protocol):
    """Turns JSON-like values into text and back."""

    def dumps(self, value: Any) -> str:
        """Serialise ``value``. Raises ``TypeError`` for unsupported types."""

    def loads(self, text: str) -> Any:
        """Deserialise ``text``. Raises ``CorruptRecordError`` if it cannot."""


def _tag(name: str, value: Any) -> Dict[str, Any]:
    return {TYPE_TAG: name, "value": value}


def encode_extra(value: Any) -> Any:
    """``json.dumps`` hook for the non-native types we support."""
    if isinstance(value, decimal.Decimal):
        return _tag("decimal", str(value))
    if isinstance(value, datetime.datetime):
        return _tag("datetime", value.isoformat())
    if isinstance(value, datetime.date):
        return _tag("date", value.isoformat())
    if isinstance(value, datetime.time):
        return _tag("time", value.isoformat())
    if isinstance(value, uuid.UUID):
        return _tag("uuid", str(value))
    if isinstance(value, (set, frozenset)):
        return _tag("set", sorted(value, key=repr))
    if isinstance(value, (bytes, bytearray)):
        return _tag("bytes", base64.b64encode(bytes(value)).decode("ascii"))
    # numpy without importing it: scalars have .item(), arrays .tolist().
    module = type(value).__module__
    if module == "numpy":
        if hasattr(value, "tolist"):
            return value.tolist()
    raise TypeError(f"{type(value).__module__}.{type(value).__qualname__}")


_DECODERS: Dict[str, Callable[[Any], Any]] = {
    "decimal": decimal.Decimal,
    "datetime": datetime.datetime.fromisoformat,
    "date": datetime.date.fromisoformat,
    "time": datetime.time.fromisoformat,
    "uuid": uuid.UUID,
    "set": set,
    "bytes": lambda v: base64.b64decode(v.encode("ascii")),
}


def _is_tag_like(key: Any) -> bool:
    """``TYPE_TAG`` followed by zero or more ``~``: keys that need escaping."""
    return (isinstance(key, str) and key.startswith(TYPE_TAG)
            and not key[len(TYPE_TAG):].strip(_ESCAPE))


def _escape(value: Any) -> Any:
    """``value`` with every tag-like dict key given one more ``~``."""
    if isinstance(value, dict):
        return {(f"{k}{_ESCAPE}" if _is_tag_like(k) else k): _escape(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape(v) for v in value]
    return value


def _decode_extra(obj: Dict[str, Any]) -> Any:
    if any(k != TYPE_TAG and _is_tag_like(k) for k in obj):
        # A user's dict, escaped on the way in (``_escape``): never a tag.
        return {(k[:-1] if k != TYPE_TAG and _is_tag_like(k) else k): v
                for k, v in obj.items()}
    if len(obj) == 2 and TYPE_TAG in obj and "value" in obj:
        decoder = _DECODERS.get(obj[TYPE_TAG])
        if decoder is None:
            raise CorruptRecordError(f"unknown value type tag {obj[TYPE_TAG]!r}")
        try:
            return decoder(obj["value"])
        except (TypeError, ValueError, decimal.InvalidOperation, AttributeError) as exc:
            raise CorruptRecordError(f"bad {obj[TYPE_TAG]} value") from exc
    return obj


_ENCODER = json.JSONEncoder(default=encode_extra, separators=(",", ":"))


class JsonSerializer:
    """Plain JSON with tagged extra types. The default serialiser."""

    def dumps(self, value: Any) -> str:
        """Serialise ``value`` to compact JSON text (tag-like keys escaped)."""
        text = _ENCODER.encode(value)
        if TYPE_TAG in text:  # a tag of ours, or a user's key that looks like one
            text = _ENCODER.encode(_escape(value))
        return text

    def loads(self, text: str) -> Any:
        """Parse JSON text; any malformation becomes ``CorruptRecordError``."""
        try:
            if TYPE_TAG not in text:  # the hook costs a call per object: skip it if unneeded
                return json.loads(text)
            return json.loads(text, object_hook=_decode_extra)
        except (ValueError, TypeError, RecursionError) as exc:
            raise CorruptRecordError(f"invalid JSON ({type(exc).__name__})") from None


CHECKSUM_MARK = "\n#"


def _checksum(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=10).hexdigest()


class Encoded(NamedTuple):
    """A hot record's payload, the record exactly as ``Codec.loads_record``
    reads it back, and the JSON texts of its events and base."""

    payload: str
    record: Dict[str, Any]
    texts: List[str]
    base_text: str


class Codec:
    """What the store encodes with, and the policy on what it believes.

    Without a key: hot records and snapshots are JSON plus a checksum (any
    flipped bit is detected), log rows and outbox entries plain JSON. With a
    key, every stored value is sealed (``crypto``) and bound to its kind,
    conversation and (log rows) seq: hot records, snapshots and outbox entries
    encrypted whole; log rows encrypted if ``is_sensitive``, else
    authenticated. Plaintext, and legacy unbound log rows and outbox entries,
    are then refused like corrupt data, unless ``accept_plaintext`` (an
    explicit migration; ``rotate-keys`` seals them). Legacy ``rpt-enc:1``
    records and snapshots stay readable: they name their conversation inside.

    Args:
        plain: serialiser for values that need no protection.
        protected: ``crypto.EncryptedSerializer``; None: no encryption.
        is_sensitive: decides per event dict whether its log row is encrypted.
        accept_plaintext: with a key, still believe plaintext and legacy values.
    """

    def __init__(self, plain: Serializer, protected: Any = None,
                 is_sensitive: Callable[[Dict[str, Any]], bool] = lambda _: True,
                 accept_plaintext: bool = False) -> None:
        self._plain = plain
        self._protected = protected
        self._is_sensitive = is_sensitive
        self.accept_plaintext = accept_plaintext

    @property
    def encrypting(self) -> bool:
        return self._protected is not None

    # ------------------------------------------------------------ records

    def dumps_record(self, record: Any, kind: str = crypto.HOT) -> str:
        """Serialise a hot record (or a snapshot: ``kind``), bound to its
        ``sender_id``."""
        return self._seal_record(self._plain.dumps(record), kind,
                                 record.get("sender_id") if isinstance(record, dict) else None)

    def encode_record(self, record: Dict[str, Any], event_texts: List[Optional[str]],
                      base_text: Optional[str] = None) -> "Encoded":
        """``dumps_record`` for a record whose parts are partly serialised already.

        ``event_texts[i]`` is the JSON text of ``record["events"][i]`` and
        ``base_text`` that of ``record["base"]`` (None: serialise it here); only
        the rest is serialised anew. ``record["events"]`` (and ``record["base"]``
        if its text is given) must hold values as they read back from JSON.
        Raises ``TypeError`` for a value that cannot be written and
        ``CorruptRecordError`` for one that would not read back as written.
        """
        texts = [text if text is not None else self._plain.dumps(event)
                 for event, text in zip(record["events"], event_texts, strict=True)]
        skip = ("events", "base") if base_text is not None else ("events",)
        head = self._plain.dumps({k: v for k, v in record.items() if k not in skip})
        decoded = self._plain.loads(head)
        decoded["events"] = record["events"]
        if base_text is not None:
            decoded["base"] = record["base"]
            head = f'{{"base":{base_text},{head[1:]}'
        else:
            base_text = self._plain.dumps(decoded["base"])
        payload = self._seal_record(f'{{"events":[{",".join(texts)}],{head[1:]}', crypto.HOT,
                                    record["sender_id"])
        return Encoded(payload, decoded, texts, base_text)

    def _seal_record(self, text: str, kind: str, conversation_id: Optional[str]) -> str:
        if self._protected is not None:
            return self._protected.seal(text, kind, conversation_id)
        return f"{text}{CHECKSUM_MARK}{_checksum(text)}"

    def _open_record(self, text: str, conversation_id: str, kind: str) -> str:
        if text[:1] in ("{", "["):
            self._plaintext_allowed(kind)
            body, mark, digest = text.rpartition(CHECKSUM_MARK)
            if not mark or _checksum(body) != digest:
                raise CorruptRecordError("record checksum does not match")
            return body
        # Legacy records name their conversation inside (replay.validate_record).
        return self._open(text, kind, conversation_id, None, legacy=True)

    def loads_record(self, text: str, conversation_id: str, kind: str = crypto.HOT) -> Any:
        """Read a record ``dumps_record`` wrote for this conversation and kind.
        Raises CorruptRecordError."""
        return self._plain.loads(self._open_record(text, conversation_id, kind))

    def reseal_record(self, text: str, conversation_id: str, kind: str) -> str:
        """A hot record's payload as a value of another ``kind`` (the snapshot).
        Raises CorruptRecordError if it does not open as a hot record."""
        if self._protected is None:
            return text
        return self._protected.seal(self._open_record(text, conversation_id, crypto.HOT),
                                    kind, conversation_id)

    # ------------------------------------------------------------- events

    def event_text(self, event: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        """An event's JSON text and the event as it reads back from it.
        Raises ``TypeError`` for a value that cannot be written and
        ``CorruptRecordError`` for one that would not read back as written."""
        text = self._plain.dumps(event)
        return text, self._plain.loads(text)

    def protect_event(self, event: Dict[str, Any], text: str, conversation_id: str,
                      seq: int) -> str:
        """The log form of an event already serialised to ``text``, at ``seq``."""
        if self._protected is None:
            return text
        if self._is_sensitive(event):
            return self._protected.seal(text, crypto.ROW, conversation_id, seq)
        return self._protected.mac(text, crypto.ROW, conversation_id, seq)

    def dumps_event(self, event: Dict[str, Any], conversation_id: str, seq: int) -> str:
        """Serialise one event for the log row ``seq`` of a conversation."""
        return self.protect_event(event, self._plain.dumps(event), conversation_id, seq)

    def row_text(self, data: str, conversation_id: str, seq: int) -> str:
        """The JSON text of a log row's ``data``. Raises CorruptRecordError."""
        return self._open(data, crypto.ROW, conversation_id, seq)

    def loads_event(self, data: str, conversation_id: str, seq: int) -> Any:
        """Read a log row's ``data``. Raises CorruptRecordError."""
        return self._plain.loads(self.row_text(data, conversation_id, seq))

    def rebind_row(self, data: str, conversation_id: str, seq: int, new_seq: int) -> str:
        """A row's ``data`` for its new place when delivery re-sequences it.
        Raises CorruptRecordError if it does not open at its old place."""
        if self._protected is None or data[:1] in ("{", "["):
            return data
        text = self.row_text(data, conversation_id, seq)
        if data.startswith(crypto.MAC_PREFIX):
            return self._protected.mac(text, crypto.ROW, conversation_id, new_seq)
        return self._protected.seal(text, crypto.ROW, conversation_id, new_seq)

    # ---------------------------------------------------- outbox entries

    def seal_entry(self, body: str, conversation_id: str, header: str) -> str:
        """An outbox entry's body (its rows' JSON), bound to its header."""
        if self._protected is None:
            return body
        return self._protected.seal(body, crypto.OUTBOX, conversation_id, header)

    def open_entry(self, body: str, conversation_id: str, header: str) -> str:
        """Inverse of ``seal_entry``. Raises CorruptRecordError."""
        return self._open(body, crypto.OUTBOX, conversation_id, header)

    # -------------------------------------------------- quarantine copies

    def seal_quarantine(self, text: str, conversation_id: str) -> str:
        """A quarantine copy's content, sealed as one (key rotation)."""
        return self._protected.seal(text, crypto.QUARANTINE, conversation_id)

    def unwrap(self, text: str, kind: str, conversation_id: str, extra: Any = None) -> str:
        """The clear text of any sealed form (legacy too), or ``text`` if it is
        plaintext: for values that are never believed, only re-sealed
        (quarantine copies). Raises CorruptRecordError."""
        if self._protected is None or crypto.key_id_of(text) is None:
            return text
        return self._protected.open(text, kind, conversation_id, extra, legacy=True)

    # --------------------------------------------------------------------

    def _plaintext_allowed(self, kind: str) -> None:
        if self._protected is not None and not self.accept_plaintext:
            raise CorruptRecordError(f"plaintext {kind} refused: an encryption key is "
                                     f"configured (accept_plaintext is off)")

    def _open(self, text: str, kind: str, conversation_id: str, extra: Any,
              legacy: bool = False) -> str:
        if text[:1] in ("{", "["):
            self._plaintext_allowed(kind)
            return text
        if self._protected is None:
            if crypto.is_ciphertext(text):
                raise EncryptionKeyMissing(
                    "stored data is encrypted, but no encryption key is configured: give this "
                    "process the keys it was written with (RPT_ENCRYPTION_KEYS or "
                    "'encryption_key_file'); nothing was changed")
            clear = crypto.strip_mac(text)  # without a key nothing is verified
            if clear is None:
                raise CorruptRecordError("payload is neither JSON nor readable ciphertext")
            return clear
        return self._protected.open(text, kind, conversation_id, extra,
                                    legacy=legacy or self.accept_plaintext)
