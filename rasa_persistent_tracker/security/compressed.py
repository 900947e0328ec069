"""The compressed hot record (issue 17): its stored form and the payload's bytes.

A hot record's JSON text is stored deflated (raw deflate, a fixed preset
dictionary of the words every Rasa record repeats):

* ``rpt-z1:<digest><deflate>`` without a key, where ``digest`` is 10 raw
  bytes of BLAKE2b over the deflate bytes, so any flipped bit is detected
  before anything is inflated;
* with a key, the deflate bytes are encrypted (``crypto``'s binary form
  ``rpt-enc:3:``; the AEAD covers them). Compression comes before
  encryption, so a record's stored length says something about how
  repetitive its content is (docs/security.md).

The deflate stream is the record's text ``{"base":<base>,"events":[...],...}``
in two segments: the base (its ``{"base":...`` prefix), compressed once per
base, and the rest, compressed on every save with the base as its preset
dictionary. A reader inflates the whole stream at once; the inflated size is
capped (``MAX_RECORD_BYTES``).

The rest names the base segment's length (``SEGMENT_FIELD``). A reader
checks it (``packed_base``) and hands the segment on with the base's text,
so a save that keeps the base reuses its compressed bytes whichever process
compressed them, even when this process does not remember the conversation
(more conversations than its memories hold). ``Deflater`` also keeps the
segments of recent bases. Readers that do not know the field ignore it: the
stream is the same.

Payloads are text in the hot layers; compressed ones are binary. Stored
bytes and payload text convert with UTF-8 and ``surrogateescape``
(``stored_bytes`` / ``stored_text``): every byte string round-trips, and
JSON payloads read as before. The save path hands bytes straight to the hot
state, so nothing converts on a turn.
"""
import collections
import hashlib
import re
import threading
import zlib
from typing import Any, NamedTuple, Optional, Tuple, Union

from rasa_persistent_tracker.errors import CorruptRecordError
from rasa_persistent_tracker.security.crypto import BINARY_PREFIX

PREFIX = "rpt-z1:"
PREFIX_BYTES = PREFIX.encode("ascii")
# How stored bytes of a binary hot record begin: plain, or encrypted.
BINARY_FORMS = (PREFIX_BYTES, BINARY_PREFIX.encode("ascii"))
_DIGEST = 10
# Inflating more than this is refused as corrupt (a "zip bomb" must not take
# the process's memory); a real hot record is tens of KB.
MAX_RECORD_BYTES = 64 * 1024 * 1024
# The base changes about once every slack(max_history) turns: compress it hard.
# The rest is compressed on every save: level 3 is zlib's fastest strategy that
# still finds most repeats (measured on benchmark records: levels 4-6 save
# another 3-4% for 40-80 us more per save).
BASE_LEVEL = 9
REST_LEVEL = 3
# Bases remembered with their compressed segment (per process, any conversation).
BASE_CACHE_SIZE = 64
_WINDOW = 32768  # deflate's window: the most of a preset dictionary it uses
# The record field (top level, in the rest) holding the base segment's length
# in bytes of the stream; the codec writes it and takes it out on reading.
SEGMENT_FIELD = "base_segment"
_HEAD = b'{"base":'
_REST_STARTS = ',"events":['
# How a sync flush ends a segment: an empty stored block, on a byte boundary.
_SYNC_MARK = b"\x00\x00\xff\xff"
# The writer puts the field last in the record text.
_SEGMENT_TAIL = re.compile(r',"' + SEGMENT_FIELD + r'":([1-9][0-9]{0,9})\}\Z')

# Words every record repeats (event keys, Rasa's NLU and response shapes),
# so the first event of each kind compresses like the later ones. Part of
# the ``rpt-z1`` format: changing it needs a new format version.
DICTIONARY = (
    b'{"event":"session_started","timestamp":1,"metadata":{}}'
    b'{"event":"slot","timestamp":1,"name":"","value":null}'
    b'{"event":"bot","timestamp":1,"metadata":{"utter_action":"utter_"},"text":"",'
    b'"data":{"elements":null,"quick_replies":null,"buttons":null,"attachment":null,'
    b'"image":null,"custom":null}}'
    b'{"event":"user","timestamp":1,"text":"","parse_data":{"intent":{"name":"",'
    b'"confidence":0.9},"entities":[{"entity":"","start":0,"end":0,"value":"",'
    b'"confidence_entity":0.9,"extractor":"DIETClassifier","processors":'
    b'["EntitySynonymMapper"]}],"text":"","message_id":"","metadata":{},"intent_ranking":'
    b'[{"name":"","confidence":0.1},{"name":"","confidence":0.0}],"response_selector":'
    b'{"all_retrieval_intents":[],"default":{"response":{"id":null,"responses":null,'
    b'"response_templates":null,"confidence":0.0,"intent_response_key":null,'
    b'"utter_action":"utter_None","template_name":"utter_None"},"ranking":[]}}},'
    b'"input_channel":"","message_id":"","metadata":{}}'
    b'{"event":"active_loop","timestamp":1,"name":null}'
    b'{"event":"action","timestamp":1,"metadata":{"model_id":""},"name":"action_listen",'
    b'"policy":"RulePolicy","confidence":1.0,"action_text":null,"hide_rule_turn":false}'
    b'{"event":"action","timestamp":1,"name":"action_session_start","policy":null,'
    b'"confidence":null,"action_text":null,"hide_rule_turn":false}'
    b'{"base":{"loops":[],"head":[],"summary":[],"applied":[],"latest_bot":null},'
    b'"events":[],"schema":2,"sender_id":"","next_seq":1,"state":{"slots":{},'
    b'"active_loop":null,"latest_action":{"action_name":"action_listen"},'
    b'"followup_action":null,"paused":false,"latest_message_at":null},"last_event":""}'
)

Payload = Union[str, bytes]


def stored_bytes(payload: Payload) -> bytes:
    """The bytes a payload is stored as (``bytes`` are stored as they are)."""
    if isinstance(payload, bytes):
        return payload
    return payload.encode("utf-8", "surrogateescape")


def stored_text(raw: bytes) -> str:
    """A stored payload as text; ``stored_bytes`` gives back ``raw`` exactly."""
    return raw.decode("utf-8", "surrogateescape")


def is_compressed(payload: Payload) -> bool:
    """Whether ``payload`` is an unencrypted compressed record."""
    return payload.startswith(PREFIX_BYTES if isinstance(payload, bytes) else PREFIX)


class PackedBase(NamedTuple):
    """A base's JSON text and its compressed segment, as a stored record has them."""

    text: str
    segment: bytes


def _context(base_json: str) -> bytes:
    """The preset dictionary the rest is compressed with: what precedes it."""
    return (DICTIONARY + _HEAD + base_json.encode("utf-8"))[-_WINDOW:]


class Deflater:
    """Deflates record texts, remembering the compressed segment of recent bases.

    Thread-safe (stores may be shared by event loops in several threads).
    """

    def __init__(self, size: int = BASE_CACHE_SIZE) -> None:
        self._size = size
        self._bases: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def segment(self, base_json: str) -> bytes:
        """The compressed segment of ``'{"base":' + base_json``, ending on a
        byte boundary so that the rest's segment continues the same stream."""
        with self._lock:
            hit = self._bases.get(base_json)
            if hit is not None:
                self._bases.move_to_end(base_json)
                return hit
        squeezer = zlib.compressobj(BASE_LEVEL, zlib.DEFLATED, -15, 9,
                                    zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
        segment = (squeezer.compress(_HEAD + base_json.encode("utf-8"))
                   + squeezer.flush(zlib.Z_SYNC_FLUSH))
        with self._lock:
            self._bases[base_json] = segment
            while len(self._bases) > self._size:
                self._bases.popitem(last=False)
        return segment

    @staticmethod
    def finish(base_json: str, segment: bytes, rest: str) -> bytes:
        """The deflate stream of ``'{"base":' + base_json + rest``, whose first
        ``len(segment)`` bytes are ``segment`` (``segment(base_json)``, or
        the one ``packed_base`` found for this very base text)."""
        squeezer = zlib.compressobj(REST_LEVEL, zlib.DEFLATED, -15, 8,
                                    zlib.Z_DEFAULT_STRATEGY, _context(base_json))
        return segment + squeezer.compress(rest.encode("utf-8")) + squeezer.flush()

    def deflate(self, base_json: str, rest: str) -> bytes:
        """The deflate stream of ``'{"base":' + base_json + rest``."""
        return self.finish(base_json, self.segment(base_json), rest)


def segment_length(text: str) -> Optional[int]:
    """The base segment's length a record text names in its last field, if any."""
    found = _SEGMENT_TAIL.search(text, max(0, len(text) - 40))
    return int(found.group(1)) if found else None


def packed_base(stream: bytes, length: Optional[int], text: str) -> Optional[PackedBase]:
    """The base text and segment of a record read from ``stream`` (inflated to
    ``text``), if ``length`` (``segment_length``) marks where a segment ends
    that inflates to ``'{"base":'`` + some text followed in ``text`` by the
    events; None otherwise (older records, anything that does not check out:
    the base is then compressed afresh on the next save). That the base text
    is the whole base, and the record's only one, is for the caller to check
    (``Codec.loads_record_parts`` parses the record in these two parts)."""
    if type(length) is not int or not len(_SYNC_MARK) <= length < len(stream) or \
            stream[length - len(_SYNC_MARK):length] != _SYNC_MARK:
        return None
    inflater = zlib.decompressobj(-15, zdict=DICTIONARY)
    try:
        # A prefix of a stream that inflated whole within the cap: no bomb.
        head = inflater.decompress(stream[:length])
        head_text = head.decode("utf-8")
    except (zlib.error, UnicodeDecodeError):
        return None
    if (inflater.eof or not head.startswith(_HEAD)
            or not text.startswith(head_text)
            or not text.startswith(_REST_STARTS, len(head_text))):
        return None
    return PackedBase(head_text[len(_HEAD):], stream[:length])


def seal_plain(stream: bytes) -> bytes:
    """The unencrypted stored form of a deflate stream."""
    return PREFIX_BYTES + hashlib.blake2b(stream, digest_size=_DIGEST).digest() + stream


def open_plain(payload: Payload) -> bytes:
    """The deflate stream of an unencrypted compressed payload, checked.
    Raises CorruptRecordError (any changed byte or truncation)."""
    data = stored_bytes(payload)
    start = len(PREFIX_BYTES)
    digest, stream = data[start:start + _DIGEST], data[start + _DIGEST:]
    if hashlib.blake2b(stream, digest_size=_DIGEST).digest() != digest:
        raise CorruptRecordError("compressed record checksum does not match")
    return stream


def inflate(stream: bytes) -> str:
    """Record text from a deflate stream ``Deflater`` wrote. Raises
    CorruptRecordError: not a complete stream, too large, not UTF-8."""
    inflater = zlib.decompressobj(-15, zdict=DICTIONARY)
    try:
        raw = inflater.decompress(stream, MAX_RECORD_BYTES)
    except zlib.error:
        raise CorruptRecordError("compressed record does not inflate") from None
    if inflater.unconsumed_tail:
        raise CorruptRecordError(f"compressed record inflates to more than "
                                 f"{MAX_RECORD_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise CorruptRecordError("compressed record is truncated or has trailing data")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptRecordError("compressed record is not UTF-8 text") from None
