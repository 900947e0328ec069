"""The ``HotState`` contract, run unchanged against every hot-state backend.

fakeredis, real Redis (REDIS_URL), Redis Cluster and Sentinel (throwaway
servers, tests/servers.py) and the embedded SQLite store. Covers load,
save-if-version (conflicts), outbox take + ack, TTL expiry, quarantine and
the atomicity of a save. A missing server skips locally and fails in CI
(``real_urls`` / tests/servers.py).
"""
import asyncio
import os
import sqlite3
import uuid
from typing import Any, Callable, List, Optional

import fakeredis
import pytest
import redis

from rasa_persistent_tracker.backends import open_hot_state
from rasa_persistent_tracker.config import parse_config
from rasa_persistent_tracker.errors import ConcurrentSaveError
from rasa_persistent_tracker.hot.embedded import SQLiteHotState
from rasa_persistent_tracker.hot.entry_header import make_header
from rasa_persistent_tracker.hot.protocol import Erased, HotState, RecordMissing, payload_digest
from rasa_persistent_tracker.hot.redis_keys import KeyNames
from rasa_persistent_tracker.hot.redis_state import RedisHotState
from tests.conftest import real_urls

OUTBOX_TTL = 3600.0
DAY = 86400.0


class Clock:
    """An injected clock (embedded store); Redis expires keys on its own time."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class UnderTest:
    """One backend: the hot state, plus fault injection and time travel."""

    def __init__(self, kind: str, hot: HotState, prefix: str,
                 sync_client: Optional[Callable[[], Any]] = None,
                 path: Optional[str] = None, clock: Optional[Clock] = None) -> None:
        self.kind, self.hot, self.prefix = kind, hot, prefix
        self._sync_client, self._path, self._clock = sync_client, path, clock

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store's expiry."""
        if self._clock is not None:
            self._clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    def break_record(self, conversation_id: str) -> None:
        """Make the stored record unusable (a value the store did not write)."""
        if self._path is not None:
            conn = sqlite3.connect(self._path)
            conn.execute("UPDATE rpt_hot SET version='garbage' WHERE conversation_id=?",
                         (conversation_id,))
            conn.commit()
            conn.close()
            return
        client = self._sync_client()
        key = KeyNames(self.prefix).record(conversation_id)
        client.delete(key)
        client.set(key, "not a hash")
        client.close()

    async def cleanup(self) -> None:
        await self.hot.close()
        if self._sync_client is not None:
            client = self._sync_client()
            for key in client.scan_iter(match=f"{self.prefix}:*"):
                client.delete(key)
            client.close()


def _redis_hot(url: str, prefix: str, tmp_path: Any) -> HotState:
    config = parse_config({"host": url, "key_prefix": prefix,
                           "sql_url": f"sqlite:///{tmp_path}/unused.sqlite3"}, environ={})
    return open_hot_state(config)


@pytest.fixture(params=[
    "fake",
    "embedded",
    pytest.param("real", marks=pytest.mark.real),
    pytest.param("cluster", marks=pytest.mark.servers),
    pytest.param("sentinel", marks=pytest.mark.servers),
])
async def backend(request, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:10]}"
    kind = request.param
    if kind == "fake":
        server = fakeredis.FakeServer()
        under = UnderTest(kind, RedisHotState(
            lambda: fakeredis.aioredis.FakeRedis(server=server), prefix, OUTBOX_TTL), prefix,
            sync_client=lambda: fakeredis.FakeRedis(server=server))
    elif kind == "embedded":
        clock, path = Clock(), os.path.join(str(tmp_path), "hot.sqlite3")
        under = UnderTest(kind, SQLiteHotState(path, OUTBOX_TTL, clock=clock), prefix,
                          path=path, clock=clock)
    elif kind == "real":
        url = real_urls()["redis"]
        under = UnderTest(kind, _redis_hot(url, prefix, tmp_path), prefix,
                          sync_client=lambda: redis.Redis.from_url(url))
    else:
        servers = request.getfixturevalue(f"redis_{kind}")
        under = UnderTest(kind, _redis_hot(servers.url, prefix, tmp_path), prefix,
                          sync_client=servers.client)
    yield under
    await under.cleanup()


def entry(seq: int, body: str = "rows") -> str:
    """An outbox entry as the hot state sees it (it reads only the header)."""
    return f"{make_header(seq, 1.5)}|{body}"


async def entries_of(hot: HotState, cid: str) -> List[str]:
    return (await hot.pending(cid, 1000)).entries


async def ids(found) -> List[str]:
    return sorted([cid async for cid in found])


# ------------------------------------------------------------------- load

async def test_unknown_conversation_loads_empty(backend):
    loaded = await backend.hot.load("nobody")
    assert (loaded.version, loaded.payload, loaded.problem, loaded.outbox_seq,
            loaded.unchanged) == (0, None, None, 0, False)
    assert await entries_of(backend.hot, "nobody") == []


async def test_commit_then_load_and_known_digest(backend):
    hot = backend.hot
    assert await hot.commit("a", None, "record-1", DAY, entry(3)) == 1
    loaded = await hot.load("a")
    assert (loaded.version, loaded.payload, loaded.outbox_seq) == (1, "record-1", 3)
    same = await hot.load("a", known=payload_digest("record-1"))
    # Skipping a known payload is an optimisation: servers without
    # redis.sha1hex (fakeredis) send it anyway, never a wrong "unchanged".
    if same.unchanged or backend.kind != "fake":
        assert same.unchanged and same.payload is None and same.version == 1
    else:
        assert (same.payload, same.version) == ("record-1", 1)
    other = await hot.load("a", known=payload_digest("something else"))
    assert not other.unchanged and other.payload == "record-1"
    assert await ids(hot.conversations()) == ["a"]


# ------------------------------------------------------- save-if-version

async def test_save_if_version(backend):
    hot = backend.hot
    assert await hot.commit("v", 0, "r1", DAY, None) == 1  # expected 0: new
    assert await hot.commit("v", 1, "r2", DAY, None) == 2
    with pytest.raises(ConcurrentSaveError):
        await hot.commit("v", 1, "stale", DAY, entry(9))
    assert await hot.commit("v", None, "r3", DAY, None) == 3  # None: any version
    loaded = await hot.load("v")
    assert (loaded.version, loaded.payload) == (3, "r3")


async def test_a_lost_record_continues_from_the_expected_version(backend):
    # A record restored after it was lost keeps counting from the version the
    # saver read, so older trackers still conflict.
    assert await backend.hot.commit("gone", 7, "r", DAY, None) == 8


async def test_a_commit_expecting_its_record_refuses_a_lost_one(backend):
    # (expect_record: a wipe during the turn took the outbox too; the store
    # logs the lost rows again first.) Nothing is written.
    hot = backend.hot
    with pytest.raises(RecordMissing):
        await hot.commit("wiped", 4, "r", DAY, entry(9), expect_record=True)
    loaded = await hot.load("wiped")
    assert (loaded.payload, loaded.outbox_seq) == (None, 0)
    assert await hot.commit("there", None, "r1", DAY, None) == 1
    assert await hot.commit("there", 1, "r2", DAY, None, expect_record=True) == 2


# ------------------------------------------------------------- erasure

async def test_erase_leaves_a_tombstone_that_refuses_late_commits(backend):
    hot = backend.hot
    for version in range(3):
        await hot.commit("+4917011", version, f"r{version}", DAY, entry(version + 1))
    await hot.commit("other", None, "o1", DAY, entry(1))
    removed = await hot.erase("+4917011", 1, DAY)
    assert (removed.floor, removed.record, removed.outbox_entries) == (3, True, 3)
    loaded = await hot.load("+4917011")
    assert (loaded.payload, loaded.outbox_seq) == (None, 0)
    assert await entries_of(hot, "+4917011") == []
    assert await hot.tombstone("+4917011") == 3 and await hot.tombstone("other") is None
    # A tracker read before the erasure: refused, nothing written.
    for expected, expect_record in ((3, True), (2, False), (1, True)):
        with pytest.raises(Erased):
            await hot.commit("+4917011", expected, "late", DAY, entry(9), expect_record)
    # A record restored from SQL data read before the erasure: refused too.
    with pytest.raises(Erased):
        await hot.commit("+4917011", 0, "restored", DAY, None, restoring=True)
    assert (await hot.load("+4917011")).payload is None
    # A new conversation under the id counts on from the floor.
    assert await hot.commit("+4917011", None, "new-1", DAY, entry(1)) == 4
    with pytest.raises(ConcurrentSaveError):
        await hot.commit("+4917011", 3, "late", DAY, entry(9), expect_record=True)
    assert (await hot.load("other")).payload == "o1"
    # A floor given from elsewhere (the SQL snapshot's version) is kept.
    assert (await hot.erase("+4917011", 10, DAY)).floor == 10
    assert await hot.commit("+4917011", 0, "newer", DAY, None) == 11
    assert await hot.commit("restored", 0, "r", DAY, None, restoring=True) == 1


async def test_an_erase_conditional_on_a_version_skips_a_changed_record(backend):
    hot = backend.hot
    await hot.commit("cond", None, "r1", DAY, None)
    assert (await hot.erase("cond", 0, DAY, only_at_version=0)).floor is None
    await hot.commit("cond", 1, "r2", DAY, None)
    assert (await hot.erase("cond", 0, DAY, only_at_version=1)).floor is None
    assert (await hot.load("cond")).payload == "r2" and await hot.tombstone("cond") is None
    assert (await hot.erase("cond", 0, DAY, only_at_version=2)).floor == 2
    assert (await hot.erase("never", 0, DAY, only_at_version=0)).floor == 0


async def test_tombstone_keys_never_name_the_conversation(backend):
    if backend.kind == "embedded":
        conn = sqlite3.connect(backend._path)
        await backend.hot.erase("+4917012", 0, DAY)
        names = [r[0] for r in conn.execute("SELECT name FROM rpt_erased")]
        conn.close()
    else:
        await backend.hot.erase("+4917012", 0, DAY)
        client = backend._sync_client()
        names = [k.decode() for k in client.scan_iter(match=f"{backend.prefix}:*")]
        client.close()
    assert len(names) == 1 and "4917012" not in names[0]


def test_a_tombstone_key_is_in_its_records_cluster_slot():
    from redis.crc import key_slot
    names = KeyNames("rpt")
    for i in range(3000):
        cid = ["+49170%d" % i, "}odd{%d" % i, "user-%d@example.org" % i, "ü%d" % i][i % 4]
        tombstone = names.tombstone(cid, uuid.uuid5(uuid.NAMESPACE_OID, cid).hex)
        assert key_slot(tombstone.encode()) == key_slot(names.record(cid).encode()), cid


# ------------------------------------------------------------- atomicity

async def test_a_conflicting_save_writes_nothing(backend):
    hot = backend.hot
    await hot.commit("c", None, "r1", DAY, entry(1))
    with pytest.raises(ConcurrentSaveError):
        await hot.commit("c", 0, "r-conflict", DAY, entry(2))
    loaded = await hot.load("c")
    assert (loaded.version, loaded.payload, loaded.outbox_seq) == (1, "r1", 1)
    assert await entries_of(hot, "c") == [entry(1)]


async def test_racing_saves_one_wins_with_its_entry(backend):
    hot = backend.hot
    await hot.commit("race", None, "r0", DAY, None)
    results = await asyncio.gather(
        *(hot.commit("race", 1, f"r-{i}", DAY, entry(10 + i)) for i in range(5)),
        return_exceptions=True)
    winners = [i for i, r in enumerate(results) if r == 2]
    assert len(winners) == 1
    assert all(isinstance(r, ConcurrentSaveError) for i, r in enumerate(results)
               if i not in winners)
    loaded = await hot.load("race")
    assert loaded.payload == f"r-{winners[0]}"
    assert await entries_of(hot, "race") == [entry(10 + winners[0])]


# ------------------------------------------------------ outbox take + ack

async def test_outbox_take_in_order_and_ack(backend):
    hot = backend.hot
    for version, seq in enumerate((3, 5, 7)):
        await hot.commit("o", version or None, f"r{seq}", DAY, entry(seq))
    taken = await hot.pending("o", 10)
    assert taken.entries == [entry(3), entry(5), entry(7)]
    assert (taken.payload, taken.version, taken.complete) == ("r7", 3, True)
    first_two = await hot.pending("o", 2)
    assert first_two.entries == [entry(3), entry(5)] and not first_two.complete
    assert await ids(hot.outboxes()) == ["o"]
    assert await hot.ack("o", 5) == 2
    assert await entries_of(hot, "o") == [entry(7)]
    assert (await hot.load("o")).outbox_seq == 7
    assert await hot.ack("o", 6) == 0  # an entry is acknowledged whole or not at all
    assert await hot.ack("o", 7) == 1
    assert await entries_of(hot, "o") == []
    assert await ids(hot.outboxes()) == []
    loaded = await hot.load("o")  # acknowledging never touches the record
    assert (loaded.version, loaded.payload) == (3, "r7")


async def test_quarantine_one_entry_keeps_the_others(backend):
    hot = backend.hot
    for seq in (1, 2, 3):
        await hot.commit("q", None, "r", DAY, entry(seq, body=f"body-{seq}"))
    where = await hot.quarantine_entry("q", entry(2, body="body-2"), OUTBOX_TTL)
    assert where
    assert await entries_of(hot, "q") == [entry(1, body="body-1"), entry(3, body="body-3")]


# ------------------------------------------------------------- TTL expiry

async def test_record_expires_and_touch_extends(backend):
    hot = backend.hot
    await hot.commit("short", None, "r", 0.4, None)
    await hot.commit("touched", None, "r", 0.4, None)
    await hot.touch("touched", DAY)
    await backend.pass_time(0.7)
    assert (await hot.load("short")).payload is None
    assert (await hot.load("touched")).payload == "r"
    assert await ids(hot.conversations()) == ["touched"]


# ------------------------------------------------------------- quarantine

async def test_unusable_record_is_reported_and_quarantined(backend):
    hot = backend.hot
    await hot.commit("bad", None, "r1", DAY, entry(4))
    backend.break_record("bad")
    loaded = await hot.load("bad")
    assert loaded.problem and loaded.payload is None
    assert loaded.outbox_seq == 4  # the outbox is still read
    where = await hot.quarantine("bad", OUTBOX_TTL)
    assert where
    assert await hot.quarantine("bad", OUTBOX_TTL) is None  # nothing left to move
    moved = await hot.load("bad")
    assert moved.problem is None and moved.payload is None
    assert await hot.commit("bad", None, "r2", DAY, entry(5)) >= 1
    assert (await hot.load("bad")).payload == "r2"
    assert await entries_of(hot, "bad") == [entry(4), entry(5)]
