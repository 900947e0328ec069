"""Hot-state faults that must never surface as a raw error or a lost turn:
an outbox key of the wrong type, Cluster pool exhaustion, ids that would break
the hash tag, a commit whose connection broke or whose reply was lost, and a
Redis restart under a pool of connections opened before it."""
import asyncio
import logging
import uuid

import fakeredis
import pytest
import sqlalchemy as sa
from redis import exceptions as redis_errors
from rasa.shared.core.events import UserUttered
from redis.crc import key_slot

from rasa_persistent_tracker import HotStateBusy, HotStateUnavailable, PersistentTrackerStore
from rasa_persistent_tracker.hot.redis_keys import KeyNames, key_tag, tag_id
from rasa_persistent_tracker.hot.redis_state import RedisHotState
from rasa_persistent_tracker.log import direct
from tests.conftest import TOPOLOGIES, open_backend
from tests.dialogue import run_turns, turn
from tests.servers import throwaway_redis  # noqa: F401 (fixture)


def logged_seqs(store, conversation_id):
    with store._log.sync.engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text(
            "SELECT seq FROM rpt_events WHERE conversation_id=:c ORDER BY seq"),
            {"c": conversation_id})]


async def test_outbox_of_wrong_type_is_moved_aside_and_saves_go_on(make_store, backend, caplog):
    store = make_store()
    await run_turns(store, "alice", 1)
    await store.flush()
    client = backend.redis_client()
    outbox = f"{backend.prefix}:o:{{alice}}"
    client.set(outbox, b"not a list")
    caplog.set_level(logging.WARNING)
    for i in range(2):  # every later save works, not just the first
        tracker = await store.retrieve("alice")
        turn(tracker, 10 + i)
        await store.save(tracker)
    await store.flush()
    seqs = logged_seqs(store, "alice")
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 5 + 5
    kept = [k for k in client.scan_iter(match=f"{backend.prefix}:q:*")]
    assert len(kept) == 1 and client.get(kept[0]) == b"not a list"
    assert any("wrong Redis type" in r.getMessage() for r in caplog.records)
    assert not any("not a list" in r.getMessage() for r in caplog.records)


class _Exhausted:
    """A Cluster client whose pool is exhausted: redis-py raises at once."""

    def __init__(self, free_after: int = 10 ** 9) -> None:
        self.calls = 0
        self.free_after = free_after

    async def eval(self, *args):
        self.calls += 1
        if self.calls <= self.free_after:
            raise redis_errors.MaxConnectionsError()
        return [b"none", None, None, b"0", 0]


async def test_cluster_pool_exhaustion_waits_then_is_busy_not_an_outage():
    client = _Exhausted()
    hot = RedisHotState(lambda: client, "p", 60.0, busy_wait=0.3)
    with pytest.raises(HotStateBusy):
        await hot.load("alice")
    assert client.calls > 2  # it waited for a connection instead of giving up at once


async def test_cluster_pool_exhaustion_that_clears_is_not_an_error():
    client = _Exhausted(free_after=3)
    hot = RedisHotState(lambda: client, "p", 60.0, busy_wait=5.0)
    entry = await hot.load("alice")
    assert entry.payload is None and entry.problem is None


@pytest.mark.parametrize("conversation_id", [
    "}alice", "}x{", "", "{a}", "a{b}c", "=deadbeef", "\ud800visitor", "plain", "ünï cødé"])
def test_every_key_of_a_conversation_shares_one_slot(conversation_id):
    names = KeyNames("rpt")
    keys = [names.record(conversation_id), names.outbox(conversation_id),
            names.quarantine(conversation_id, "1-abc")]
    slots = {key_slot(k.encode("utf-8")) for k in keys}
    assert len(slots) == 1, keys
    assert tag_id(key_tag(conversation_id)) == conversation_id
    head = "rpt:h:{"
    assert names.conversation_of("h", keys[0]) == conversation_id and keys[0].startswith(head)


def test_plain_ids_keep_their_old_keys():
    assert KeyNames("rpt").record("alice") == "rpt:h:{alice}"


@pytest.fixture(params=TOPOLOGIES[:1])
async def cluster(request, tmp_path):
    async for pair in open_backend(request, tmp_path):
        yield pair


@pytest.mark.parametrize("conversation_id", ["}alice", "}x{", "", "\ud800visitor"])
async def test_ids_that_break_a_hash_tag_work_on_cluster(cluster, domain, conversation_id):
    store = cluster.make_store(domain)
    if conversation_id.startswith("\ud800"):
        assert await store.retrieve(conversation_id) is None  # not storable in SQL: never saved
        return
    await run_turns(store, conversation_id, 3)
    tracker = await store.retrieve(conversation_id)
    assert tracker.get_slot("name") == "bob 2"
    await store.flush()
    assert len(logged_seqs(store, conversation_id)) > 0
    assert conversation_id in list(await store.keys())


class _LosesReplies:
    """A client that runs the first N commits but loses their replies, as a
    connection that breaks after sending does."""

    def __init__(self, inner, lose: int, before: bool = False) -> None:
        self.inner, self.lose, self.before = inner, lose, before

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def eval(self, script, numkeys, *rest):
        if "HSET" in script and self.lose:
            self.lose -= 1
            if not self.before:
                await self.inner.eval(script, numkeys, *rest)
            raise redis_errors.ConnectionError("Connection closed by server.")
        return await self.inner.eval(script, numkeys, *rest)


@pytest.mark.parametrize("backend", ["fake"], indirect=True)  # faults go into fakeredis
@pytest.mark.parametrize("applied", [True, False], ids=["reply-lost", "never-sent"])
async def test_commit_retried_after_a_broken_connection_applies_once(make_store, backend, applied):
    store = make_store()
    await run_turns(store, "bob", 1)
    inner = fakeredis.aioredis.FakeRedis(server=backend.server)
    store._hot._factory = lambda: _LosesReplies(inner, lose=1, before=not applied)
    store._hot._clients = {}
    tracker = await store.retrieve("bob")
    version = store._records.loaded(tracker).version
    turn(tracker, 7)
    await store.save(tracker)  # neither an error nor a conflict
    assert store._records.loaded(tracker).version == version + 1
    await store.flush()
    seqs = logged_seqs(store, "bob")
    assert seqs == list(range(1, len(seqs) + 1))
    again = await store.retrieve("bob")
    assert again.get_slot("name") == "bob 7"
    assert [e.as_dict().get("text") for e in again.events].count("my name is bob 7") == 1


@pytest.mark.parametrize("backend", ["fake"], indirect=True)  # faults go into fakeredis
async def test_commit_error_names_the_underlying_cause(make_store, backend, caplog,
                                                      monkeypatch):
    store = make_store()
    await run_turns(store, "carol", 1)
    inner = fakeredis.aioredis.FakeRedis(server=backend.server)
    store._hot._factory = lambda: _LosesReplies(inner, lose=100, before=True)
    store._hot._clients = {}
    tracker = await store.retrieve("carol")
    turn(tracker, 1)
    caplog.set_level(logging.WARNING)
    await store.save(tracker)  # Redis keeps failing: the turn goes to SQL
    assert any("Connection closed by server" in r.getMessage() for r in caplog.records)
    # With SQL down as well, the error itself names both causes.
    tracker = await store.retrieve("carol")
    turn(tracker, 2)
    def sql_down(*_args):
        raise sa.exc.OperationalError("INSERT", {}, Exception("could not connect"))

    monkeypatch.setattr(direct, "commit", sql_down)
    with pytest.raises(HotStateUnavailable) as raised:
        await store.save(tracker)
    assert "Connection closed by server" in str(raised.value)


@pytest.mark.servers
async def test_save_after_a_redis_restart_uses_a_fresh_connection(throwaway_redis, domain, tmp_path):
    store = PersistentTrackerStore(domain, host=throwaway_redis.url, sql_url=f"sqlite:///{tmp_path}/e.db",
                                   key_prefix=f"t{uuid.uuid4().hex[:8]}", environ={},
                                   sync_log=True)
    try:
        # Several conversations at once, so the pool holds several connections.
        await asyncio.gather(*(run_turns(store, f"u{i}", 2) for i in range(4)))
        trackers = [await store.retrieve(f"u{i}") for i in range(4)]
        throwaway_redis.restart()
        for i, tracker in enumerate(trackers):
            turn(tracker, 50 + i)
        await asyncio.gather(*(store.save(t) for t in trackers))  # none fails
        await store.flush()
        for i in range(4):
            seqs = logged_seqs(store, f"u{i}")
            assert seqs == list(range(1, len(seqs) + 1))
            again = await store.retrieve(f"u{i}")
            assert again.get_slot("name") == f"bob {50 + i}"
            texts = [e.as_dict().get("text") for e in again.events]
            assert texts.count(f"my name is bob {50 + i}") == 1
    finally:
        await store.close()


@pytest.mark.servers
async def test_scripts_run_by_sha_and_survive_a_script_flush(throwaway_redis, domain, tmp_path):
    """The hot state's scripts go as EVALSHA on idle connections
    (redis_client.py); a Redis that forgot them (restart, SCRIPT FLUSH)
    gets them again with EVAL, and no turn notices."""
    store = PersistentTrackerStore(domain, host=throwaway_redis.url,
                                   sql_url=f"sqlite:///{tmp_path}/f.db",
                                   key_prefix=f"t{uuid.uuid4().hex[:8]}", environ={})
    client = throwaway_redis.client()

    async def turns(numbers):
        for i in numbers:
            tracker = await store.get_or_create_tracker("s")
            turn(tracker, i)
            await store.save(tracker)
    try:
        await turns(range(3))
        client.config_resetstat()
        await turns(range(3, 6))
        stats = client.info("commandstats")
        by_sha = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        by_text = stats.get("cmdstat_eval", {}).get("calls", 0)
        assert by_sha >= 6 and by_text == 0, stats
        client.script_flush()
        await turns(range(6, 8))
        assert client.info("commandstats")["cmdstat_eval"]["calls"] >= 1  # loaded again
        await store.flush()
        seqs = logged_seqs(store, "s")
        assert seqs == list(range(1, len(seqs) + 1))
        full = await store.retrieve_full_tracker("s")
        assert [e.text for e in full.events if isinstance(e, UserUttered)] == [
            f"my name is bob {i}" for i in range(8)]  # every turn, once
        assert (await store.retrieve("s")).get_slot("name") == "bob 7"
    finally:
        client.close()
        await store.close()


@pytest.mark.servers
async def test_health_checks_asked_for_in_the_url_keep_redis_pys_path(throwaway_redis, domain,
                                                                       tmp_path):
    """``health_check_interval`` in the URL: every call takes redis-py's own
    path (which runs the checks), so scripts go as EVAL, never EVALSHA."""
    store = PersistentTrackerStore(domain, host=f"{throwaway_redis.url}?health_check_interval=30",
                                   sql_url=f"sqlite:///{tmp_path}/h.db",
                                   key_prefix=f"t{uuid.uuid4().hex[:8]}", environ={})
    client = throwaway_redis.client()
    try:
        await run_turns(store, "h", 2)
        client.config_resetstat()
        await run_turns(store, "h", 2)
        stats = client.info("commandstats")
        assert stats.get("cmdstat_evalsha", {}).get("calls", 0) == 0, stats
        assert stats["cmdstat_eval"]["calls"] >= 4
    finally:
        client.close()
        await store.close()
