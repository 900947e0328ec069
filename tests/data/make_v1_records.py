"""Writes tests/data/records_v1.json: hot records as the schema-1 code wrote them.

Run once with the code of main at 0829cd5 (before schema 2); the upgrade test
(tests/test_record_upgrade.py) reads these records with the current code.
Each entry: the stored hot hash (fields ``v`` and ``d``) and what the
schema-1 code's ``retrieve`` gave for it.
"""
import asyncio
import json
import sys
import tempfile

from rasa.shared.core.trackers import EventVerbosity

from tests.conftest import Backend
from tests.dialogues_gen import domain, play_through


async def main(path: str) -> None:
    dom = domain()
    out = []
    for seed, turns in ((11, 40), (12, 60), (13, 25), (14, 80)):
        pair = Backend("fake", tempfile.mkdtemp())
        store = pair.make_store(dom, max_history=3, record_cache_size=0)
        sender = f"upgrade-{seed}"
        await play_through(store, sender, seed, turns)
        await store.flush()
        got = await store.retrieve(sender)
        raw = pair.redis_client().hgetall(f"{pair.prefix}:h:{{{sender}}}")
        state = got.current_state(EventVerbosity.NONE)
        out.append({
            "sender_id": sender, "max_history": 3,
            "hot": {k.decode(): v.decode() for k, v in raw.items()},
            "retrieved": {"slots": state["slots"], "active_loop": state["active_loop"],
                          "latest_action_name": state["latest_action_name"],
                          "latest_message_text": got.latest_message.text,
                          "events": [e.as_dict() for e in got.events]},
        })
        await pair.cleanup()
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1, sort_keys=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/records_v1.json"))
