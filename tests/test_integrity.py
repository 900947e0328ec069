"""An attacker who can write to Redis and to the SQL tables, but has no key.

Every forged, moved or replayed value must be refused (warning, quarantine,
recovery from the true state), never believed. Also: user input cannot choose
a stored type. Runs on both backend pairs.
"""
import json
import logging

from rasa.shared.core.events import ActionExecuted, SlotSet, UserUttered

from test_encryption import K1, keyed_store

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
