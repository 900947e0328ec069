"""A throwaway Redis Cluster (three masters, no replicas)."""
import subprocess
from typing import List

import pytest
import redis

from tests.servers.common import HOST, ServerError, shared, wait_for
from tests.servers.redis_server import RedisGroup, redis_binaries, require_redis


class RedisClusterSet(RedisGroup):
    """A Redis Cluster of ``masters`` masters and no replicas.

    ``url`` is the store's seed-node URL (``redis+cluster://h:p,h:p,…``).
    """

    def __init__(self, masters: int = 3) -> None:
        super().__init__("rpt-cluster-")
        for i in range(masters):
            self._add(f"node{i}", cluster=True, args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000"])

    @property
    def ports(self) -> List[int]:
        return [s.port for s in self.servers]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def client(self) -> redis.RedisCluster:
        """A sync cluster client (SCAN and friends go to every master)."""
        return redis.RedisCluster(host=HOST, port=self.ports[0], socket_timeout=5)

    def start(self, timeout: float = 60.0) -> "RedisClusterSet":
        for server in self.servers:
            server.start()
        cli = redis_binaries()[1] or "redis-cli"
        command = [cli, "--cluster", "create", *[f"{HOST}:{p}" for p in self.ports],
                   "--cluster-replicas", "0", "--cluster-yes"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ServerError(f"{' '.join(command)} timed out") from None
        if done.returncode != 0:
            raise ServerError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

        def healthy() -> bool:
            for server in self.servers:
                with server.client() as client:
                    info = client.cluster("INFO")
                if (info.get("cluster_state") != "ok"
                        or int(info.get("cluster_slots_ok", 0)) != 16384
                        or int(info.get("cluster_known_nodes", 0)) != len(self.servers)):
                    return False
            return True
        wait_for(healthy, timeout, "cluster_state:ok on every node", interval=0.1)
        return self


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> RedisClusterSet:
    """A 3-master Redis Cluster shared by the session (``.url``, ``.ports``)."""
    require_redis()
    return shared(request, "cluster", RedisClusterSet)
