"""Builds the hot-state and event-log backends from a ``StoreConfig``.

Redis URL forms:

* ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS), ``unix://…``;
* ``redis+sentinel://[:password@]host:port[,host:port…]/service[/db]`` (or the
  ``sentinel_service`` key instead of the path);
* ``redis+cluster://[:password@]host:port[,host:port…]`` (seed nodes);
* ``embedded`` (default): a local SQLite file, no server needed.
"""
import asyncio
import concurrent.futures
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis

from rasa_persistent_tracker.config import StoreConfig, mask_url
from rasa_persistent_tracker.errors import ConfigError, StorageUnavailable
from rasa_persistent_tracker.redis_client import CountingPool, PooledRedis


def _hosts(netloc: str, default_port: int) -> Tuple[Dict[str, Any], List[Tuple[str, int]]]:
    auth: Dict[str, Any] = {}
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, _, password = creds.partition(":")
        auth = {"username": unquote(user) or None, "password": unquote(password) or None}
    nodes = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        try:
            nodes.append((host or part, int(port) if port else default_port))
        except ValueError:
            raise ConfigError(f"Config key 'url' has a bad port in {part!r}.") from None
    return auth, nodes


def _tls(config: StoreConfig) -> Dict[str, Any]:
    return {k: v for k, v in (("ssl_keyfile", config.ssl_keyfile),
                              ("ssl_certfile", config.ssl_certfile),
                              ("ssl_ca_certs", config.ssl_ca_certs)) if v}


class _SentinelMaster(aioredis.Redis):
    """Master client of a Sentinel set whose ``close`` releases every connection.

    redis-py leaves a pool it did not create open on ``close``, and never closes
    the clients it keeps for the sentinels themselves.
    """

    async def close(self, close_connection_pool: Optional[bool] = None) -> None:
        await super().close(close_connection_pool=True)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            await sentinel.close()


def redis_client_factory(config: StoreConfig) -> Callable[[], Any]:
    """Return a function creating a redis.asyncio client for ``config.redis_url``."""
    url = config.redis_url
    common = {"socket_timeout": config.redis_socket_timeout,
              "socket_connect_timeout": config.redis_socket_timeout}
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        tls = _tls(config) if parts.scheme == "rediss" else {}

        def standalone_client() -> Any:
            # A blocking pool: with more turns in flight than connections, a
            # turn waits for a free connection instead of failing.
            pool = CountingPool.from_url(
                url, max_connections=config.redis_max_connections,
                timeout=max(config.redis_socket_timeout, 1.0), **common, **tls)
            return PooledRedis(connection_pool=pool)
        return standalone_client
    if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
        from redis.asyncio.sentinel import Sentinel

        auth, nodes = _hosts(parts.netloc, 26379)
        path = [p for p in parts.path.split("/") if p]
        service = config.sentinel_service or (path[0] if path else None)
        if not service:
            raise ConfigError(f"Config key 'url' ({mask_url(url)}) names no Sentinel "
                              f"service: add '/<service>' or set 'sentinel_service'.")
        db = int(path[1]) if len(path) > 1 else 0
        ssl = {"ssl": True, **_tls(config)} if parts.scheme.startswith("rediss") else {}

        def sentinel_client() -> Any:
            sentinel = Sentinel(nodes, sentinel_kwargs={**common}, **common)
            return sentinel.master_for(service, redis_class=_SentinelMaster, db=db,
                                       max_connections=config.redis_max_connections,
                                       **auth, **ssl)
        return sentinel_client
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        auth, nodes = _hosts(parts.netloc, 6379)
        ssl = {"ssl": True, **_tls(config)} if parts.scheme.startswith("rediss") else {}
        return lambda: RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                                    max_connections=config.redis_max_connections,
                                    **common, **auth, **ssl)
    raise ConfigError(f"Config key 'url' has an unsupported scheme {parts.scheme!r} "
                      f"({mask_url(url)}); use redis://, rediss://, unix://, "
                      f"redis+sentinel://, redis+cluster:// or 'embedded'.")


def run_blocking(coroutine_fn: Callable[[], Any], timeout: float) -> Any:
    """Run an async function to completion from sync code, even inside a loop.

    Used only at start-up (the constructor is synchronous in Rasa): it runs the
    coroutine on a private event loop in a worker thread.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(lambda: asyncio.run(coroutine_fn())).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        raise StorageUnavailable(f"start-up check timed out after {timeout:.0f}s") from None
    finally:
        pool.shutdown(wait=False)
