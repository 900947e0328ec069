"""A throwaway PostgreSQL server (initdb on a loopback port, trust auth, no fsync).

Binaries: ``RPT_PG_BINDIR``, else the newest ``/usr/lib/postgresql/*/bin``,
else PATH.
"""
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from typing import Optional

import pytest

from tests.servers.common import (HOST, ServerError, free_port, log_tail, register,
                                  require, started, unregister)


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
        register(self)

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
            log = log_tail(self.log)
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
            unregister(self)


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
