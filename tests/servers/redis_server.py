"""A standalone ``redis-server`` (or sentinel) process, and groups of them."""
import os
import shutil
import signal
import subprocess
import tempfile
from typing import List, Optional, Sequence, Tuple

import pytest
import redis

from tests.servers.common import (HOST, ServerError, free_port, log_tail, register,
                                  require, started, unregister, wait_for)

CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's bus listens on port + 10000


def redis_binaries() -> Tuple[Optional[str], Optional[str]]:
    return shutil.which("redis-server"), shutil.which("redis-cli")


def require_redis() -> None:
    """Skip (locally) or fail (CI) without ``redis-server`` / ``redis-cli``."""
    require(*redis_binaries(), what="redis-server / redis-cli on PATH")


class RedisServer:
    """One ``redis-server`` (or sentinel) process on a loopback port.

    Args:
        args: extra command-line options (``("--cluster-enabled", "yes")``).
        sentinel_config: lines of a sentinel config; runs with ``--sentinel``.
        workdir: directory for logs and files (default: a new temp dir, removed
            by ``close``).
        cluster: reserve the cluster bus port (port + 10000) too.
    """

    def __init__(self, args: Sequence[str] = (), sentinel_config: Optional[List[str]] = None,
                 workdir: Optional[str] = None, cluster: bool = False) -> None:
        self.binary = redis_binaries()[0] or "redis-server"
        self.args = list(args)
        self.sentinel_config = sentinel_config
        self.cluster = cluster
        self._own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="rpt-redis-")
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(self.dir, "redis.log")
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None
        register(self)

    def __repr__(self) -> str:
        kind = "sentinel" if self.sentinel_config is not None else "redis"
        return f"RedisServer({kind} {HOST}:{self.port}, pid={self.pid})"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs) -> redis.Redis:
        """A sync client straight to this process (no cluster/sentinel logic)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, **kwargs)

    def _command(self) -> List[str]:
        common = ["--port", str(self.port), "--bind", HOST, "--dir", self.dir,
                  "--logfile", self.log, "--daemonize", "no"]
        if self.sentinel_config is None:
            return [self.binary, *common, "--save", "", "--appendonly", "no", *self.args]
        conf = os.path.join(self.dir, "sentinel.conf")
        if not os.path.exists(conf):  # sentinel rewrites it with its state: keep on restart
            with open(conf, "w") as handle:
                handle.write("\n".join(self.sentinel_config) + "\n")
        return [self.binary, conf, "--sentinel", *common, *self.args]

    def start(self, timeout: float = 15.0) -> "RedisServer":
        """Start (again, on the same port once one was chosen) and wait for PING."""
        if self.running:
            return self
        fixed = self.port is not None
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port(CLUSTER_BUS_OFFSET if self.cluster else None)
            self.process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                            cwd=self.dir)
            try:
                wait_for(self._ready, timeout, f"{self!r} to answer PING")
                return self
            except ServerError as exc:
                self.stop()
                log = log_tail(self.log)
                if "Address already in use" not in log or fixed:
                    raise ServerError(f"{exc}\n--- {self.log} ---\n{log}") from None
        raise ServerError(f"{self!r}: every port tried was taken")

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise ServerError(f"redis-server exited with {self.process.returncode}")
        with self.client(socket_connect_timeout=1) as client:
            return bool(client.ping())

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no final replication."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self, timeout: float = 15.0) -> "RedisServer":
        """Stop and start on the same port (the data is gone: no persistence)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the process (resuming it if it was SIGSTOPped) and remove its dir."""
        if self.running:
            os.kill(self.process.pid, signal.SIGCONT)
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        unregister(self)


class RedisGroup:
    """Servers started and stopped together, in one temp dir."""

    def __init__(self, prefix: str) -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.servers: List[RedisServer] = []
        register(self)

    def _add(self, name: str, **kwargs) -> RedisServer:
        server = RedisServer(workdir=os.path.join(self.dir, name), **kwargs)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in reversed(self.servers):  # sentinels first: no failover on the way out
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        unregister(self)


@pytest.fixture
def throwaway_redis():
    """A standalone redis-server for one test (``.url``, ``.stop()``, ``.restart()``)."""
    require_redis()
    server = started(RedisServer())
    yield server
    server.close()
