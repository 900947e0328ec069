"""``import --from``: Rasa's own stores copied in, checked equal, resumable.

The warning a user sees when Redis still holds ``type: redis`` trackers points
here (issue 11). Sources are Rasa's ``SQLTrackerStore`` (SQLite always; a
throwaway PostgreSQL database on real servers) and ``RedisTrackerStore`` (real
Redis, own key prefix). On real servers, 1,000 conversations from each, about
half of them with a form in progress, read back equal and resuming mid-form.
"""
import asyncio
import random
import uuid
from typing import Any, List

import pytest
import sqlalchemy as sa
import yaml
from rasa.core.tracker_store import RedisTrackerStore, SQLTrackerStore, TrackerStore
from rasa.shared.core.events import (
    ActionExecuted,
    ActiveLoop,
    BotUttered,
    SessionStarted,
    SlotSet,
    UserUttered,
)
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import cli
from rasa_persistent_tracker.admin.importer import import_all
from tests.conftest import DOMAIN_YAML, Backend, real_urls


def conversation(domain: Any, cid: str, rng: random.Random) -> DialogueStateTracker:
    """A conversation of a few turns; some end mid-form, some span two sessions."""
    tracker = DialogueStateTracker(cid, domain.slots)
    stamp = 1_700_000_000.0 + rng.random() * 1000

    def add(event: Any) -> None:
        nonlocal stamp
        stamp += 1
        event.timestamp = stamp
        tracker.update(event)

    for session in range(rng.choice([1, 1, 2])):
        add(ActionExecuted("action_session_start"))
        add(SessionStarted())
        add(ActionExecuted("action_listen"))
        for turn in range(rng.randint(1, 6)):
            add(UserUttered(f"hello {turn}", {"name": "greet", "confidence": 0.9}))
            add(ActionExecuted("utter_greet"))
            add(BotUttered("hi", {"elements": None}))
            add(SlotSet("name", f"user-{cid}-{turn}"))
            add(ActionExecuted("action_listen"))
    if rng.random() < 0.5:  # a form in progress
        add(UserUttered("I want a pizza", {"name": "request_pizza", "confidence": 0.9}))
        add(ActionExecuted("pizza_form"))
        add(ActiveLoop("pizza_form"))
        add(SlotSet("requested_slot", "size"))
        add(ActionExecuted("action_listen"))
    return tracker


async def fill(source: TrackerStore, domain: Any, count: int, seed: int = 7,
               name: str = "imp") -> List[str]:
    rng = random.Random(seed)
    ids = [f"{name}-{i:04d}" for i in range(count)]
    for cid in ids:
        await source.save(conversation(domain, cid, rng))
    return ids


async def check_equal(source: TrackerStore, target: Any, ids: List[str]) -> None:
    for cid in ids:
        want = await source.retrieve_full_tracker(cid)
        got = await target.retrieve_full_tracker(cid)
        assert [e.as_dict() for e in got.events] == [e.as_dict() for e in want.events], cid
        live = await target.retrieve(cid)  # the current session resumes as it was
        assert live.active_loop_name == want.active_loop_name, cid
        assert live.current_slot_values() == want.current_slot_values(), cid


class Interrupted(Exception):
    pass


class FailsAfter:
    """A source whose ``retrieve_full_tracker`` fails after ``n`` calls."""

    def __init__(self, source: TrackerStore, n: int) -> None:
        self._source, self._left = source, n

    async def keys(self):
        return await self._source.keys()

    async def retrieve_full_tracker(self, cid):
        self._left -= 1
        if self._left < 0:
            raise Interrupted(cid)
        return await self._source.retrieve_full_tracker(cid)


async def test_import_from_sql_tracker_store_is_equal_and_resumable(make_store, domain,
                                                                    tmp_path):
    source = SQLTrackerStore(domain, dialect="sqlite", db=str(tmp_path / "rasa.db"))
    ids = await fill(source, domain, 40)
    target = make_store()
    # A conversation that an earlier, interrupted run imported in part.
    partial = await source.retrieve_full_tracker(ids[30])
    await target.save(DialogueStateTracker.from_events(ids[30], list(partial.events)[:6],
                                                       domain.slots))
    with pytest.raises(Interrupted):
        await import_all(FailsAfter(source, 15), target)
    dry = await import_all(source, target, dry_run=True)
    assert (dry.imported, dry.resumed, dry.already_here) == (24, 1, 15) and dry.ok
    report = await import_all(source, target)
    assert report.ok, report.summary()
    assert (report.imported, report.resumed, report.already_here) == (24, 1, 15)
    await check_equal(source, target, ids)
    again = await import_all(source, target)
    assert again.already_here == 40 and again.imported == 0


async def test_a_conversation_that_differs_here_is_left_alone(make_store, domain, tmp_path):
    source = SQLTrackerStore(domain, dialect="sqlite", db=str(tmp_path / "rasa.db"))
    ids = await fill(source, domain, 3)
    target = make_store()
    other = DialogueStateTracker.from_events(ids[1], [UserUttered("something else")],
                                             domain.slots)
    await target.save(other)
    report = await import_all(source, target)
    assert report.conflicts == [ids[1]] and not report.ok
    assert "differ from what this store holds" in report.summary()
    assert len((await target.retrieve_full_tracker(ids[1])).events) == 1


@pytest.mark.real
async def test_import_from_rasas_redis_and_postgresql_stores(domain, tmp_path):
    urls = real_urls()  # Rasa's Redis and PostgreSQL stores need the real servers
    backend = Backend("real", str(tmp_path))
    redis_url = sa.engine.make_url(urls["redis"].replace("redis://", "postgresql://"))
    redis_source = RedisTrackerStore(domain, host=redis_url.host, port=redis_url.port or 6379,
                                     db=int(redis_url.database or 0),
                                     # letters and digits only, or Rasa uses "tracker:"
                                     key_prefix=f"{backend.prefix}old")
    pg = sa.engine.make_url(urls["sql"])
    database = f"rpt_import_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
    try:
        sql_source = SQLTrackerStore(domain, dialect="postgresql", host=pg.host, port=pg.port,
                                     db=database, username=pg.username, password=pg.password)
        for source, name in ((redis_source, "redis"), (sql_source, "sql")):
            count = 1000  # issue 16: a thousand conversations from each of Rasa's stores
            target = backend.make_store(domain)
            ids = await fill(source, domain, count, seed=len(name), name=name)
            report = await import_all(source, target)
            assert report.ok and report.imported == count, report.summary()
            await check_equal(source, target, ids)
        sql_source.engine.dispose()
    finally:
        await backend.cleanup()
        client = backend.redis_client()
        for key in client.scan_iter(match=f"{backend.prefix}old:*"):
            client.delete(key)
        client.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


async def test_cli_import_into_the_embedded_default(tmp_path, domain, monkeypatch, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    source = SQLTrackerStore(domain, dialect="sqlite", db=str(tmp_path / "rasa.db"))
    ids = await fill(source, domain, 12)
    (tmp_path / "domain.yml").write_text(DOMAIN_YAML)
    (tmp_path / "old.yml").write_text(yaml.safe_dump({"tracker_store": {
        "type": "SQL", "dialect": "sqlite", "db": str(tmp_path / "rasa.db")}}))
    (tmp_path / "endpoints.yml").write_text(
        "tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n")
    argv = ["import", "--from", str(tmp_path / "old.yml"), "--endpoints",
            str(tmp_path / "endpoints.yml")]
    assert await asyncio.to_thread(cli.main, argv + ["--dry-run"]) == 0
    assert "would import 12 conversation(s)" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "12/12 conversations" in out and "imported 12 conversation(s)" in out
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert "12 already here" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    from rasa_persistent_tracker import PersistentTrackerStore
    target = PersistentTrackerStore(domain)
    await check_equal(source, target, ids)
    await target.close()
