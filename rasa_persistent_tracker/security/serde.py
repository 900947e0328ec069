"""Serialisers: values to text and back (the serde that encryption wraps).

A serialiser is a tiny protocol (``dumps``/``loads``). ``JsonSerializer`` writes
plain JSON (it always starts with ``{`` or ``[``); ``crypto.EncryptedSerializer``
seals its text, and ``codec.Codec`` decides what is stored and believed.

Slot values that JSON cannot hold natively are stored faithfully:
Decimal, date/datetime/time, UUID, set/frozenset and bytes carry a small type
tag and come back as the same type; numpy scalars and arrays become the equal
Python numbers/lists (Rasa issues #2265, #5215).

User data cannot choose a stored type: a dict key that looks like the tag
(``__rpt_type__``, or it followed by ``~``s) gets one more ``~`` on the way
in and loses it on the way out, so a slot value such as
``{"__rpt_type__": "decimal", "value": "7.5"}`` comes back as that dict.

Text is written by orjson where that gives json's values in ASCII (most
events: ~5x faster), else by json; it is always read by json (see
``_by_orjson``). ``dumps_read_back`` gives the text and the value it reads
back as in one step, which orjson's check computes anyway.
"""
import base64
import datetime
import decimal
import json
import uuid
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

try:
    import orjson
except ImportError:  # a speed-up only: json alone gives the same values
    orjson = None

from rasa_persistent_tracker.errors import CorruptRecordError

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

# orjson, where it gives the very values json gives, ~5x faster on events.
# Its text is used only if it is ASCII, as json's (``ensure_ascii``: stored
# text fits a database of any encoding) and reads back equal to the value,
# so whatever it writes differently (non-ASCII unescaped, NaN as null, a
# UUID as a plain string, an Enum as its value, a tuple) or refuses (integers
# past 64 bits, non-string keys, lone surrogates, the extra types above) goes
# through json as before. Reading stays json's: orjson reads integers past
# 64 bits as floats, and finding them in the text first costs what it saves.
if orjson is not None:
    _ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
    _ORJSON_ERRORS = (TypeError, ValueError, orjson.JSONEncodeError, orjson.JSONDecodeError)


def _not_by_orjson(value: Any) -> Any:
    raise TypeError("left to json")


def _by_orjson(value: Any) -> Optional[Tuple[str, Any]]:
    """orjson's text of ``value`` and the value it reads back as (equal to
    ``value``, as json reads that text), or None: json must write it."""
    if orjson is None:
        return None
    try:
        data = orjson.dumps(value, default=_not_by_orjson, option=_ORJSON_OPTIONS)
        if not data.isascii():  # json escapes the rest: text for any SQL encoding
            return None
        read = orjson.loads(data)  # no integer past 64 bits: orjson wrote none
        if read == value:
            return data.decode("utf-8"), read
    except _ORJSON_ERRORS:
        pass  # json decides, and raises what it raises
    return None


def compact_json(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))``'s value (no extra types),
    through orjson where it gives the same."""
    fast = _by_orjson(value)
    return fast[0] if fast is not None else _COMPACT.encode(value)


_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _untagged_by_orjson(value: Any) -> Optional[Tuple[str, Any]]:
    """``_by_orjson``, unless the text holds the tag (which json escapes)."""
    fast = _by_orjson(value)
    return fast if fast is not None and TYPE_TAG not in fast[0] else None


def _json_text(value: Any) -> str:
    text = _ENCODER.encode(value)
    if TYPE_TAG in text:  # a tag of ours, or a user's key that looks like one
        text = _ENCODER.encode(_escape(value))
    return text


def dumps_read_back(serializer: Serializer, value: Any) -> Tuple[str, Any]:
    """``serializer.dumps(value)`` and that text read back by ``serializer``
    (in one step where the serialiser offers it, as ``JsonSerializer`` does)."""
    both = getattr(serializer, "dumps_read_back", None)
    if both is not None:
        return both(value)
    text = serializer.dumps(value)
    return text, serializer.loads(text)


class JsonSerializer:
    """Plain JSON with tagged extra types. The default serialiser."""

    def dumps(self, value: Any) -> str:
        """Serialise ``value`` to compact JSON text (tag-like keys escaped)."""
        fast = _untagged_by_orjson(value)
        return fast[0] if fast is not None else _json_text(value)

    def dumps_read_back(self, value: Any) -> Tuple[str, Any]:
        """``dumps(value)``, and the value as ``loads`` reads that text back
        (a new object). Raises as ``dumps`` and ``loads``."""
        fast = _untagged_by_orjson(value)
        if fast is not None:
            return fast
        text = _json_text(value)
        return text, self.loads(text)

    def loads(self, text: str) -> Any:
        """Parse JSON text; any malformation becomes ``CorruptRecordError``."""
        try:
            if TYPE_TAG not in text:  # the hook costs a call per object: skip it if unneeded
                return json.loads(text)
            return json.loads(text, object_hook=_decode_extra)
        except (ValueError, TypeError, RecursionError) as exc:
            raise CorruptRecordError(f"invalid JSON ({type(exc).__name__})") from None
