"""Fixtures: every store test runs on (fakeredis + SQLite) and (Redis + PostgreSQL).

The real pair uses ``REDIS_URL`` and ``DATABASE_URL``. Locally, when they are
unset, the real variant is skipped with a reason; in CI (``CI=true``) it must
run, so missing or unreachable servers fail the test instead. Each test gets
its own key prefix and its own PostgreSQL schema, and cleans up only those.
"""
import os
import tempfile
import uuid
from typing import Any, Callable, Dict, List

import fakeredis
import pytest
import redis
import sqlalchemy as sa

from rasa.shared.core.domain import Domain
from rasa_persistent_tracker import PersistentTrackerStore
from rasa_persistent_tracker.backends import assemble
from rasa_persistent_tracker.config import parse_config
from rasa_persistent_tracker.hot.redis_state import RedisHotState
from rasa_persistent_tracker.log.event_log import SQLEventLog, make_engine
from tests.servers import (  # noqa: F401  (fixtures for the modules that start servers)
    redis_cluster,
    redis_sentinel,
    redis_sentinel_failover,
    throwaway_postgres,
    throwaway_redis,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HERE = os.path.dirname(__file__)

DOMAIN_YAML = """
version: "3.1"
intents: [greet, inform, bye, request_pizza]
entities: [size]
slots:
  name:
    type: text
    mappings: [{type: from_text}]
  amount:
    type: any
    mappings: [{type: custom}]
  size:
    type: text
    mappings: [{type: from_entity, entity: size}]
forms:
  pizza_form:
    required_slots: [size]
responses:
  utter_greet: [{text: hi}]
  utter_bye: [{text: bye}]
session_config:
  session_expiration_time: 60
  carry_over_slots_to_new_session: true
"""


@pytest.fixture
def domain() -> Domain:
    return Domain.from_yaml(DOMAIN_YAML)


def real_urls() -> Dict[str, str]:
    """REDIS_URL / DATABASE_URL, or skip (locally) / fail (CI) if unset."""
    redis_url, db_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    if not (redis_url and db_url):
        message = "real servers need REDIS_URL and DATABASE_URL"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: the real-server tests must run)")
        pytest.skip(message)
    return {"redis": redis_url, "sql": db_url}


class Backend:
    """One backend pair, with per-test isolation and cleanup.

    Kinds: ``fake`` (fakeredis + SQLite), ``real`` (REDIS_URL + DATABASE_URL),
    ``cluster`` / ``sentinel`` (throwaway servers from tests/servers.py, passed
    as ``servers``, with a SQLite log).
    """

    def __init__(self, kind: str, tmp_path: str, servers: Any = None) -> None:
        self.kind = kind
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.stores: List[PersistentTrackerStore] = []
        self.servers = servers
        if kind in ("fake", "cluster", "sentinel"):
            self.server = fakeredis.FakeServer() if kind == "fake" else None
            self.sql_url = f"sqlite:///{tmp_path}/events-{self.prefix}.sqlite3"
            self.redis_url = servers.url if servers is not None else "redis://fake"
        else:
            urls = real_urls()
            self.redis_url = urls["redis"]
            try:
                redis.Redis.from_url(self.redis_url, socket_timeout=5).ping()
            except redis.exceptions.RedisError as exc:
                pytest.fail(f"REDIS_URL is set but Redis is unreachable: {exc}")
            self.schema = self.prefix
            admin = sa.create_engine(urls["sql"])
            try:
                with admin.begin() as conn:
                    conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
            except sa.exc.OperationalError as exc:
                pytest.fail(f"DATABASE_URL is set but PostgreSQL is unreachable: {exc}")
            self.admin = admin
            sep = "&" if "?" in urls["sql"] else "?"
            self.sql_url = f"{urls['sql']}{sep}options=-csearch_path%3D{self.schema}"

    def redis_client(self) -> redis.Redis:
        """A sync client on the same server (to inject faults, inspect keys)."""
        if self.kind == "fake":
            return fakeredis.FakeRedis(server=self.server)
        if self.servers is not None:
            return self.servers.client()
        return redis.Redis.from_url(self.redis_url)

    def engine(self) -> sa.engine.Engine:
        return make_engine(self.sql_url, 2)

    def make_store(self, domain: Domain = None, environ: Dict[str, str] = None,
                   **overrides: Any) -> PersistentTrackerStore:
        """A store on this pair; ``environ`` supplies e.g. RPT_ENCRYPTION_KEYS."""
        environ = environ or {}
        keys = {"key_prefix": self.prefix, "sql_url": self.sql_url, **overrides}
        if self.kind == "fake":
            config = parse_config({"host": "redis://fake", **keys}, environ=environ)
            hot = RedisHotState(lambda: fakeredis.aioredis.FakeRedis(server=self.server),
                                config.key_prefix, config.quarantine_ttl)
            log = SQLEventLog(make_engine(config.sql_url, 2))
            log.migrate()
            store = PersistentTrackerStore(domain, backends=assemble(config, hot, log, environ))
        else:
            store = PersistentTrackerStore(domain, host=self.redis_url, environ=environ, **keys)
        self.stores.append(store)
        return store

    async def cleanup(self) -> None:
        for store in self.stores:
            try:
                await store.close()
            except Exception:  # cleanup must go on; the test already reported
                pass
        client = self.redis_client()
        for key in client.scan_iter(match=f"{self.prefix}:*"):
            client.delete(key)
        client.close()
        if self.kind == "real":
            with self.admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{self.schema}" CASCADE'))
            self.admin.dispose()


async def open_backend(request: pytest.FixtureRequest, tmp_path: Any):
    """Yield a ``Backend`` of kind ``request.param`` and clean it up afterwards."""
    servers = None
    if request.param in ("cluster", "sentinel"):
        servers = request.getfixturevalue(f"redis_{request.param}")
    pair = Backend(request.param, str(tmp_path), servers)
    yield pair
    await pair.cleanup()


# Every store test module runs on these; the contract suite adds Cluster and
# Sentinel (tests/test_store_contract.py).
BACKENDS = ["fake", pytest.param("real", marks=pytest.mark.real)]
TOPOLOGIES = [pytest.param("cluster", marks=pytest.mark.servers),
              pytest.param("sentinel", marks=pytest.mark.servers)]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    async for pair in open_backend(request, tmp_path):
        yield pair


@pytest.fixture
def make_store(backend: Backend, domain: Domain) -> Callable[..., PersistentTrackerStore]:
    """``make_store(**config_overrides)`` on this test's backend pair."""
    def make(domain_override: Domain = None, **overrides: Any) -> PersistentTrackerStore:
        return backend.make_store(domain_override or domain, **overrides)
    return make


@pytest.fixture
def tmp_dir() -> str:
    return tempfile.mkdtemp(prefix="rpt-")
