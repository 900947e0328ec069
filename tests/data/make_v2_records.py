"""Writes tests/data/records_v2.json: hot records as the schema-2 code wrote
them before compression (issue 17): JSON plus checksum, and ``rpt-enc:2``.

Run once with the code of main at 5ba890a; the upgrade test
(tests/test_record_upgrade.py) reads these records with the current code.
Each entry as in records_v1.json, plus ``keys``: the (test-only) encryption
key the record was sealed with, or null.
"""
import asyncio
import json
import sys
import tempfile

from rasa.shared.core.trackers import EventVerbosity

from rasa_persistent_tracker.security.keys import new_key_entry
from tests.conftest import Backend
from tests.dialogues_gen import domain, play_through

ENV = "RPT_ENCRYPTION_KEYS"


async def main(path: str) -> None:
    dom = domain()
    out = []
    key = new_key_entry("k1")
    for seed, turns, keys in ((21, 40, None), (22, 25, None), (23, 40, key), (24, 60, key)):
        pair = Backend("fake", tempfile.mkdtemp())
        store = pair.make_store(dom, environ={ENV: keys} if keys else None, max_history=3,
                                record_cache_size=0)
        sender = f"upgrade-v2-{seed}"
        await play_through(store, sender, seed, turns)
        await store.flush()
        got = await store.retrieve(sender)
        raw = pair.redis_client().hgetall(f"{pair.prefix}:h:{{{sender}}}")
        state = got.current_state(EventVerbosity.NONE)
        out.append({
            "sender_id": sender, "max_history": 3, "keys": keys,
            "hot": {k.decode(): v.decode() for k, v in raw.items() if k in (b"v", b"d")},
            "retrieved": {"slots": state["slots"], "active_loop": state["active_loop"],
                          "latest_action_name": state["latest_action_name"],
                          "latest_message_text": got.latest_message.text,
                          "events": [e.as_dict() for e in got.events]},
        })
        await pair.cleanup()
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1, sort_keys=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/records_v2.json"))
