"""The embedded hot state (no servers): same contract, and it survives restarts."""
import asyncio

import pytest
from rasa.shared.core.events import ActionExecuted, SlotSet, UserUttered

from rasa_persistent_tracker import ConcurrentSaveError, PersistentTrackerStore


def make(tmp_path, domain, **keys):
    return PersistentTrackerStore(domain, embedded_path=str(tmp_path / "hot.sqlite3"),
                                  sql_url=f"sqlite:///{tmp_path}/events.sqlite3",
                                  environ={}, **keys)


def turn(tracker, i):
    tracker.update(UserUttered(f"hi {i}", {"name": "inform", "confidence": 1.0}))
    tracker.update(SlotSet("name", f"n{i}"))
    tracker.update(ActionExecuted("action_listen"))


async def test_state_survives_a_restart_of_the_bot(tmp_path, domain):
    store = make(tmp_path, domain)
    tracker = await store.get_or_create_tracker("u")
    for i in range(30):
        tracker = await store.retrieve("u")
        turn(tracker, i)
        await store.save(tracker)
    await store.close()

    again = make(tmp_path, domain)  # a new process would do exactly this
    loaded = await again.retrieve("u")
    assert loaded.get_slot("name") == "n29"
    assert len((await again.retrieve_full_tracker("u")).events) == 1 + 30 * 3
    assert await again.keys() == ["u"]
    await again.close()


async def test_conflicting_saves_are_rejected(tmp_path, domain):
    store = make(tmp_path, domain)
    await store.get_or_create_tracker("c")
    first, second = await store.retrieve("c"), await store.retrieve("c")
    turn(first, 1)
    await store.save(first)
    turn(second, 2)
    with pytest.raises(ConcurrentSaveError):
        await store.save(second)
    await store.close()


async def test_expiry_starts_a_fresh_session(tmp_path, domain):
    store = make(tmp_path, domain, record_exp=1)
    tracker = await store.get_or_create_tracker("e")
    turn(tracker, 1)
    await store.save(tracker)
    await store.flush()
    await asyncio.sleep(1.2)
    assert await store.retrieve("e") is None
    await store.close()


async def test_corrupt_embedded_record_is_quarantined(tmp_path, domain, caplog):
    store = make(tmp_path, domain)
    tracker = await store.get_or_create_tracker("x")
    turn(tracker, 1)
    await store.save(tracker)
    await store.flush()
    store._hot._conn.execute("UPDATE rpt_hot SET payload=? WHERE conversation_id='x'",
                             (b"\x00garbage",))
    loaded = await store.retrieve("x")
    assert loaded.get_slot("name") == "n1"
    assert "unreadable" in caplog.text
    count = store._hot._conn.execute("SELECT COUNT(*) FROM rpt_quarantine").fetchone()[0]
    assert count == 1
    await store.close()


async def test_unreadable_outbox_entry_is_moved_out_and_delivery_goes_on(tmp_path, domain):
    # Between two good entries, with a header no acknowledgement would pop.
    store = make(tmp_path, domain, outbox_linger=600)
    tracker = await store.get_or_create_tracker("o")
    turn(tracker, 1)
    await store.save(tracker)
    bogus = '99|1.0|[{"seq": 99, "bogus": 1}]'
    store._hot._conn.execute("INSERT INTO rpt_outbox (conversation_id, last_seq, entry, "
                             "expires_at) VALUES ('o', 99, ?, 1e12)", (bogus,))
    tracker = await store.retrieve("o")
    turn(tracker, 2)
    await store.save(tracker)
    conn = store._hot._conn
    queued = [e for (e,) in conn.execute("SELECT entry FROM rpt_outbox ORDER BY id")]
    assert bogus in queued[1:-1]
    await store.flush()
    assert conn.execute("SELECT payload FROM rpt_quarantine").fetchall() == [(bogus,)]
    assert conn.execute("SELECT COUNT(*) FROM rpt_outbox").fetchone()[0] == 0
    full = await store.retrieve_full_tracker("o")
    assert [e.value for e in full.events if isinstance(e, SlotSet)] == ["n1", "n2"]
    await store.close()
