"""``Codec``: what a stored value must be, and what is believed.

Values are text from a serialiser (``serde.py``); with a key, every stored
value is sealed by ``crypto.EncryptedSerializer`` (``rpt-enc:2:<key id>:...``,
or authenticated only as ``rpt-mac:2:...``), bound to where it belongs.
Hot records are compressed first (``compressed.py``: ``rpt-z1:``, or with a
key ``rpt-enc:3:``); snapshots, which SQL stores as text, are not.
Readers dispatch on the prefix, so plaintext, older formats and several key
ids coexist; the codec decides which forms are believed (``accept_plaintext``).
"""
import hashlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from rasa_persistent_tracker.errors import CorruptRecordError, EncryptionKeyMissing
from rasa_persistent_tracker.security import compressed, crypto, serde
from rasa_persistent_tracker.security.compressed import Payload
from rasa_persistent_tracker.security.serde import Serializer

CHECKSUM_MARK = "\n#"


def _checksum(text: str) -> str:
    # surrogateescape: a payload read back from garbage bytes must fail the
    # comparison, not raise UnicodeEncodeError.
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()


class Encoded(NamedTuple):
    """A hot record's payload (its stored bytes), the record exactly as
    ``Codec.loads_record`` reads it back, the JSON texts of its events and
    base, and the base's compressed segment (None if not compressed)."""

    payload: Payload
    record: Dict[str, Any]
    event_jsons: List[str]
    base_json: str
    base_segment: Optional[bytes] = None


class Codec:
    """What the store encodes with, and the policy on what it believes.

    Without a key: hot records are compressed JSON with a checksum, snapshots
    JSON plus a checksum (any flipped bit is detected), log rows and outbox
    entries plain JSON. With a key, every stored value is sealed (``crypto``;
    hot records compressed, then encrypted) and bound to its kind,
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
        compress: write hot records compressed (``rpt-z1`` / ``rpt-enc:3``);
            False writes the text forms of the releases before compression (JSON
            plus checksum, ``rpt-enc:2``), which they read: for a rolling upgrade. Both are
            read either way.
    """

    def __init__(self, plain: Serializer, protected: Any = None,
                 is_sensitive: Callable[[Dict[str, Any]], bool] = lambda _: True,
                 accept_plaintext: bool = False, compress: bool = True) -> None:
        self._plain = plain
        self._protected = protected
        self._is_sensitive = is_sensitive
        self.accept_plaintext = accept_plaintext
        self._compress = compress
        self._deflater = compressed.Deflater()

    @property
    def encrypting(self) -> bool:
        return self._protected is not None

    # ------------------------------------------------------------ records

    def dumps_record(self, record: Any, kind: str = crypto.HOT) -> str:
        """Serialise a hot record (or a snapshot: ``kind``), bound to its
        ``sender_id``. A hot record's binary form comes as ``compressed.stored_text``."""
        cid = record.get("sender_id") if isinstance(record, dict) else None
        if kind == crypto.HOT and isinstance(record, dict) and "base" in record:
            first = {"events": record["events"]} if "events" in record else {}
            fields = self._plain.dumps({**first, **{
                k: v for k, v in record.items()
                if k not in ("base", "events", compressed.SEGMENT_FIELD)}})
            packed = self._pack(self._plain.dumps(record["base"]), fields, cid)[0]
            return packed if isinstance(packed, str) else compressed.stored_text(packed)
        return self._seal_record(self._plain.dumps(record), kind, cid)

    def encode_record(self, record: Dict[str, Any], event_texts: List[Optional[str]],
                      base_json: Optional[str] = None,
                      base_segment: Optional[bytes] = None) -> "Encoded":
        """``dumps_record`` for a record whose parts are partly serialised already.

        ``event_texts[i]`` is the JSON text of ``record["events"][i]`` and
        ``base_json`` that of ``record["base"]`` (None: serialise it here); only
        the rest is serialised anew. ``record["events"]`` (and ``record["base"]``
        if its text is given) must hold values as they read back from JSON.
        ``base_segment``: the compressed segment of exactly ``base_json``, as
        ``loads_record_parts`` found it (None: compress it, or take it from the
        recent bases). Raises ``TypeError`` for a value that cannot be written
        and ``CorruptRecordError`` for one that would not read back as written.
        """
        event_jsons = [text if text is not None else self._plain.dumps(event)
                 for event, text in zip(record["events"], event_texts, strict=True)]
        if base_json is None:  # a new base: serialised once, read back once
            (base_json, base), base_segment = serde.dumps_read_back(
                self._plain, record["base"]), None
        else:
            base = record["base"]
        head, decoded = serde.dumps_read_back(
            self._plain, {k: v for k, v in record.items()
                          if k not in ("events", "base", compressed.SEGMENT_FIELD)})
        decoded["events"] = record["events"]
        decoded["base"] = base
        payload, segment = self._pack(
            base_json, f'{{"events":[{",".join(event_jsons)}],{head[1:]}',
            record["sender_id"], base_segment)
        return Encoded(payload, decoded, event_jsons, base_json, segment)

    def _pack(self, base_json: str, fields: str, conversation_id: Optional[str],
              segment: Optional[bytes] = None) -> Tuple[Payload, Optional[bytes]]:
        """The stored form of the hot record ``{"base":<base_json>, <fields>}``
        (``fields`` a JSON object's text, ``"events"`` first), as bytes (text
        if compression is off), and the base's compressed segment."""
        rest = f",{fields[1:]}" if fields != "{}" else "}"
        if not self._compress:
            return self._seal_record(f'{{"base":{base_json}{rest}', crypto.HOT,
                                     conversation_id), None
        if segment is None:
            segment = self._deflater.segment(base_json)
        if fields != "{}":  # the segment's length, for the next writer (``packed_base``)
            rest = f',{fields[1:-1]},"{compressed.SEGMENT_FIELD}":{len(segment)}}}'
        stream = self._deflater.finish(base_json, segment, rest)
        if self._protected is not None:
            return self._protected.seal_bytes(stream, crypto.HOT, conversation_id), segment
        return compressed.seal_plain(stream), segment

    def _seal_record(self, text: str, kind: str, conversation_id: Optional[str]) -> str:
        if self._protected is not None:
            return self._protected.seal(text, kind, conversation_id)
        return f"{text}{CHECKSUM_MARK}{_checksum(text)}"

    def _open_record(self, payload: Payload, conversation_id: str, kind: str) -> str:
        return self._open_record_stream(payload, conversation_id, kind)[0]

    def _open_record_stream(self, payload: Payload, conversation_id: str, kind: str
                            ) -> Tuple[str, Optional[bytes]]:
        """A record's JSON text, and its deflate stream if it was compressed."""
        if compressed.is_compressed(payload):
            self._plaintext_allowed(kind)
            stream = compressed.open_plain(payload)
            return compressed.inflate(stream), stream
        if payload.startswith(crypto.BINARY_PREFIX if isinstance(payload, str)
                              else crypto.BINARY_PREFIX.encode("ascii")):
            if self._protected is None:
                self._key_missing()
            stream = self._protected.open_bytes(compressed.stored_bytes(payload), kind,
                                                conversation_id)
            return compressed.inflate(stream), stream
        if isinstance(payload, bytes):
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptRecordError("payload is neither a record nor ciphertext") from None
        else:
            text = payload
        if text[:1] in ("{", "["):
            self._plaintext_allowed(kind)
            body, mark, digest = text.rpartition(CHECKSUM_MARK)
            if not mark or _checksum(body) != digest:
                raise CorruptRecordError("record checksum does not match")
            return body, None
        # Legacy records name their conversation inside (replay.validate_record).
        return self._open(text, kind, conversation_id, None, legacy=True), None

    def loads_record(self, payload: Payload, conversation_id: str,
                     kind: str = crypto.HOT) -> Any:
        """Read a record ``dumps_record`` or ``encode_record`` wrote for this
        conversation and kind (older formats too). Raises CorruptRecordError."""
        return self.loads_record_parts(payload, conversation_id, kind)[0]

    def loads_record_parts(self, payload: Payload, conversation_id: str,
                           kind: str = crypto.HOT
                           ) -> Tuple[Any, Optional[compressed.PackedBase]]:
        """``loads_record``, and the base's text and compressed segment if the
        payload holds them checkably: a save that keeps the base passes them
        back to ``encode_record``. Raises CorruptRecordError."""
        text, stream = self._open_record_stream(payload, conversation_id, kind)
        if stream is not None:
            parts = self._parts(stream, text)
            if parts is not None:
                return parts
        record = self._plain.loads(text)
        if isinstance(record, dict):
            record.pop(compressed.SEGMENT_FIELD, None)
        return record, None

    def _parts(self, stream: bytes, text: str
               ) -> Optional[Tuple[Dict[str, Any], compressed.PackedBase]]:
        """The record parsed as the base its segment holds and the rest, or
        None: then the segment is not exactly the base (the base text does
        not parse alone, or the rest does not, or names a base again; only a
        forged record does that) and the caller parses the text whole. The
        same values as one parse, for the same work."""
        packed = compressed.packed_base(stream, compressed.segment_length(text), text)
        if packed is None:
            return None
        try:
            base = self._plain.loads(packed.text)
            # text = '{"base":' + base + ',' + the rest's members + '}'
            rest = self._plain.loads("{" + text[len(packed.text) + 9:])
        except CorruptRecordError:
            return None
        if not isinstance(rest, dict) or "base" in rest:
            return None
        rest.pop(compressed.SEGMENT_FIELD, None)
        return {"base": base, **rest}, packed

    def record_text(self, payload: Payload, conversation_id: str,
                    kind: str = crypto.HOT) -> str:
        """The JSON text of a record ``loads_record`` reads. Raises CorruptRecordError."""
        return self._open_record(payload, conversation_id, kind)

    def reseal_record(self, payload: Payload, conversation_id: str, kind: str) -> str:
        """A hot record's payload as a value of another ``kind`` (the snapshot),
        as text. Raises CorruptRecordError if it does not open as a hot record."""
        if self._protected is None and isinstance(payload, str) and payload[:1] in ("{", "["):
            return payload  # JSON with its checksum already, as snapshots are
        return self._seal_record(self._open_record(payload, conversation_id, crypto.HOT),
                                 kind, conversation_id)

    # ------------------------------------------------------------- events

    def event_text(self, event: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        """An event's JSON text and the event as it reads back from it.
        Raises ``TypeError`` for a value that cannot be written and
        ``CorruptRecordError`` for one that would not read back as written."""
        return serde.dumps_read_back(self._plain, event)

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
        if text.startswith(crypto.BINARY_PREFIX):  # a hot record moved aside: its JSON
            return self._open_record(text, conversation_id, crypto.HOT)
        return self._protected.open(text, kind, conversation_id, extra, legacy=True)

    # --------------------------------------------------------------------

    def _plaintext_allowed(self, kind: str) -> None:
        if self._protected is not None and not self.accept_plaintext:
            raise CorruptRecordError(f"plaintext {kind} refused: an encryption key is "
                                     f"configured (accept_plaintext is off)")

    @staticmethod
    def _key_missing() -> None:
        raise EncryptionKeyMissing(
            "stored data is encrypted, but no encryption key is configured: give this "
            "process the keys it was written with (RPT_ENCRYPTION_KEYS or "
            "'encryption_key_file'); nothing was changed")

    def _open(self, text: str, kind: str, conversation_id: str, extra: Any,
              legacy: bool = False) -> str:
        if text[:1] in ("{", "["):
            self._plaintext_allowed(kind)
            return text
        if self._protected is None:
            if crypto.is_ciphertext(text):
                self._key_missing()
            clear = crypto.strip_mac(text)  # without a key nothing is verified
            if clear is None:
                raise CorruptRecordError("payload is neither JSON nor readable ciphertext")
            return clear
        return self._protected.open(text, kind, conversation_id, extra,
                                    legacy=legacy or self.accept_plaintext)
