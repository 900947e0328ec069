"""A throwaway Redis Sentinel set: master, replica, three sentinels; failover helpers."""
import os
import signal
from typing import List, Optional

import pytest
import redis
from redis.sentinel import Sentinel

from tests.servers.common import HOST, ServerError, shared, started, wait_for
from tests.servers.redis_server import RedisGroup, RedisServer, require_redis

SENTINEL_SERVICE = "rptmaster"


class RedisSentinelSet(RedisGroup):
    """One master, one replica and three sentinels (quorum 2) for ``service``.

    ``url`` is the store's URL (``redis+sentinel://h:p,h:p,h:p/<service>/0``).
    Failover: ``down-after-milliseconds 1000``, ``failover-timeout 5000``.
    """

    def __init__(self, service: str = SENTINEL_SERVICE, sentinels: int = 3) -> None:
        super().__init__("rpt-sentinel-")
        self.service = service
        self.master = self._add("master")
        self.replica = self._add("replica")
        self.sentinels = [self._add(f"sentinel{i}", sentinel_config=[])
                          for i in range(sentinels)]
        self._killed: Optional[int] = None

    @property
    def url(self) -> str:
        nodes = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.service}/0"

    @property
    def data_servers(self) -> List[RedisServer]:
        return [self.master, self.replica]

    def start(self, timeout: float = 30.0) -> "RedisSentinelSet":
        self.master.start()
        self.replica.args = ["--replicaof", HOST, str(self.master.port)]
        self.replica.start()
        wait_for(lambda: self._link_up(self.replica), timeout, "the replica to sync")
        for sentinel in self.sentinels:
            sentinel.sentinel_config = [
                "sentinel resolve-hostnames no",
                f"sentinel monitor {self.service} {HOST} {self.master.port} 2",
                f"sentinel down-after-milliseconds {self.service} 1000",
                f"sentinel failover-timeout {self.service} 5000",
                f"sentinel parallel-syncs {self.service} 1",
            ]
            sentinel.start()
        wait_for(self._sentinels_agree, timeout, "the sentinels to see each other and the replica",
              interval=0.1)
        return self

    @staticmethod
    def _link_up(server: RedisServer) -> bool:
        with server.client() as client:
            return client.info("replication").get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(self.service)
            if (state.get("num-other-sentinels") != len(self.sentinels) - 1
                    or state.get("num-slaves") != 1 or not state.get("is_master")
                    or state.get("is_sdown") or state.get("is_odown")):
                return False
        return True

    def sentinel(self) -> Sentinel:
        return Sentinel([(HOST, s.port) for s in self.sentinels], socket_timeout=2)

    def client(self) -> redis.Redis:
        """A sync client on the current master (found through the sentinels)."""
        return self.sentinel().master_for(self.service, socket_timeout=5)

    def master_port(self) -> int:
        """The master's port as the sentinels currently report it."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with sentinel.client() as client:
                    addr = client.sentinel_get_master_addr_by_name(self.service)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        raise ServerError(f"no sentinel knows a master for {self.service!r}")

    def server_on(self, port: int) -> RedisServer:
        for server in self.data_servers:
            if server.port == port:
                return server
        raise ServerError(f"no data server of this set listens on {port}")

    def isolate_replicas(self) -> None:
        """Make the master's next writes unreplicated until ``kill_master``.

        SIGSTOPs the replicas (so they cannot reconnect) and drops their links
        on the master; ``kill_master`` or ``close`` resumes them.
        """
        master = self.server_on(self.master_port())
        for server in self.data_servers:
            if server is not master and server.running:
                os.kill(server.pid, signal.SIGSTOP)
        with master.client() as client:
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
            wait_for(lambda: client.info("replication").get("connected_slaves") == 0, 5,
                  "the master to drop its replica links")

    def kill_master(self) -> int:
        """SIGKILL the current master (and resume isolated replicas); return its port."""
        port = self.master_port()
        self.server_on(port).kill()
        for server in self.data_servers:
            if server.running:
                os.kill(server.pid, signal.SIGCONT)
        self._killed = port
        return port

    def wait_for_failover(self, timeout: float = 30.0) -> int:
        """Wait until a majority of sentinels name a new, writable master; return its port."""
        old = self._killed

        def promoted() -> Optional[int]:
            ports = []
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    addr = client.sentinel_get_master_addr_by_name(self.service)
                if addr and int(addr[1]) != old:
                    ports.append(int(addr[1]))
            if len(ports) * 2 <= len(self.sentinels) or len(set(ports)) != 1:
                return None
            with self.server_on(ports[0]).client() as client:
                if client.info("replication").get("role") != "master":
                    return None
            return ports[0]
        return wait_for(promoted, timeout, f"a new master for {self.service!r}", interval=0.1)


@pytest.fixture(scope="session")
def redis_sentinel(request: pytest.FixtureRequest) -> RedisSentinelSet:
    """Master + replica + 3 sentinels shared by the session; do not kill its master."""
    require_redis()
    return shared(request, "sentinel", RedisSentinelSet)


@pytest.fixture
def redis_sentinel_failover():
    """A Sentinel set owned by one test, which may kill its master."""
    require_redis()
    group = started(RedisSentinelSet())
    yield group
    group.close()
