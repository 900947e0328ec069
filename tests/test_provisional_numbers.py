"""A returning user whose hot record expired, during a SQL outage: the turn is
numbered provisionally, delivery later moves its rows after the history, and
the snapshot and hot record must follow, so that a later Redis wipe resumes
the conversation instead of reporting it expired."""
import sqlalchemy as sa

from tests.dialogue import run_turns, turn


def _down(*_args, **_kwargs):
    raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))


async def test_rows_numbered_during_a_sql_outage_move_the_snapshot_and_record(
        make_store, backend, monkeypatch):
    store = make_store()
    await run_turns(store, "back", 3)
    await store.flush()
    client = backend.redis_client()
    client.delete(f"{backend.prefix}:h:{{back}}")  # the hot record expired...
    with store._log.sync.engine.begin() as conn:  # ...because the user was away a day
        conn.execute(sa.text("UPDATE rpt_snapshots SET saved_at = saved_at - 172800"))

    log = store._log.sync
    with monkeypatch.context() as outage:
        for name in ("snapshot", "read", "next_seq", "append"):
            outage.setattr(log, name, _down)
        tracker = await store.get_or_create_tracker("back")  # a new session
        turn(tracker, 50)
        await store.save(tracker)  # numbered provisionally, queued in the outbox
    await store.flush()  # SQL is back: the rows move after the history

    tracker = await store.retrieve("back")
    turn(tracker, 51)
    await store.save(tracker)
    await store.flush()
    client.flushall() if backend.kind == "fake" else [
        client.delete(k) for k in client.scan_iter(match=f"{backend.prefix}:*")]

    resumed = await store.retrieve("back")  # Redis wiped: from the snapshot
    assert resumed is not None and resumed.get_slot("name") == "bob 51"
    turn(resumed, 52)
    await store.save(resumed)
    await store.flush()
    with store._log.sync.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT seq, data FROM rpt_events WHERE "
                                    "conversation_id='back' ORDER BY seq")).fetchall()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    for i in (0, 1, 2, 50, 51, 52):
        assert sum(f'"my name is bob {i}"' in r[1] for r in rows) == 1, i
