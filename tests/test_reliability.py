"""Never lose a turn: fuzzed corruption, racing writers, Redis loss, outages."""
import asyncio
import json
import logging
import random
import threading
import uuid

import pytest
import sqlalchemy as sa
from rasa.shared.core.events import ActionExecuted, SlotSet, UserUttered

from rasa_persistent_tracker import (
    ConcurrentSaveError,
    HotStateBusy,
    HotStateUnavailable,
    PersistentTrackerStore,
)
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.compressed import stored_bytes
from rasa_persistent_tracker.security.serde import JsonSerializer
from tests.conftest import Backend, real_urls
from tests.servers import throwaway_postgres, throwaway_redis  # noqa: F401 (fixtures)


def turn(tracker, marker):
    tracker.update(UserUttered(f"message {marker}", {"name": "inform", "confidence": 1.0}))
    tracker.update(ActionExecuted("utter_greet"))
    tracker.update(SlotSet("name", marker))
    tracker.update(ActionExecuted("action_listen"))


def log_rows(engine, conversation_id):
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT seq, type_name, data FROM rpt_events WHERE conversation_id=:c ORDER BY seq"),
            {"c": conversation_id}).fetchall()


def assert_gap_free(rows):
    seqs = [r[0] for r in rows]
    assert seqs == list(range(1, len(seqs) + 1)), f"sequence has gaps/duplicates: {seqs[:20]}..."


# ------------------------------------------------------------------ corruption

_PLAIN = Codec(JsonSerializer())  # the codec of a store without a key

def _mutate_record(payload: bytes, rng: random.Random) -> bytes:
    """Schema-valid JSON with a wrong value, re-framed as a store without a key
    frames it (compressed, with a valid checksum)."""
    record = json.loads(_PLAIN.record_text(payload, "any"))
    choice = rng.randrange(9)
    if choice == 0:
        record["schema"] = 99  # a schema this code does not know
    elif choice == 1:
        record["next_seq"] = rng.choice([-1, 0, "7", None])
    elif choice == 2:
        del record[rng.choice(["events", "state", "base", "next_seq", "sender_id"])]
    elif choice == 3:
        record["events"] = []
    elif choice == 4:
        record["events"][-1]["event"] = "no_such_event"
    elif choice == 5:
        record["state"]["slots"]["name"] = rng.choice([42, "someone else", None, [1]])
    elif choice == 6:
        record["sender_id"] = "another-conversation"
    elif choice == 7:
        record["base"] = {"slot_events": "x", "paused": 3}
    else:
        record["events"][0] = {"event": "slot", "name": "name", "value": "x", "timestamp": "t"}
    return stored_bytes(_PLAIN.dumps_record(record))


def corrupt(client, key: str, rng: random.Random) -> str:
    """Write one generated corruption into the hot record; return its kind."""
    payload = client.hget(key, "d") or b"{}"
    kind = rng.choice(["random", "bitflip", "truncate", "schema", "schema", "type",
                       "version", "missing"])
    if kind == "random":
        client.hset(key, "d", bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
    elif kind == "bitflip":
        data = bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        client.hset(key, "d", bytes(data))
    elif kind == "truncate":
        client.hset(key, "d", payload[:rng.randrange(len(payload))])
    elif kind == "schema":
        client.hset(key, "d", _mutate_record(payload, rng))
    elif kind == "type":
        client.delete(key)
        rng.choice([lambda: client.set(key, payload), lambda: client.rpush(key, payload),
                    lambda: client.sadd(key, payload)])()
    elif kind == "version":
        client.hset(key, "v", rng.choice([b"abc", b"", b"-", b"1.5"]))
    else:
        client.hdel(key, "d")
    return kind


async def test_fuzzed_corruptions_never_crash_and_are_all_quarantined(make_store, backend, caplog):
    rng = random.Random(20261125)
    store = make_store(max_history=4)
    client = backend.redis_client()
    conversations = [f"fuzz-{i}" for i in range(5)]
    for cid in conversations:
        tracker = await store.get_or_create_tracker(cid)
        turn(tracker, "start")
        await store.save(tracker)
    total = 1000
    kinds = {}
    caplog.set_level(logging.WARNING, logger="rasa_persistent_tracker")
    for i in range(total):
        cid = conversations[i % len(conversations)]
        kind = corrupt(client, f"{backend.prefix}:h:{{{cid}}}", rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        tracker = await store.retrieve(cid)  # must never raise
        assert tracker is not None, f"corruption #{i} ({kind}) gave no tracker"
        turn(tracker, f"after-{i}")
        await store.save(tracker)  # the conversation goes on
        assert (await store.retrieve(cid)).get_slot("name") == f"after-{i}"
    quarantined = list(client.scan_iter(match=f"{backend.prefix}:q:*", count=1000))
    print(f"FIGURES fuzz[{backend.kind}]: {total} corruptions {kinds}, "
          f"{len(quarantined)} quarantined, 0 exceptions")
    assert len(quarantined) == total, kinds
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == total
    await store.flush()
    engine = backend.engine()
    for cid in conversations:
        rows = log_rows(engine, cid)
        assert_gap_free(rows)
        # every turn after every corruption is in the log exactly once
        names = [json.loads(d)["value"] for _, t, d in rows if t == "slot"]
        assert names == ["start"] + [f"after-{i}" for i in range(total) if
                                      conversations[i % len(conversations)] == cid]
    engine.dispose()


async def test_a_record_that_only_looks_right_never_becomes_the_snapshot(make_store, backend):
    store = make_store(outbox_linger=60.0)  # the turns' rows wait in the outbox
    for marker in ("first", "second"):
        tracker = await store.get_or_create_tracker("look")
        turn(tracker, marker)
        await store.save(tracker)
    client = backend.redis_client()
    key = f"{backend.prefix}:h:{{look}}"
    record = _PLAIN.loads_record(client.hget(key, "d"), "look")
    record["state"]["slots"]["name"] = "someone else"  # valid shape, valid checksum
    client.hset(key, "d", stored_bytes(_PLAIN.dumps_record(record)))
    await store.flush()  # delivers the rows; the snapshot must not take that record
    engine = backend.engine()
    assert len(log_rows(engine, "look")) == 1 + 2 * 4
    with engine.connect() as conn:
        snapshots = conn.execute(sa.text("SELECT payload FROM rpt_snapshots")).fetchall()
    engine.dispose()
    assert all("someone else" not in row[0] for row in snapshots)


async def test_corrupt_log_rows_are_skipped_with_a_warning(make_store, backend, caplog):
    store = make_store()
    tracker = await store.get_or_create_tracker("rows")
    for i in range(3):
        turn(tracker, i)
        await store.save(tracker)
    await store.flush()
    engine = backend.engine()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE rpt_events SET data='{broken' WHERE conversation_id='rows' "
                             "AND seq=3"))
    caplog.set_level(logging.WARNING, logger="rasa_persistent_tracker")
    full = await store.retrieve_full_tracker("rows")
    assert len(full.events) == 1 + 3 * 4 - 1
    assert "seq=3" in caplog.text and "rows" in caplog.text
    engine.dispose()


# --------------------------------------------------------------------- races

async def test_racing_writers_lose_no_update_and_keep_the_log_gap_free(make_store, backend):
    workers, turns_each = 4, 15
    conversations = ["race-a", "race-b"]
    seed = make_store()
    for cid in conversations:
        await seed.get_or_create_tracker(cid)
    stores = [make_store() for _ in range(workers)]
    conflicts = [0] * workers

    async def work(w: int) -> None:
        store = stores[w]
        for i in range(turns_each):
            for cid in conversations:
                while True:
                    tracker = await store.retrieve(cid)
                    turn(tracker, f"w{w}-{i}")
                    await asyncio.sleep(0)  # let the others interleave
                    try:
                        await store.save(tracker)
                        break
                    except ConcurrentSaveError:
                        conflicts[w] += 1
        await store.close()  # flushes, and stops the delivery task of this loop

    # On real Redis half the writers run in threads with their own event loops
    # (parallel connections); fakeredis cannot be shared across loops, so there
    # all writers race as tasks on this loop (each save still awaits I/O).
    threaded = 2 if backend.kind == "real" else 0
    threads = [threading.Thread(target=lambda w=w: asyncio.run(work(w))) for w in range(threaded)]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(work(w) for w in range(threaded, workers)))
    for thread in threads:
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
    await seed.flush()
    print(f"FIGURES race[{backend.kind}]: {workers} writers x {turns_each} turns x "
          f"{len(conversations)} conversations, {sum(conflicts)} conflicts retried")
    assert sum(conflicts) > 0, "the writers never actually raced"
    engine = backend.engine()
    for cid in conversations:
        rows = log_rows(engine, cid)
        assert_gap_free(rows)
        markers = [json.loads(d)["value"] for _, t, d in rows if t == "slot"]
        expected = {f"w{w}-{i}" for w in range(workers) for i in range(turns_each)}
        assert sorted(markers) == sorted(expected), "lost or duplicated updates"
        assert (await seed.retrieve(cid)).get_slot("name") == markers[-1]
    engine.dispose()


# ------------------------------------------------------------- Redis forgets

async def test_flushall_mid_conversation_loses_no_conversation(domain, tmp_path):
    pair = Backend("fake", str(tmp_path))  # the real variant owns a server, below
    try:
        await _flushall_scenario(pair, domain)
    finally:
        await pair.cleanup()


@pytest.mark.servers
async def test_flushall_on_a_real_redis(throwaway_redis, domain, tmp_path):  # noqa: F811
    real_urls()
    pair = Backend("real", str(tmp_path))
    pair.redis_url = throwaway_redis.url
    try:
        await _flushall_scenario(pair, domain)
    finally:
        await pair.cleanup()


async def _flushall_scenario(pair: Backend, domain) -> None:
    """20 conversations, FLUSHALL mid-way, all continue; write-through loses no turn."""
    store = pair.make_store(domain, sync_log=True)
    conversations = [f"flush-{i}" for i in range(20)]
    for cid in conversations:
        tracker = await store.get_or_create_tracker(cid)
        for i in range(3):
            tracker = await store.retrieve(cid)
            turn(tracker, f"{cid}-{i}")
            await store.save(tracker)
    pair.redis_client().flushall()
    lost = 0
    for cid in conversations:
        tracker = await store.retrieve(cid)
        if tracker is None or tracker.get_slot("name") != f"{cid}-2":
            lost += 1
            continue
        turn(tracker, f"{cid}-3")
        await store.save(tracker)
    assert lost == 0
    await store.flush()
    engine = pair.engine()
    for cid in conversations:
        rows = log_rows(engine, cid)
        assert_gap_free(rows)
        assert len(rows) == 1 + 4 * 4
    engine.dispose()


async def test_long_flows_may_resume_from_the_snapshot_after_expiry(make_store):
    store = make_store(record_exp=1)
    tracker = await store.get_or_create_tracker("long")
    turn(tracker, "day-1")
    await store.save(tracker)
    await store.flush()
    await asyncio.sleep(1.3)  # the hot record expired through inactivity
    assert await store.retrieve("long") is None  # by default: a fresh session
    resuming = make_store(record_exp=1, snapshot_resume_window=3600)
    resumed = await resuming.retrieve("long")
    assert resumed is not None and resumed.get_slot("name") == "day-1"


# ------------------------------------------------------------------- outages

@pytest.mark.servers
async def test_postgres_down_turns_succeed_and_the_log_catches_up(throwaway_postgres, domain,  # noqa: F811
                                                                   tmp_path):
    urls = real_urls()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    store = PersistentTrackerStore(domain, host=urls["redis"], key_prefix=prefix,
                                   sql_url=throwaway_postgres.url, environ={},
                                   outbox_scan_interval=0.5)
    conversations = [f"pg-{i}" for i in range(10)]
    failed = 0
    try:
        for cid in conversations[:5]:
            tracker = await store.get_or_create_tracker(cid)
            turn(tracker, f"{cid}-before")
            await store.save(tracker)
        await store.flush()
        throwaway_postgres.stop()
        for round_ in range(3):
            for cid in conversations:  # 5 ongoing + 5 brand-new conversations
                try:
                    tracker = await store.get_or_create_tracker(cid)
                    turn(tracker, f"{cid}-down-{round_}")
                    await store.save(tracker)
                except Exception:  # any failure is a failed turn
                    failed += 1
        print(f"FIGURES pg-down: {3 * len(conversations)} turns while PostgreSQL was stopped, "
              f"{failed} failed")
        assert failed == 0
        throwaway_postgres.start()
        # No new messages: the background delivery must catch up on its own.
        engine = sa.create_engine(throwaway_postgres.url)
        for _ in range(100):
            with engine.connect() as conn:
                count = conn.execute(sa.text("SELECT COUNT(*) FROM rpt_events")).scalar()
            if count == 5 * (1 + 4) + 5 * 3 * 4 + 5 * (1 + 3 * 4):
                break
            await asyncio.sleep(0.2)
        for i, cid in enumerate(conversations):
            rows = log_rows(engine, cid)
            assert_gap_free(rows)
            markers = [json.loads(d)["value"] for _, t, d in rows if t == "slot"]
            before = [f"{cid}-before"] if i < 5 else []
            assert markers == before + [f"{cid}-down-{r}" for r in range(3)]
        engine.dispose()
    finally:
        await store.close()
        client = __import__("redis").Redis.from_url(urls["redis"])
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)


@pytest.mark.real
async def test_busy_pool_fails_the_turn_without_falling_back(domain, tmp_path):
    real_urls()
    pair = Backend("real", str(tmp_path))
    store = pair.make_store(domain, redis_max_connections=1, redis_socket_timeout=1.0)
    try:
        tracker = await store.get_or_create_tracker("busy")
        turn(tracker, "before")
        await store.save(tracker)
        pool = store._hot._client().connection_pool
        held = await pool.get_connection("PING")  # the only connection, kept busy
        try:
            with pytest.raises(HotStateBusy, match="redis_max_connections"):
                await store.retrieve("busy")
            turn(tracker, "during")
            with pytest.raises(HotStateBusy):
                await store.save(tracker)
        finally:
            await pool.release(held)
        # Not an outage: no snapshot fallback happened, no re-checking follows.
        assert not store._recovery.suspecting
        again = await store.retrieve("busy")
        assert again.get_slot("name") == "before"
    finally:
        await pair.cleanup()


@pytest.mark.servers
async def test_redis_down_never_gives_a_fresh_tracker_and_recovers(throwaway_redis, domain,  # noqa: F811
                                                                   tmp_path):
    real_urls()
    pair = Backend("real", str(tmp_path))
    pair.redis_url = throwaway_redis.url
    store = pair.make_store(domain, redis_socket_timeout=0.5, outbox_linger=60.0)
    try:
        tracker = await store.get_or_create_tracker("r1")
        for i in range(3):
            tracker = await store.retrieve("r1")
            turn(tracker, f"r1-{i}")
            await store.save(tracker)
        await store.flush()
        fresh = await store.get_or_create_tracker("r2")  # its rows still wait in the outbox
        turn(fresh, "r2-0")
        await store.save(fresh)
        throwaway_redis.stop()
        degraded = await store.retrieve("r1")  # read from the SQL snapshot
        assert degraded is not None and degraded.get_slot("name") == "r1-2"
        with pytest.raises(HotStateUnavailable, match="'r2'"):
            await store.retrieve("r2")  # cannot be told from a new one: never a fresh tracker
        turn(degraded, "saved-while-down")
        await store.save(degraded)  # straight to SQL (issue 13): the turn is not lost
        throwaway_redis.start()  # comes back empty (no persistence)
        tracker = await store.retrieve("r1")
        assert tracker.get_slot("name") == "saved-while-down"
        turn(tracker, "r1-3")
        await store.save(tracker)
        await store.flush()
        engine = pair.engine()
        rows = log_rows(engine, "r1")
        assert_gap_free(rows)
        assert [json.loads(d)["value"] for _, t, d in rows if t == "slot"] == [
            "r1-0", "r1-1", "r1-2", "saved-while-down", "r1-3"]
        engine.dispose()
    finally:
        await pair.cleanup()


async def test_a_restore_that_loses_the_race_to_a_newer_write_reads_that_write(make_store,
                                                                              backend):
    # The hot record is gone (a wipe); process A restores it from the SQL
    # snapshot while process B commits a turn of the same conversation. A's
    # write-back conflicts: retrieve must read B's record, never raise.
    a, b = make_store(), make_store()
    tracker = await a.get_or_create_tracker("restore-race")
    turn(tracker, "before")
    await a.save(tracker)
    await a.flush()
    client = backend.redis_client()
    for key in list(client.scan_iter(match=f"{backend.prefix}:*")):
        client.delete(key)
    client.close()
    commit = a._hot.commit
    raced = []

    async def racing_commit(cid, expected, payload, ttl, outbox_entry, **kwargs):
        if outbox_entry is None and not raced:  # A's write-back of the restored record
            raced.append(True)
            other = await b.retrieve(cid)  # B restores and writes its turn first
            turn(other, "from B")
            await b.save(other)
        return await commit(cid, expected, payload, ttl, outbox_entry, **kwargs)
    a._hot.commit = racing_commit
    got = await a.retrieve("restore-race")
    assert raced and got.get_slot("name") == "from B"
    turn(got, "after")
    await a.save(got)  # read after the race: no conflict
    assert (await b.retrieve("restore-race")).get_slot("name") == "after"


# A script that leaves its store open (Rasa never closes a tracker store
# either) while the SQL log is gone. asyncio.run cancels the delivery task
# once at its end and waits for it. Through redis-py's send, which uses
# asyncio.wait_for, Python 3.10 lost that cancellation (bpo-42130): the task
# retried on and the process never exited (2 of 2 runs before the fix).
_LEFT_OPEN = """
import asyncio, os, sys
import sqlalchemy as sa
import uvloop
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, UserUttered
from rasa_persistent_tracker import PersistentTrackerStore

prefix, db = sys.argv[1], sys.argv[2]
admin_url = sa.engine.make_url(os.environ["DATABASE_URL"])
admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
with admin.connect() as conn:
    conn.execute(sa.text(f'CREATE DATABASE "{db}"'))


async def main():
    store = PersistentTrackerStore(
        Domain.from_yaml("version: '3.1'\\nintents: [greet]\\n"), host=os.environ["REDIS_URL"],
        key_prefix=prefix, sql_url=admin_url.set(database=db).render_as_string(False))
    tracker = await store.get_or_create_tracker("left-open")
    for i in range(50):
        tracker = await store.retrieve("left-open")
        tracker.update(UserUttered(f"hi {i}", {"name": "greet", "confidence": 1.0}))
        tracker.update(ActionExecuted("action_listen"))
        await store.save(tracker)
    with admin.connect() as conn:  # the log goes away under the running delivery
        conn.execute(sa.text(f'DROP DATABASE "{db}" WITH (FORCE)'))

uvloop.install()
asyncio.run(main())
print("asyncio.run returned", flush=True)
"""


@pytest.mark.real
def test_a_script_that_leaves_its_store_open_exits_while_the_log_is_down(tmp_path):
    import subprocess
    import sys

    urls = real_urls()
    script = tmp_path / "left_open.py"
    script.write_text(_LEFT_OPEN)
    tag = uuid.uuid4().hex[:10]
    env = {**__import__("os").environ, "REDIS_URL": urls["redis"], "DATABASE_URL": urls["sql"]}
    try:
        done = subprocess.run([sys.executable, str(script), f"t{tag}", f"t{tag}"], env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: its delivery task ignored asyncio.run's "
                    "cancellation")
    finally:
        client = __import__("redis").Redis.from_url(urls["redis"])
        for key in client.scan_iter(match=f"t{tag}:*"):
            client.delete(key)
        admin = sa.create_engine(urls["sql"], isolation_level="AUTOCOMMIT",
                                 poolclass=sa.pool.NullPool)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "t{tag}" WITH (FORCE)'))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "asyncio.run returned" in done.stdout
