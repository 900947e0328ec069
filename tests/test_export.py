"""``export``: the log as JSON lines (or to an event broker), decrypted, in
order, resumable, skipping (and naming) rows that do not open.

Conversations are written through the store as Rasa would (encrypted user
text and a sensitive slot), then exported through the command line the way
an operator runs it, and compared with ``retrieve_full_tracker``.
"""
import asyncio
import base64
import json
import os
import random
import sqlite3
from typing import Any, Dict, List

import pytest
import sqlalchemy as sa
import yaml

from rasa_persistent_tracker import PersistentTrackerStore, cli
from rasa_persistent_tracker.admin import exporting
from tests.conftest import Backend
from tests.test_import import conversation

KEY = "k1:" + base64.urlsafe_b64encode(bytes(range(32))).decode()


def endpoints(folder: Any, **block: Any) -> str:
    path = os.path.join(str(folder), "endpoints.yml")
    with open(path, "w") as f:
        yaml.safe_dump({"tracker_store": {
            "type": "rasa_persistent_tracker.PersistentTrackerStore",
            "sensitive_slots": ["name"], "encrypt_user_text": True, **block}}, f)
    return path


async def fill(store: Any, domain: Any, count: int, seed: int = 3) -> List[str]:
    rng = random.Random(seed)
    ids = [f"exp-{i:03d}" for i in range(count)]
    for cid in ids:
        full = conversation(domain, cid, rng)
        # saved turn by turn, as the processor does
        events = list(full.events)
        cut = rng.randint(1, len(events))
        from rasa.shared.core.trackers import DialogueStateTracker
        await store.save(DialogueStateTracker.from_events(cid, events[:cut], domain.slots))
        tracker = await store.retrieve(cid)
        for event in events[cut:]:
            tracker.update(event)
        await store.save(tracker)
    await store.flush()
    return ids


def run_cli(argv: List[str]) -> int:
    return cli.main(argv)


def read_lines(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


async def expected_bodies(store: Any, ids: List[str]) -> Dict[str, List[Dict[str, Any]]]:
    out = {}
    for cid in ids:
        full = await store.retrieve_full_tracker(cid)
        out[cid] = [e.as_dict() for e in full.events]
    return out


def by_conversation(lines: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for line in lines:
        out.setdefault(line["sender_id"], []).append(line)
    return out


def strip(line: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in line.items() if k not in ("sender_id", "seq")}


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """An embedded store in ``tmp_path`` (as ``rasa run`` there), with a key."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("RPT_ENCRYPTION_KEYS", KEY)
    monkeypatch.chdir(tmp_path)
    return endpoints(tmp_path)


async def test_export_is_the_full_history_decrypted_in_order(embedded, domain, tmp_path):
    store = PersistentTrackerStore(domain, sensitive_slots=["name"], encrypt_user_text=True)
    ids = await fill(store, domain, 25)
    want = await expected_bodies(store, ids)
    await store.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / ".rasa_tracker").iterdir())
    assert b"hello 0" not in raw and b"user-exp-000" not in raw  # ciphertext at rest

    out = str(tmp_path / "export.jsonl")
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded,
                                             "--output", out]) == 0
    lines = read_lines(out)
    got = by_conversation(lines)
    assert sorted(got) == sorted(ids)
    for cid in ids:
        assert [line["seq"] for line in got[cid]] == list(range(1, len(want[cid]) + 1)), cid
        assert [strip(line) for line in got[cid]] == want[cid], cid
    assert any(line.get("text") == "hello 0" for line in lines)  # decrypted

    one = str(tmp_path / "one.jsonl")
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded, "--output",
                                             one, "--conversation", ids[3]]) == 0
    assert read_lines(one) == got[ids[3]]


async def test_since_until_select_a_time_window_in_time_order(embedded, domain, tmp_path):
    store = PersistentTrackerStore(domain, sensitive_slots=["name"], encrypt_user_text=True)
    ids = await fill(store, domain, 20, seed=5)
    want = await expected_bodies(store, ids)
    await store.close()
    stamps = sorted(e["timestamp"] for events in want.values() for e in events)
    since, until = stamps[len(stamps) // 4], stamps[3 * len(stamps) // 4]
    out = str(tmp_path / "window.jsonl")
    argv = ["export", "--endpoints", embedded, "--output", out, "--since", repr(since),
            "--until", repr(until)]
    assert await asyncio.to_thread(run_cli, argv) == 0
    lines = read_lines(out)
    inside = sorted(json.dumps(e, sort_keys=True) for events in want.values() for e in events
                    if since <= e["timestamp"] < until)
    assert sorted(json.dumps(strip(x), sort_keys=True) for x in lines) == inside
    assert [x["timestamp"] for x in lines] == sorted(x["timestamp"] for x in lines)
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded, "--since",
                                             "2026-01-02", "--until", "2026-01-01"]) == 2


def test_moments_are_unix_seconds_or_iso_dates() -> None:
    assert cli._moment("1700000000.5") == 1700000000.5
    assert cli._moment("2026-11-01") == 1793491200.0  # midnight UTC
    assert cli._moment("2026-11-01T01:00:00+01:00") == 1793491200.0
    with pytest.raises(Exception, match="ISO 8601"):
        cli._moment("last tuesday")


@pytest.mark.parametrize("window", [[], ["--since", "1"]], ids=["log-order", "time-order"])
async def test_an_interrupted_export_continues_from_its_cursor(embedded, domain, tmp_path,
                                                               monkeypatch, window):
    store = PersistentTrackerStore(domain, sensitive_slots=["name"], encrypt_user_text=True)
    await fill(store, domain, 15, seed=9)
    await store.close()
    whole = str(tmp_path / "whole.jsonl")
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded, "--output",
                                             whole] + window) == 0
    monkeypatch.setattr(exporting, "PAGE", 7)
    real_call = exporting.JsonLinesSink.__call__
    pages = [0]

    async def interrupted(self, bodies):
        pages[0] += 1
        if pages[0] == 4:
            raise KeyboardInterrupt  # as Ctrl-C during the fourth page
        await real_call(self, bodies)
    monkeypatch.setattr(exporting.JsonLinesSink, "__call__", interrupted)
    part = str(tmp_path / "part.jsonl")
    cursor = str(tmp_path / "cursor.json")
    argv = ["export", "--endpoints", embedded, "--output", part, "--cursor", cursor] + window
    assert await asyncio.to_thread(run_cli, argv) == 130
    assert len(read_lines(part)) == 21
    monkeypatch.setattr(exporting.JsonLinesSink, "__call__", real_call)
    assert await asyncio.to_thread(run_cli, argv) == 0
    assert read_lines(part) == read_lines(whole)
    # the cursor belongs to this export: another window is refused, nothing written
    assert await asyncio.to_thread(run_cli, argv + ["--until", "5"]) == 2


async def test_a_row_that_does_not_open_is_skipped_and_named(embedded, domain, tmp_path,
                                                             caplog):
    store = PersistentTrackerStore(domain, sensitive_slots=["name"], encrypt_user_text=True)
    ids = await fill(store, domain, 4, seed=11)
    want = await expected_bodies(store, ids)
    await store.close()
    log_db = next(p for p in (tmp_path / ".rasa_tracker").iterdir() if "hot" not in p.name)
    conn = sqlite3.connect(log_db)
    data, = conn.execute("SELECT data FROM rpt_events WHERE conversation_id = ? AND seq = 3",
                         (ids[1],)).fetchone()
    forged = data[:-6] + ("A" if data[-6] != "A" else "B") + data[-5:]
    conn.execute("UPDATE rpt_events SET data = ? WHERE conversation_id = ? AND seq = 3",
                 (forged, ids[1]))
    conn.commit()
    conn.close()
    out = str(tmp_path / "export.jsonl")
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded,
                                             "--output", out]) == 1
    got = by_conversation(read_lines(out))
    assert [x["seq"] for x in got[ids[1]]] == [s for s in range(1, len(want[ids[1]]) + 1)
                                               if s != 3]
    assert sum(len(v) for v in got.values()) == sum(len(v) for v in want.values()) - 1
    warning = [r.getMessage() for r in caplog.records if "does not open" in r.getMessage()]
    assert len(warning) == 1 and ids[1] in warning[0] and "seq 3" in warning[0]
    assert forged[:40] not in warning[0]


async def test_export_to_rasas_event_broker(embedded, domain, tmp_path):
    store = PersistentTrackerStore(domain, sensitive_slots=["name"], encrypt_user_text=True)
    ids = await fill(store, domain, 6, seed=13)
    want = await expected_bodies(store, ids)
    await store.close()
    with open(embedded) as f:
        config = yaml.safe_load(f)
    config["event_broker"] = {"type": "sql", "dialect": "sqlite",
                              "db": str(tmp_path / "broker.db")}
    with open(embedded, "w") as f:
        yaml.safe_dump(config, f)
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded,
                                             "--to-broker"]) == 0
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'broker.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT sender_id, data FROM events ORDER BY id")).fetchall()
    engine.dispose()
    published = by_conversation([json.loads(data) for _sender, data in rows])
    assert {cid: [strip(x) for x in lines] for cid, lines in published.items()} == want


@pytest.mark.real
async def test_export_from_redis_and_postgresql(domain, tmp_path, monkeypatch):
    monkeypatch.setenv("RPT_ENCRYPTION_KEYS", KEY)
    backend = Backend("real", str(tmp_path))
    try:
        store = backend.make_store(domain, environ={"RPT_ENCRYPTION_KEYS": KEY},
                                   sensitive_slots=["name"], encrypt_user_text=True)
        ids = await fill(store, domain, 30, seed=17)
        want = await expected_bodies(store, ids)
        path = endpoints(tmp_path, url=backend.redis_url, sql_url=backend.sql_url,
                         key_prefix=backend.prefix)
        out = str(tmp_path / "export.jsonl")
        assert await asyncio.to_thread(run_cli, ["export", "--endpoints", path,
                                                 "--output", out]) == 0
        got = by_conversation(read_lines(out))
        assert {cid: [strip(x) for x in lines] for cid, lines in got.items()} == want
    finally:
        await backend.cleanup()


async def test_values_json_cannot_hold_are_exported_as_stored(embedded, domain, tmp_path):
    """A Decimal, a datetime, a set or bytes in a slot (the store keeps them
    faithfully) must not stop the export: they come out in the store's tagged
    form, which a consumer can read back (docs/operations.md)."""
    import datetime
    import decimal

    from rasa.shared.core.events import SlotSet
    from rasa.shared.core.trackers import DialogueStateTracker

    store = PersistentTrackerStore(domain)
    tracker = DialogueStateTracker("odd-values", domain.slots)
    values = [decimal.Decimal("7.50"), datetime.datetime(2026, 11, 30, 12, 0),
              {"b", "a"}, b"\x00\xff", {"__rpt_type__": "decimal", "value": "user data"}]
    for value in values:
        tracker.update(SlotSet("amount", value))
    await store.save(tracker)
    await store.flush()
    await store.close()
    out = str(tmp_path / "odd.jsonl")
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded,
                                             "--output", out]) == 0
    lines = read_lines(out)
    got = [line["value"] for line in lines]
    assert got[0] == {"__rpt_type__": "decimal", "value": "7.50"}
    assert got[1] == {"__rpt_type__": "datetime", "value": "2026-11-30T12:00:00"}
    assert got[2]["__rpt_type__"] == "set" and sorted(got[2]["value"]) == ["a", "b"]
    assert got[3] == {"__rpt_type__": "bytes", "value": "AP8="}
    # a user's dict that looks like a tag keeps its escaped key: never a Decimal
    assert got[4] == {"__rpt_type__~": "decimal", "value": "user data"}
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    assert all(line["sender_id"] == "odd-values" for line in lines)


@pytest.mark.parametrize("broken", ['{"event": "slot", "value": ', '["not", "an", "event"]',
                                    '{"event": "user"} trailing'])
async def test_a_plaintext_row_that_is_not_an_event_is_skipped_and_named(
        embedded, domain, tmp_path, caplog, monkeypatch, broken):
    """Without a key rows are plain JSON: one that is damaged (truncated,
    not an object, trailing bytes) is skipped and named, never spliced into
    the output as a broken line."""
    monkeypatch.delenv("RPT_ENCRYPTION_KEYS")
    embedded = endpoints(tmp_path, sensitive_slots=[], encrypt_user_text=False)
    store = PersistentTrackerStore(domain)
    ids = await fill(store, domain, 2, seed=12)
    await store.close()
    log_db = next(p for p in (tmp_path / ".rasa_tracker").iterdir() if "hot" not in p.name)
    conn = sqlite3.connect(log_db)
    conn.execute("UPDATE rpt_events SET data = ? WHERE conversation_id = ? AND seq = 2",
                 (broken, ids[0]))
    conn.commit()
    conn.close()
    out = str(tmp_path / "export.jsonl")
    assert await asyncio.to_thread(run_cli, ["export", "--endpoints", embedded,
                                             "--output", out]) == 1
    lines = read_lines(out)  # every line parses
    assert (ids[0], 2) not in {(x["sender_id"], x["seq"]) for x in lines}
    warning = [r.getMessage() for r in caplog.records if "seq 2" in r.getMessage()]
    assert len(warning) == 1 and ids[0] in warning[0]
