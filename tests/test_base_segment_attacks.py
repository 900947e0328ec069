"""The base segment a hot record names (``compressed.SEGMENT_FIELD``), against
an attacker who writes Redis, and through key rotation, processes that do not
compress and processes that remember nothing. A segment is reused only if
the record parses as exactly that base plus the rest: a forged split (at a
nested ``"events"`` key inside the base) or a second ``"base"`` key must not
make the store write a record that reads back otherwise (found by review).
Runs on both backend pairs."""
import json
import zlib

import pytest
from rasa.shared.core.events import ActionExecuted, BotUttered, SlotSet, UserUttered
from rasa.shared.core.trackers import EventVerbosity

from rasa_persistent_tracker.record.events import fingerprint
from rasa_persistent_tracker.record.replay import validate_record
from rasa_persistent_tracker.security import compressed, crypto, rekey
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.serde import JsonSerializer
from tests.test_compressed_attacks import get_d, set_d
from tests.test_encryption import K1, K2, keyed_store

NESTED = {"channel": "web", "events": [1, 2]}  # a user's metadata: any JSON a channel sends


def meta_turn(tracker, i):
    tracker.update(UserUttered(f"my name is bob {i}", {"name": "inform", "confidence": 1.0},
                               metadata=NESTED))
    tracker.update(ActionExecuted("utter_greet"))
    tracker.update(BotUttered(f"hi bob {i}"))
    tracker.update(SlotSet("name", f"bob {i}"))
    tracker.update(ActionExecuted("action_listen"))


async def meta_turns(store, cid, count, start=0):
    tracker = await store.get_or_create_tracker(cid)
    for i in range(start, start + count):
        tracker = await store.retrieve(cid)
        meta_turn(tracker, i)
        await store.save(tracker)
    return tracker


def resplit(payload: bytes, codec: Codec) -> bytes:
    """The same record text, its deflate stream split (sync flush) at the
    base's first nested ``,"events":[`` and ``base_segment`` naming that split."""
    loaded, packed = codec.loads_record_parts(payload, "c")  # noqa: F841 (cid unchecked for rpt-z1)
    text = codec.record_text(payload, "c")
    base = packed.text
    cut = base.find(',"events":[')
    assert cut > 0, "the base holds no nested events key"
    head = b'{"base":' + base[:cut].encode()
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY,
                                compressed.DICTIONARY)
    first = squeezer.compress(head) + squeezer.flush(zlib.Z_SYNC_FLUSH)
    rest = text[len(head):].replace(f'"base_segment":{len(packed.segment)}',
                                    f'"base_segment":{len(first)}')
    return compressed.seal_plain(first + squeezer.compress(rest.encode()) + squeezer.flush())


PLAIN = Codec(JsonSerializer())


async def test_a_segment_split_at_a_nested_events_key_is_not_reused(
        make_store, backend):
    # Plaintext (no key): anyone who can write Redis can re-deflate a record.
    # The forged value holds the very same record text as the store wrote (it
    # reads back identically), only its base_segment names a sync-flushed
    # split at a nested '"events":[' key in a user's metadata inside the
    # base. packed_base accepts it: the inflated prefix starts with
    # '{"base":' and is followed by ',"events":['. A process that does not
    # remember the conversation then saves the base's *prefix* as the base.
    cid = "seg1"
    writer = make_store()
    await meta_turns(writer, cid, 12)
    original = get_d(backend, writer, cid)
    want = PLAIN.loads_record(original, cid)
    assert '"events":[1,2]' in json.dumps(want["base"], separators=(",", ":"))
    forged = resplit(original, PLAIN)
    assert PLAIN.loads_record(forged, cid) == want  # the same record, read back
    assert PLAIN.loads_record_parts(forged, cid)[1] is None  # but its segment is refused
    set_d(backend, writer, cid, forged)

    reader = make_store(record_cache_size=0)  # another process, remembering nothing
    tracker = await reader.retrieve(cid)
    assert tracker.get_slot("name") == "bob 11"
    meta_turn(tracker, 12)
    await reader.save(tracker)
    written = get_d(backend, writer, cid)
    # What the store just wrote must read back (it did not when the segment
    # was reused: the base cut mid-object, the JSON unbalanced).
    record = validate_record(PLAIN.loads_record(written, cid), cid)
    assert record["base"] == want["base"]


def test_a_segment_whose_base_a_later_duplicate_key_overrides_is_not_reused():
    # Codec level, plaintext: '{"base":X,"events":[..],...,"base":Y,"base_segment":|X|}'
    # reads as base Y (json: the last key wins), yet loads_record_parts hands
    # back X as "the base's text"; encode_record then writes X while the
    # record it returns (and a process remembers) says Y.
    x = {"loops": [], "head": [], "summary": [], "applied": [], "latest_bot": None}
    y = {**x, "loops": ["survey_form"]}
    events = [{"event": "action", "timestamp": 1.0, "name": "action_listen", "policy": None,
               "confidence": None, "action_text": None, "hide_rule_turn": False}]
    tail = {"events": events, "schema": 2, "sender_id": "c", "next_seq": 2,
            "state": {"slots": {}, "active_loop": None, "latest_action": {},
                      "followup_action": None, "paused": False, "latest_message_at": None},
            "last_event": fingerprint(events[-1]), "base_checked": 0}
    base_json = json.dumps(x, separators=(",", ":"))
    segment = compressed.Deflater(0).segment(base_json)
    rest = "," + json.dumps({**tail, "base": y, "base_segment": len(segment)},
                            separators=(",", ":"))[1:]
    payload = compressed.seal_plain(compressed.Deflater.finish(base_json, segment, rest))
    loaded, packed = PLAIN.loads_record_parts(payload, "c")
    assert loaded["base"] == y and packed is None
    written = PLAIN.encode_record(loaded, [None] * len(loaded["events"]),
                                  packed.text if packed else None,
                                  packed.segment if packed else None)
    assert PLAIN.loads_record(written.payload, "c") == written.record  # X != Y


@pytest.mark.parametrize("keyed", [False, True])
async def test_segment_survives_rotation_mixed_compression_and_forgetful_processes(
        backend, domain, keyed):
    # Control (passes): the store's own writers, key rotation through
    # Codec.dumps_record, a compress_records=false process and processes that
    # remember nothing take turns on one conversation whose base holds a
    # nested "events" key; every record reads back as the tracker saved.
    cid = "seg2"
    first = keyed_store(backend, domain, K1 if keyed else None)
    await meta_turns(first, cid, 12)
    if keyed:  # rotate-keys: the hot record re-sealed under K2
        rotated = keyed_store(backend, domain, f"{K2},{K1}")
        old = get_d(backend, first, cid)
        new = rekey.record(rotated._codec, "k2", cid, compressed.stored_text(old), crypto.HOT)
        assert new is not None
        assert rotated._codec.loads_record_parts(new, cid)[1] is not None  # reused next
        set_d(backend, first, cid, compressed.stored_bytes(new))
    keys = f"{K2},{K1}" if keyed else None
    procs = [keyed_store(backend, domain, keys, record_cache_size=0),
             keyed_store(backend, domain, keys, compress_records=False),
             keyed_store(backend, domain, keys, record_cache_size=0)]
    for p in procs:
        p._codec._deflater._size = 0
    i = 12
    for _ in range(3):
        for proc in procs:
            tracker = await proc.retrieve(cid)
            meta_turn(tracker, i)
            i += 1
            await proc.save(tracker)
            fresh = keyed_store(backend, domain, keys)
            got = await fresh.retrieve(cid)
            record = validate_record(fresh._codec.loads_record(
                compressed.stored_text(get_d(backend, fresh, cid)), cid), cid)
            assert record["state"]["slots"]["name"] == f"bob {i - 1}"
            assert got.get_slot("name") == tracker.get_slot("name")
            assert got.latest_message.text == tracker.latest_message.text
            assert got.latest_message.metadata == NESTED
            want = [e for e in tracker.current_state(EventVerbosity.ALL)["events"]
                    if e["event"] == "user"]
            have = [e for e in got.current_state(EventVerbosity.ALL)["events"]
                    if e["event"] == "user"]
            assert have == want[-len(have):] and len(have) >= 3
            await fresh.close()
