"""Throwaway servers for tests: Redis, Redis Cluster, Redis Sentinel, PostgreSQL.

Every server listens on 127.0.0.1 only, on a free port picked at start-up, and
keeps its files in its own temp dir. Fixture finalizers stop the processes and
remove the dirs; an ``atexit`` hook does the same for anything a crashed test
left behind. The shared servers on 6379 / 5432 are never touched.

Binaries: ``redis-server`` / ``redis-cli`` on PATH; PostgreSQL from
``RPT_PG_BINDIR``, else the newest ``/usr/lib/postgresql/*/bin``, else PATH.
Missing binaries skip the test locally and fail it in CI (``CI=true``); a server
that is there but fails to start always fails the test.

Fixtures: ``throwaway_redis`` and ``throwaway_postgres`` (per test),
``redis_cluster`` and ``redis_sentinel`` (one per session, however many modules
import them), ``redis_sentinel_failover`` (per test, for tests that kill its
master). Import them where they are used, or once in tests/conftest.py::

    from tests.servers import (  # noqa: F401  (fixtures)
        redis_cluster, redis_sentinel, redis_sentinel_failover,
        throwaway_postgres, throwaway_redis)
"""
import atexit
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import pytest
import redis
from redis.sentinel import Sentinel

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST = "127.0.0.1"
PORT_RANGE = (17000, 29999)
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's bus listens on port + 10000
SENTINEL_SERVICE = "rptmaster"
T = TypeVar("T")


class ServerError(RuntimeError):
    """A throwaway server could not be started or did not become ready."""


# ------------------------------------------------------------------ registry

_LIVE: Dict[int, "object"] = {}


def _register(server: object) -> None:
    _LIVE[id(server)] = server


def _unregister(server: object) -> None:
    _LIVE.pop(id(server), None)


@atexit.register
def _close_all() -> None:
    """Safety net: stop whatever a finalizer did not (crash, Ctrl-C)."""
    for server in list(_LIVE.values()):
        try:
            server.close()  # type: ignore[attr-defined]
        except Exception:  # best effort at interpreter exit
            pass


def _on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM (e.g. from `timeout`) skips atexit: stop the servers, then die as asked.
    _close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _on_sigterm)


# --------------------------------------------------------------- utilities

def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(also_free_offset: Optional[int] = None) -> int:
    """A loopback port that is free now (and ``port + also_free_offset`` too).

    Random within PORT_RANGE so that parallel runs rarely pick the same one;
    the servers retry with another port if one is taken in between.
    """
    for _ in range(500):
        port = random.randint(*PORT_RANGE)
        if _bindable(port) and (also_free_offset is None or _bindable(port + also_free_offset)):
            return port
    raise ServerError(f"no free port on {HOST} in {PORT_RANGE}")


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(check: Callable[[], Optional[T]], timeout: float, what: str,
          interval: float = 0.05) -> T:
    """Poll ``check`` until it returns a truthy value; ServerError on timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}"
                              + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


def require(*binaries: Optional[str], what: str) -> None:
    """Skip (locally) or fail (CI) unless every binary was found."""
    if all(binaries):
        return
    message = f"not found: {what}"
    if IN_CI:
        pytest.fail(f"{message}; CI=true, so the server tests must run")
    pytest.skip(message)


def redis_binaries() -> Tuple[Optional[str], Optional[str]]:
    return shutil.which("redis-server"), shutil.which("redis-cli")


def postgres_bindir() -> Optional[str]:
    candidates = [os.environ.get("RPT_PG_BINDIR")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True)
    initdb = shutil.which("initdb")
    candidates.append(os.path.dirname(initdb) if initdb else None)
    for bindir in candidates:
        if bindir and all(os.access(os.path.join(bindir, b), os.X_OK)
                          for b in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def started(server: T) -> T:
    """``server.start()``, turning a failure into a failed test (after cleanup)."""
    try:
        server.start()  # type: ignore[attr-defined]
    except ServerError as exc:
        server.close()  # type: ignore[attr-defined]
        pytest.fail(f"{type(server).__name__} did not start: {exc}")
    return server


# -------------------------------------------------------------------- Redis

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
        _register(self)

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
                _wait(self._ready, timeout, f"{self!r} to answer PING")
                return self
            except ServerError as exc:
                self.stop()
                log = _tail(self.log)
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
        _unregister(self)


class _Group:
    """Servers started and stopped together, in one temp dir."""

    def __init__(self, prefix: str) -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.servers: List[RedisServer] = []
        _register(self)

    def _add(self, name: str, **kwargs) -> RedisServer:
        server = RedisServer(workdir=os.path.join(self.dir, name), **kwargs)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in reversed(self.servers):  # sentinels first: no failover on the way out
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        _unregister(self)


class RedisClusterSet(_Group):
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
        _wait(healthy, timeout, "cluster_state:ok on every node", interval=0.1)
        return self


class RedisSentinelSet(_Group):
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
        _wait(lambda: self._link_up(self.replica), timeout, "the replica to sync")
        for sentinel in self.sentinels:
            sentinel.sentinel_config = [
                "sentinel resolve-hostnames no",
                f"sentinel monitor {self.service} {HOST} {self.master.port} 2",
                f"sentinel down-after-milliseconds {self.service} 1000",
                f"sentinel failover-timeout {self.service} 5000",
                f"sentinel parallel-syncs {self.service} 1",
            ]
            sentinel.start()
        _wait(self._sentinels_agree, timeout, "the sentinels to see each other and the replica",
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
            _wait(lambda: client.info("replication").get("connected_slaves") == 0, 5,
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
        return _wait(promoted, timeout, f"a new master for {self.service!r}", interval=0.1)


# --------------------------------------------------------------- PostgreSQL

class PostgresServer:
    """A PostgreSQL cluster (initdb) on a loopback port, trust auth, no fsync.

    Runs as the ``postgres`` user when the tests run as root (initdb refuses
    root). ``url`` is ``postgresql+psycopg2://postgres@127.0.0.1:<port>/postgres``.
    """

    def __init__(self) -> None:
        self.bindir = postgres_bindir() or ""
        self.dir = tempfile.mkdtemp(prefix="rpt-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "postgres.log")
        self.port: Optional[int] = None
        self._initialised = False
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        _register(self)

    def __repr__(self) -> str:
        return f"PostgresServer({HOST}:{self.port}, {self.dir})"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@{HOST}:{self.port}/postgres"

    def _run(self, binary: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bindir, binary), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  cwd=self.dir, stdin=subprocess.DEVNULL,
                                  env={**os.environ, "LC_ALL": "C"})
        except subprocess.TimeoutExpired:
            raise ServerError(f"{' '.join(command)} timed out after {timeout:.0f}s") from None

    def _initdb(self) -> None:
        done = self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                         "-E", "UTF8", "--locale=C", "--no-sync")
        if done.returncode != 0:
            raise ServerError(f"initdb failed:\n{done.stdout}{done.stderr}")
        settings = ["listen_addresses = '127.0.0.1'", f"unix_socket_directories = '{self.dir}'",
                    "fsync = off", "synchronous_commit = off", "full_page_writes = off",
                    "shared_buffers = 32MB", "max_connections = 50"]
        # The file belongs to postgres; appending as root keeps its owner.
        with open(os.path.join(self.data, "postgresql.conf"), "a") as handle:
            handle.write("\n" + "\n".join(settings) + "\n")
        self._initialised = True

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        """initdb (first time), then ``pg_ctl start`` (same port once chosen)."""
        if not self._initialised:
            self._initdb()
        fixed = self.port is not None
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port()
            done = self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w",
                             "-t", str(int(timeout)), "-o", f"-p {self.port}", "start",
                             timeout=timeout + 10)
            if done.returncode == 0:
                return self
            log = _tail(self.log)
            if "already in use" not in log or fixed:
                raise ServerError(f"pg_ctl start failed:\n{done.stdout}{done.stderr}\n"
                                  f"--- {self.log} ---\n{log}")
        raise ServerError(f"{self!r}: every port tried was taken")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``; if that fails, signal the postmaster directly."""
        pid_file = os.path.join(self.data, "postmaster.pid")
        if not os.path.exists(pid_file):
            return
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop", timeout=40)
        if os.path.exists(pid_file):
            try:
                with open(pid_file) as handle:
                    os.kill(int(handle.readline().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Stop the server and remove its data dir."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _unregister(self)


# ------------------------------------------------------------------ fixtures

@pytest.fixture
def throwaway_redis():
    """A standalone redis-server for one test (``.url``, ``.stop()``, ``.restart()``)."""
    require(*redis_binaries(), what="redis-server / redis-cli on PATH")
    server = started(RedisServer())
    yield server
    server.close()


_SHARED: Dict[str, object] = {}


def _shared(request: pytest.FixtureRequest, name: str, factory: Callable[[], T]) -> T:
    """One started instance per session, even when several modules import the
    fixture (each import is a separate fixture definition with its own cache)."""
    require(*redis_binaries(), what="redis-server / redis-cli on PATH")
    if name not in _SHARED:
        server = started(factory())
        _SHARED[name] = server

        def release() -> None:
            _SHARED.pop(name, None)
            server.close()  # type: ignore[attr-defined]
        request.config.add_cleanup(release)
    return _SHARED[name]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> RedisClusterSet:
    """A 3-master Redis Cluster shared by the session (``.url``, ``.ports``)."""
    return _shared(request, "cluster", RedisClusterSet)


@pytest.fixture(scope="session")
def redis_sentinel(request: pytest.FixtureRequest) -> RedisSentinelSet:
    """Master + replica + 3 sentinels shared by the session; do not kill its master."""
    return _shared(request, "sentinel", RedisSentinelSet)


@pytest.fixture
def redis_sentinel_failover():
    """A Sentinel set owned by one test, which may kill its master."""
    require(*redis_binaries(), what="redis-server / redis-cli on PATH")
    group = started(RedisSentinelSet())
    yield group
    group.close()


@pytest.fixture
def throwaway_postgres():
    """A PostgreSQL server for one test (``.url``, ``.stop()``, ``.start()``)."""
    require(postgres_bindir(), what="PostgreSQL initdb/pg_ctl/postgres in $RPT_PG_BINDIR, "
                                     "/usr/lib/postgresql/*/bin or on PATH")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        require(None, what="runuser (initdb must run as 'postgres' when the tests run as root)")
    server = started(PostgresServer())
    yield server
    server.close()
