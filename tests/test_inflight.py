"""``inflight.meanwhile`` on a real Redis: the work runs once the request is
written and before its reply is read, exactly once, in the caller's task;
its failure never costs the call, and a work that escapes with a
``BaseException`` leaves no unread reply on a pooled connection."""
import asyncio
import time

import pytest

from rasa_persistent_tracker import inflight
from rasa_persistent_tracker.redis_client import CountingPool, PooledRedis
from tests.conftest import real_urls

# A script that keeps Redis busy for about ``ARGV[1]`` milliseconds.
BUSY = """
local stop = redis.call('TIME')
local until_us = (tonumber(stop[1]) * 1000000 + tonumber(stop[2])) + tonumber(ARGV[1]) * 1000
while true do
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000000 + tonumber(now[2]) >= until_us then break end
end
return ARGV[2]
"""


@pytest.fixture
async def client():
    pool = CountingPool.from_url(real_urls()["redis"], max_connections=2, timeout=1)
    redis = PooledRedis(connection_pool=pool)
    await redis.run_script(BUSY, 0, 0, "warm")  # an idle connection in the pool
    yield redis
    await redis.close()


async def test_work_runs_during_the_round_trip(client):
    seen = []
    started = time.perf_counter()

    def work():
        seen.append(time.perf_counter() - started)
        return "done"
    reply, outcome = await inflight.meanwhile(client.run_script(BUSY, 0, 200, "r1"), work)
    took = time.perf_counter() - started
    assert reply == b"r1" and outcome.result() == "done"
    assert len(seen) == 1
    assert took >= 0.2 and seen[0] < 0.1  # long before Redis replied


async def test_work_runs_once_when_redis_lost_its_scripts(client):
    await client.script_flush()  # EVALSHA fails, EVAL sends the script again
    calls = []
    reply, outcome = await inflight.meanwhile(client.run_script(BUSY, 0, 0, "r2"),
                                              lambda: calls.append(1) or len(calls))
    assert reply == b"r2" and outcome.result() == 1 and calls == [1]


async def test_a_call_that_never_sends_runs_the_work_after_it():
    order = []

    async def call():
        await asyncio.sleep(0.01)
        order.append("call")
        return "r"
    reply, outcome = await inflight.meanwhile(call(), lambda: order.append("work"))
    assert reply == "r" and order == ["call", "work"] and outcome.result() is None


async def test_a_failing_work_is_kept_and_the_call_still_answers(client):
    def work():
        raise ValueError("broken work")
    reply, outcome = await inflight.meanwhile(client.run_script(BUSY, 0, 0, "r3"), work)
    assert reply == b"r3"
    with pytest.raises(ValueError, match="broken work"):
        outcome.result()


class _Escape(BaseException):
    pass


async def test_a_work_escaping_leaves_no_unread_reply_behind(client):
    def work():
        raise _Escape()
    with pytest.raises(_Escape):
        await inflight.meanwhile(client.run_script(BUSY, 0, 50, "stale"), work)
    # Every later call reads its own reply, never "stale", on either connection.
    for i in range(6):
        assert await client.run_script(BUSY, 0, 0, f"fresh {i}") == f"fresh {i}".encode()


async def test_a_cancelled_caller_leaves_no_unread_reply_behind(client):
    ran = []
    task = asyncio.ensure_future(
        inflight.meanwhile(client.run_script(BUSY, 0, 300, "late"), lambda: ran.append(1)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == [1]
    for i in range(6):
        assert await client.run_script(BUSY, 0, 0, f"next {i}") == f"next {i}".encode()


async def test_the_work_is_not_run_by_a_later_call(client):
    calls = []
    await inflight.meanwhile(client.run_script(BUSY, 0, 0, "a"), lambda: calls.append(1))
    await client.run_script(BUSY, 0, 0, "b")  # outside any meanwhile
    assert calls == [1]


async def test_concurrent_meanwhiles_each_run_their_own_work(client):
    got = {}

    async def one(i):
        return await inflight.meanwhile(client.run_script(BUSY, 0, 20, f"c{i}"),
                                        lambda: got.setdefault(i, []).append(i) or i)
    results = await asyncio.gather(*(one(i) for i in range(5)))  # more than the pool holds
    assert [r.decode() for r, _ in results] == [f"c{i}" for i in range(5)]
    assert [o.result() for _, o in results] == list(range(5))
    assert got == {i: [i] for i in range(5)}
