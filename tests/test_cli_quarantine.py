"""The CLI as an operator uses it (issue 11): paths from the endpoints file's
folder, a plain "not found", and quarantined copies listed and put back.

Runs on the embedded default (fake) and on real Redis + PostgreSQL.
"""
import asyncio
import logging
import os
from typing import Any

import pytest

from rasa_persistent_tracker import cli
from tests.test_encryption import ENV, K1, K2, chat, hot_key, keyed_store, track
from tests.test_rotation import endpoint_store, endpoints


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def test_relative_embedded_paths_are_read_beside_the_endpoints_file(
        tmp_path, monkeypatch, domain, capsys):
    bot = tmp_path / "bot"
    bot.mkdir()
    monkeypatch.chdir(bot)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    from rasa_persistent_tracker import PersistentTrackerStore
    store = PersistentTrackerStore(domain)  # the defaults, as `rasa run` in bot/ uses them
    await chat(store, "rel1", 2)
    await store.close()
    (bot / "endpoints.yml").write_text(
        "tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n")
    elsewhere = tmp_path / "repo-root"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert await run_cli("inspect", "rel1", "--endpoints", "../bot/endpoints.yml") == 0
    assert "event log: 11 events" in capsys.readouterr().out
    assert not (elsewhere / ".rasa_tracker").exists()  # nothing created where the CLI ran


async def test_a_wrong_endpoints_folder_is_an_error_not_an_empty_store(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    (tmp_path / "endpoints.yml").write_text(
        "tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n")
    assert await run_cli("inspect", "x", "--endpoints", str(tmp_path / "endpoints.yml")) == 2
    assert "No embedded hot state at" in capsys.readouterr().err
    assert not (tmp_path / ".rasa_tracker").exists()


async def test_inspect_of_an_unknown_conversation_says_not_found(backend, domain, tmp_path,
                                                                 monkeypatch, capsys):
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, "known", 1)
    await store.flush()
    monkeypatch.setenv(ENV, K1)
    assert await run_cli("inspect", "nobody", "--endpoints", endpoints(backend, tmp_path)) == 1
    assert "Conversation 'nobody' not found" in capsys.readouterr().err


async def quarantine_a_record(backend: Any, domain: Any, tmp_path: Any, cid: str) -> Any:
    """A conversation whose live record was quarantined by a misconfigured
    process (here: a stored record overwritten with bytes that do not read)."""
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, cid, 2)
    await store.flush()
    garbage = "rpt-enc:1:k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    if backend.kind == "fake":
        store._hot._conn.execute("UPDATE rpt_hot SET payload = ? WHERE conversation_id=?",
                                 (garbage, cid))
    else:
        client = backend.redis_client()
        client.hset(hot_key(backend, cid), "d", garbage)
        client.close()
    return store


async def test_quarantine_list_shows_copies_without_their_content(
        backend, domain, tmp_path, monkeypatch, capsys, caplog):
    store = await quarantine_a_record(backend, domain, tmp_path, "q1")
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        fresh = await store.retrieve("q1")  # quarantined, resumed from the snapshot
    assert fresh.get_slot("name") == "Zed Secret1"
    path = endpoints(backend, tmp_path)
    monkeypatch.setenv(ENV, K1)
    capsys.readouterr()
    assert await run_cli("quarantine", "list", "q1", "--endpoints", path) == 0
    out = capsys.readouterr().out
    assert "conversation 'q1', hot record" in out and "does not read" in out
    assert "1 quarantined copy, 0 readable" in out
    assert "Secret" not in out


async def test_restore_puts_back_a_record_quarantined_for_lack_of_a_key(
        backend, domain, tmp_path, monkeypatch, capsys):
    # A copy that could not be read when it was set aside (here: the store's
    # quarantine path used directly, as an old process without the key did).
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, "q2", 3)
    await store.flush()
    ref = await store._hot.quarantine("q2", 3600)
    assert await store.retrieve("q2") is not None  # restored from the snapshot meanwhile...
    path = endpoints(backend, tmp_path)
    monkeypatch.setenv(ENV, K2)  # ... and the copy needs k1, which this CLI lacks
    capsys.readouterr()
    assert await run_cli("quarantine", "restore", ref, "--endpoints", path) == 2
    assert "needs a key this process lacks" in capsys.readouterr().err
    monkeypatch.setenv(ENV, f"{K2},{K1}")
    assert await run_cli("quarantine", "restore", ref, "--endpoints", path) == 2
    assert "has a live hot record" in capsys.readouterr().err
    assert await run_cli("quarantine", "restore", ref, "--force", "--endpoints", path) == 0
    assert "Restored" in capsys.readouterr().out
    reader = endpoint_store(backend, domain, tmp_path, f"{K2},{K1}")
    tracker = await reader.retrieve("q2")
    assert tracker.get_slot("name") == "Zed Secret2"
    await chat(reader, "q2", 1, start=3)  # and the conversation goes on from it
    await reader.flush()
    assert len((await reader.retrieve_full_tracker("q2")).events) == 1 + 4 * 5
    capsys.readouterr()
    assert await run_cli("quarantine", "list", "q2", "--endpoints", path) == 0
    assert "1 quarantined copy" in capsys.readouterr().out  # the replaced live record, kept


async def test_restore_an_outbox_entry_writes_its_rows_once(backend, domain, tmp_path,
                                                            monkeypatch, capsys):
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, "q3", 2)
    await store.flush()
    pending = await store._hot.pending("q3", 10)
    assert not pending.entries
    rows = await store._log.run(store._log.sync.read, "q3", 0)
    from rasa_persistent_tracker.log.entries import Entries
    entry = Entries(store._codec).make("q3", rows[-5:], 1.0)  # the last turn, as queued
    ref = await store._hot.quarantine_entry("q3", entry, 3600)
    monkeypatch.setenv(ENV, K1)
    path = endpoints(backend, tmp_path)
    capsys.readouterr()
    assert await run_cli("quarantine", "restore", ref, "--endpoints", path) == 0
    assert "Wrote the 5 event(s)" in capsys.readouterr().out
    assert len(await store._log.run(store._log.sync.read, "q3", 0)) == len(rows)  # once
    assert await run_cli("quarantine", "list", "q3", "--endpoints", path) == 0
    assert "0 quarantined copies" in capsys.readouterr().out
