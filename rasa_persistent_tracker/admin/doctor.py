"""``doctor``: checks a store's storage and configuration, and explains.

Each check gives one finding: ``ok``, ``warn`` (works, but look at it) or
``fail`` (the store cannot work as configured, or data is waiting that
nothing delivers). Checks: the hot state and the SQL log are reachable (and
their versions), the log's schema version, the outbox backlog and the age of
its oldest entry, quarantined copies, the key ids in use against the
configured ones, ``record_exp`` against the domain's session expiry, and pool
sizes against the store's own concurrency. Read-only: nothing is delivered,
moved or rewritten (opening the log applies pending migrations, as every
command and the bot itself do).
"""
import dataclasses
import sqlite3
import time
from typing import Any, Awaitable, Callable, List, Optional

import sqlalchemy as sa

from rasa_persistent_tracker import startup
from rasa_persistent_tracker.admin.quarantine import QuarantineAdmin
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.config import mask_url
from rasa_persistent_tracker.hot import entry_header
from rasa_persistent_tracker.log import migrations
from rasa_persistent_tracker.log.tables import FACTS
from rasa_persistent_tracker.security.keys import Keyring

OK, WARN, FAIL = "ok", "warn", "fail"
# An entry older than this has waited through many delivery attempts: no
# process is delivering (none running, or the log refuses its rows).
STALE_ENTRY_S = 300.0
KEY_CHECK_FACT = "key_check:"


@dataclasses.dataclass(frozen=True)
class Finding:
    status: str
    check: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.check}: {self.detail}"


async def _hot_state(backends: Backends, redis_client: Any) -> Finding:
    config = backends.config
    try:
        await backends.hot.ping()
    except Exception as exc:  # noqa: BLE001 - reported, it is what doctor is for
        return Finding(FAIL, "hot state", f"unreachable at {mask_url(config.redis_url)} "
                                          f"({type(exc).__name__}: {exc})")
    if redis_client is None:
        return Finding(OK, "hot state", f"embedded SQLite {sqlite3.sqlite_version} at "
                                        f"{config.embedded_path}")
    info = await redis_client.info("server")
    mode = info.get("redis_mode", "standalone")
    return Finding(OK, "hot state", f"Redis {info.get('redis_version', '?')} ({mode}) at "
                                    f"{mask_url(config.redis_url)}")


def _sql_log(backends: Backends) -> List[Finding]:
    engine = backends.log.sync.engine
    where = mask_url(backends.config.sql_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            version = conn.execute(sa.select(sa.func.max(sa.column("version"))).select_from(
                sa.table(migrations.VERSION_TABLE))).scalar()
    except sa.exc.SQLAlchemyError as exc:
        return [Finding(FAIL, "SQL log", f"unreachable at {where} ({type(exc).__name__})")]
    server = ".".join(map(str, engine.dialect.server_version_info or ())) or "?"
    latest = migrations.MIGRATIONS[-1].version
    schema = (Finding(OK, "schema", f"version {version} (latest)") if version == latest else
              Finding(FAIL, "schema", f"version {version}, this code needs {latest}: start "
                                      f"the bot (or any command) once to migrate"))
    return [Finding(OK, "SQL log", f"{engine.dialect.name} {server} at {where}"), schema]


async def _outbox(backends: Backends, now: float) -> Finding:
    conversations = entries = 0
    oldest: Optional[float] = None
    async for cid in backends.hot.outboxes():
        pending = await backends.hot.pending(cid, backends.config.outbox_batch_size)
        if not pending.entries:
            continue
        conversations += 1
        entries += len(pending.entries)
        try:
            saved_at = entry_header.split(pending.entries[0])[1]
        except ValueError:
            continue  # unreadable: delivery quarantines it
        oldest = saved_at if oldest is None else min(oldest, saved_at)
    if not conversations:
        return Finding(OK, "outbox", "empty: every saved turn is in the SQL log")
    age = now - oldest if oldest is not None else 0.0
    detail = (f"{entries} undelivered entr{'y' if entries == 1 else 'ies'} in "
              f"{conversations} conversation(s), oldest {age:.0f} s old")
    if age > STALE_ENTRY_S:
        return Finding(FAIL, "outbox", detail + ": nothing is delivering them (is the bot "
                                                "running? is the SQL log refusing rows? see "
                                                "its log lines)")
    return Finding(OK, "outbox", detail + " (being delivered)")


async def _quarantine(backends: Backends, redis_client: Any) -> Finding:
    copies = await QuarantineAdmin(backends, redis_client).list_copies()
    if not copies:
        return Finding(OK, "quarantine", "no quarantined copies")
    return Finding(WARN, "quarantine", f"{len(copies)} quarantined cop"
                                       f"{'y' if len(copies) == 1 else 'ies'}: "
                                       f"'rasa-persistent-tracker quarantine list' shows them")


def _keys(backends: Backends, keyring: Optional[Keyring]) -> Finding:
    with backends.log.sync.engine.connect() as conn:
        facts = dict(conn.execute(sa.select(FACTS.c.name, FACTS.c.value)).fetchall())
    used = sorted(name[len(KEY_CHECK_FACT):] for name in facts if name.startswith(KEY_CHECK_FACT))
    configured = keyring.ids if keyring is not None else []
    if not used and not configured:
        return Finding(OK, "keys", "no encryption configured, none recorded in the log")
    missing = [kid for kid in used if kid not in configured]
    detail = f"configured {configured or 'none'} (primary {configured[0] if configured else '-'})" \
             f"; recorded as having written data: {used or 'none'}"
    if missing:
        return Finding(WARN, "keys", detail + f"; not configured: {missing} (data under them "
                                              f"cannot be read here until rotate-keys moved it)")
    return Finding(OK, "keys", detail)


def _domain(backends: Backends, domain: Any) -> Finding:
    if domain is None:
        return Finding(WARN, "domain", "not checked: no domain found (--domain)")
    warnings = startup.domain_warnings(domain, backends.config.record_exp)
    if warnings:
        return Finding(FAIL, "record_exp", " ".join(warnings))
    minutes = getattr(getattr(domain, "session_config", None), "session_expiration_time", 0)
    return Finding(OK, "record_exp", f"{backends.config.record_exp:.0f} s covers the domain's "
                                     f"session expiry ({minutes or 0:g} min)")


def _pools(backends: Backends) -> Finding:
    config = backends.config
    problems = []
    if config.sql_pool_size < config.sql_workers:
        problems.append(f"sql_pool_size ({config.sql_pool_size}) < sql_workers "
                        f"({config.sql_workers}): SQL threads wait for connections")
    if not config.embedded and config.redis_max_connections < 10:
        problems.append(f"redis_max_connections ({config.redis_max_connections}) < 10: "
                        f"concurrent turns past it wait, then fail with HotStateBusy")
    detail = (f"redis_max_connections {config.redis_max_connections}, sql_pool_size "
              f"{config.sql_pool_size}, sql_workers {config.sql_workers}")
    if problems:
        return Finding(WARN, "pools", detail + "; " + "; ".join(problems))
    return Finding(OK, "pools", detail)


async def diagnose(backends: Backends, keyring: Optional[Keyring], domain: Any,
                   redis_client: Any = None, now: Optional[float] = None,
                   report: Optional[Callable[[Finding], Awaitable[None]]] = None
                   ) -> List[Finding]:
    """Every finding, in order (``report`` is called with each as it comes)."""
    now = time.time() if now is None else now
    findings: List[Finding] = []

    async def add(finding: Finding) -> None:
        findings.append(finding)
        if report is not None:
            await report(finding)
    hot = await _hot_state(backends, redis_client)
    await add(hot)
    for finding in _sql_log(backends):
        await add(finding)
    sql_ok = all(f.status != FAIL for f in findings[1:])
    if hot.status != FAIL:
        await add(await _outbox(backends, now))
        await add(await _quarantine(backends, redis_client))
    if sql_ok:
        await add(_keys(backends, keyring))
    await add(_domain(backends, domain))
    await add(_pools(backends))
    return findings


def summary(findings: List[Finding], strict: bool = False) -> str:
    failed = [f for f in findings if f.status == FAIL or (strict and f.status == WARN)]
    warned = [f for f in findings if f.status == WARN]
    if failed:
        return "NOT healthy: " + "; ".join(f.check for f in failed)
    return "healthy" + (f" ({len(warned)} warning(s))" if warned else "")
