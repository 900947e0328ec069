"""Throwaway servers for tests: Redis, Redis Cluster, Redis Sentinel, PostgreSQL.

Every server listens on 127.0.0.1 only, on a free port picked at start-up, and
keeps its files in its own temp dir. Fixture finalizers stop the processes and
remove the dirs; an ``atexit`` hook does the same for anything a crashed test
left behind. The shared servers on 6379 / 5432 are never touched.

One module per server: ``redis_server`` (a standalone ``redis-server``),
``cluster``, ``sentinel``, ``postgres``; ``common`` holds ports, waiting,
clean-up and the skip-or-fail rule. Binaries: ``redis-server`` /
``redis-cli`` on PATH; PostgreSQL from ``RPT_PG_BINDIR``, else the newest
``/usr/lib/postgresql/*/bin``, else PATH. Missing binaries skip the test
locally and fail it in CI (``CI=true``); a server that is there but fails to
start always fails the test.

Fixtures: ``throwaway_redis`` and ``throwaway_postgres`` (per test),
``redis_cluster`` and ``redis_sentinel`` (one per session, however many modules
import them), ``redis_sentinel_failover`` (per test, for tests that kill its
master). Import them where they are used, or once in tests/conftest.py::

    from tests.servers import (  # noqa: F401  (fixtures)
        redis_cluster, redis_sentinel, redis_sentinel_failover,
        throwaway_postgres, throwaway_redis)
"""
from tests.servers.cluster import redis_cluster
from tests.servers.common import free_port
from tests.servers.postgres import throwaway_postgres
from tests.servers.redis_server import throwaway_redis
from tests.servers.sentinel import redis_sentinel, redis_sentinel_failover

__all__ = [
    "free_port",
    "redis_cluster",
    "redis_sentinel",
    "redis_sentinel_failover",
    "throwaway_postgres",
    "throwaway_redis",
]
