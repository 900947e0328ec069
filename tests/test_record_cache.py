"""The per-process memory of written records, and batched log delivery.

A process remembers the hot records it wrote (``record_cache_size``) so the
next ``retrieve`` neither moves nor decodes them. It must never serve anything
a fresh process would not read: other writers, tampering and odd slot values
are all checked against a second store on the same servers (another process).
"""
import asyncio
import datetime
import decimal

import numpy as np
import pytest
import sqlalchemy as sa
from rasa.shared.core.events import (
    ActionExecuted,
    DefinePrevUserUtteredFeaturization,
    EntitiesAdded,
    SlotSet,
    UserUttered,
)
from rasa.shared.core.trackers import EventVerbosity

from rasa_persistent_tracker import PersistentTrackerStore
from rasa_persistent_tracker.hot.protocol import payload_digest
from rasa_persistent_tracker.record.recent import RecentRecords, Remembered
from tests.dialogue import run_turns, turn


def state(tracker):
    return tracker.current_state(EventVerbosity.ALL)


async def test_unchanged_record_is_not_sent_again(make_store, backend):
    store = make_store()
    await run_turns(store, "u1", 2)
    payload = backend.redis_client().hget(f"{backend.prefix}:h:{{u1}}", "d").decode("utf-8", "surrogateescape")
    entry = await store._hot.load("u1", known=payload_digest(payload))
    # fakeredis' Lua has no redis.sha1hex: there the record is always sent.
    assert entry.unchanged is (backend.kind != "fake")
    assert entry.payload == (None if entry.unchanged else payload)
    assert (await store._hot.load("u1", known="0" * 40)).payload == payload


async def test_a_record_written_elsewhere_is_read_afresh(make_store):
    mine, other = make_store(), make_store()  # two processes on the same servers
    await run_turns(mine, "u2", 2)
    tracker = await other.retrieve("u2")
    turn(tracker, 7)
    await other.save(tracker)
    seen = await mine.retrieve("u2")
    assert seen.get_slot("name") == "bob 7"
    assert state(seen) == state(await other.retrieve("u2"))


async def test_a_tampered_record_is_caught_by_its_writer(make_store, backend, caplog):
    store = make_store()
    await run_turns(store, "u3", 2)
    client = backend.redis_client()
    key = f"{backend.prefix}:h:{{u3}}"
    client.hset(key, "d", client.hget(key, "d")[:-3] + b"xyz")
    tracker = await store.retrieve("u3")
    assert "unreadable" in caplog.text
    assert len(list(client.scan_iter(match=f"{backend.prefix}:q:{{u3}}:*"))) == 1
    assert tracker.get_slot("name") in ("bob 1", None)  # snapshot or fresh, never garbage


async def test_remembered_tracker_equals_a_decoded_one(make_store):
    writer, reader = make_store(), make_store()
    tracker = await writer.get_or_create_tracker("u4")
    turn(tracker, 1)
    # Values JSON changes on the way: a tuple, numpy numbers, a Decimal, a date.
    tracker.update(SlotSet("amount", {"t": (1, 2), "np": np.float32(0.5), "arr": np.arange(2),
                                      "d": decimal.Decimal("1.10"),
                                      "day": datetime.date(2026, 11, 25), 3: "int key"}))
    await writer.save(tracker)
    remembered = await writer.retrieve("u4")
    assert writer._recent.get("u4") is not None  # it replayed (a failure forgets it)
    decoded = await reader.retrieve("u4")
    assert state(remembered) == state(decoded)
    assert remembered.get_slot("amount") == {"t": [1, 2], "np": 0.5, "arr": [0, 1],
                                             "d": decimal.Decimal("1.10"),
                                             "day": datetime.date(2026, 11, 25),
                                             "3": "int key"}
    turn(remembered, 2)  # and the next save from the remembered copy is right too
    await writer.save(remembered)
    await writer.flush()
    assert state(await reader.retrieve("u4")) == state(await writer.retrieve("u4"))
    assert len((await reader.retrieve_full_tracker("u4")).events) == 1 + 6 + 5


async def test_a_process_that_remembers_nothing_still_reuses_the_stored_base(make_store):
    # A process serving more conversations than its memories hold (record
    # memory, recent bases) reads each record afresh. The base's compressed
    # segment comes with it: the base is compressed again only when a
    # compaction makes a new one, not on every save.
    forgetful = make_store(record_cache_size=0)
    forgetful._codec._deflater._size = 0
    compressed_bases = []
    real = forgetful._codec._deflater.segment

    def counting(base_json):
        if base_json != "{}":  # no base yet (the first turns): nothing to compress
            compressed_bases.append(base_json)
        return real(base_json)
    forgetful._codec._deflater.segment = counting
    turns = 40
    tracker = await run_turns(forgetful, "u9", turns)
    distinct = len(set(compressed_bases))
    assert len(compressed_bases) == distinct  # never the same base twice
    assert 3 <= distinct <= turns // 3  # compactions only (every few turns)
    # What it wrote reads the same in a process with memory, and in itself.
    other = make_store()
    assert state(await other.retrieve("u9")) == state(await forgetful.retrieve("u9"))
    assert (await other.retrieve("u9")).get_slot("name") == tracker.get_slot("name")


async def test_editing_a_handed_out_tracker_leaves_the_memory_alone(make_store):
    store = make_store()
    tracker = await store.get_or_create_tracker("u5")
    tracker.update(UserUttered("a small one", {"name": "inform", "confidence": 1.0},
                               [{"entity": "size", "value": "small", "start": 2, "end": 7}]))
    await store.save(tracker)
    # Retrieves after the first rebuild reuse the events it parsed: each
    # edit below must stay in its own tracker, on every one of them.
    for _ in range(3):
        tracker = await store.retrieve("u5")
        tracker.update(ActionExecuted("action_listen"))
        before = list(tracker.latest_message.entities)
        assert len(before) == 1
        flag = tracker.latest_message.use_text_for_featurization
        assert flag is not True
        # TED adds the entities it recognises in place, to the latest message,
        # and a policy marks how it was featurised.
        tracker.update(EntitiesAdded([{"entity": "size", "value": "large", "start": 0, "end": 5}]))
        tracker.update(DefinePrevUserUtteredFeaturization(True))
        assert len(tracker.latest_message.entities) == len(before) + 1
        assert tracker.latest_message.use_text_for_featurization is True
        again = await store.retrieve("u5")  # that tracker was never saved
        assert again.latest_message.entities == before
        assert again.latest_message.parse_data["entities"] == before
        assert again.latest_message.use_text_for_featurization is flag


async def test_log_delivery_waits_for_more_turns(make_store, backend):
    store = make_store(outbox_linger=2.0)
    for sender in ("l1", "l2"):
        await run_turns(store, sender, 3)
    engine = backend.engine()

    def logged() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM rpt_events")).scalar()

    assert logged() == 0  # still lingering: the rows wait in the outbox
    full = await store.retrieve_full_tracker("l1")
    assert len(full.events) == 1 + 3 * 5  # and are read from there meanwhile
    for _ in range(100):
        if logged() == 2 * (1 + 3 * 5):
            break
        await asyncio.sleep(0.1)
    assert logged() == 2 * (1 + 3 * 5)
    engine.dispose()


async def test_embedded_hot_state_remembers_too(tmp_path, domain):
    store = PersistentTrackerStore(domain, embedded_path=str(tmp_path / "hot.sqlite3"),
                                   sql_url=f"sqlite:///{tmp_path}/events.sqlite3", environ={})
    await run_turns(store, "e1", 2)
    remembered = store._recent.get("e1")
    assert (await store._hot.load("e1", known=remembered.digest)).unchanged
    other = PersistentTrackerStore(domain, embedded_path=str(tmp_path / "hot.sqlite3"),
                                   sql_url=f"sqlite:///{tmp_path}/events.sqlite3", environ={})
    tracker = await other.retrieve("e1")
    turn(tracker, 5)
    await other.save(tracker)
    assert not (await store._hot.load("e1", known=remembered.digest)).unchanged
    assert (await store.retrieve("e1")).get_slot("name") == "bob 5"
    await store.close()
    await other.close()


def test_recent_records_is_a_bounded_lru():
    recent = RecentRecords(2)
    for name in ("a", "b", "a", "b"):  # each saved twice in a row: admitted
        recent.put(name, Remembered.of(name, {"events": []}, []))
    assert recent.get("a").digest == "a"  # "a" is now the most recent
    recent.put("c", Remembered.of("c", {"events": []}, []))
    recent.put("c", Remembered.of("c", {"events": []}, []))
    assert recent.get("b") is None and len(recent) == 2
    recent.forget("a")
    assert recent.get("a") is None
    off = RecentRecords(0)
    off.put("a", Remembered.of("a", {"events": []}, []))
    off.put("a", Remembered.of("a", {"events": []}, []))
    assert off.get("a") is None


def test_recent_records_admits_only_what_it_could_keep_until_next_use():
    recent = RecentRecords(2)
    recent.put("a", Remembered.of("a", {"events": []}, []))
    assert recent.get("a") is None  # first save: not yet known to come back
    recent.put("a", Remembered.of("a", {"events": []}, []))
    assert recent.get("a") is not None
    cycle = RecentRecords(2)
    for _ in range(5):  # three conversations in turn, memory for two: no use
        for name in ("x", "y", "z"):
            cycle.put(name, Remembered.of(name, {"events": []}, []))
    assert len(cycle) == 0


@pytest.mark.parametrize("size", ["-1", "many"])
def test_record_cache_size_must_be_a_count(size, tmp_path, domain):
    from rasa_persistent_tracker import ConfigError

    with pytest.raises(ConfigError, match="record_cache_size"):
        PersistentTrackerStore(domain, embedded_path=str(tmp_path / "h.sqlite3"),
                               sql_url=f"sqlite:///{tmp_path}/e.sqlite3", environ={},
                               record_cache_size=size)
