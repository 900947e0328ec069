"""A Redis outage fails no turn and loses none: turns go straight to SQL, reads
come from SQL, and Redis is refilled from SQL when it returns; a Redis that
comes back with older data never wins over newer SQL."""
import uuid

import fakeredis
import pytest
import sqlalchemy as sa
from redis import exceptions as redis_errors

from rasa_persistent_tracker import ConcurrentSaveError, PersistentTrackerStore
from tests.dialogue import run_turns, turn
from tests.servers import throwaway_redis  # noqa: F401 (fixture)


def log_texts(store, conversation_id):
    with store._log.sync.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT seq, data FROM rpt_events WHERE conversation_id=:c ORDER BY seq"),
            {"c": conversation_id}).fetchall()
    seqs = [r[0] for r in rows]
    assert seqs == list(range(1, len(seqs) + 1)), f"gaps or duplicates: {seqs}"
    return [r[1] for r in rows]


class _Down:
    """A Redis client whose server is unreachable (and a switch to bring it back)."""

    def __init__(self, inner):
        self.inner, self.down = inner, True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def eval(self, *args):
        if self.down:
            raise redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:1. "
                                               "Connection refused.")
        return await self.inner.eval(*args)


def _outage(store, backend):
    client = _Down(fakeredis.aioredis.FakeRedis(server=backend.server))
    store._hot._factory = lambda: client
    store._hot._clients = {}
    return client


@pytest.mark.parametrize("backend", ["fake"], indirect=True)  # faults go into fakeredis
@pytest.mark.parametrize("sync_log", [True, False], ids=["sync_log", "write-behind"])
async def test_turns_during_an_outage_go_to_sql_and_older_redis_never_wins(
        make_store, backend, sync_log):
    store = make_store(sync_log=sync_log)
    await run_turns(store, "u", 3)
    await store.flush()
    redis = _outage(store, backend)  # Redis keeps its (soon older) record
    for i in range(3, 6):
        tracker = await store.retrieve("u")  # from SQL
        assert tracker.get_slot("name") == f"bob {i - 1}"
        turn(tracker, i)
        await store.save(tracker)  # no turn fails
    redis.down = False  # back, holding the record of turn 2
    tracker = await store.retrieve("u")
    assert tracker.get_slot("name") == "bob 5"
    turn(tracker, 6)
    await store.save(tracker)
    await store.flush()
    texts = log_texts(store, "u")
    for i in range(7):
        assert sum(f'"my name is bob {i}"' in t for t in texts) == 1, i
    assert (await store.retrieve("u")).get_slot("name") == "bob 6"


@pytest.mark.parametrize("backend", ["fake"], indirect=True)  # faults go into fakeredis
async def test_racing_saves_during_an_outage_are_refused_in_sql(make_store, backend):
    store = make_store(sync_log=True)
    await run_turns(store, "r", 2)
    _outage(store, backend)
    first, second = await store.retrieve("r"), await store.retrieve("r")
    turn(first, 10)
    turn(second, 11)
    await store.save(first)
    with pytest.raises(ConcurrentSaveError):
        await store.save(second)
    texts = log_texts(store, "r")
    assert not any("bob 11" in t for t in texts)


@pytest.mark.servers
async def test_redis_stopped_then_restarted_empty(throwaway_redis, domain, tmp_path):
    store = PersistentTrackerStore(domain, host=throwaway_redis.url,
                                   sql_url=f"sqlite:///{tmp_path}/e.db", sync_log=True,
                                   key_prefix=f"t{uuid.uuid4().hex[:8]}", environ={},
                                   redis_socket_timeout=1)
    try:
        await run_turns(store, "a", 2)
        throwaway_redis.stop()
        tracker = await store.get_or_create_tracker("new-during-outage")
        turn(tracker, 0)
        await store.save(tracker)
        for i in range(2, 4):
            tracker = await store.retrieve("a")
            turn(tracker, i)
            await store.save(tracker)
        throwaway_redis.start()  # empty
        for cid, last in (("a", 3), ("new-during-outage", 0)):
            tracker = await store.retrieve(cid)
            assert tracker.get_slot("name") == f"bob {last}"
            turn(tracker, 9)
            await store.save(tracker)
        await store.flush()
        texts = log_texts(store, "a")
        for i in (0, 1, 2, 3, 9):
            assert sum(f'"my name is bob {i}"' in t for t in texts) == 1, i
        assert len(log_texts(store, "new-during-outage")) > 0
    finally:
        throwaway_redis.start()
        await store.close()


class _DiesAfterCommit(_Down):
    """Redis takes the commit, then fails (and loses its data) before delivery."""

    def __init__(self, inner, server):
        super().__init__(inner)
        self.down, self.server, self.fired = False, server, False

    async def eval(self, script, *args):
        if "LRANGE" in script and not self.fired:
            self.down = self.fired = True
            await self.inner.flushall()
        return await super().eval(script, *args)


@pytest.mark.parametrize("backend", ["fake"], indirect=True)  # faults go into fakeredis
async def test_write_through_survives_redis_failing_right_after_the_commit(make_store, backend):
    store = make_store(sync_log=True)
    await run_turns(store, "w", 2)
    client = _DiesAfterCommit(fakeredis.aioredis.FakeRedis(server=backend.server),
                              backend.server)
    store._hot._factory = lambda: client
    store._hot._clients = {}
    tracker = await store.retrieve("w")
    turn(tracker, 5)
    await store.save(tracker)  # answered: so it must be stored
    texts = log_texts(store, "w")
    assert sum('"my name is bob 5"' in t for t in texts) == 1
    client.down = False  # back, empty
    assert (await store.retrieve("w")).get_slot("name") == "bob 5"


@pytest.mark.parametrize("backend", ["fake"], indirect=True)  # faults go into fakeredis
async def test_write_through_when_a_restarted_redis_hands_back_an_empty_outbox(
        make_store, backend):
    store = make_store(sync_log=True)
    await run_turns(store, "e", 2)
    inner = fakeredis.aioredis.FakeRedis(server=backend.server)

    class _RestartsBeforeDelivery:
        def __getattr__(self, name):
            return getattr(inner, name)

        async def eval(self, script, *args):
            if "LRANGE" in script:  # delivery's read: Redis restarted since the commit
                await inner.flushall()
            return await inner.eval(script, *args)

    store._hot._factory = _RestartsBeforeDelivery
    store._hot._clients = {}
    tracker = await store.retrieve("e")
    turn(tracker, 5)
    await store.save(tracker)
    assert sum('"my name is bob 5"' in t for t in log_texts(store, "e")) == 1
