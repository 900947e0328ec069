"""Records written by earlier code are read by this code, and rewritten.

tests/data/records_v1.json holds hot records exactly as the code at 0829cd5
(schema 1) stored them, and what its ``retrieve`` gave (written by
tests/data/make_v1_records.py); tests/data/records_v2.json those of the code
at 5ba890a (schema 2, before compression: JSON plus checksum, and
``rpt-enc:2`` with the key it names), written by make_v2_records.py. Each is
put into an empty hot state, with no SQL log at all: a quarantine, a log
replay or a fresh session would show.
"""
import inspect
import json
import logging
import os

import pytest
from rasa.shared.core.events import ActionExecuted, BotUttered, UserUttered
from rasa.shared.core.trackers import EventVerbosity

from rasa_persistent_tracker.security.compressed import stored_bytes
from tests.dialogues_gen import domain as gen_domain

HERE = os.path.dirname(__file__)


def _load(store, text, sender):
    """The store's codec reading a record (bound to its conversation where the
    codec takes the id)."""
    loads = store._codec.loads_record
    if len(inspect.signature(loads).parameters) > 1:
        return loads(text, sender)
    return loads(text)


def _records(name="records_v1.json"):
    with open(os.path.join(HERE, "data", name)) as fh:
        return json.load(fh)


async def test_schema_1_records_resume_and_are_rewritten(make_store, backend, caplog):
    await _resume_and_rewrite(make_store, backend, caplog, _records())


@pytest.mark.parametrize("form", ["plain", "encrypted"])
async def test_uncompressed_records_resume_and_are_rewritten_compressed(make_store, backend,
                                                                        caplog, form):
    entries = [e for e in _records("records_v2.json") if bool(e["keys"]) == (form == "encrypted")]
    assert entries and all(e["hot"]["d"].startswith("{" if form == "plain" else "rpt-enc:2:")
                           for e in entries)
    await _resume_and_rewrite(make_store, backend, caplog, entries,
                              "rpt-z1:" if form == "plain" else "rpt-enc:3:k1:")


async def _resume_and_rewrite(make_store, backend, caplog, entries, written=None):
    dom = gen_domain()
    keys = {e.get("keys") for e in entries}
    environ = {"RPT_ENCRYPTION_KEYS": keys.pop()} if None not in keys else None
    store = make_store(domain_override=dom, environ=environ, max_history=3,
                       record_cache_size=0)
    client = backend.redis_client()
    caplog.set_level(logging.WARNING)
    for entry in entries:
        sender = entry["sender_id"]
        key = f"{backend.prefix}:h:{{{sender}}}"
        client.hset(key, mapping=entry["hot"])
        client.expire(key, 600)
        tracker = await store.retrieve(sender)
        assert tracker is not None, sender
        old = entry["retrieved"]
        state = tracker.current_state(EventVerbosity.NONE)
        assert state["slots"] == old["slots"], sender
        assert state["active_loop"] == old["active_loop"], sender
        assert state["latest_action_name"] == old["latest_action_name"], sender
        assert tracker.latest_message.text == old["latest_message_text"], sender
        size = len(_load(store, entry["hot"]["d"], sender)["events"])
        window = [e.as_dict() for e in tracker.events][-size:]
        assert window == old["events"][-size:], sender  # the raw window, as it was
        # The next turn writes schema 2 and the conversation goes on from it.
        for event in (UserUttered("hello", {"name": "greet", "confidence": 1.0}),
                      ActionExecuted("utter_greet"), BotUttered("hi"),
                      ActionExecuted("action_listen")):
            tracker.update(event)
        await store.save(tracker)
        raw = client.hget(key, "d")
        if written is not None:
            assert raw.startswith(written.encode()), raw[:20]
        stored = _load(store, raw.decode("utf-8", "surrogateescape"), sender)
        assert stored["schema"] == 2
        again = await store.retrieve(sender)
        assert again.current_state()["slots"] == tracker.current_state()["slots"]
        assert again.active_loop == tracker.active_loop
        assert again.latest_message.text == "hello"
    assert "unreadable" not in caplog.text and "resumed" not in caplog.text


async def test_records_without_base_checked_resume_and_gain_it(make_store, backend):
    # Records of commit 5ba890a and before have no "base_checked": they read as
    # "the base accounts for none of the window" (every revert in it forces a
    # compaction, as that code did), and the next save writes the field.
    from rasa_persistent_tracker.errors import CorruptRecordError
    from rasa_persistent_tracker.record.replay import validate_record
    from tests.dialogues_gen import Simulator, generate

    dom = gen_domain()
    store = make_store(domain_override=dom, max_history=3, record_cache_size=0)
    client = backend.redis_client()
    sim = Simulator(dom, "old")
    key = f"{backend.prefix}:h:{{old}}"
    for number, turn in enumerate(generate(31, 150)):
        events = await sim.play(turn)
        tracker = await store.retrieve("old") or store.init_tracker("old")
        for event in events:
            tracker.update(event)
        await store.save(tracker)
        record = _load(store, client.hget(key, "d"), "old")
        if number > 10 and record["base"] and record["base_checked"]:
            break  # a record with a base that accounts for part of its window
    assert record["base"] and 0 < record["base_checked"] <= len(record["events"])
    expected = (await store.retrieve("old")).current_state(EventVerbosity.ALL)
    del record["base_checked"]
    client.hset(key, "d", stored_bytes(store._codec.dumps_record(record)))
    tracker = await store.retrieve("old")
    assert tracker.current_state(EventVerbosity.ALL) == expected
    tracker.update(UserUttered("hello", {"name": "greet", "confidence": 1.0}))
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)
    assert "base_checked" in _load(store, client.hget(key, "d"), "old")
    for bad in (-1, len(record["events"]) + 1, True, "2", 1.5):
        with_bad = {**record, "base_checked": bad}
        try:
            validate_record(with_bad, "old")
        except CorruptRecordError as exc:
            assert "base_checked" in str(exc)
        else:
            raise AssertionError(f"base_checked={bad!r} was accepted")
