"""``pack_script_call`` writes exactly the bytes redis-py's ``pack_command``
writes for ``EVALSHA`` (the hot state's scripts go through it), for every
kind of argument the store passes and the ones it must refuse."""
import random

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from rasa_persistent_tracker.redis_client import pack_script_call, script_sha

SHA = script_sha("return 1")


def _connection(**kwargs) -> Connection:
    return Connection(host="127.0.0.1", port=1, **kwargs)  # never connected


def _expected(connection: Connection, numkeys: int, args) -> bytes:
    return b"".join(bytes(part) for part in connection.pack_command(
        "EVALSHA", SHA, numkeys, *args))


def _random_arg(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(rng.choice("ab{}:\r\n é漢🙂") for _ in range(rng.randrange(12)))
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 2:
        return rng.choice([0, -1, 1, 2 ** 63, -(2 ** 70), rng.randrange(-10 ** 6, 10 ** 6)])
    if kind == 3:
        return rng.choice([0.5, -3.25, 1e-9, 12345.0])
    if kind == 4:  # large: redis-py splits these into separate chunks
        return rng.randbytes(rng.choice([5999, 6000, 6001, 70000]))
    if kind == 5:
        return memoryview(rng.randbytes(rng.randrange(1, 9000)))
    if kind == 6:
        return "x" * rng.choice([0, 6000, 20000])
    return ""


@pytest.mark.parametrize("seed", range(40))
def test_same_bytes_as_pack_command(seed):
    rng = random.Random(seed)
    connection = _connection()
    args = [_random_arg(rng) for _ in range(rng.randrange(0, 14))]
    numkeys = rng.randrange(0, len(args) + 1)
    assert pack_script_call(connection.encoder, SHA, numkeys, args) == _expected(
        connection, numkeys, args)


def test_other_encoding_as_the_connection_has_it():
    connection = _connection(encoding="latin-1")
    args = ["café", b"\xff", 7]
    assert pack_script_call(connection.encoder, SHA, 1, args) == _expected(connection, 1, args)


@pytest.mark.parametrize("bad", [True, False, None, object()])
def test_refuses_what_redis_py_refuses(bad):
    connection = _connection()
    with pytest.raises(DataError):
        connection.pack_command("EVALSHA", SHA, 0, bad)
    with pytest.raises(DataError):
        pack_script_call(connection.encoder, SHA, 0, [bad])


def test_unencodable_text_refused_like_redis_py():
    connection = _connection()
    with pytest.raises(UnicodeEncodeError):
        connection.pack_command("EVALSHA", SHA, 0, "\udc80")
    with pytest.raises(UnicodeEncodeError):
        pack_script_call(connection.encoder, SHA, 0, ["\udc80"])
