"""Assembles the storage a store runs on, and checks it at start-up.

``open_backends`` turns endpoint keys into a ``Backends``: the parsed config,
the hot state (Redis or embedded), the SQL event log (migrated), the codec and
the outbox. Unreachable servers fail here, fast, naming the URL (password
masked), so ``rasa run`` stops at start-up instead of on the first message.
"""
import dataclasses
import logging
from typing import Any, Dict, Mapping, Optional

import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_errors

from rasa_persistent_tracker.config import StoreConfig, mask_url, parse_config
from rasa_persistent_tracker.connect import redis_client_factory, run_blocking
from rasa_persistent_tracker.errors import (
    ConfigError,
    EventLogUnavailable,
    HotStateUnavailable,
    StorageUnavailable,
)
from rasa_persistent_tracker.hot.embedded import SQLiteHotState
from rasa_persistent_tracker.hot.protocol import HotState
from rasa_persistent_tracker.hot.redis_state import RedisHotState
from rasa_persistent_tracker.log.entries import Entries
from rasa_persistent_tracker.log.event_log import AsyncEventLog, SQLEventLog, make_engine
from rasa_persistent_tracker.log.outbox import Outbox
from rasa_persistent_tracker.logids import PURPOSE, ConversationIds
from rasa_persistent_tracker.record.freshness import Freshness, Suspicion
from rasa_persistent_tracker.record.recent import RecentRecords
from rasa_persistent_tracker.record.trackers import Records
from rasa_persistent_tracker.security.codec import Codec
from rasa_persistent_tracker.security.crypto import build_protected
from rasa_persistent_tracker.security.erasure import PURPOSE as ERASURE
from rasa_persistent_tracker.security.erasure import ErasureIds
from rasa_persistent_tracker.security.serde import JsonSerializer
from rasa_persistent_tracker.startup import check_encryption, rasa_store_keys, rasa_store_warning

logger = logging.getLogger("rasa_persistent_tracker.store")
STARTUP_TIMEOUT = 15.0


@dataclasses.dataclass
class Backends:
    """Everything a ``PersistentTrackerStore`` stores through."""

    config: StoreConfig
    hot: HotState
    log: AsyncEventLog
    codec: Codec
    outbox: Outbox
    records: Records
    suspicion: Suspicion
    announce: Optional[str] = None
    ids: ConversationIds = dataclasses.field(default_factory=ConversationIds)


def open_hot_state(config: StoreConfig) -> HotState:
    """Build the configured hot state (no I/O yet for Redis)."""
    if config.embedded:
        return SQLiteHotState(config.embedded_path, outbox_ttl=config.quarantine_ttl)
    return RedisHotState(redis_client_factory(config), config.key_prefix,
                         outbox_ttl=config.quarantine_ttl, description=mask_url(config.redis_url),
                         busy_wait=max(config.redis_socket_timeout, 1.0))


def check_hot_state(hot: HotState, config: StoreConfig) -> None:
    """Raise HotStateUnavailable naming the URL unless the hot state answers;
    warn if the Redis database still holds Rasa's own tracker keys."""
    async def ping() -> int:
        try:
            await hot.ping()
        finally:
            if not config.embedded:
                await hot.close()
        if config.embedded:
            return 0
        client = redis_client_factory(config)()
        try:
            return await rasa_store_keys(client, config.key_prefix)
        except RedisError:
            return 0  # a best-effort hint (e.g. SCAN not allowed by an ACL)
        finally:
            await client.close()
    try:
        foreign = run_blocking(ping, STARTUP_TIMEOUT)
    except StorageUnavailable as exc:
        where = config.embedded_path if config.embedded else mask_url(config.redis_url)
        raise HotStateUnavailable(f"Cannot reach the hot state at {where}: {exc}") from exc
    warning = rasa_store_warning(foreign, mask_url(config.redis_url))
    if warning:
        logger.warning(warning)


# The packages SQLAlchemy needs for each database kind, by the URL's driver.
_DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary (pip install 'rasa-persistent-tracker[postgres]')",
                    "asyncpg": "asyncpg", "pymysql": "PyMySQL", "mysqldb": "mysqlclient"}


def driver_message(exc: BaseException, url: str) -> str:
    """The driver's own words for a failed connection (first line, password masked)."""
    original = getattr(exc, "orig", None) or exc
    text = " ".join(str(original).split()) or type(original).__name__
    password = _url_password(url)
    if password:
        text = text.replace(password, "***")
    return f"{type(original).__name__}: {text[:300]}"


def _url_password(url: str) -> Optional[str]:
    try:
        return sa.engine.make_url(url).password
    except sa_errors.ArgumentError:
        return None


def open_event_log(config: StoreConfig) -> SQLEventLog:
    """Connect to the SQL log and apply pending migrations.

    Raises:
        ConfigError: the URL is unusable, or its database driver is not installed
            (an ImportError would make Rasa fall back to an in-memory store).
        EventLogUnavailable: the database cannot be reached; the message carries
            the driver's reason (e.g. ``database "x" does not exist``).
    """
    where = mask_url(config.sql_url)
    try:
        log = SQLEventLog(make_engine(config.sql_url, config.sql_pool_size))
        log.ping()
        log.migrate()
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        package = _DRIVER_PACKAGES.get(str(missing).split(".")[0], missing)
        raise ConfigError(
            f"Config key 'sql_url' ({where}) needs the database driver '{missing}', which "
            f"is not installed: install {package}.") from None
    except (sa_errors.OperationalError, sa_errors.InterfaceError) as exc:
        raise EventLogUnavailable(
            f"Cannot reach the SQL event log at {where}: "
            f"{driver_message(exc, config.sql_url)}") from exc
    except sa_errors.NoSuchModuleError as exc:
        raise ConfigError(
            f"Config key 'sql_url' ({where}) names an unknown database dialect: {exc}") from None
    except (sa_errors.ArgumentError, ValueError) as exc:
        # Not SQLAlchemy's message: it quotes the whole URL, password included.
        raise ConfigError(
            f"Config key 'sql_url' is not usable ({where}): {type(exc).__name__}") from None
    return log


def assemble(config: StoreConfig, hot: HotState, log: SQLEventLog,
             environ: Optional[Mapping[str, str]] = None) -> Backends:
    """Wire already-open storage together (tests use this with fakes).

    Raises:
        EncryptionKeyMissing / ConfigError: the log holds ciphertext this
            process has no key for (``startup.check_encryption``).
    """
    protected, is_sensitive = build_protected(config, environ)
    try:
        check_encryption(log, getattr(protected, "keyring", None), mask_url(config.sql_url))
    except (sa_errors.OperationalError, sa_errors.InterfaceError) as exc:
        raise EventLogUnavailable(f"Cannot read the SQL event log at {mask_url(config.sql_url)}: "
                                  f"{driver_message(exc, config.sql_url)}") from exc
    codec = Codec(JsonSerializer(), protected, is_sensitive,
                  accept_plaintext=config.accept_plaintext, compress=config.compress_records)
    ids = ConversationIds(config.log_conversation_ids,
                          protected.keyring.derived(PURPOSE) if protected else ())
    if codec.encrypting and config.accept_plaintext:
        logger.warning("rasa_persistent_tracker: accept_plaintext is on: plaintext and "
                       "unbound legacy values are believed although a key is configured. "
                       "Run rotate-keys, then turn it off (docs/security.md).")
    log.bind_rows(codec.rebind_row, codec.row_text)
    # Tombstones of erased conversations, named by a keyed digest of the id.
    erasure_ids = ErasureIds(protected.keyring.derived(ERASURE) if protected else ())
    log.bind_erasure(erasure_ids)
    hot.bind_erasure(erasure_ids)
    async_log = AsyncEventLog(log, config.sql_workers)

    entries = Entries(codec)
    records = Records(codec, RecentRecords(config.record_cache_size),
                      Freshness(async_log, hot, entries), ids)
    suspicion = Suspicion()
    # The snapshot check replays records with the store's domain once Rasa set
    # it (``Records.snapshot_payload``); re-sequenced rows make hot records suspect.
    outbox = Outbox(hot, async_log, config.outbox_batch_size, config.outbox_scan_interval,
                    config.quarantine_ttl, records.snapshot_payload, linger=config.outbox_linger,
                    entries=entries, ids=ids, on_resequenced=suspicion.suspect)
    return Backends(config, hot, async_log, codec, outbox, records, suspicion, ids=ids)


def open_backends(kwargs: Dict[str, Any], environ: Optional[Mapping[str, str]] = None) -> Backends:
    """Parse ``kwargs``, open and check both stores. See the module docstring."""
    config = parse_config(kwargs, environ)
    hot = open_hot_state(config)
    check_hot_state(hot, config)
    backends = assemble(config, hot, open_event_log(config), environ)
    if config.embedded:
        backends.announce = (
            f"rasa_persistent_tracker: no Redis configured (url / REDIS_URL), using the "
            f"embedded hot state at {config.embedded_path} and the event log at "
            f"{mask_url(config.sql_url)}.")
    return backends
