"""Assembles the storage a store runs on, and checks it at start-up.

``open_backends`` turns endpoint keys into a ``Backends``: the parsed config,
the hot state (Redis or embedded), the SQL event log (migrated), the codec and
the outbox. Unreachable servers fail here, fast, naming the URL (password
masked), so ``rasa run`` stops at start-up instead of on the first message.
"""
import dataclasses
import logging
from typing import Any, Dict, Mapping, Optional

from sqlalchemy import exc as sa_errors

from rasa_persistent_tracker.codec import Codec, JsonSerializer
from rasa_persistent_tracker.config import StoreConfig, mask_url, parse_config
from rasa_persistent_tracker.connect import redis_client_factory, run_blocking
from rasa_persistent_tracker.crypto import SNAPSHOT, build_protected
from rasa_persistent_tracker.entries import Entries
from rasa_persistent_tracker.embedded import SQLiteHotState
from rasa_persistent_tracker.errors import (
    CorruptRecordError,
    EventLogUnavailable,
    HotStateUnavailable,
    StorageUnavailable,
)
from rasa_persistent_tracker.event_log import AsyncEventLog, SQLEventLog, make_engine
from rasa_persistent_tracker.hot_state import HotState, RedisHotState
from rasa_persistent_tracker.logids import PURPOSE, ConversationIds
from rasa_persistent_tracker.outbox import Outbox
from rasa_persistent_tracker.replay import validate_record

logger = logging.getLogger("rasa_persistent_tracker")
STARTUP_TIMEOUT = 15.0


@dataclasses.dataclass
class Backends:
    """Everything a ``PersistentTrackerStore`` stores through."""

    config: StoreConfig
    hot: HotState
    log: AsyncEventLog
    codec: Codec
    outbox: Outbox
    announce: Optional[str] = None
    ids: ConversationIds = dataclasses.field(default_factory=ConversationIds)


def open_hot_state(config: StoreConfig) -> HotState:
    """Build the configured hot state (no I/O yet for Redis)."""
    if config.embedded:
        return SQLiteHotState(config.embedded_path, outbox_ttl=config.quarantine_ttl)
    return RedisHotState(redis_client_factory(config), config.key_prefix,
                         outbox_ttl=config.quarantine_ttl, description=mask_url(config.redis_url))


def check_hot_state(hot: HotState, config: StoreConfig) -> None:
    """Raise HotStateUnavailable naming the URL unless the hot state answers."""
    async def ping() -> None:
        try:
            await hot.ping()
        finally:
            if not config.embedded:
                await hot.close()
    try:
        run_blocking(ping, STARTUP_TIMEOUT)
    except StorageUnavailable as exc:
        where = config.embedded_path if config.embedded else mask_url(config.redis_url)
        raise HotStateUnavailable(f"Cannot reach the hot state at {where}: {exc}") from exc


def open_event_log(config: StoreConfig) -> SQLEventLog:
    """Connect to the SQL log and apply pending migrations."""
    try:
        log = SQLEventLog(make_engine(config.sql_url, config.sql_pool_size))
        log.ping()
        log.migrate()
    except (sa_errors.OperationalError, sa_errors.InterfaceError) as exc:
        raise EventLogUnavailable(
            f"Cannot reach the SQL event log at {mask_url(config.sql_url)}: "
            f"{type(exc.orig or exc).__name__}") from exc
    except (sa_errors.ArgumentError, ValueError) as exc:
        # Not the driver's message: SQLAlchemy quotes the whole URL in it.
        raise EventLogUnavailable(
            f"Config key 'sql_url' is not usable ({mask_url(config.sql_url)}): "
            f"{type(exc).__name__}") from exc
    return log


def assemble(config: StoreConfig, hot: HotState, log: SQLEventLog,
             environ: Optional[Mapping[str, str]] = None) -> Backends:
    """Wire already-open storage together (tests use this with fakes)."""
    protected, is_sensitive = build_protected(config, environ)
    codec = Codec(JsonSerializer(), protected, is_sensitive,
                  accept_plaintext=config.accept_plaintext)
    ids = ConversationIds(config.log_conversation_ids,
                          protected.keyring.derived(PURPOSE) if protected else ())
    if codec.encrypting and config.accept_plaintext:
        logger.warning("rasa_persistent_tracker: accept_plaintext is on: plaintext and "
                       "unbound legacy values are believed although a key is configured. "
                       "Run rotate-keys, then turn it off (docs/security.md).")
    log.bind_rows(codec.rebind_row, codec.row_text)
    async_log = AsyncEventLog(log, config.sql_workers)

    def snapshot_payload(conversation_id: str, payload: str, next_seq: int) -> Optional[str]:
        try:
            record = validate_record(codec.loads_record(payload, conversation_id),
                                     conversation_id)
            if record["next_seq"] != next_seq:
                return None
            return codec.reseal_record(payload, conversation_id, SNAPSHOT)
        except CorruptRecordError:
            return None

    outbox = Outbox(hot, async_log, config.outbox_batch_size, config.outbox_scan_interval,
                    config.quarantine_ttl, snapshot_payload, linger=config.outbox_linger,
                    entries=Entries(codec), ids=ids)
    return Backends(config, hot, async_log, codec, outbox, ids=ids)


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
