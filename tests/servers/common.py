"""What every throwaway server shares: loopback ports, waiting, clean-up, skipping.

Every server registers itself here; an ``atexit`` hook (and a SIGTERM handler)
stops whatever a fixture finalizer did not (a crash, Ctrl-C, ``timeout``).
"""
import atexit
import os
import random
import signal
import socket
import time
from typing import Callable, Dict, Optional, TypeVar

import pytest
import redis

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST = "127.0.0.1"
PORT_RANGE = (17000, 29999)
T = TypeVar("T")


class ServerError(RuntimeError):
    """A throwaway server could not be started or did not become ready."""


# ------------------------------------------------------------------ registry

_LIVE: Dict[int, "object"] = {}


def register(server: object) -> None:
    """Remember a server, so the exit hook stops it if no finalizer did."""
    _LIVE[id(server)] = server


def unregister(server: object) -> None:
    """Forget a server that has been closed."""
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


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(check: Callable[[], Optional[T]], timeout: float, what: str,
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


def started(server: T) -> T:
    """``server.start()``, turning a failure into a failed test (after cleanup)."""
    try:
        server.start()  # type: ignore[attr-defined]
    except ServerError as exc:
        server.close()  # type: ignore[attr-defined]
        pytest.fail(f"{type(server).__name__} did not start: {exc}")
    return server


_SHARED: Dict[str, object] = {}


def shared(request: pytest.FixtureRequest, name: str, factory: Callable[[], T]) -> T:
    """One started instance per session, even when several modules import the
    fixture (each import is a separate fixture definition with its own cache)."""
    if name not in _SHARED:
        server = started(factory())
        _SHARED[name] = server

        def release() -> None:
            _SHARED.pop(name, None)
            server.close()  # type: ignore[attr-defined]
        request.config.add_cleanup(release)
    return _SHARED[name]  # type: ignore[return-value]
