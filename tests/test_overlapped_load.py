"""Work done while a Redis reply is in flight.

``retrieve`` rebuilds a remembered record before the load says whether it is
still the stored one; ``save`` makes the record it will remember before the
commit's reply says it was written. Whatever runs ahead must count only when
it is used: a record another process replaced is read afresh even if the
remembered one fails to rebuild, an error of a rebuild that is used surfaces
as before, a failing memory never fails a saved turn, and a cancelled
retrieve or save leaves no load or commit running on its own.
"""
import asyncio
import copy
import gc

import pytest

from rasa.shared.core.domain import Domain
from rasa.shared.core.events import SlotSet
from rasa.shared.core.trackers import EventVerbosity

from rasa_persistent_tracker import PersistentTrackerStore
from tests.conftest import DOMAIN_YAML
from tests.dialogue import run_turns, turn


def state(tracker):
    return tracker.current_state(EventVerbosity.ALL)


def _remembering(store, sender):
    assert store._recent.get(sender) is not None


def _reports_unchanged(backend):
    """fakeredis' Lua lacks redis.sha1hex: there every load sends the record."""
    return backend.kind != "fake"


@pytest.fixture(params=["pair", "embedded"])
async def stores(request, backend, tmp_path, domain):
    """``(make_store, reports_unchanged)``: the backend pair, or the embedded
    hot state (which ignores the pair)."""
    if request.param == "pair":
        yield (lambda: backend.make_store(domain)), _reports_unchanged(backend)
        return
    made = []

    def make():
        made.append(PersistentTrackerStore(
            domain, embedded_path=str(tmp_path / "hot.sqlite3"),
            sql_url=f"sqlite:///{tmp_path}/events.sqlite3", environ={}))
        return made[-1]
    yield make, True
    for store in made:
        await store.close()


class _Boom(RuntimeError):
    pass


def _failing_rebuild(store, calls):
    def rebuild(sender_id, remembered):
        calls.append(sender_id)
        raise _Boom("rebuild failed")
    store._records.rebuild_remembered = rebuild


async def test_rebuild_error_of_a_replaced_record_is_not_raised(stores):
    make_store, _ = stores
    mine, other = make_store(), make_store()
    await run_turns(mine, "o1", 3)
    _remembering(mine, "o1")
    tracker = await other.retrieve("o1")
    turn(tracker, 9)
    await other.save(tracker)  # the record mine remembers is no longer the stored one
    calls = []
    _failing_rebuild(mine, calls)
    seen = await mine.retrieve("o1")
    assert calls == ["o1"]  # it ran ahead, and its failure did not count
    assert mine._recent.get("o1") is not None
    assert seen.get_slot("name") == "bob 9"
    assert len(seen.events) == len((await other.retrieve("o1")).events)


async def test_rebuild_error_of_the_current_record_is_raised(stores):
    make_store, unchanged = stores
    store = make_store()
    await run_turns(store, "o2", 3)
    _remembering(store, "o2")
    calls = []
    _failing_rebuild(store, calls)
    if unchanged:  # the rebuild is used: its error is the retrieve's, as before
        with pytest.raises(_Boom):
            await store.retrieve("o2")
    else:  # the record came with the reply: decoded, the rebuild's error unused
        assert (await store.retrieve("o2")).get_slot("name") == "bob 2"
    assert calls == ["o2"]


async def test_unchanged_record_is_rebuilt_once_per_retrieve(stores):
    make_store, _ = stores
    store = make_store()
    await run_turns(store, "o3", 3)
    _remembering(store, "o3")
    real, calls = store._records.rebuild_remembered, []

    def counting(sender_id, remembered):
        calls.append(sender_id)
        return real(sender_id, remembered)
    store._records.rebuild_remembered = counting
    tracker = await store.retrieve("o3")
    assert calls == ["o3"]
    assert tracker.get_slot("name") == "bob 2"


def _slowed(hot, name):
    """Make ``hot.<name>`` a call whose reply is long in flight; return the real one."""
    real = getattr(hot, name)

    async def slow(*args, **kwargs):
        await asyncio.sleep(0.5)
        return await real(*args, **kwargs)
    setattr(hot, name, slow)
    return real


async def _cancelled_after(call, steps):
    """Run ``call``, cancel it after ``steps`` loop turns, let the loop settle;
    the tasks started meanwhile that are still running."""
    started = set(asyncio.all_tasks())
    running = asyncio.ensure_future(call)
    for _ in range(steps):
        await asyncio.sleep(0)
    running.cancel()
    try:
        await running
    except asyncio.CancelledError:
        pass
    for _ in range(5):
        await asyncio.sleep(0)
    return {t for t in asyncio.all_tasks() if t not in started and not t.done()}


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_cancelled_retrieve_leaves_no_load_behind(stores, steps):
    make_store, _ = stores
    store = make_store()
    await run_turns(store, "o4", 2)
    _remembering(store, "o4")
    real_load = _slowed(store._hot, "load")
    left = await _cancelled_after(store.retrieve("o4"), steps)
    assert not [t for t in left if "load" in repr(t.get_coro())]
    store._hot.load = real_load
    # The pool got its connection back, the conversation reads and saves on.
    tracker = await store.retrieve("o4")
    turn(tracker, 5)
    await store.save(tracker)
    assert (await store.retrieve("o4")).get_slot("name") == "bob 5"
    gc.collect()


# ``save`` makes the remembered record while the commit's reply is in flight.

async def test_a_failing_memory_does_not_fail_the_turn(stores, caplog):
    make_store, _ = stores
    store, reader = make_store(), make_store()
    await run_turns(store, "o5", 3)
    real = store._turns._remembered

    def broken(*args):
        raise _Boom("memory failed")
    store._turns._remembered = broken
    tracker = await store.retrieve("o5")
    turn(tracker, 7)
    await store.save(tracker)  # saved, though it cannot be remembered
    assert "could not be kept in memory" in caplog.text
    assert store._recent.get("o5") is None
    store._turns._remembered = real
    assert (await store.retrieve("o5")).get_slot("name") == "bob 7"
    assert (await reader.retrieve("o5")).get_slot("name") == "bob 7"


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_cancelled_save_leaves_no_commit_behind(stores, steps):
    make_store, _ = stores
    store, reader = make_store(), make_store()
    await run_turns(store, "o6", 2)
    real_commit = _slowed(store._hot, "commit")
    tracker = await store.retrieve("o6")
    turn(tracker, 8)
    left = await _cancelled_after(store.save(tracker), steps)
    assert not [t for t in left if "commit" in repr(t.get_coro())]
    store._hot.commit = real_commit
    # Not saved (the commit never ran), and the conversation goes on.
    assert (await reader.retrieve("o6")).get_slot("name") == "bob 1"
    tracker = await store.retrieve("o6")
    assert tracker.get_slot("name") == "bob 1"
    turn(tracker, 9)
    await store.save(tracker)
    assert (await reader.retrieve("o6")).get_slot("name") == "bob 9"


# ``save`` also clones the base's state for the next rebuild during the commit.

async def _with_prepared_clone(store, sender, unchanged=True):
    """A conversation with a base, whose remembered record has a clone ready
    (None with fakeredis: ``unchanged`` False, nothing is rebuilt from memory)."""
    await run_turns(store, sender, 14)  # compacted: the record has a base
    for i in range(12):  # a rebuild captures the base's state; the next save prepares
        tracker = await store.retrieve(sender)
        turn(tracker, 20 + i)
        await store.save(tracker)
        remembered = store._recent.get(sender)
        if remembered.ready and unchanged:
            assert remembered.record["base"]
            return remembered, f"bob {20 + i}"
    return None, f"bob {20 + i}"


async def test_a_prepared_clone_is_handed_out_once(stores):
    make_store, unchanged = stores
    store, reader = make_store(), make_store()
    remembered, name = await _with_prepared_clone(store, "o7", unchanged)
    assert (remembered is not None) is unchanged
    if remembered is not None:
        assert len(remembered.ready) == 1
    first = await store.retrieve("o7")
    second = await store.retrieve("o7")  # nothing ready now: cloned anew
    assert first is not second
    assert remembered is None or not remembered.ready
    first.update(SlotSet("name", "changed"))
    first.slots["size"].value = "huge"
    # In place, as Rasa edits the latest user message (nested values of it
    # are shared: editing those needs record_cache_size 0, docs/configuration.md).
    first.latest_message.parse_data["text"] = "edited"
    first.latest_message.entities.append({"entity": "size", "value": "huge"})
    assert second.get_slot("name") == name and second.get_slot("size") is None
    fresh = await reader.retrieve("o7")  # another process decodes the stored record
    for tracker in (second, await store.retrieve("o7")):
        assert state(tracker) == state(fresh)


async def test_concurrent_retrieves_get_their_own_trackers(stores):
    make_store, _ = stores
    store, reader = make_store(), make_store()
    await _with_prepared_clone(store, "o8")
    trackers = await asyncio.gather(*(store.retrieve("o8") for _ in range(4)))
    assert len({id(t) for t in trackers}) == 4
    assert len({id(t.slots["name"]) for t in trackers}) == 4
    fresh = state(await reader.retrieve("o8"))
    assert all(state(t) == fresh for t in trackers)


async def test_a_clone_prepared_for_another_domain_is_not_used(stores):
    make_store, unchanged = stores
    store = make_store()
    remembered, name = await _with_prepared_clone(store, "o9", unchanged)
    assert (remembered is not None) is unchanged
    # A new model with another slot set is loaded before the next turn.
    store.domain = Domain.from_yaml(DOMAIN_YAML.replace(
        "slots:\n", "slots:\n  extra:\n    type: text\n    mappings: [{type: custom}]\n"))
    tracker = await store.retrieve("o9")
    assert "extra" in tracker.slots and tracker.get_slot("name") == name
    assert {s.name for s in tracker.slots.values()} == {s.name for s in store.domain.slots}


async def test_a_clone_of_another_state_is_not_used(stores):
    make_store, unchanged = stores
    store = make_store()
    remembered, _ = await _with_prepared_clone(store, "o10", unchanged)
    if remembered is None:
        return  # fakeredis: nothing prepared (see above)
    state_, clone = remembered.take_ready()
    stranger = copy.copy(state_)  # equal in every field, but not the state in use
    remembered.ready.append((stranger, clone))
    tracker = store._records.rebuild_remembered("o10", remembered)[1]
    assert tracker is not clone
    remembered.ready.append((remembered.base_state, clone))
    assert store._records.rebuild_remembered("o10", remembered)[1] is clone


# A save that compacts replays the new base during the commit, so the next
# retrieve (whose load round trip is too short to hide a base replay) does not.

async def _compacting_save(store, sender):
    """Turns until a save makes a new base; that save's remembered record."""
    for i in range(30):
        tracker = await store.retrieve(sender)
        turn(tracker, 40 + i)
        await store.save(tracker)
        remembered = store._recent.get(sender)
        if remembered is not None and remembered.new_base and remembered.record["base"]:
            return remembered, f"bob {40 + i}"
    raise AssertionError("no save compacted in 30 turns")


async def test_a_new_base_is_replayed_during_the_commit(stores):
    make_store, unchanged = stores
    store, reader = make_store(), make_store()
    await run_turns(store, "o11", 3)
    remembered, name = await _compacting_save(store, "o11")
    assert remembered.base_state is not None and remembered.base_state.base is (
        remembered.record["base"])
    assert len(remembered.ready) == 1
    prepared = remembered.ready[0][1]
    tracker = await store.retrieve("o11")
    assert (tracker is prepared) is unchanged
    assert tracker.get_slot("name") == name
    assert state(tracker) == state(await reader.retrieve("o11"))
    # The conversation goes on from it, and its next compaction too.
    await _compacting_save(store, "o11")
    assert state(await store.retrieve("o11")) == state(await reader.retrieve("o11"))


async def test_a_failing_replay_ahead_is_left_to_the_rebuild(stores, caplog, monkeypatch):
    make_store, _ = stores
    store, reader = make_store(), make_store()
    await run_turns(store, "o12", 3)
    from rasa_persistent_tracker.errors import CorruptRecordError
    from rasa_persistent_tracker.record import replay

    def broken(*args, **kwargs):
        raise CorruptRecordError("base does not replay")
    monkeypatch.setattr(replay, "base_ahead", broken)
    remembered, name = await _compacting_save(store, "o12")
    assert not remembered.ready and "could not be kept" not in caplog.text
    monkeypatch.undo()
    tracker = await store.retrieve("o12")  # rebuilt (or decoded) as before
    assert tracker.get_slot("name") == name
    assert state(tracker) == state(await reader.retrieve("o12"))


async def test_a_kept_base_without_a_state_is_not_replayed_ahead(stores):
    """A record saved from a decoded tracker (another process wrote last)
    keeps its base: nothing is replayed during that commit."""
    make_store, _ = stores
    store, other = make_store(), make_store()
    await run_turns(store, "o13", 3)
    await _compacting_save(store, "o13")
    tracker = await other.retrieve("o13")
    turn(tracker, 90)
    await other.save(tracker)  # store's memory is stale now
    tracker = await store.retrieve("o13")  # decoded: no base state
    turn(tracker, 91)
    await store.save(tracker)
    remembered = store._recent.get("o13")
    assert remembered is not None and not remembered.new_base
    assert remembered.base_state is None and not remembered.ready
