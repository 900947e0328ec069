"""The throwaway servers of tests/servers.py start, answer, stop and restart."""
import pytest
import redis
import sqlalchemy as sa

from tests.servers import (  # noqa: F401  (fixtures)
    redis_cluster,
    redis_sentinel,
    throwaway_postgres,
    throwaway_redis,
)

pytestmark = pytest.mark.servers


def test_standalone_redis_answers_and_restarts(throwaway_redis):
    client = redis.Redis.from_url(throwaway_redis.url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert client.config_get("save") == {"save": ""}
    port = throwaway_redis.port
    throwaway_redis.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(throwaway_redis.url, socket_connect_timeout=1).ping()
    throwaway_redis.restart()
    assert throwaway_redis.port == port
    assert client.get("k") is None  # no persistence: a restart loses everything


def test_cluster_has_three_masters_sharing_all_slots(redis_cluster):
    client = redis_cluster.client()
    try:
        assert redis_cluster.url.startswith("redis+cluster://127.0.0.1:")
        assert len(redis_cluster.ports) == 3
        primaries = client.get_primaries()
        assert sorted(n.port for n in primaries) == sorted(redis_cluster.ports)
        names = [f"smoke:{i}" for i in range(30)]
        for name in names:
            client.set(name, name)
        owners = {client.get_node_from_key(name).port for name in names}
        assert owners == set(redis_cluster.ports)
        assert sorted(k.decode() for k in client.scan_iter(match="smoke:*")) == sorted(names)
        client.delete(*names)
    finally:
        client.close()


def test_sentinel_set_reports_master_and_replica(redis_sentinel):
    port = redis_sentinel.master_port()
    assert port == redis_sentinel.master.port
    assert redis_sentinel.url.endswith(f"/{redis_sentinel.service}/0")
    client = redis_sentinel.client()
    client.set("smoke", "1")
    with redis_sentinel.replica.client() as replica:
        assert replica.info("replication")["role"] == "slave"
    assert client.wait(1, 2000) == 1  # the replica acknowledged the write
    client.delete("smoke")


def test_postgres_answers_stops_and_starts(throwaway_postgres):
    engine = sa.create_engine(throwaway_postgres.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
        engine.dispose()
        throwaway_postgres.stop()
        with pytest.raises(sa.exc.OperationalError):
            with engine.connect():
                pass
        throwaway_postgres.start()
        with engine.connect() as conn:
            assert conn.execute(sa.text("show listen_addresses")).scalar() == "127.0.0.1"
    finally:
        engine.dispose()
