"""Key rotation (``rasa-persistent-tracker rotate-keys``) and ``inspect``, on both backends.

``rotation.rotate`` runs in-process; one test runs the installed console script.
"""
import asyncio
import collections
import dataclasses
import logging
import os
import re
import subprocess
import sys
from typing import Any, Dict, List

import pytest
import sqlalchemy as sa

from rasa_persistent_tracker import ConfigError, PersistentTrackerStore, cli
from rasa_persistent_tracker.admin import inspection, rotation
from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.admin.rotation_report import Progress, RotationReport
from rasa_persistent_tracker.log.tables import EVENTS, LogRow
from rasa_persistent_tracker.security.crypto import QUARANTINE, key_id_of

from test_encryption import (
    ENV,
    K1,
    K2,
    async_redis,
    chat,
    hot_key,
    keyed_store,
    log_rows,
    material,
    snapshot_payloads,
    tamper,
    track,
    warnings_of,
)

SCRIPT = os.path.join(os.path.dirname(sys.executable), "rasa-persistent-tracker")


def key_ids(backend: Any) -> Dict[str, collections.Counter]:
    """Key id (None: plaintext) of every log row, snapshot and hot record."""
    client = backend.redis_client()
    return {
        "events": collections.Counter(key_id_of(r.data) for r in log_rows(backend)),
        "snapshots": collections.Counter(key_id_of(p) for p in snapshot_payloads(backend)),
        "hot": collections.Counter(key_id_of(client.hget(k, "d").decode("utf-8", "surrogateescape"))
                                   for k in client.scan_iter(match=f"{backend.prefix}:h:*")),
    }


async def full_dicts(store: PersistentTrackerStore, cids: List[str]) -> Dict[str, List[Dict]]:
    return {c: [e.as_dict() for e in (await store.retrieve_full_tracker(c)).events] for c in cids}


def raw_access(store: PersistentTrackerStore, backend: Any) -> RawHotAccess:
    return RawHotAccess(store.config, async_redis(backend))


async def rotate_all(store: PersistentTrackerStore, backend: Any, **kwargs: Any
                     ) -> RotationReport:
    """``rotation.rotate`` with access to the quarantine copies, as the CLI runs it."""
    raw = raw_access(store, backend)
    try:
        return await rotation.rotate(store._backends, raw=raw, **kwargs)
    finally:
        await raw.close()


async def test_rotation_end_to_end(backend, domain, caplog, monkeypatch):
    writer = keyed_store(backend, domain, K1)
    for cid in ("a", "b", "c"):
        await chat(writer, cid, 3)
    await writer.flush()
    monkeypatch.setattr(writer._outbox, "notify", lambda cid: None)  # no delivery now
    await chat(writer, "pending", 2)  # stays in the outbox: rotate delivers it first
    before = await full_dicts(writer, ["a", "b", "c", "pending"])
    client = backend.redis_client()
    assert client.llen(f"{backend.prefix}:o:{{pending}}") == 3  # get_or_create + 2 turns
    client.pexpire(hot_key(backend, "a"), 500_000)

    rotator = keyed_store(backend, domain, f"{K2},{K1}")
    raw = raw_access(rotator, backend)
    progress: List[Progress] = []
    report = await rotation.rotate(rotator._backends, batch_size=5, progress=progress.append,
                              ttl_of=raw.ttl, raw=raw)
    await raw.close()

    assert report.finished, report.summary()
    assert "every key except 'k2' can be removed" in report.summary()
    # 'pending' gets its snapshot when rotation delivers it: sealed under k2 already.
    assert report.rewritten["hot records"] == 4 and report.rewritten["rpt_snapshots"] == 3
    assert report.rewritten["rpt_events"] == 59  # every row: sealed or authenticated
    assert not client.exists(f"{backend.prefix}:o:{{pending}}")
    kids = key_ids(backend)
    assert set(kids["events"]) == {"k2"} and set(kids["snapshots"]) == {"k2"}
    assert report.by_key["rpt_events"] == {"k2": 59} and report.by_key["hot records"] == {
        "k2": 4}
    assert kids["hot"] == {"k2": 4}
    assert sum(kids["events"].values()) == 3 * (1 + 3 * 5) + 1 + 2 * 5  # nothing lost
    assert 400_000 < client.pttl(hot_key(backend, "a")) <= 500_000  # remaining TTL kept
    events_progress = [p for p in progress if p.phase == "rpt_events"]
    assert events_progress[-1].checked == events_progress[-1].total == 59
    assert [p.checked for p in events_progress][:3] == [5, 10, 15]

    reader = keyed_store(backend, domain, K2)  # the old key is gone
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        assert await full_dicts(reader, ["a", "b", "c", "pending"]) == before
        assert (await reader.retrieve("a")).get_slot("name") == "Zed Secret2"
        assert (await reader.retrieve("pending")).get_slot("name") == "Zed Secret1"
    assert not warnings_of(caplog, "")

    again = await rotate_all(rotator, backend, batch_size=5)
    assert again.finished and not any(again.rewritten.values())  # idempotent


async def test_rotation_encrypts_rows_written_before_encryption(backend, domain):
    plain = keyed_store(backend, domain, None)
    await chat(plain, "p1", 2)
    await plain.flush()
    assert key_ids(backend)["events"] == {None: 11}

    refused = keyed_store(backend, domain, K1)  # plaintext is not made authentic unasked
    report = await rotate_all(refused, backend)
    assert not report.finished and report.unreadable["rpt_events"] == 11
    assert "plaintext needs accept_plaintext" in report.summary()
    assert key_ids(backend)["events"] == {None: 11}

    rotator = keyed_store(backend, domain, K1, accept_plaintext=True)  # the migration
    report = await rotate_all(rotator, backend)
    assert report.finished, report.summary()
    kinds = {r.type_name: key_id_of(r.data) for r in log_rows(backend)}
    assert kinds == {"action": "k1", "user": "k1", "bot": "k1", "slot": "k1"}
    kids = key_ids(backend)
    assert kids["hot"] == {"k1": 1} and kids["snapshots"] == {"k1": 1}
    assert not any((await rotate_all(rotator, backend)).rewritten.values())
    reader = keyed_store(backend, domain, K1)
    assert len((await reader.retrieve_full_tracker("p1")).events) == 11
    assert (await reader.retrieve("p1")).get_slot("name") == "Zed Secret1"


async def test_rotation_interrupted_and_resumed_loses_nothing(backend, domain):
    writer = keyed_store(backend, domain, K1)
    for cid in ("i1", "i2"):
        await chat(writer, cid, 3)
    await writer.flush()
    before = await full_dicts(writer, ["i1", "i2"])
    rows_before = len(log_rows(backend))

    rotator = keyed_store(backend, domain, f"{K2},{K1}")
    # 1 batch of hot records, then 2 batches of 2 log rows; then it stops.
    first = await rotation.rotate(rotator._backends, batch_size=2, max_batches=3)
    assert not first.complete and not first.finished
    assert "run rotate-keys again" in first.summary()
    kids = key_ids(backend)
    assert kids["hot"] == {"k2": 2} and kids["events"]["k2"] >= 1 and kids["events"]["k1"] > 10
    assert first.old_key["rpt_events"] == kids["events"]["k1"]
    # Half-rotated data reads fine with both keys.
    assert await full_dicts(keyed_store(backend, domain, f"{K2},{K1}"), ["i1", "i2"]) == before

    # A crash in the middle (here: from the progress callback) keeps finished batches.
    calls = []

    def crash(progress: Progress) -> None:
        calls.append(progress)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await rotation.rotate(rotator._backends, batch_size=2, progress=crash)
    assert key_ids(backend)["events"]["k1"] < kids["events"]["k1"]

    final = await rotate_all(rotator, backend, batch_size=2)
    assert final.finished, final.summary()
    assert "k1" not in {**key_ids(backend)["events"], **key_ids(backend)["snapshots"]}
    assert len(log_rows(backend)) == rows_before
    assert await full_dicts(keyed_store(backend, domain, K2), ["i1", "i2"]) == before


class RacingHot:
    """A hot state whose first ``commit`` is preceded by a turn saved elsewhere."""

    def __init__(self, hot: Any, race: Any) -> None:
        self._hot = hot
        self._race = race
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hot, name)

    async def commit(self, *args: Any) -> int:
        if not self.raced:
            self.raced = True
            await self._race(args[0])
        return await self._hot.commit(*args)


async def test_rotation_retries_a_record_a_turn_saved_meanwhile(backend, domain):
    writer = keyed_store(backend, domain, K1)
    await chat(writer, "x1", 2)
    await writer.flush()
    rotator = keyed_store(backend, domain, f"{K2},{K1}")
    bot = keyed_store(backend, domain, f"{K2},{K1}")

    async def turn_meanwhile(cid: str) -> None:
        await chat(bot, cid, 1, start=9)

    racing = dataclasses.replace(rotator._backends,
                                 hot=RacingHot(rotator._backends.hot, turn_meanwhile))
    raw = raw_access(rotator, backend)
    report = await rotation.rotate(racing, raw=raw)
    await raw.close()
    assert racing.hot.raced and report.finished, report.summary()
    assert report.rewritten["hot records"] == 0  # the turn already wrote it under k2
    await bot.flush()
    reader = keyed_store(backend, domain, K2)
    assert (await reader.retrieve("x1")).get_slot("name") == "Zed Secret9"
    assert len((await reader.retrieve_full_tracker("x1")).events) == 1 + 3 * 5


async def test_rotation_reports_rows_it_cannot_decrypt(backend, domain, caplog):
    writer = keyed_store(backend, domain, K1)
    await chat(writer, "u1", 1)
    await writer.flush()
    victim = [r for r in log_rows(backend) if r.type_name == "user"][0]
    engine = backend.engine()
    with engine.begin() as conn:
        conn.execute(EVENTS.update().where(EVENTS.c.id == victim.id)
                     .values(data=tamper(victim.data)))
    engine.dispose()
    rotator = keyed_store(backend, domain, f"{K2},{K1}")
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        report = await rotate_all(rotator, backend)
    assert report.complete and not report.finished
    assert report.unreadable["rpt_events"] == 1 and report.old_key["rpt_events"] == 1
    assert "keep the other keys" in report.summary() and "1 in rpt_events" in report.summary()
    assert warnings_of(caplog, f"rpt_events id={victim.id} cannot be decoded")


async def test_rotation_without_the_old_key_changes_nothing_and_says_so(backend, domain,
                                                                         caplog):
    writer = keyed_store(backend, domain, K1)
    await chat(writer, "m1", 8)
    await writer.flush()
    rows_before = [(r.id, r.data) for r in log_rows(backend)]
    rotator = keyed_store(backend, domain, K2)  # k1 forgotten in the keyring
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        report = await rotate_all(rotator, backend)
    assert report.complete and not report.finished
    rows = 1 + 8 * 5  # every row: sealed or authenticated under k1
    assert report.unreadable == {"hot records": 1, "rpt_events": rows, "rpt_snapshots": 1,
                                 "quarantine": 0}
    assert report.old_key == {"hot records": 1, "rpt_events": rows, "rpt_snapshots": 1,
                              "outbox": 0, "quarantine": 0}
    assert report.by_key["rpt_events"] == {"k1": rows}
    assert "is a key missing from the keyring?" in report.summary()
    assert len(warnings_of(caplog, "rpt_events id=")) == 20  # then counted, not listed
    assert warnings_of(caplog, "Further unreadable values in rpt_events")
    assert [(r.id, r.data) for r in log_rows(backend)] == rows_before


async def test_rotation_needs_a_key(backend, domain):
    store = keyed_store(backend, domain, None)
    with pytest.raises(ConfigError, match="rotate-keys needs encryption keys"):
        await rotation.rotate(store._backends)


async def test_inspect_hides_values_unless_asked(backend, domain):
    store = keyed_store(backend, domain, K1)
    await chat(store, "n1", 2)
    await store.flush()
    client = backend.redis_client()
    client.set(f"{backend.prefix}:q:{{n1}}:123-abc", "kept")
    raw = raw_access(store, backend)
    lines: List[str] = []
    assert await inspection.inspect_conversation(store._backends, raw, "n1", out=lines.append)
    hidden = "\n".join(lines)
    assert "version 3" in hidden and "encrypted with key 'k1'" in hidden
    assert "next_seq 12" in hidden and "slots set: name" in hidden
    assert "event log: 11 events (seq 1..11)" in hidden and "outbox: 0 pending" in hidden
    assert f"{backend.prefix}:q:{{n1}}:123-abc" in hidden
    assert "Secret" not in hidden
    lines.clear()
    await inspection.inspect_conversation(store._backends, raw, "n1", show_values=True, out=lines.append)
    assert "name = 'Zed Secret1'" in "\n".join(lines)
    lines.clear()
    assert not await inspection.inspect_conversation(store._backends, raw, "nobody", out=lines.append)
    await raw.close()


# ------------------------------------------------------------ command line


def endpoints(backend: Any, tmp_path: Any, **extra: Any) -> str:
    """An endpoints.yml for this backend (fake: the embedded hot state + SQLite)."""
    if backend.kind == "fake":
        keys = {"url": "embedded", "embedded_path": str(tmp_path / "hot.sqlite3"),
                "sql_url": f"sqlite:///{tmp_path}/events.sqlite3"}
    else:
        keys = {"url": backend.redis_url, "key_prefix": backend.prefix,
                "sql_url": backend.sql_url}
    keys.update(extra)
    body = "".join(f"  {k}: \"{v}\"\n" for k, v in keys.items())
    path = tmp_path / "endpoints.yml"
    path.write_text(f"tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n"
                    f"{body}")
    return str(path)


def endpoint_store(backend: Any, domain: Any, tmp_path: Any, keys: str) -> PersistentTrackerStore:
    if backend.kind == "real":
        return keyed_store(backend, domain, keys)
    store = PersistentTrackerStore(
        domain, host="embedded", embedded_path=str(tmp_path / "hot.sqlite3"),
        sql_url=f"sqlite:///{tmp_path}/events.sqlite3", environ={ENV: keys})
    return track(backend, store)


async def test_cli_rotate_and_inspect(backend, domain, tmp_path, monkeypatch, capsys):
    writer = endpoint_store(backend, domain, tmp_path, K1)
    await chat(writer, "cli1", 3)
    await writer.flush()
    path = endpoints(backend, tmp_path)
    monkeypatch.setenv(ENV, f"{K2},{K1}")

    code = await asyncio.to_thread(cli.main, ["rotate-keys", "--endpoints", path,
                                              "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "Rotating to key 'k2'" in out and "rpt_events: 4/16 checked" in out
    assert "rpt_events: 16/16 checked, 16 re-encrypted" in out
    assert "Key rotation complete" in out
    code = await asyncio.to_thread(cli.main, ["inspect", "cli1", "--endpoints", path])
    inspected, err = capsys.readouterr()
    assert code == 0, inspected + err
    assert "encrypted with key 'k2'" in inspected and "slots set: name" in inspected
    assert "Secret" not in inspected
    for text in (out, inspected, err):
        assert material(K1)[:12] not in text and material(K2)[:12] not in text

    reader = endpoint_store(backend, domain, tmp_path, K2)
    assert (await reader.retrieve("cli1")).get_slot("name") == "Zed Secret2"
    assert len((await reader.retrieve_full_tracker("cli1")).events) == 16


@pytest.mark.parametrize("body, message", [
    (None, "does not exist"),
    ("action_endpoint:\n  url: http://x\n", "has no 'tracker_store' block"),
    ("tracker_store:\n  type: redis\n", "has type 'redis'"),
    ("tracker_store: [\n", "cannot be read"),
], ids=["missing", "no-block", "other-type", "bad-yaml"])
def test_cli_endpoint_errors_exit_2(tmp_path, capsys, body, message):
    path = tmp_path / "endpoints.yml"
    if body is not None:
        path.write_text(body)
    assert cli.main(["rotate-keys", "--endpoints", str(path)]) == 2
    assert message in capsys.readouterr().err


async def test_cli_config_errors_exit_2_without_key_material(backend, domain, tmp_path,
                                                             monkeypatch, capsys):
    await endpoint_store(backend, domain, tmp_path, None).close()  # the bot ran here before
    monkeypatch.setenv(ENV, f"{K1},k1:{material(K2)}")
    path = endpoints(backend, tmp_path)
    assert await asyncio.to_thread(cli.main, ["rotate-keys", "--endpoints", path]) == 2
    err = capsys.readouterr().err
    assert "appears twice" in err and material(K1)[:12] not in err
    assert material(K2)[:12] not in err

    monkeypatch.delenv(ENV)
    assert await asyncio.to_thread(cli.main, ["rotate-keys", "--endpoints", path]) == 2
    assert "rotate-keys needs encryption keys" in capsys.readouterr().err

    path = endpoints(backend, tmp_path, encryption_keys=K1)
    assert await asyncio.to_thread(cli.main, ["inspect", "x", "--endpoints", path]) == 2
    err = capsys.readouterr().err
    assert "'encryption_keys' is not accepted inline" in err and material(K1)[:12] not in err

    path = endpoints(backend, tmp_path, max_hisory=3)
    assert await asyncio.to_thread(cli.main, ["inspect", "x", "--endpoints", path]) == 2
    assert "Unknown config key(s) ['max_hisory']" in capsys.readouterr().err


def test_cli_new_key_and_argument_errors(capsys):
    assert cli.main(["new-key", "--id", "prod-2025"]) == 0
    assert re.fullmatch(r"prod-2025:[A-Za-z0-9_\-]{43}=\n", capsys.readouterr().out)
    assert cli.main(["new-key", "--id", "no spaces"]) == 2
    assert "Key id 'no spaces'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["rotate-keys", "--batch-size", "0"])
    assert info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_console_script_smoke(tmp_path):
    hot, events = tmp_path / "hot.sqlite3", tmp_path / "events.sqlite3"
    store = PersistentTrackerStore(None, host="embedded", embedded_path=str(hot),
                                   sql_url=f"sqlite:///{events}")  # the bot ran here before
    asyncio.run(store.close())
    (tmp_path / "endpoints.yml").write_text(
        "tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n"
        f"  url: embedded\n  embedded_path: {hot}\n  sql_url: sqlite:///{events}\n")
    new = subprocess.run([SCRIPT, "new-key", "--id", "smoke"], capture_output=True,
                         text=True, timeout=120)
    assert new.returncode == 0 and new.stdout.startswith("smoke:")
    rotated = subprocess.run(
        [SCRIPT, "rotate-keys", "--endpoints", str(tmp_path / "endpoints.yml")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, ENV: new.stdout.strip()})
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "Key rotation complete" in rotated.stdout
    assert new.stdout.strip().split(":", 1)[1] not in rotated.stdout + rotated.stderr


# ------------------------------------------- store lifecycle (found running these suites)


class SwallowsOneCancel:
    """Hot state whose ``ack`` in the outbox task swallows one cancellation, as
    redis-py 4.6's ``async_timeout(0)`` in ``can_read_destructive`` does when a
    cancel races its zero timeout (seen as a teardown hang with fakeredis)."""

    def __init__(self, hot: Any) -> None:
        self._hot = hot
        self.inside = asyncio.Event()
        self.swallowed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hot, name)

    async def ack(self, *args: Any) -> int:
        if not self.swallowed and asyncio.current_task().get_name() == "rpt-outbox":
            self.inside.set()
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                self.swallowed = True
        return await self._hot.ack(*args)


async def test_outbox_stop_survives_a_swallowed_cancellation(backend, domain):
    """Regression: ``Outbox.stop`` cancelled once and then waited forever, so
    ``store.close()`` hung whenever a library swallowed that cancellation."""
    store = keyed_store(backend, domain, K1)
    backend.stores.pop()  # closed below, by hand
    outbox = store._outbox
    outbox._hot = hot = SwallowsOneCancel(outbox._hot)
    task = None
    try:
        await chat(store, "z1", 1)
        await asyncio.wait_for(hot.inside.wait(), 5)
        task = outbox._task
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(outbox.stop(), 5)
        assert hot.swallowed and task.done()
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.5)
        await store.close()
    reader = keyed_store(backend, domain, K1)  # nothing was lost on the way
    assert len((await reader.retrieve_full_tracker("z1")).events) == 1 + 5


async def test_rotation_leaves_nothing_under_an_old_key_quarantine_included(
        backend, domain, tmp_path):
    writer = endpoint_store(backend, domain, tmp_path, K1)
    await chat(writer, "qr1", 2)
    await chat(writer, "qr2", 1)
    await writer.flush()
    hot = writer._backends.hot
    # Genuine values moved aside (as a stale record or a refused entry would be) ...
    await hot.quarantine("qr1", 3600)
    entry = writer._outbox.entries.make("qr2", [LogRow(99, "slot", 1.0, None, None,
                                                       writer._codec.dumps_event(
                                                           {"event": "slot", "name": "name",
                                                            "value": "Zed Quarantined"},
                                                           "qr2", 99))], 1.0)
    await hot.quarantine_entry("qr2", entry, 3600)
    # ... and a plaintext one (a forged record refused under the key).
    await hot.commit("qr2", None, '{"schema": "forged Zed Plain"}\n#0', 3600, None)
    await hot.quarantine("qr2", 3600)
    rotator = endpoint_store(backend, domain, tmp_path, f"{K2},{K1}")
    raw = RawHotAccess(rotator.config, None if backend.kind == "fake" else
                           async_redis(backend))
    report = await rotation.rotate(rotator._backends, raw=raw)
    assert report.finished, report.summary()
    assert report.rewritten["quarantine"] == 3 and report.by_key["quarantine"] == {"k2": 3}
    copies = [(cid, value) async for _, cid, value in raw.copies()]
    await raw.close()
    stored = "\n".join(v for _, v in copies)
    with rotator._backends.log.sync.engine.connect() as conn:
        for table in ("rpt_events", "rpt_snapshots"):
            stored += "\n".join(str(r) for r in conn.execute(sa.text(f"SELECT * FROM {table}")))
    for form in ("rpt-enc:2:k1:", "rpt-mac:2:k1:", "rpt-enc:1:k1:", "Zed"):
        assert form not in stored
    # Readable with the new key alone, as an operator would read them.
    reader = endpoint_store(backend, domain, tmp_path, K2)
    clear = [reader._codec.unwrap(v, QUARANTINE, cid) for cid, v in copies]
    assert sorted(c.count("Zed") > 0 for c in clear) == [True] * 3
    assert any("Zed Quarantined" in c for c in clear) and any("Zed Plain" in c for c in clear)
    assert (await reader.retrieve("qr2")) is not None


async def test_rotation_finds_records_and_copies_of_ids_with_braces(backend, domain):
    # Such ids are hex-tagged in their Redis keys (issue 13); rotation and the
    # quarantine listing must build and read the same key names.
    odd = "}odd{"
    writer = keyed_store(backend, domain, K1)
    await chat(writer, odd, 2)
    await writer.flush()
    await writer._hot.quarantine(odd, 3600)  # a copy under the old key
    await chat(writer, odd, 1, start=2)  # and a live record again
    await writer.flush()
    rotator = keyed_store(backend, domain, f"{K2},{K1}")
    report = await rotate_all(rotator, backend)
    assert report.finished, report.summary()
    raw = raw_access(rotator, backend)
    try:
        assert len(await raw.quarantined(odd)) == 1
    finally:
        await raw.close()
    reader = keyed_store(backend, domain, K2)  # the new key alone reads everything
    assert (await reader.retrieve(odd)).get_slot("name") == "Zed Secret2"
