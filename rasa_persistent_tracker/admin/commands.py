"""One function per CLI command, on the storage the endpoints file configures.

``cli.py`` parses the arguments and calls ``run_<command>(backends, args)``,
which returns the exit code and releases the storage it was given.
"""
import argparse
import os
import sys
from typing import Any, AsyncIterator

from rasa_persistent_tracker import logids
from rasa_persistent_tracker.admin import doctor, erasing, erasure_report, exporting, importer
from rasa_persistent_tracker.admin.endpoints_file import tracker_store_block
from rasa_persistent_tracker.admin.inspection import inspect_conversation
from rasa_persistent_tracker.admin.quarantine import QuarantineAdmin
from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.admin.rotation import primary_key_id, rotate
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.config import mask_url
from rasa_persistent_tracker.errors import ConfigError
from rasa_persistent_tracker.log import partitions
from rasa_persistent_tracker.security.keys import load_keyring

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _redis_client(backends: Backends) -> Any:
    """A client on the hot state's Redis; None for the embedded hot state."""
    if backends.config.embedded:
        return None
    from rasa_persistent_tracker.connect import redis_client_factory

    return redis_client_factory(backends.config)()


async def _release(backends: Backends, client: Any = None) -> None:
    """Stop what a command opened: the storage, and a Redis client if any."""
    if client is not None:
        await client.close()
    await backends.outbox.stop()
    await backends.hot.close()
    backends.log.close()


def _raw_access(backends: Backends) -> RawHotAccess:
    return RawHotAccess(backends.config, _redis_client(backends))


async def _close(backends: Backends, raw: RawHotAccess) -> None:
    await raw.close()
    await _release(backends)


async def run_rotate(backends: Backends, args: argparse.Namespace) -> int:
    raw = _raw_access(backends)
    try:
        print(f"Rotating to key '{primary_key_id(backends)}' (hot state "
              f"{mask_url(backends.config.redis_url)}, log {mask_url(backends.config.sql_url)}).")
        report = await rotate(
            backends, args.batch_size, max_batches=args.max_batches, ttl_of=raw.ttl, raw=raw,
            progress=lambda p: print(f"{p.phase}: {p.checked}/{p.total} checked, "
                                     f"{p.rewritten} re-encrypted", flush=True))
    finally:
        await _close(backends, raw)
    print(report.summary())
    return EXIT_OK if report.finished else EXIT_FAILED


async def run_inspect(backends: Backends, args: argparse.Namespace) -> int:
    raw = _raw_access(backends)
    try:
        cid = await _resolved(backends, args.conversation_id)
        found = await inspect_conversation(backends, raw, cid, args.show_values)
    finally:
        await _close(backends, raw)
    if not found:
        print(f"Conversation '{args.conversation_id}' not found: no hot record, log rows, "
              f"outbox entries or quarantined copies.", file=sys.stderr)
    return EXIT_OK if found else EXIT_FAILED


async def run_quarantine(backends: Backends, args: argparse.Namespace) -> int:
    client = _redis_client(backends)
    admin = QuarantineAdmin(backends, client)
    try:
        if args.action == "list":
            copies = await admin.list_copies(args.conversation_id)
            for copy in copies:
                print(copy.line())
            readable = sum(c.problem is None for c in copies)
            print(f"{len(copies)} quarantined cop{'y' if len(copies) == 1 else 'ies'}, "
                  f"{readable} readable with the configured keys.")
            return EXIT_OK
        print(await admin.restore(args.ref, force=args.force))
        return EXIT_OK
    finally:
        await _release(backends, client)


async def run_partitions(backends: Backends, args: argparse.Namespace) -> int:
    engine = backends.log.sync.engine
    try:
        if args.ahead is not None:
            created = await backends.log.run(partitions.ensure_partitions, engine, args.ahead)
            print(f"Created {len(created)} partition(s){': ' if created else ''}"
                  f"{', '.join(created)}.")
        found = await backends.log.run(partitions.list_partitions, engine)
    finally:
        await _release(backends)
    if not found:
        print(f"The log at {mask_url(backends.config.sql_url)} is one table: partitions are "
              f"made on PostgreSQL only.")
        return EXIT_OK
    for partition in found:
        month = "default" if partition.month is None else str(partition.month)
        print(f"{partition.name:<24} {month:>8} {partition.rows:>12} rows")
    return EXIT_OK


async def run_doctor(backends: Backends, args: argparse.Namespace) -> int:
    client = _redis_client(backends)

    async def report(finding: doctor.Finding) -> None:
        print(finding.line(), flush=True)
    try:
        findings = await doctor.diagnose(backends, load_keyring(backends.config),
                                         _domain_beside(args), client, report=report)
    finally:
        await _release(backends, client)
    verdict = doctor.summary(findings, args.strict)
    print(verdict)
    return EXIT_OK if verdict.startswith("healthy") else EXIT_FAILED


def _domain_beside(args: argparse.Namespace) -> Any:
    """``--domain``, else the domain.yml beside the endpoints file; None if neither."""
    path = args.domain or os.path.join(os.path.dirname(os.path.abspath(args.endpoints)),
                                       "domain.yml")
    if not os.path.exists(path):
        if args.domain:
            raise ConfigError(f"Domain '{path}' does not exist.")
        return None
    from rasa.shared.core.domain import Domain

    return Domain.load(path)


async def run_import(backends: Backends, args: argparse.Namespace) -> int:
    from rasa.core.tracker_store import TrackerStore
    from rasa.shared.core.domain import Domain

    from rasa_persistent_tracker.store import PersistentTrackerStore

    domain_path = args.domain or os.path.join(
        os.path.dirname(os.path.abspath(args.endpoints)), "domain.yml")
    if not os.path.exists(domain_path):
        raise ConfigError(f"Domain '{domain_path}' does not exist: pass --domain (the bot's "
                          f"domain.yml or domain folder; trackers are rebuilt with its slots).")
    domain = Domain.load(domain_path)
    source_endpoint = tracker_store_block(args.source)
    if str(source_endpoint.type or "").startswith("rasa_persistent_tracker"):
        raise ConfigError(f"'{args.source}' already uses rasa_persistent_tracker: --from names "
                          f"the endpoints file of the store to copy from.")
    source = TrackerStore.create(source_endpoint, domain)
    target = PersistentTrackerStore(domain, backends=backends)
    tty = sys.stdout.isatty()

    def progress(done: int, total: int) -> None:
        if tty or done == total or done % 100 == 0:
            print(f"\r{done}/{total} conversations", end="" if tty and done < total else "\n",
                  flush=True)
    try:
        report = await importer.import_all(source, target, args.dry_run, progress)
    finally:
        await target.close()
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


async def run_export(backends: Backends, args: argparse.Namespace) -> int:
    window = exporting.Window(args.since, args.until, args.conversation)
    if window.since is not None and window.until is not None and window.until <= window.since:
        raise ConfigError(f"--until ({args.until}) must be after --since ({args.since}).")
    cursor = exporting.Cursor(args.cursor, window)
    engine = backends.log.sync.engine
    broker = await _event_broker(args.endpoints) if args.to_broker else None
    tty = sys.stderr.isatty()
    total = exporting.count(engine, window, cursor) if tty else 0

    def progress(done: int) -> None:
        print(f"\r{done}/{total} events", end="", file=sys.stderr, flush=True)
    out = None
    try:
        if broker is not None:
            sink: Any = exporting.BrokerSink(broker)
        elif args.output == "-":
            sink = exporting.JsonLinesSink(sys.stdout)
        else:  # appended to when continuing from a cursor
            out = open(args.output, "a" if cursor.after is not None else "w", encoding="utf-8")
            sink = exporting.JsonLinesSink(out)
        report = await exporting.export(engine, backends.codec, window, cursor, sink,
                                        progress if tty else None, limit=exporting.PAGE)
    finally:
        if out is not None:
            out.close()
        if broker is not None:
            await broker.close()
        await _release(backends)
    if tty:
        print(file=sys.stderr)
    print(report.summary(), file=sys.stderr if args.output == "-" and not broker else sys.stdout)
    return EXIT_OK if not report.unreadable else EXIT_FAILED


async def _event_broker(endpoints_path: str) -> Any:
    """The endpoints file's event broker, ready to publish (as ``rasa export``)."""
    from rasa.core.brokers.broker import EventBroker
    from rasa.core.brokers.pika import PikaEventBroker
    from rasa.core.utils import AvailableEndpoints

    config = AvailableEndpoints.read_endpoints(endpoints_path).event_broker
    if config is None:
        raise ConfigError(f"'{endpoints_path}' has no 'event_broker' block for --to-broker.")
    broker = await EventBroker.create(config)
    if broker is None:
        raise ConfigError(f"The 'event_broker' of '{endpoints_path}' could not be created.")
    if isinstance(broker, PikaEventBroker):  # fail loudly rather than keep messages in memory
        broker.should_keep_unpublished_messages = False
        broker.raise_on_failure = True
    if not broker.is_ready():
        await broker.close()
        raise ConfigError(f"The event broker of '{endpoints_path}' is not ready.")
    return broker


async def run_erase(backends: Backends, args: argparse.Namespace) -> int:
    raw = _raw_access(backends)
    totals = erasure_report.Totals()
    try:
        ids = [await _resolved(backends, cid) for cid in args.conversation_ids]
        eraser = erasing.Eraser(backends, raw)
        for start in range(0, len(ids), 100):
            erasures = await eraser.erase_batch(ids[start:start + 100], args.dry_run)
            for erasure in erasures:
                print(erasure.line(args.dry_run), flush=True)
            totals.add(erasures)
    finally:
        await _close(backends, raw)
    print(totals.summary("erase", args.dry_run))
    return EXIT_FAILED if totals.missing else EXIT_OK


async def run_purge(backends: Backends, args: argparse.Namespace) -> int:
    inactive_for = erasing.parse_duration(args.inactive_for)
    raw = _raw_access(backends)
    tty = sys.stdout.isatty()
    running = erasure_report.Totals()

    def report(erasures: list) -> None:
        running.add(erasures)
        for erasure in erasures:
            if tty:  # a progress line on a terminal; a plain line per conversation else
                print(f"\r{running.erased} erased, {running.skipped} skipped", end="",
                      flush=True)
            else:
                print(erasure.line(args.dry_run), flush=True)

    def report_month(month: erasure_report.MonthDrop) -> None:
        # After a month's conversations (a progress line on a terminal).
        after_progress = tty and bool(running.erased or running.skipped)
        print(("\n" if after_progress else "") + month.line(args.dry_run), flush=True)

    try:
        totals = await erasing.Eraser(backends, raw).purge(inactive_for, args.batch,
                                                           args.dry_run, report, report_month)
    finally:
        await _close(backends, raw)
    if tty:
        print()
    print(totals.summary(f"purge (inactive for {args.inactive_for})", args.dry_run))
    return EXIT_OK


async def _resolved(backends: Backends, cid: str) -> str:
    """The conversation id, also when given as a hashed log line names it (``h:...``)."""
    if cid.startswith(logids.PREFIX):
        return await logids.resolve(backends.ids, cid, _conversation_ids(backends)) or cid
    return cid


async def _conversation_ids(backends: Backends) -> AsyncIterator[str]:
    async for cid in backends.hot.conversations():
        yield cid
    for cid in await backends.log.run(backends.log.sync.conversation_ids):
        yield cid
