"""``doctor``: what an operator runs when something looks wrong, on the
embedded default and on real Redis + PostgreSQL (the ``backend`` fixture).

Each unhealthy state is produced for real (a turn its outbox still holds, a
quarantined record, a ``record_exp`` shorter than the domain's sessions, an
unreachable server) and the command must name it and exit 1.
"""
import asyncio
import time
from typing import Any, List

import pytest

from rasa_persistent_tracker import cli
from rasa_persistent_tracker.admin import doctor
from tests.test_cli_quarantine import quarantine_a_record
from tests.test_encryption import ENV, K1, K2, chat
from tests.test_rotation import endpoint_store, endpoints

DOMAIN = """
version: "3.1"
intents: [greet]
slots:
  name: {type: text, mappings: [{type: custom}]}
session_config:
  session_expiration_time: 60
  carry_over_slots_to_new_session: true
"""


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def statuses(out: str) -> dict:
    """{check: status} from doctor's output lines."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in (doctor.OK, doctor.WARN, doctor.FAIL) and ":" in rest:
            found[rest.split(":", 1)[0].strip()] = status.strip()
    return found


async def test_a_healthy_store(backend, domain, tmp_path, monkeypatch, capsys):
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, "d1", 3)
    await store.flush()
    (tmp_path / "domain.yml").write_text(DOMAIN)
    monkeypatch.setenv(ENV, K1)
    path = endpoints(backend, tmp_path, record_exp=7200)
    assert await run_cli("doctor", "--endpoints", path) == 0
    out = capsys.readouterr().out
    found = statuses(out)
    assert found == {"hot state": "ok", "SQL log": "ok", "schema": "ok", "outbox": "ok",
                     "quarantine": "ok", "keys": "ok", "record_exp": "ok", "pools": "ok"}, out
    assert ("embedded SQLite" if backend.kind == "fake" else "Redis ") in out
    assert "recorded as having written data: ['k1']" in out
    assert out.strip().endswith("healthy")


async def test_undelivered_turns_nobody_delivers_fail(backend, domain, tmp_path):
    # The bot saved turns and lingers before delivering them; seen 1,000 s later
    # (no process delivered meanwhile) they are a failure, once delivered they are not.
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, "d2", 1)
    await store.flush()
    lingering = backend_store_with_linger(backend, domain, tmp_path)
    await chat(lingering, "d2b", 2)
    backends = lingering._backends
    later = time.time() + 1000
    findings = await doctor.diagnose(backends, None, None, redis_client(backend), now=later)
    outbox = [f for f in findings if f.check == "outbox"][0]
    assert outbox.status == doctor.FAIL and "nothing is delivering" in outbox.detail
    assert "1 conversation(s)" in outbox.detail
    assert doctor.summary(findings).startswith("NOT healthy: outbox")
    await lingering.flush()
    findings = await doctor.diagnose(backends, None, None, redis_client(backend), now=later)
    assert [f.status for f in findings if f.check == "outbox"] == [doctor.OK]


def backend_store_with_linger(backend: Any, domain: Any, tmp_path: Any) -> Any:
    from rasa_persistent_tracker import PersistentTrackerStore
    from tests.test_encryption import track

    if backend.kind == "real":
        return backend.make_store(domain, environ={ENV: K1}, outbox_linger=3600)
    return track(backend, PersistentTrackerStore(
        domain, host="embedded", embedded_path=str(tmp_path / "hot.sqlite3"),
        sql_url=f"sqlite:///{tmp_path}/events.sqlite3", environ={ENV: K1},
        outbox_linger=3600))


def redis_client(backend: Any) -> Any:
    if backend.kind == "fake":
        return None
    import redis.asyncio

    return redis.asyncio.Redis.from_url(backend.redis_url)


async def test_a_quarantined_copy_warns_and_strict_fails(backend, domain, tmp_path,
                                                         monkeypatch, capsys):
    store = await quarantine_a_record(backend, domain, tmp_path, "d3")
    await store.retrieve("d3")  # the unreadable record is moved aside
    monkeypatch.setenv(ENV, K1)
    path = endpoints(backend, tmp_path)
    assert await run_cli("doctor", "--endpoints", path) == 0
    out = capsys.readouterr().out
    assert statuses(out)["quarantine"] == "warn" and "1 quarantined copy" in out
    assert "healthy (" in out and "warning(s)" in out
    assert await run_cli("doctor", "--endpoints", path, "--strict") == 1
    assert "NOT healthy: quarantine" in capsys.readouterr().out


async def test_record_exp_shorter_than_the_sessions_fails(backend, domain, tmp_path,
                                                          monkeypatch, capsys):
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, "d4", 1)
    await store.flush()
    (tmp_path / "domain.yml").write_text(DOMAIN)
    monkeypatch.setenv(ENV, K1)
    assert await run_cli("doctor", "--endpoints", endpoints(backend, tmp_path, record_exp=60)) == 1
    out = capsys.readouterr().out
    assert statuses(out)["record_exp"] == "fail" and "session_expiration_time" in out
    assert "NOT healthy: record_exp" in out


async def test_keys_recorded_but_not_configured_are_named(backend, domain, tmp_path):
    store = endpoint_store(backend, domain, tmp_path, K1)
    await chat(store, "d5", 1)
    await store.flush()
    findings = await doctor.diagnose(store._backends, None, None, redis_client(backend))
    keys = [f for f in findings if f.check == "keys"][0]
    assert keys.status == doctor.WARN and "not configured: ['k1']" in keys.detail
    assert K1.split(":", 1)[1] not in keys.detail and K2.split(":", 1)[1] not in keys.detail


async def test_an_unreachable_redis_is_named(tmp_path, capsys):
    (tmp_path / "events.sqlite3").touch()  # the log is there; Redis is not
    (tmp_path / "endpoints.yml").write_text(
        "tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n"
        "  url: redis://127.0.0.1:1/0\n"
        f"  sql_url: sqlite:///{tmp_path}/events.sqlite3\n")
    assert await run_cli("doctor", "--endpoints", str(tmp_path / "endpoints.yml")) == 1
    err = capsys.readouterr().err
    assert "redis://127.0.0.1:1/0" in err and "unreachable" in err.lower()
