"""``rasa-persistent-tracker``: keys, rotation, inspection, quarantine.

* ``new-key [--id KID]`` prints a fresh ``kid:base64key`` entry.
* ``rotate-keys`` re-encrypts everything under the newest (first) key: the hot
  records, every ``rpt_events`` row and ``rpt_snapshots`` payload that uses
  another key, and sensitive rows written before encryption was on. It works
  in batches that commit on their own, so it can be stopped and run again; a
  rerun skips what is already under the newest key. Pending outbox entries are
  delivered first. Hot records keep their remaining TTL (read just before the
  write, so approximately). Rewriting a hot record bumps its version: a turn
  of that conversation in flight at that instant fails with
  ``ConcurrentSaveError``, so run it when traffic is low.
* ``inspect ID`` summarises one conversation without printing slot values
  (``--show-values`` prints them).
* ``import --from OLD_ENDPOINTS [--dry-run]`` copies every conversation of
  another tracker store into this one (see ``importer.py``).
* ``quarantine list [ID]`` / ``quarantine restore REF [--force]``: see
  ``quarantine.py``.
* ``export [--since T] [--until T] [--conversation ID] [--output FILE|-]
  [--to-broker] [--cursor FILE]`` streams the log as JSON lines or to the
  endpoints file's event broker (see ``exporting.py``).

Relative embedded paths in the endpoints file are read from that file's
folder, as ``rasa run`` started there reads them.

Exit codes: 0 done, 1 storage failure or work left, 2 configuration error.
Key material is never printed.
"""
import argparse
import asyncio
import datetime
import logging
import os
import sys
import time
import warnings
from typing import Any, AsyncIterator, Dict, Optional, Sequence

import sqlalchemy as sa

from rasa_persistent_tracker.backends import Backends, open_backends
from rasa_persistent_tracker.config import mask_url, parse_config
from rasa_persistent_tracker.crypto import load_keyring, new_key_entry
from rasa_persistent_tracker.errors import ConfigError, PersistentTrackerError
from rasa_persistent_tracker import exporting, importer, logids
from rasa_persistent_tracker.inspection import inspect_conversation
from rasa_persistent_tracker.quarantine import QuarantineAdmin
from rasa_persistent_tracker.raw_access import RawHotAccess
from rasa_persistent_tracker.rotation import Progress, primary_key_id, rotate

__all__ = ["Progress", "RawHotAccess", "inspect_conversation", "main", "rotate"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


# ------------------------------------------------------------------ command line


def load_endpoint_backends(path: str, must_exist: bool = True) -> Backends:
    """Open the storage of the ``tracker_store`` block of ``path`` as Rasa would.

    Raises:
        ConfigError: the file is missing or unreadable, or names no tracker store.
        StorageUnavailable: a server is unreachable.
    """
    endpoint = _tracker_store_block(path)
    if endpoint.type and not str(endpoint.type).startswith("rasa_persistent_tracker"):
        raise ConfigError(f"The 'tracker_store' in '{path}' has type {endpoint.type!r}, "
                          f"not rasa_persistent_tracker.PersistentTrackerStore.")
    kwargs = {"host": endpoint.url, **endpoint.kwargs}
    folder = os.path.dirname(os.path.abspath(path))
    return open_backends({**kwargs, **_paths_beside(kwargs, folder, must_exist)})


def _tracker_store_block(path: str) -> Any:
    """The ``tracker_store`` EndpointConfig of an endpoints file."""
    with warnings.catch_warnings():  # Rasa's imports warn about its own dependencies
        warnings.simplefilter("ignore")
        from rasa.core.utils import read_endpoints_from_path
        from rasa.shared.exceptions import RasaException

    if not os.path.isfile(path):
        raise ConfigError(f"Endpoints file '{path}' does not exist.")
    try:
        endpoint = read_endpoints_from_path(path).tracker_store
    except (RasaException, OSError, ValueError) as exc:
        raise ConfigError(f"Endpoints file '{path}' cannot be read: {exc}") from None
    if endpoint is None:
        raise ConfigError(f"Endpoints file '{path}' has no 'tracker_store' block.")
    return endpoint


def _paths_beside(kwargs: Dict[str, Any], folder: str, must_exist: bool) -> Dict[str, str]:
    """The embedded files as the bot finds them: ``rasa run`` is started in the
    project folder, so relative paths are read from the endpoints file's folder,
    not from wherever the CLI runs. Missing files are an error: the CLI must not
    create an empty store next to a typo."""
    config = parse_config(kwargs)
    load_keyring(config)  # a bad key is the first thing to say, before any path
    paths: Dict[str, str] = {}
    if config.embedded:
        paths["embedded_path"] = os.path.join(folder, config.embedded_path)
        if must_exist and not os.path.isfile(paths["embedded_path"]):
            raise ConfigError(
                f"No embedded hot state at {paths['embedded_path']}: the bot has not stored "
                f"anything there. Relative paths are read from the endpoints file's folder, "
                f"as `rasa run` started there reads them; is --endpoints the bot's file?")
    url = sa.engine.make_url(config.sql_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = os.path.join(folder, url.database)
        if must_exist and not os.path.isfile(database):
            raise ConfigError(
                f"No SQLite event log at {database}: relative paths are read from the "
                f"endpoints file's folder; is --endpoints the bot's file?")
        paths["sql_url"] = url.set(database=database).render_as_string(hide_password=False)
    return paths


def _raw_access(backends: Backends) -> RawHotAccess:
    if backends.config.embedded:
        return RawHotAccess(backends.config)
    from rasa_persistent_tracker.connect import redis_client_factory

    return RawHotAccess(backends.config, redis_client_factory(backends.config)())


async def _close(backends: Backends, raw: RawHotAccess) -> None:
    await backends.outbox.stop()
    await raw.close()
    await backends.hot.close()
    backends.log.close()


async def _run_rotate(backends: Backends, args: argparse.Namespace) -> int:
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


async def _run_inspect(backends: Backends, args: argparse.Namespace) -> int:
    raw = _raw_access(backends)
    try:
        cid = args.conversation_id
        if cid.startswith(logids.PREFIX):  # as a hashed log line names it
            cid = await logids.resolve(backends.ids, cid, _conversation_ids(backends)) or cid
        found = await inspect_conversation(backends, raw, cid, args.show_values)
    finally:
        await _close(backends, raw)
    if not found:
        print(f"Conversation '{args.conversation_id}' not found: no hot record, log rows, "
              f"outbox entries or quarantined copies.", file=sys.stderr)
    return EXIT_OK if found else EXIT_FAILED


async def _run_quarantine(backends: Backends, args: argparse.Namespace) -> int:
    client = None
    if not backends.config.embedded:
        from rasa_persistent_tracker.connect import redis_client_factory

        client = redis_client_factory(backends.config)()
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
        if client is not None:
            await client.close()
        await backends.outbox.stop()
        await backends.hot.close()
        backends.log.close()


async def _run_import(backends: Backends, args: argparse.Namespace) -> int:
    from rasa.core.tracker_store import TrackerStore
    from rasa.shared.core.domain import Domain

    from rasa_persistent_tracker.store import PersistentTrackerStore

    domain_path = args.domain or os.path.join(
        os.path.dirname(os.path.abspath(args.endpoints)), "domain.yml")
    if not os.path.exists(domain_path):
        raise ConfigError(f"Domain '{domain_path}' does not exist: pass --domain (the bot's "
                          f"domain.yml or domain folder; trackers are rebuilt with its slots).")
    domain = Domain.load(domain_path)
    source_endpoint = _tracker_store_block(args.source)
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


async def _run_export(backends: Backends, args: argparse.Namespace) -> int:
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
        await backends.outbox.stop()
        await backends.hot.close()
        backends.log.close()
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


def _moment(text: str) -> float:
    """A point in time: unix seconds, or an ISO 8601 date/time (UTC if no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected unix seconds or an ISO 8601 date/time like 2026-11-01 or "
            f"2026-11-01T08:00:00+01:00, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


async def _conversation_ids(backends: Backends) -> AsyncIterator[str]:
    async for cid in backends.hot.conversations():
        yield cid
    for cid in await backends.log.run(backends.log.sync.conversation_ids):
        yield cid


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


_ROTATION_STEPS = """\
rotating the encryption key:
  1. rasa-persistent-tracker new-key --id k2     (keep the output as a secret)
  2. put it first: RPT_ENCRYPTION_KEYS="k2:...,k1:..."; restart the bot
  3. rasa-persistent-tracker rotate-keys --endpoints endpoints.yml
  4. once it reports that no data uses an old key, remove k1 and restart
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rasa-persistent-tracker",
        description="Tools for rasa_persistent_tracker: encryption keys and inspection.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_ROTATION_STEPS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new_key = commands.add_parser("new-key", help="print a fresh 'kid:base64key' entry")
    new_key.add_argument("--id", default=None, metavar="KID",
                         help="key id (default: k<unix time>)")
    rotate_cmd = commands.add_parser(
        "rotate-keys", help="re-encrypt stored data under the first key",
        description="Re-encrypt hot records, log rows and snapshots under the first key of "
                    "the keyring (environment variable or key file of the tracker_store "
                    "block). Safe to stop and run again.")
    inspect_cmd = commands.add_parser("inspect", help="summarise one conversation")
    inspect_cmd.add_argument("conversation_id", metavar="CONVERSATION_ID",
                             help="the conversation (sender) id, or h:<hash> as a "
                                  "hashed log line names it")
    quarantine_cmd = commands.add_parser(
        "quarantine", help="list quarantined copies, or put one back",
        description="Unreadable hot records and outbox entries are moved aside, never "
                    "deleted. 'list' shows them (without content) and whether they read "
                    "with the configured keys; 'restore REF' puts one back: a hot record as "
                    "the live record, an outbox entry's rows into the SQL log.")
    actions = quarantine_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    list_cmd = actions.add_parser("list", help="list quarantined copies")
    list_cmd.add_argument("conversation_id", nargs="?", metavar="CONVERSATION_ID",
                          help="only this conversation's copies")
    restore_cmd = actions.add_parser("restore", help="put one quarantined copy back")
    restore_cmd.add_argument("ref", metavar="REF", help="the copy, as 'list' prints it")
    restore_cmd.add_argument("--force", action="store_true",
                             help="replace a live hot record (it is quarantined first)")
    import_cmd = commands.add_parser(
        "import", help="copy every conversation from another tracker store into this one",
        description="Reads every conversation of the tracker store in --from (any type Rasa "
                    "supports: redis, sql, mongod, dynamo) through Rasa's own API, writes its "
                    "whole history into this store's log and its current session into the hot "
                    "state, and checks each read back equal. Safe to run again: done "
                    "conversations are skipped, interrupted ones completed.")
    import_cmd.add_argument("--from", dest="source", required=True, metavar="OLD_ENDPOINTS",
                            help="endpoints file whose tracker_store is the old store")
    import_cmd.add_argument("--domain", default=None,
                            help="the bot's domain (default: domain.yml beside --endpoints)")
    import_cmd.add_argument("--dry-run", action="store_true",
                            help="count what would be imported; write nothing")
    export_cmd = commands.add_parser(
        "export", help="stream the SQL log as JSON lines or to the event broker",
        description="Every event of the log, decrypted, one JSON object per line in the shape "
                    "Rasa's event brokers receive (sender_id, the event, its seq), in log "
                    "order, or in time order with --since/--until. Constant memory; with "
                    "--cursor an interrupted export continues where it stopped.")
    export_cmd.add_argument("--since", type=_moment, default=None, metavar="T",
                            help="events at or after T (unix seconds or ISO 8601; UTC)")
    export_cmd.add_argument("--until", type=_moment, default=None, metavar="T",
                            help="events before T")
    export_cmd.add_argument("--conversation", default=None, metavar="ID",
                            help="only this conversation")
    target = export_cmd.add_mutually_exclusive_group()
    target.add_argument("--output", default="-", metavar="FILE",
                        help="JSON lines file, '-' for standard output (default)")
    target.add_argument("--to-broker", action="store_true",
                        help="publish to the event_broker of --endpoints, as 'rasa export'")
    export_cmd.add_argument("--cursor", default=None, metavar="FILE",
                            help="remember progress here; run again to continue")
    for sub in (rotate_cmd, inspect_cmd, list_cmd, restore_cmd, import_cmd, export_cmd):
        sub.add_argument("--endpoints", default="endpoints.yml",
                         help="Rasa endpoints file with the tracker_store block "
                              "(default: endpoints.yml)")
    rotate_cmd.add_argument("--batch-size", type=_positive, default=500,
                            help="rows per batch; each batch commits on its own (default: 500)")
    rotate_cmd.add_argument("--max-batches", type=_positive, default=None,
                            help="stop after this many batches (run again to continue)")
    inspect_cmd.add_argument("--show-values", action="store_true",
                             help="print slot values (may be personal data)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``rasa-persistent-tracker`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "new-key":
            print(new_key_entry(args.id or f"k{int(time.time())}"))
            return EXIT_OK
        backends = load_endpoint_backends(args.endpoints, must_exist=args.command != "import")
        runner = {"rotate-keys": _run_rotate, "inspect": _run_inspect,
                  "quarantine": _run_quarantine, "import": _run_import,
                  "export": _run_export}[args.command]
        return asyncio.run(runner(backends, args))
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PersistentTrackerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if args.command == "rotate-keys":
            print("Completed batches are kept; run rotate-keys again to continue.",
                  file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("Interrupted; completed batches are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
