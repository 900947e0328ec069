"""Serialising through orjson gives exactly the values json gave.

``JsonSerializer`` writes with orjson where its text reads back equal to the
value, and falls back to json otherwise. For every value, generated with the
hazards where the two libraries differ (NaN and infinities, integers past 64
bits, non-string keys, lone surrogates, UUIDs, Enums, tuples, extra types,
tag-like keys, deep nesting), the text must read back as json's text does,
``dumps_read_back`` must return what ``loads`` reads, and a value json
refuses must be refused with json's error.
"""
import dataclasses
import datetime
import decimal
import enum
import json
import math
import random
import uuid

import numpy as np
import pytest

from rasa_persistent_tracker.security import serde
from rasa_persistent_tracker.security.serde import TYPE_TAG, JsonSerializer


class Colour(enum.Enum):
    RED = 1


class Size(enum.IntEnum):
    LARGE = 3


class Mood(str, enum.Enum):
    HAPPY = "happy"


@dataclasses.dataclass
class Point:
    x: int


class Text(str):
    pass


HAZARDS = [
    float("nan"), float("inf"), -float("inf"), -0.0, 1e300, 5e-324, 0.1 + 0.2,
    2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -2 ** 63, -2 ** 63 - 1, 10 ** 30,
    "\ud800", "a\udcffb", "é ü 中 😀", "\u2028", "\x00", TYPE_TAG, TYPE_TAG + "~",
    uuid.UUID(int=7), Colour.RED, Size.LARGE, Mood.HAPPY, (1, "two"), Text("sub"),
    decimal.Decimal("1.10"), datetime.datetime(2026, 12, 1, 7, 0), datetime.date(2026, 1, 2),
    datetime.time(7, 30), {1, 2}, b"\x00\xff", np.float64(0.5), np.float32(0.25),
    np.int64(7), np.arange(3), True, False, None, "", 0, 1, 1.0,
]
KEYS = ["a", "é", TYPE_TAG, TYPE_TAG + "~~", 1, 2.5, True, None, "\ud800"]


def generate(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 4 or roll < 0.45:
        return rng.choice(HAZARDS) if rng.random() < 0.6 else rng.choice(
            [rng.random(), rng.randint(-10 ** 6, 10 ** 6), "text %d" % rng.randint(0, 99)])
    if roll < 0.75:
        return {rng.choice(KEYS) if rng.random() < 0.3 else f"k{i}": generate(rng, depth + 1)
                for i in range(rng.randint(0, 4))}
    items = [generate(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return tuple(items) if rng.random() < 0.2 else items


def canon(value):
    """Exact structure: types, NaN as NaN, insertion order."""
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    if isinstance(value, dict):
        return ("dict", [(canon(k), canon(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [canon(v) for v in value])
    if isinstance(value, np.ndarray):
        return ("ndarray", value.tolist())
    return (type(value).__name__, repr(value))


def json_only(serializer: JsonSerializer, value):
    """What the json-only serialiser (before orjson) wrote and read back."""
    text = serde._json_text(value)
    return text, serializer.loads(text)


@pytest.mark.parametrize("seed", range(40))
def test_generated_values_read_back_as_with_json_alone(seed):
    rng = random.Random(seed)
    serializer = JsonSerializer()
    for _ in range(150):
        value = generate(rng)
        try:
            expected_text, expected = json_only(serializer, value)
        except (TypeError, ValueError, RecursionError) as exc:
            with pytest.raises(type(exc)) as caught:
                serializer.dumps(value)
            assert str(caught.value) == str(exc)
            with pytest.raises(type(exc)):
                serializer.dumps_read_back(value)
            continue
        text = serializer.dumps(value)
        assert canon(serializer.loads(text)) == canon(expected), (value, text, expected_text)
        both = serializer.dumps_read_back(value)
        assert both[0] == text
        assert canon(both[1]) == canon(serializer.loads(text))
        assert canon(json.loads(text)) == canon(json.loads(expected_text))
        assert text.isascii()  # as json's: stored text fits any database encoding


@pytest.mark.parametrize("value", HAZARDS + [{k: 1} for k in KEYS] + [[1, (2, 3)]],
                         ids=lambda v: type(v).__name__)
def test_each_hazard_alone(value):
    serializer = JsonSerializer()
    try:
        expected_text, expected = json_only(serializer, value)
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            serializer.dumps(value)
        return
    text, read = serializer.dumps_read_back(value)
    assert canon(read) == canon(expected)
    assert canon(serializer.loads(text)) == canon(expected)


def test_deep_nesting_falls_back_to_json():
    value = []
    for _ in range(600):  # orjson refuses more than 254 levels; json takes them
        value = [value]
    serializer = JsonSerializer()
    text, read = serializer.dumps_read_back(value)
    assert text == serde._json_text(value)
    assert read == value


def test_the_read_back_is_a_new_object():
    value = {"a": [1, {"b": "c"}]}
    text, read = JsonSerializer().dumps_read_back(value)
    assert read == value and read is not value and read["a"] is not value["a"]


def test_compact_json_is_json_dumps():
    rng = random.Random(5)
    for _ in range(300):
        value = generate(rng)
        try:
            expected = json.dumps(value, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as exc:
            with pytest.raises(type(exc)):
                serde.compact_json(value)
            continue
        assert canon(json.loads(serde.compact_json(value))) == canon(json.loads(expected))


def test_without_orjson_json_alone(monkeypatch):
    monkeypatch.setattr(serde, "orjson", None)
    value = {"a": [1.5, "é", None], "b": {"c": True}}
    text, read = JsonSerializer().dumps_read_back(value)
    assert text == serde._json_text(value) and read == value
    assert serde.compact_json(value) == json.dumps(value, separators=(",", ":"))
