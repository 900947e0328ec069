"""What is particular to Redis Cluster and Sentinel, including a failover.

The contract suite itself also runs on both (tests/test_store_contract.py);
this module covers keys spread over nodes, same-slot quarantine, delivery, and
killing the master.

Each test owns a key prefix (removed afterwards) and a SQLite event log in its
tmp_path; the servers are the throwaway ones of tests/servers.py.
"""
import asyncio
import logging
import time
import uuid
from typing import Any, List

import pytest
import sqlalchemy as sa
from rasa.shared.core.events import ActionExecuted, BotUttered, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

from tests.dialogue import run_turns, turn, user  # noqa: F401
from rasa_persistent_tracker import (
    ConcurrentSaveError,
    HotStateUnavailable,
    PersistentTrackerStore,
)
from tests.servers import redis_cluster, redis_sentinel, redis_sentinel_failover  # noqa: F401

pytestmark = pytest.mark.servers
CLOSE_TIMEOUT = 20.0


class Setup:
    """Stores of one test on one topology, with a unique prefix and SQL file."""

    def __init__(self, servers: Any, tmp_path: Any, domain: Any) -> None:
        self.servers = servers
        self.domain = domain
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.sql_url = f"sqlite:///{tmp_path}/e.sqlite3"
        self.stores: List[PersistentTrackerStore] = []
        self.client = servers.client()

    def make_store(self, **overrides: Any) -> PersistentTrackerStore:
        store = PersistentTrackerStore(self.domain, host=self.servers.url,
                                       key_prefix=self.prefix, sql_url=self.sql_url,
                                       environ={}, **overrides)
        self.stores.append(store)
        return store

    def key(self, kind: str, conversation_id: str) -> str:
        return f"{self.prefix}:{kind}:{{{conversation_id}}}"

    def keys(self, pattern: str = "*") -> List[bytes]:
        return list(self.client.scan_iter(match=f"{self.prefix}:{pattern}"))

    def log_seqs(self, conversation_id: str) -> List[int]:
        engine = sa.create_engine(self.sql_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(
                    "select seq from rpt_events where conversation_id = :c order by seq"),
                    {"c": conversation_id}).scalars())
        finally:
            engine.dispose()

    async def cleanup(self) -> None:
        hung = 0
        for store in self.stores:
            # A hang here must fail this test, not block the whole run.
            closing = asyncio.ensure_future(store.close())
            done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)
            if not done:
                hung += 1
                closing.cancel()
                await asyncio.wait({closing}, timeout=5)
        for key in self.keys():
            self.client.delete(key)
        self.client.close()
        if hung:
            pytest.fail(f"{hung} store.close() call(s) did not return within {CLOSE_TIMEOUT}s")


@pytest.fixture(params=["cluster", "sentinel"])
async def setup(request, tmp_path, domain):
    servers = request.getfixturevalue(f"redis_{request.param}")
    made = Setup(servers, tmp_path, domain)
    yield made
    await made.cleanup()


@pytest.fixture
async def failover_setup(redis_sentinel_failover, tmp_path, domain):
    made = Setup(redis_sentinel_failover, tmp_path, domain)
    yield made
    await made.cleanup()


async def test_keys_and_exists_cover_every_node(setup):
    store = setup.make_store()
    ids = [f"k{i}" for i in range(12)]
    for cid in ids:
        await run_turns(store, cid, 1)
    if hasattr(setup.client, "get_node_from_key"):  # cluster: spread over all masters
        owners = {setup.client.get_node_from_key(setup.key("h", cid)).port for cid in ids}
        assert owners == set(setup.servers.ports)
    await store.flush()
    setup.client.delete(setup.key("h", "k3"))  # only in the SQL log now
    assert sorted(await store.keys()) == sorted(ids)
    assert await store.exists("k0") and await store.exists("k3")
    assert not await store.exists("nope")


async def test_corrupt_record_is_quarantined_in_the_same_slot(setup, caplog):
    store = setup.make_store()
    await run_turns(store, "x1", 2)
    await store.flush()
    garbage = b"\x00\xff garbage"
    setup.client.hset(setup.key("h", "x1"), "d", garbage)
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await store.retrieve("x1")
    assert tracker.get_slot("name") == "bob 1"
    assert any("unreadable" in r.getMessage() and "x1" in r.getMessage()
               for r in caplog.records)
    quarantined = setup.keys("q:*")
    assert len(quarantined) == 1 and setup.client.hget(quarantined[0], "d") == garbage
    if hasattr(setup.client, "keyslot"):  # cluster: RENAME needs one slot
        assert setup.client.keyslot(quarantined[0]) == setup.client.keyslot(setup.key("h", "x1"))
    turn(tracker, 5)
    await store.save(tracker)
    await store.flush()
    assert len((await store.retrieve_full_tracker("x1")).events) == 1 + 3 * 5


async def test_full_tracker_from_sql_and_outbox_delivered(setup):
    store = setup.make_store()
    await run_turns(store, "f1", 4)
    # Before delivery the full tracker merges the outbox; after it, SQL alone.
    assert len((await store.retrieve_full_tracker("f1")).events) == 1 + 4 * 5
    await store.flush()
    assert setup.keys("o:*") == []
    assert setup.log_seqs("f1") == list(range(1, 1 + 1 + 4 * 5))
    full = await store.retrieve_full_tracker("f1")
    assert [e.text for e in full.events if isinstance(e, UserUttered)] == [
        f"my name is bob {i}" for i in range(4)]


async def test_background_delivery_without_flush(setup):
    store = setup.make_store()
    await run_turns(store, "b1", 2)
    deadline = time.monotonic() + 10
    while len(setup.log_seqs("b1")) < 1 + 2 * 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert setup.log_seqs("b1") == list(range(1, 1 + 1 + 2 * 5)), \
        "saved turns did not reach SQL within 10 s without flush()"


# ------------------------------------------------------------------ failover

TURNS = 10
EVENTS_PER_TURN = 6


def failover_turn(tracker: DialogueStateTracker, i: int) -> None:
    """A turn that also appends ``i`` to the ``amount`` slot: a lost turn shows."""
    done = list(tracker.get_slot("amount") or [])
    tracker.update(user(f"turn {i}"))
    tracker.update(ActionExecuted("utter_greet"))
    tracker.update(BotUttered(f"answer {i}"))
    tracker.update(SlotSet("name", f"bob {i}"))
    tracker.update(SlotSet("amount", done + [i]))
    tracker.update(ActionExecuted("action_listen"))


# kill_between_retrieve_and_save: the master dies while a turn is processed
#   (after retrieve, before save); that save fails and the turn is retried
#   against the promoted replica.
# replica_lacks_last_turn_that_sql_has: the replica never got the last turn
#   (nor its outbox ack), but the outbox had delivered that turn and its
#   snapshot to SQL before the master died.
# replica_lacks_whole_conversation_that_sql_has: nothing of the conversation
#   was replicated (no record on the replica) but all of it is in SQL.
SCENARIOS = ("kill_between_retrieve_and_save", "replica_lacks_last_turn_that_sql_has",
             "replica_lacks_whole_conversation_that_sql_has")


async def play(store, sender: str, i: int, retried: List[str], before_save=None) -> None:
    """One turn, retried (as a channel would after an error) until it is saved."""
    deadline = time.monotonic() + 40
    while True:
        try:
            tracker = await store.retrieve(sender)
            failover_turn(tracker, i)
            if before_save is not None:
                before_save()
                before_save = None
            await store.save(tracker)
            return
        except (HotStateUnavailable, ConcurrentSaveError) as exc:
            retried.append(f"turn {i}: {type(exc).__name__}: {exc}")
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_sentinel_failover_loses_no_turn(failover_setup, scenario, record_property):
    """Kill -9 the master mid-conversation (see SCENARIOS); nothing is lost."""
    setup = failover_setup
    sentinel = setup.servers
    kill_at = 4
    retried: List[str] = []
    store = setup.make_store()
    if scenario == "replica_lacks_whole_conversation_that_sql_has":
        sentinel.isolate_replicas()
    await store.get_or_create_tracker("fo")
    for i in range(TURNS):
        if i != kill_at:
            await play(store, "fo", i, retried)
        elif scenario == "kill_between_retrieve_and_save":
            await play(store, "fo", i, retried, before_save=sentinel.kill_master)
            # The save after the kill does not fail: it goes straight to SQL.
            assert not retried, "the save after the kill should have gone to SQL"
            assert sentinel.wait_for_failover() == sentinel.replica.port
        else:
            if scenario == "replica_lacks_last_turn_that_sql_has":
                sentinel.isolate_replicas()
            await play(store, "fo", i, retried)
            await store.flush()
            assert setup.log_seqs("fo")[-1] == 1 + (i + 1) * EVENTS_PER_TURN
            sentinel.kill_master()
            sentinel.wait_for_failover()
    turns_retried = sorted({attempt.split(":")[0] for attempt in retried})
    record_property("retried_attempts", retried)
    print(f"\n{scenario}: {len(turns_retried)} turn(s) needed a retry "
          f"({len(retried)} failed attempts)", *retried, sep="\n  ")

    final = await store.retrieve("fo")
    await store.flush()
    seqs = setup.log_seqs("fo")
    full = await store.retrieve_full_tracker("fo")
    # Compared as one dict so that a failure shows every symptom at once.
    observed = {
        "hot: amount slot": final.get_slot("amount"),
        "hot: name slot": final.get_slot("name"),
        "log: seqs": seqs,
        "log: user turns": [e.text for e in full.events if isinstance(e, UserUttered)],
        "log: amount slot": full.get_slot("amount"),
    }
    assert observed == {
        "hot: amount slot": list(range(TURNS)),
        "hot: name slot": f"bob {TURNS - 1}",
        "log: seqs": list(range(1, 1 + 1 + TURNS * EVENTS_PER_TURN)),
        "log: user turns": [f"turn {i}" for i in range(TURNS)],
        "log: amount slot": list(range(TURNS)),
    }
