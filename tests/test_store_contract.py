"""Store behaviours every backend pair must honour (fake and real servers)."""
import asyncio
import datetime
import decimal
import json
import logging

import numpy as np
import pytest
import sqlalchemy as sa
from rasa.shared.core.events import (
    ActionExecuted,
    ActiveLoop,
    BotUttered,
    Restarted,
    SessionStarted,
    SlotSet,
    UserUttered,
)
from rasa.shared.core.trackers import DialogueStateTracker

from tests.conftest import BACKENDS, TOPOLOGIES, open_backend
from tests.dialogue import run_turns, turn, user  # noqa: F401
from rasa_persistent_tracker import ConcurrentSaveError, SlotValueError


@pytest.fixture(params=BACKENDS + TOPOLOGIES)
async def backend(request, tmp_path):
    """The contract holds on every pair, Redis Cluster and Sentinel included."""
    async for pair in open_backend(request, tmp_path):
        yield pair


async def test_round_trip_slots_and_active_form(make_store):
    store = make_store()
    tracker = await store.get_or_create_tracker("c1")
    tracker.update(user("I want a pizza", "request_pizza"))
    tracker.update(ActionExecuted("pizza_form"))
    tracker.update(ActiveLoop("pizza_form"))
    tracker.update(SlotSet("requested_slot", "size"))
    tracker.update(SlotSet("name", "Ann"))
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)

    loaded = await store.retrieve("c1")
    assert loaded.active_loop_name == "pizza_form"
    assert loaded.get_slot("requested_slot") == "size"
    assert loaded.get_slot("name") == "Ann"
    assert loaded.latest_action_name == "action_listen"
    assert loaded.latest_message.text == "I want a pizza"
    again = make_store()  # a second process sees the same state
    assert (await again.retrieve("c1")).active_loop_name == "pizza_form"


async def test_retrieve_gives_last_session_full_gives_all(make_store):
    store = make_store()
    tracker = await run_turns(store, "c2", 3)
    tracker = await store.retrieve("c2")
    tracker.update(ActionExecuted("action_session_start"))
    tracker.update(SessionStarted())
    tracker.update(SlotSet("name", "carried"))
    tracker.update(ActionExecuted("action_listen"))
    turn(tracker, 99)
    await store.save(tracker)

    last = await store.retrieve("c2")
    assert [e.type_name for e in last.events][:2] == ["action", "session_started"]
    assert last.get_slot("name") == "bob 99"
    full = await store.retrieve_full_tracker("c2")
    assert len(full.events) == 1 + 3 * 5 + 4 + 5
    assert sum(isinstance(e, SessionStarted) for e in full.events) == 1


async def test_get_or_create_semantics(make_store):
    store = make_store()
    assert await store.retrieve("new") is None
    created = await store.get_or_create_tracker("new")
    assert [e.type_name for e in created.events] == ["action"]
    again = await store.get_or_create_tracker("new")
    assert len(again.events) == 1
    full = await store.get_or_create_full_tracker("other", append_action_listen=False)
    assert len(full.events) == 0
    assert await store.retrieve_full_tracker("new") is not None


async def test_restart_resets_state_but_history_is_kept(make_store):
    store = make_store()
    await run_turns(store, "c3", 2)
    tracker = await store.retrieve("c3")
    tracker.update(user("/restart", "restart"))
    tracker.update(ActionExecuted("action_restart"))
    tracker.update(Restarted())
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)
    loaded = await store.retrieve("c3")
    assert loaded.get_slot("name") is None
    assert [e.text for e in loaded.events if isinstance(e, UserUttered)][-1] == "/restart"
    full = await store.retrieve_full_tracker("c3")
    assert any(isinstance(e, Restarted) for e in full.events)
    assert len(full.events) == 1 + 2 * 5 + 4


async def test_max_event_history_limits_tracker_but_not_log(make_store):
    store = make_store()
    tracker = await store.get_or_create_tracker("c4", max_event_history=6)
    for i in range(5):
        tracker = await store.get_or_create_tracker("c4", max_event_history=6)
        turn(tracker, i)
        await store.save(tracker)
    loaded = await store.get_or_create_tracker("c4", max_event_history=6)
    assert len(loaded.events) == 6
    assert loaded.get_slot("name") == "bob 4"
    store.max_event_history = None
    full = await store.retrieve_full_tracker("c4")
    assert len(full.events) == 1 + 5 * 5


async def test_trackers_built_outside_retrieve(make_store, domain):
    store = make_store()
    await run_turns(store, "c5", 2)
    full = await store.retrieve_full_tracker("c5")
    rebuilt = DialogueStateTracker.from_events("c5", list(full.events), domain.slots)
    turn(rebuilt, 7)
    await store.save(rebuilt)
    await store.save(rebuilt)  # saved twice: nothing new the second time
    history = await store.retrieve_full_tracker("c5")
    assert len(history.events) == 1 + 3 * 5
    # A fresh tracker for a live conversation (what Rasa's FailSafe wrapper
    # builds after a retrieve error) is merged, never written over it.
    fresh = DialogueStateTracker("c5", domain.slots)
    fresh.update(ActionExecuted("action_listen"))
    await store.save(fresh)
    loaded = await store.retrieve("c5")
    assert loaded.get_slot("name") == "bob 7"
    assert len((await store.retrieve_full_tracker("c5")).events) == 1 + 3 * 5 + 1


async def test_keys_and_exists_include_log_only_conversations(make_store, backend):
    store = make_store()
    await run_turns(store, "k1", 1)
    await run_turns(store, "k2", 1)
    await store.flush()
    backend.redis_client().delete(f"{backend.prefix}:h:{{k2}}")
    assert sorted(await store.keys()) == ["k1", "k2"]
    assert await store.exists("k1") and await store.exists("k2")
    assert not await store.exists("k3")


async def test_ttl_is_set_and_refreshed(make_store, backend):
    store = make_store(record_exp=100)
    await run_turns(store, "t1", 1)
    client = backend.redis_client()
    key = f"{backend.prefix}:h:{{t1}}"
    assert 95_000 < client.pttl(key) <= 100_000
    client.pexpire(key, 5_000)
    await run_turns(store, "t1", 1)
    assert client.pttl(key) > 95_000


async def test_hot_record_does_not_grow_with_history(make_store, backend):
    store = make_store(max_history=5)
    client = backend.redis_client()
    tracker = await store.get_or_create_tracker("g1")
    sizes, texts = [], []
    for i in range(240):
        tracker = await store.retrieve("g1")
        turn(tracker, i)
        await store.save(tracker)
        stored = client.hget(f"{backend.prefix}:h:{{g1}}", "d")
        sizes.append(len(stored))
        record = store._codec.loads_record(stored.decode("utf-8", "surrogateescape"), "g1")
        texts.append(len(json.dumps(record)))
    # Bounded: the largest record of turns 120-240 is no larger than that of
    # turns 40-120 (it saw-tooths as superseded slot events are dropped). The
    # record's text within 2%; its compressed bytes within 10%, as deflate
    # sizes vary with the timestamps' digits (an unbounded record would have
    # doubled).
    assert max(texts[120:]) <= max(texts[40:120]) * 1.02, (max(texts[40:120]), max(texts[120:]))
    assert max(sizes[120:]) <= max(sizes[40:120]) * 1.10, (max(sizes[40:120]), max(sizes[120:]))
    loaded = await store.retrieve("g1")
    assert len(loaded.events) < 80


async def test_non_json_slot_values_round_trip(make_store):
    store = make_store()
    tracker = await store.get_or_create_tracker("s1")
    value = {"d": decimal.Decimal("10.25"), "when": datetime.date(2026, 11, 25),
             "np": np.float64(1.5), "arr": np.arange(3)}
    tracker.update(SlotSet("amount", value))
    await store.save(tracker)
    loaded = await store.retrieve("s1")
    stored = loaded.get_slot("amount")
    assert stored["d"] == decimal.Decimal("10.25") and isinstance(stored["d"], decimal.Decimal)
    assert stored["when"] == datetime.date(2026, 11, 25)
    assert stored["np"] == 1.5 and stored["arr"] == [0, 1, 2]
    full = await store.retrieve_full_tracker("s1")
    assert full.get_slot("amount")["d"] == decimal.Decimal("10.25")


async def test_unstorable_slot_value_names_the_slot_and_writes_nothing(make_store):
    store = make_store()
    tracker = await store.get_or_create_tracker("s2")
    before = len((await store.retrieve_full_tracker("s2")).events)
    tracker.update(SlotSet("amount", object()))
    with pytest.raises(SlotValueError, match="'amount'"):
        await store.save(tracker)
    assert len((await store.retrieve_full_tracker("s2")).events) == before
    assert (await store.retrieve("s2")).get_slot("amount") is None


async def test_slot_value_that_would_not_read_back_is_refused(make_store):
    store = make_store()
    tracker = await store.get_or_create_tracker("s3")
    tracker.update(SlotSet("amount", {(1, 2), (3, 4)}))  # tuples come back as lists
    with pytest.raises(SlotValueError, match="'amount'"):
        await store.save(tracker)
    assert (await store.retrieve("s3")).get_slot("amount") is None


async def test_event_broker_gets_only_new_events(make_store, domain):
    published = []

    class Broker:
        def publish(self, event):
            published.append(event)

    store = make_store()
    store.event_broker = Broker()
    await run_turns(store, "b1", 2)
    assert [e["event"] for e in published] == ["action"] + ["user", "action", "bot", "slot", "action"] * 2
    assert all(e["sender_id"] == "b1" for e in published)


async def test_stale_save_is_rejected_and_logs_nothing(make_store):
    store = make_store()
    await run_turns(store, "l1", 1)
    first = await store.retrieve("l1")
    second = await store.retrieve("l1")
    turn(first, 1)
    await store.save(first)
    turn(second, 2)
    with pytest.raises(ConcurrentSaveError) as info:
        await store.save(second)
    assert info.value.conversation_id == "l1"
    assert info.value.expected_version + 1 == info.value.stored_version
    await store.flush()
    assert len((await store.retrieve_full_tracker("l1")).events) == 1 + 2 * 5
    assert (await store.retrieve("l1")).get_slot("name") == "bob 1"


@pytest.mark.parametrize("garbage", [b"\x00\xff garbage", b'{"schema": 1}', b"[1,2"])
async def test_corrupt_record_falls_back_and_is_quarantined(make_store, backend, caplog, garbage):
    store = make_store()
    await run_turns(store, "x1", 2)
    await store.flush()
    client = backend.redis_client()
    client.hset(f"{backend.prefix}:h:{{x1}}", "d", garbage)
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await store.retrieve("x1")
    assert tracker.get_slot("name") == "bob 1"  # resumed from the snapshot
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "x1" in warnings[0].getMessage()
    assert garbage.decode("latin-1") not in caplog.text
    quarantined = list(client.scan_iter(match=f"{backend.prefix}:q:*"))
    assert len(quarantined) == 1 and client.hget(quarantined[0], "d") == garbage
    turn(tracker, 5)
    await store.save(tracker)
    await store.flush()
    assert client.hget(quarantined[0], "d") == garbage
    seqs_ok = len((await store.retrieve_full_tracker("x1")).events) == 1 + 3 * 5
    assert seqs_ok


async def test_lost_record_is_restored_from_snapshot(make_store, backend):
    store = make_store()
    await run_turns(store, "f1", 3)
    await store.flush()
    backend.redis_client().delete(f"{backend.prefix}:h:{{f1}}")
    tracker = await store.retrieve("f1")
    assert tracker is not None and tracker.get_slot("name") == "bob 2"
    assert backend.redis_client().exists(f"{backend.prefix}:h:{{f1}}")
    turn(tracker, 3)
    await store.save(tracker)
    await store.flush()
    assert len((await store.retrieve_full_tracker("f1")).events) == 1 + 4 * 5
    engine = backend.engine()
    with engine.connect() as conn:
        seqs = conn.execute(sa.text("SELECT seq FROM rpt_events WHERE conversation_id='f1' "
                                    "ORDER BY seq")).scalars().all()
    engine.dispose()
    assert seqs == list(range(1, 1 + 1 + 4 * 5))


async def test_expired_conversation_starts_fresh(make_store):
    store = make_store(record_exp=1)
    await run_turns(store, "e1", 2)
    await store.flush()
    await asyncio.sleep(1.3)
    assert await store.retrieve("e1") is None
    tracker = await store.get_or_create_tracker("e1")
    assert tracker.get_slot("name") is None
    await store.flush()
    full = await store.retrieve_full_tracker("e1")
    assert len(full.events) == 1 + 2 * 5 + 1


async def test_copied_tracker_saves_its_new_events_once(make_store, backend):
    """What the store knows of a tracker stays with that object: a copy (Rasa's
    ``copy()`` or ``deepcopy``) is saved by merging, never duplicating or
    losing events, and the original still saves on its fast path afterwards."""
    import copy

    store = make_store()
    await run_turns(store, "cp", 2)
    original = await store.retrieve("cp")
    assert store._records.loaded(original) is not None
    for copied in (original.copy(), copy.deepcopy(original)):
        assert store._records.loaded(copied) is None  # not handed out by the store
    copied = copy.deepcopy(original)
    copied.update(user("from the copy"))
    copied.update(ActionExecuted("action_listen"))
    await store.save(copied)
    again = await store.retrieve("cp")
    texts = [e.text for e in again.events if isinstance(e, UserUttered)]
    assert texts.count("from the copy") == 1
    await store.save(again)  # nothing new: no second copy of the turn
    await store.flush()
    full = await store.retrieve_full_tracker("cp")
    assert [e.text for e in full.events if isinstance(e, UserUttered)].count("from the copy") == 1
    again.update(user("after the copy"))
    await store.save(again)
    assert store._records.loaded(again).version == store._records.loaded(copied).version + 1
