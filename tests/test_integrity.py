"""An attacker who can write to Redis and to the SQL tables, but has no key.

Every forged, moved or replayed value must be refused (warning, quarantine,
recovery from the true state), never believed. Also: user input cannot choose
a stored type. Runs on both backend pairs.
"""
import json
import logging
from typing import Union

import pytest
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, SlotSet, UserUttered

from rasa_persistent_tracker import CorruptRecordError, EventLogUnavailable
from rasa_persistent_tracker.config import parse_config
from rasa_persistent_tracker.log.entries import make_entry
from rasa_persistent_tracker.log.event_log import SQLEventLog
from rasa_persistent_tracker.log.tables import EVENTS, SNAPSHOTS, LogRow
from rasa_persistent_tracker.record.events import fingerprint
from rasa_persistent_tracker.record.freshness import Freshness
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.compressed import stored_bytes
from rasa_persistent_tracker.security.crypto import HOT, SNAPSHOT, build_protected
from rasa_persistent_tracker.security.serde import JsonSerializer
from test_encryption import (
    ENV,
    K1,
    chat,
    execute,
    hot_key,
    keyed_store,
    log_rows,
    secret_turn,
    warnings_of,
)

TAGGED = {"__rpt_type__": "decimal", "value": "7.5"}
NESTED = {"__rpt_type__~": ["bytes", {"__rpt_type__": "set", "value": [1]}], "x": 1}


async def test_user_dicts_that_look_like_type_tags_come_back_as_sent(backend, domain):
    store = keyed_store(backend, domain, None)
    tracker = await store.get_or_create_tracker("tag1")
    text = '/inform{"amount": ' + json.dumps(TAGGED) + "}"
    entity = {"entity": "amount", "value": TAGGED, "start": 0, "end": 1}
    tracker.update(UserUttered(text, {"name": "inform", "confidence": 1.0}, [entity]))
    tracker.update(SlotSet("amount", TAGGED))
    tracker.update(SlotSet("name", NESTED))
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)
    await store.flush()
    store._recent.forget("tag1")  # read the stored bytes, not this process' memory
    for loaded in (await store.retrieve("tag1"), await store.retrieve_full_tracker("tag1")):
        assert loaded.get_slot("amount") == TAGGED and loaded.get_slot("name") == NESTED
        assert loaded.latest_message.entities[0]["value"] == TAGGED
        json.dumps(loaded.current_state())  # what Rasa's HTTP API does: no Decimal inside
    backend.redis_client().delete(f"{backend.prefix}:h:{{tag1}}")  # from the snapshot
    assert (await store.retrieve("tag1")).get_slot("amount") == TAGGED


# ------------------------------------------------------- forged, moved, replayed

PIN_DOMAIN = """
version: "3.1"
intents: [inform]
slots:
  name: {type: any, mappings: [{type: custom}]}
  pin_attempts: {type: any, mappings: [{type: custom}]}
  locked: {type: any, mappings: [{type: custom}]}
responses:
  utter_greet: [{text: hi}]
session_config:
  session_expiration_time: 60
  carry_over_slots_to_new_session: true
"""


@pytest.fixture
def pin_domain() -> Domain:
    return Domain.from_yaml(PIN_DOMAIN)


async def wrong_pin(store, cid: str, attempt: int) -> None:
    tracker = await store.retrieve(cid) or await store.get_or_create_tracker(cid)
    tracker.update(UserUttered(f"PIN {attempt}000", {"name": "inform", "confidence": 1.0}))
    tracker.update(SlotSet("pin_attempts", attempt))
    tracker.update(SlotSet("locked", attempt >= 3))
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)


def hot_payload(backend, cid: str) -> bytes:
    return backend.redis_client().hget(hot_key(backend, cid), "d")


def write_back(backend, cid: str, payload: Union[str, bytes]) -> None:
    """The attacker's write: the old payload, under the current version."""
    backend.redis_client().hset(hot_key(backend, cid), "d", stored_bytes(payload))


def forged_record(store, cid: str, kind: str = HOT, **slots) -> str:
    """The conversation's record with other slot values, written without the key
    (compressed with its unkeyed checksum, as a store without a key writes a hot
    record; JSON plus its checksum for ``kind`` snapshot or ``legacy``)."""
    record = store._codec.loads_record(hot_payload(store_backend[store], cid), cid)
    record["state"]["slots"].update(slots)
    record["events"].append({"event": "slot", "timestamp": 1.0, "name": list(slots)[0],
                             "value": list(slots.values())[0]})
    record["last_event"] = fingerprint(record["events"][-1])
    return Codec(JsonSerializer()).dumps_record(record, SNAPSHOT if kind == "legacy" else kind)


store_backend = {}


def keyed(backend, domain, **overrides):
    store = keyed_store(backend, domain, K1, **overrides)
    store_backend[store] = backend
    return store


def rows_of(backend, cid: str):
    return {r.seq: r for r in log_rows(backend, cid)}


def set_row(backend, cid: str, seq: int, data: str) -> None:
    execute(backend, EVENTS.update().where(EVENTS.c.conversation_id == cid,
                                           EVENTS.c.seq == seq).values(data=data))


@pytest.mark.parametrize("where", ["same-process", "new-process", "undelivered"])
async def test_a_locked_session_written_back_unlocked_stays_locked(backend, pin_domain, where,
                                                                   caplog, monkeypatch):
    store = keyed(backend, pin_domain)
    if where == "undelivered":
        monkeypatch.setattr(store._outbox, "notify", lambda cid: None)  # rows stay queued
    await wrong_pin(store, "pin", 1)
    await store.flush() if where != "undelivered" else None
    unlocked = hot_payload(backend, "pin")
    await wrong_pin(store, "pin", 2)
    await wrong_pin(store, "pin", 3)
    if where != "undelivered":
        await store.flush()
    write_back(backend, "pin", unlocked)
    reader = store if where != "new-process" else keyed(backend, pin_domain)
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await reader.retrieve("pin")
    assert tracker.get_slot("locked") is True and tracker.get_slot("pin_attempts") == 3
    assert any("record is stale" in w for w in warnings_of(caplog, "'pin'"))
    await wrong_pin(reader, "pin", 4)  # the conversation goes on from its true state
    assert (await reader.retrieve("pin")).get_slot("pin_attempts") == 4


async def test_a_forged_plaintext_hot_record_is_refused(backend, domain, caplog):
    store = keyed(backend, domain)
    await chat(store, "f1", 2)
    await store.flush()
    write_back(backend, "f1", forged_record(store, "f1", name="Mallory"))
    store._recent.forget("f1")
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await store.retrieve("f1")
    assert tracker.get_slot("name") == "Zed Secret1"  # the true state, from SQL
    assert any("plaintext hot refused" in w for w in warnings_of(caplog, "'f1'"))
    secret_turn(tracker, 2)
    await store.save(tracker)
    assert (await store.retrieve("f1")).get_slot("name") == "Zed Secret2"


async def test_plaintext_is_believed_only_with_the_migration_switch(backend, domain):
    store = keyed(backend, domain)
    await chat(store, "f2", 1)
    await store.flush()
    write_back(backend, "f2", forged_record(store, "f2", name="Legacy"))
    migrating = keyed(backend, domain, accept_plaintext=True)
    assert (await migrating.retrieve("f2")).get_slot("name") == "Legacy"  # the control


@pytest.mark.parametrize("form", [HOT, "legacy"])
async def test_a_forged_plaintext_record_of_either_format_is_refused(backend, domain, caplog,
                                                                     form):
    store = keyed(backend, domain)
    await chat(store, "f3", 2)
    await store.flush()
    write_back(backend, "f3", forged_record(store, "f3", form, name="Mallory"))
    store._recent.forget("f3")
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await store.retrieve("f3")
    assert tracker.get_slot("name") == "Zed Secret1"
    assert any("plaintext hot refused" in w for w in warnings_of(caplog, "'f3'"))
    write_back(backend, "f3", forged_record(store, "f3", form, name="Legacy"))
    migrating = keyed(backend, domain, accept_plaintext=True)
    assert (await migrating.retrieve("f3")).get_slot("name") == "Legacy"  # the control


async def test_a_forged_or_moved_snapshot_is_refused(backend, domain, caplog):
    store = keyed(backend, domain)
    await chat(store, "s1", 2)
    await chat(store, "s2", 3)
    await store.flush()
    forged = forged_record(store, "s1", SNAPSHOT, name="Mallory")
    execute(backend, SNAPSHOTS.update().where(SNAPSHOTS.c.conversation_id == "s1")
            .values(payload=forged))
    # s2's hot record (a genuine ciphertext of s2, in the text form older
    # versions wrote hot records in) put where s2's snapshot belongs.
    execute(backend, SNAPSHOTS.update().where(SNAPSHOTS.c.conversation_id == "s2")
            .values(payload=store._codec.reseal_record(hot_payload(backend, "s2"), "s2", HOT)))
    client = backend.redis_client()
    client.delete(hot_key(backend, "s1"), hot_key(backend, "s2"))  # Redis lost
    reader = keyed(backend, domain)
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        assert (await reader.retrieve("s1")).get_slot("name") == "Zed Secret1"
        assert (await reader.retrieve("s2")).get_slot("name") == "Zed Secret2"
    refused = warnings_of(caplog, "snapshot is unreadable too")
    assert any("plaintext snapshot refused" in w for w in refused)
    assert any("'s2'" in w and "decryption failed" in w for w in refused)


async def test_forged_and_moved_log_rows_are_refused(backend, domain, caplog):
    store = keyed(backend, domain)
    await chat(store, "a", 2)
    await chat(store, "b", 2)
    await store.flush()
    a, b = rows_of(backend, "a"), rows_of(backend, "b")
    first, second = [s for s, r in b.items() if r.type_name == "slot"]
    action = next(s for s, r in b.items() if r.type_name == "action" and s > 1)
    forged = json.dumps({"event": "slot", "timestamp": 1.0, "name": "name", "value": "Mallory"})
    set_row(backend, "b", first, forged)  # forged plaintext
    set_row(backend, "b", second, a[second].data)  # a's row, same seq (sealed)
    set_row(backend, "b", action, a[action].data)  # a's row, same seq (authenticated)
    set_row(backend, "b", 1, b[action].data)  # b's own row, another seq (authenticated)
    set_row(backend, "a", second, a[first].data)  # a's own row, another seq (sealed)
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        full_b = await store.retrieve_full_tracker("b")
        full_a = await store.retrieve_full_tracker("a")
    skipped = warnings_of(caplog, "skipped corrupt log row")
    seqs = {cid: {w.split("seq=")[1].split(" ")[0] for w in skipped if f"'{cid}'" in w}
            for cid in ("a", "b")}
    assert seqs == {"a": {str(second)}, "b": {str(first), str(second), str(action), "1"}}
    assert not [e for e in full_b.events if isinstance(e, SlotSet)]
    assert [e.value for e in full_a.events if isinstance(e, SlotSet)] == ["Zed Secret0"]
    # Rebuilt from the log (Redis and the snapshot lost): never a forged value.
    execute(backend, SNAPSHOTS.delete())
    backend.redis_client().delete(hot_key(backend, "b"))
    tracker = await keyed(backend, domain).retrieve("b")
    assert tracker is None or tracker.get_slot("name") is None


async def test_forged_and_moved_outbox_entries_are_quarantined(backend, domain, caplog,
                                                              monkeypatch):
    store = keyed(backend, domain)
    monkeypatch.setattr(store._outbox, "notify", lambda cid: None)  # keep entries queued
    await chat(store, "o1", 1)
    await chat(store, "o2", 1)
    client = backend.redis_client()
    outbox = f"{backend.prefix}:o:{{%s}}"
    o1_entry = client.lindex(outbox % "o1", -1)
    seq = int(o1_entry.split(b"|")[0])
    plain = make_entry([LogRow(seq + 1, "slot", 1.0, None, None, json.dumps(
        {"event": "slot", "timestamp": 1.0, "name": "name", "value": "Mallory"}))], 1.0)
    client.rpush(outbox % "o2", o1_entry, plain)  # o1's entry moved, and a forged one
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        await store.flush()
    moved = warnings_of(caplog, "unreadable outbox entry")
    assert len(moved) == 2 and all("'o2'" in w for w in moved)
    assert any("plaintext outbox refused" in w for w in moved)
    names = [e.value for e in (await store.retrieve_full_tracker("o2")).events
             if isinstance(e, SlotSet)]
    assert names == ["Zed Secret0"]


def sealed_rows(codec, cid, first, last, tag):
    """Row dicts whose data is sealed (odd seqs) or authenticated (even) for their seq."""
    out = []
    for seq in range(first, last + 1):
        event = {"event": "slot" if seq % 2 else "action", "timestamp": 1.0, "v": f"{tag}{seq}"}
        data = codec.protect_event(event, json.dumps(event), cid, seq)
        out.append(LogRow(seq, event["event"], 1.0, None, None, data).as_dict())
    return out


def test_rows_re_sequenced_at_delivery_are_sealed_for_their_new_seq(backend):
    codec = Codec(JsonSerializer(), *build_protected(parse_config({}, {}), {ENV: K1}))
    log = SQLEventLog(backend.engine())
    log.migrate()
    log.bind_rows(codec.rebind_row, codec.row_text)
    try:
        log.append({"c1": sealed_rows(codec, "c1", 1, 3, "a")}, {})
        # Numbered while the log was unreachable: 2 and 3 clash and move to 4 and 5.
        late = sealed_rows(codec, "c1", 2, 4, "b")
        assert log.append({"c1": late}, {}) == 2
        assert log.append({"c1": late}, {}) == 0  # redelivered: nothing moves twice
        stored = log.read("c1")
        assert [r.seq for r in stored] == [1, 2, 3, 4, 5, 6]
        assert [codec.loads_event(r.data, "c1", r.seq)["v"] for r in stored] == [
            "a1", "a2", "a3", "b2", "b3", "b4"]
        with pytest.raises(CorruptRecordError):  # bound to the new seq, not the old one
            codec.loads_event(stored[3].data, "c1", 2)
    finally:
        log.engine.dispose()


async def test_an_unreachable_log_slows_first_reads_down_once_per_backoff():
    calls = []

    class DownLog:
        sync = type("Sync", (), {"next_seq": None})

        async def run(self, fn, *args):
            calls.append(args)
            raise EventLogUnavailable("down")

    fresh = Freshness(DownLog(), hot=None, entries=None)
    assert await fresh.behind("a", 5, 0) is None  # nothing newer known: believed
    assert await fresh.behind("b", 5, 0) is None
    assert calls == [("a",)]
