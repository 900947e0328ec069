"""A turn in flight when the hot state loses its data (write-behind mode).

The tracker was read before a Redis wipe; the turns before it were still in
the outbox, so the wipe took them from the hot state and they are not in SQL.
Its save must not number its rows after them, leaving a hole in the log that
nothing fills: the store logs those turns again from the tracker in hand
(which holds them), whether the save then finds Redis back and empty or still
unreachable, or after its commit, when a written-through turn's delivery
meets the wipe. Found by the write-behind chaos run (tests/test_chaos.py).
"""
import logging

import sqlalchemy as sa
from rasa.shared.core.events import ActionExecuted

from rasa_persistent_tracker import HotStateUnavailable
from tests.dialogue import run_turns, turn


def logged(store, sender):
    with store._log.sync.engine.connect() as conn:
        return conn.execute(sa.text("SELECT seq, data FROM rpt_events WHERE "
                                    "conversation_id=:c ORDER BY seq"), {"c": sender}).fetchall()


def wipe(backend):
    client = backend.redis_client()
    for key in client.scan_iter(match=f"{backend.prefix}:*"):
        client.delete(key)


async def in_flight(make_store, sender, **config):
    """Three turns in SQL, two more only in the outbox, and a tracker read now."""
    store = make_store(outbox_linger=600, **config)  # delivery waits for flush()
    await run_turns(store, sender, 3)
    await store.flush()
    in_sql = len(logged(store, sender))
    for i in (3, 4):
        tracker = await store.retrieve(sender)
        turn(tracker, i)
        await store.save(tracker)
    assert len(logged(store, sender)) == in_sql  # the two newest are not in SQL
    return store, await store.retrieve(sender)


def assert_whole(rows, turns):
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    for i in turns:
        assert sum(f'"my name is bob {i}"' in r[1] for r in rows) == 1, i


async def test_a_save_after_a_wipe_logs_the_lost_turns_again(make_store, backend, caplog):
    store, tracker = await in_flight(make_store, "w1")
    wipe(backend)
    caplog.set_level(logging.WARNING)
    turn(tracker, 9)
    await store.save(tracker)
    await store.flush()
    assert_whole(logged(store, "w1"), (0, 1, 2, 3, 4, 9))
    assert any("logged again from the tracker" in r.getMessage() for r in caplog.records)
    resumed = await store.retrieve("w1")
    assert resumed.get_slot("name") == "bob 9"
    turn(resumed, 10)
    await store.save(resumed)
    await store.flush()
    assert_whole(logged(store, "w1"), (0, 1, 2, 3, 4, 9, 10))


async def test_a_save_to_sql_after_a_wipe_logs_the_lost_turns_again(
        make_store, backend, monkeypatch):
    store, tracker = await in_flight(make_store, "w2")
    wipe(backend)

    async def down(*_args, **_kwargs):
        raise HotStateUnavailable("Redis is unreachable (test)")

    monkeypatch.setattr(store._hot, "commit", down)
    turn(tracker, 9)
    await store.save(tracker)  # straight to SQL
    assert_whole(logged(store, "w2"), (0, 1, 2, 3, 4, 9))


async def test_turns_logged_again_are_not_logged_twice_when_the_outbox_survives(
        make_store, backend, monkeypatch):
    store, tracker = await in_flight(make_store, "w3")

    async def down(*_args, **_kwargs):
        raise HotStateUnavailable("Redis is unreachable (test)")

    with monkeypatch.context() as outage:  # unreachable, not wiped
        outage.setattr(store._hot, "commit", down)
        turn(tracker, 9)
        await store.save(tracker)
    await store.flush()  # Redis is back: its outbox delivers the same two turns
    assert_whole(logged(store, "w3"), (0, 1, 2, 3, 4, 9))


async def test_a_written_through_turn_whose_delivery_meets_a_wipe_logs_the_lost_turns(
        make_store, backend, monkeypatch):
    store, tracker = await in_flight(make_store, "w4", sync_actions=["action_pay"])

    async def wiped_then_down(_ids):
        wipe(backend)  # Redis lost everything right after this turn's commit
        raise HotStateUnavailable("Redis is unreachable (test)")

    monkeypatch.setattr(store._outbox, "deliver", wiped_then_down)
    turn(tracker, 9)
    tracker.update(ActionExecuted("action_pay"))  # written through: a payment
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)  # returns once the turn is in SQL
    assert_whole(logged(store, "w4"), (0, 1, 2, 3, 4, 9))
