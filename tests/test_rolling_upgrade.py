"""A rolling upgrade to compressed hot records (docs/operations.md).

The code of the last release before compression (commit 5ba890a, taken with
``git archive``) runs in a real subprocess against the same Redis and
PostgreSQL as this code. With ``compress_records: false`` it reads what this
code wrote, as it was, and this code reads what it writes back; with
compression on (the control) it cannot, and quarantines the record: the case
the switch exists for. Without and with an encryption key.
"""
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict

import pytest

from rasa_persistent_tracker.security.keys import new_key_entry
from tests.conftest import IN_CI, Backend, open_backend
from tests.dialogues_gen import DOMAIN_YAML, domain as gen_domain, play_through

REPO = Path(__file__).resolve().parent.parent
OLD = "5ba890a"  # the last commit that wrote uncompressed hot records
KEY = new_key_entry("k1")

OLD_PROCESS = r"""
import asyncio, json, sys
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, BotUttered, UserUttered
from rasa.shared.core.trackers import EventVerbosity
import rasa_persistent_tracker
from rasa_persistent_tracker import PersistentTrackerStore

args = json.loads(sys.argv[1])
assert rasa_persistent_tracker.__file__.startswith(args["old"]), rasa_persistent_tracker.__file__

async def main():
    store = PersistentTrackerStore(Domain.from_yaml(args["domain"]), host=args["redis"],
                                   sql_url=args["sql"], key_prefix=args["prefix"],
                                   max_history=5, record_cache_size=0)
    tracker = await store.retrieve(args["sender"])
    state = tracker.current_state(EventVerbosity.ALL)
    for event in (UserUttered("from the old process", {"name": "greet", "confidence": 1.0}),
                  ActionExecuted("utter_greet"), BotUttered("hi"),
                  ActionExecuted("action_listen")):
        tracker.update(event)
    await store.save(tracker)
    await store.close()
    print(json.dumps({"slots": state["slots"], "active_loop": state["active_loop"],
                      "latest_message": state["latest_message"].get("text"),
                      "events": [e["event"] for e in state["events"]]}))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def old_package() -> str:
    """The package as commit OLD had it, extracted into a temporary folder."""
    listed = subprocess.run(["git", "archive", OLD, "rasa_persistent_tracker"], cwd=REPO,
                            capture_output=True)
    if listed.returncode:
        message = f"commit {OLD} is not in this checkout's history: {listed.stderr[:200]!r}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    folder = tempfile.mkdtemp(prefix="rpt-old-")
    with tarfile.open(fileobj=io.BytesIO(listed.stdout)) as archive:
        archive.extractall(folder)
    return folder


@pytest.fixture(params=[pytest.param("real", marks=pytest.mark.real)])
async def real(request, tmp_path):
    """Real servers only: the two processes share them."""
    async for pair in open_backend(request, tmp_path):
        yield pair


def run_old(old: str, pair: Backend, sender: str, keys: str) -> Dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([old, str(REPO)])}
    env.pop("RPT_ENCRYPTION_KEYS", None)
    if keys:
        env["RPT_ENCRYPTION_KEYS"] = keys
    argument = json.dumps({"old": old, "domain": DOMAIN_YAML, "redis": pair.redis_url,
                           "sql": pair.sql_url, "prefix": pair.prefix, "sender": sender})
    done = subprocess.run([sys.executable, "-c", OLD_PROCESS, argument], env=env,
                          capture_output=True, text=True, timeout=300, cwd=old)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"result": json.loads(done.stdout.strip().splitlines()[-1]), "log": done.stderr}


def quarantined(pair: Backend, sender: str) -> int:
    return len(list(pair.redis_client().scan_iter(match=f"{pair.prefix}:q:{{{sender}}}*")))


@pytest.mark.parametrize("keyed", [False, True], ids=["no key", "key"])
@pytest.mark.parametrize("compress", [False, True], ids=["compress off", "control: on"])
async def test_an_older_process_reads_what_compress_records_false_writes(
        old_package, real, keyed, compress):
    from rasa.shared.core.trackers import EventVerbosity

    keys = KEY if keyed else ""
    environ = {"RPT_ENCRYPTION_KEYS": keys} if keyed else {}
    dom = gen_domain()
    store = real.make_store(dom, environ=environ, max_history=5, record_cache_size=0,
                            compress_records=compress)
    await play_through(store, "rolling", seed=77, turns=25)
    await store.flush()
    payload = real.redis_client().hget(f"{real.prefix}:h:{{rolling}}", "d")
    assert payload.startswith(b"rpt-z1:" if compress and not keyed else
                              b"rpt-enc:3:" if compress else
                              b"rpt-enc:2:" if keyed else b"{")
    expected = (await store.retrieve("rolling")).current_state(EventVerbosity.ALL)

    old = run_old(old_package, real, "rolling", keys)
    if compress:  # the control: an older process cannot read it, and says so
        assert quarantined(real, "rolling") == 1, old["log"][-2000:]
        return
    assert quarantined(real, "rolling") == 0, old["log"][-2000:]
    got = old["result"]
    assert got["slots"] == expected["slots"]
    assert got["active_loop"] == expected["active_loop"]
    assert got["latest_message"] == expected["latest_message"].get("text")
    assert got["events"] == [e["event"] for e in expected["events"]][-len(got["events"]):]
    # ... and the turn the older process saved reads back here.
    again = await store.retrieve("rolling")
    assert again.latest_message.text == "from the old process"
    assert again.current_state()["slots"] == expected["slots"]
    assert quarantined(real, "rolling") == 0
