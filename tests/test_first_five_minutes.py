"""A new user's first mistakes explain themselves (issue 11).

Each test is one defect a new user met: a missing database driver that made
Rasa fall back to an in-memory store, a PostgreSQL error that hid its cause, a
typo without a hint, a store switched from ``type: redis`` that silently lost
history, settings that silently disagree with the domain or the policies,
rows that waited for the next user message after a restart or a shutdown.
"""
import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import uuid
import warnings

import pytest
import redis
import sqlalchemy as sa
from rasa.core.tracker_store import TrackerStore
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, UserUttered
from rasa.shared.exceptions import ConnectionException
from rasa.utils.endpoints import EndpointConfig

from rasa_persistent_tracker import ConfigError, EventLogUnavailable, PersistentTrackerStore
from rasa_persistent_tracker.config import parse_config
from rasa_persistent_tracker.startup import policy_warnings
from tests.conftest import Backend, real_urls

TYPE = "rasa_persistent_tracker.PersistentTrackerStore"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def create(url, **kwargs):
    return TrackerStore.create(EndpointConfig(url=url, type=TYPE, **kwargs))


def test_a_missing_driver_stops_start_up_instead_of_an_in_memory_store(tmp_path, monkeypatch):
    # Rasa turns an ImportError from a custom store into "Tracker store ... not
    # found" and runs on InMemoryTrackerStore: nothing would be stored.
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        create(None, sql_url="postgresql+psycopg2://rasa:hunter2@127.0.0.1:1/rasa")
    message = str(info.value)
    assert "'sql_url'" in message and "psycopg2" in message and "[postgres]" in message
    assert "hunter2" not in message


@pytest.mark.real
def test_a_postgresql_error_says_why(tmp_path, monkeypatch):
    urls = real_urls()
    monkeypatch.chdir(tmp_path)
    missing = f"rpt_missing_{uuid.uuid4().hex[:8]}"
    url = sa.engine.make_url(urls["sql"]).set(database=missing, password="hunter2")
    # Rasa wraps the store's EventLogUnavailable (a ConnectionError) in its own
    # ConnectionException, message included.
    with pytest.raises(ConnectionException) as info:
        create(None, sql_url=url.render_as_string(hide_password=False))
    assert isinstance(info.value.__cause__ or info.value.__context__, EventLogUnavailable)
    assert f'database "{missing}" does not exist' in str(info.value)
    assert "hunter2" not in str(info.value)


def test_an_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'record_exp' for 'record_exps'"):
        parse_config({"record_exps": 60}, environ={})


@pytest.mark.parametrize("kwargs, named", [
    ({"sensitive_slots": 5}, "sensitive_slots"),
    ({"host": 12345}, "url"),
    ({"host": ["a"]}, "url"),
])
def test_values_of_the_wrong_type_name_their_key(kwargs, named):
    with pytest.raises(ConfigError, match=f"'{named}'"):
        parse_config(kwargs, environ={})


@pytest.mark.real
def test_start_up_warns_when_redis_holds_rasas_own_trackers(tmp_path, caplog):
    real_urls()
    pair = Backend("real", str(tmp_path))
    client = redis.Redis.from_url(pair.redis_url)
    rasa_key = f"{pair.prefix}-old:tracker:alice"  # RedisTrackerStore with key_prefix
    client.set(rasa_key, "{}")
    try:
        with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
            pair.stores.append(create(pair.redis_url, sql_url=pair.sql_url,
                                      key_prefix=pair.prefix))
        [line] = [r.getMessage() for r in caplog.records if "RedisTrackerStore" in r.getMessage()]
        assert "rasa-persistent-tracker import --from" in line
    finally:
        client.delete(rasa_key)
        client.close()
        asyncio.run(pair.cleanup())  # its key prefix and PostgreSQL schema


def test_no_warning_when_redis_holds_only_our_keys(tmp_path, caplog, monkeypatch):
    from rasa_persistent_tracker.startup import rasa_store_warning
    assert rasa_store_warning(0, "redis://h") is None


DOMAIN_60_MIN = """
version: "3.1"
session_config:
  session_expiration_time: 60
  carry_over_slots_to_new_session: true
"""


async def test_record_exp_shorter_than_the_session_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    store = create(None, record_exp=1800)
    domain = Domain.from_yaml(DOMAIN_60_MIN)
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        store.domain = domain  # what rasa does after loading the model
        store.domain = domain  # and again on a reload of the same model
    lines = [r.getMessage() for r in caplog.records if "'record_exp'" in r.getMessage()]
    assert len(lines) == 1 and "1800 s" in lines[0] and "3600" in lines[0]
    caplog.clear()
    fine = create(None, record_exp=3600)
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        fine.domain = domain
    assert not [r for r in caplog.records if "'record_exp'" in r.getMessage()]
    await store.close()
    await fine.close()


def test_policies_looking_back_further_than_the_store_warn():
    lines = policy_warnings([("MemoizationPolicy", {"max_history": 5}),
                             ("TEDPolicy", {"max_history": None}),
                             ("RulePolicy", {"max_history": None}),
                             ("UnexpecTEDIntentPolicy", {"max_history": 12})], 10)
    assert len(lines) == 2
    assert "TEDPolicy" in lines[0] and "whole session" in lines[0] and "'max_history'" in lines[0]
    assert "UnexpecTEDIntentPolicy" in lines[1] and "12" in lines[1]


async def test_rows_left_by_a_previous_process_are_delivered_at_start_up(tmp_path, domain,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    first = create(None, outbox_linger=30)  # delivery held back: the turn stays queued
    first.domain = domain
    tracker = await first.get_or_create_tracker("u1")
    tracker.update(UserUttered("hello"))
    tracker.update(ActionExecuted("action_listen"))
    await first.save(tracker)
    await first._outbox.stop()  # the process "dies" here: nothing delivered
    assert await first._log.run(first._log.sync.next_seq, "u1") == 1
    second = create(None, outbox_linger=30)  # a restart, with no traffic after it
    second.domain = domain
    for _ in range(100):
        if await second._log.run(second._log.sync.next_seq, "u1") > 1:
            break
        await __import__("asyncio").sleep(0.05)
    assert await second._log.run(second._log.sync.next_seq, "u1") == 4
    await second.close()


EXIT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from rasa.shared.core.domain import Domain
    from rasa.shared.core.events import ActionExecuted, UserUttered
    from rasa_persistent_tracker import PersistentTrackerStore

    async def main():
        store = PersistentTrackerStore(Domain.empty(), outbox_linger=600)
        tracker = await store.get_or_create_tracker("u1")
        tracker.update(UserUttered("hello"))
        tracker.update(ActionExecuted("action_listen"))
        await store.save(tracker)
        print("saved", flush=True)
        # No close(): Rasa never closes its tracker store; the loop just stops.

    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
    loop.stop()
""")


def test_turns_saved_just_before_exit_reach_sql(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "saved" in done.stdout
    engine = sa.create_engine(f"sqlite:///{tmp_path}/.rasa_tracker/events.sqlite3")
    with engine.connect() as conn:
        count = conn.execute(sa.text(
            "SELECT count(*) FROM rpt_events WHERE conversation_id='u1'")).scalar()
    engine.dispose()
    assert count == 3  # action_listen, the user message, action_listen


class _Node:
    def __init__(self, uses, config):
        self.uses, self.config = uses, config


class _Agent:
    """Stands in for rasa.core.agent.Agent.load_model: the processor with the
    model's schema, then ``tracker_store.domain = ...``."""

    def __init__(self, nodes):
        schema = type("Schema", (), {"nodes": nodes})()
        metadata = type("Metadata", (), {"predict_schema": schema})()
        self.processor = type("Processor", (), {"model_metadata": metadata})()

    def load_model(self, store, domain):
        store.domain = domain


async def test_policy_warnings_come_from_the_model_rasa_loads(tmp_path, monkeypatch, caplog):
    from rasa.core.policies.memoization import MemoizationPolicy
    from rasa.core.policies.ted_policy import TEDPolicy
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    store = create(None, max_history=4)
    agent = _Agent({"run_MemoizationPolicy0": _Node(MemoizationPolicy, {"max_history": 5}),
                    "run_TEDPolicy1": _Node(TEDPolicy, {"epochs": 1})})  # default: None
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        agent.load_model(store, Domain.from_yaml(DOMAIN_60_MIN))
    lines = [r.getMessage() for r in caplog.records if "Policy" in r.getMessage()]
    assert len(lines) == 2
    assert "MemoizationPolicy has max_history 5" in lines[0]
    assert "TEDPolicy has max_history None" in lines[1]
    await store.close()


def test_cli_help_prints_no_warnings():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable),
                                        "rasa-persistent-tracker"), "--help"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "usage: rasa-persistent-tracker" in done.stdout
    assert "Warning" not in done.stderr, done.stderr[-1000:]
