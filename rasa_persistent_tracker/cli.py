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

Relative embedded paths in the endpoints file are read from that file's
folder, as ``rasa run`` started there reads them.

Exit codes: 0 done, 1 storage failure or work left, 2 configuration error.
Key material is never printed.
"""
import argparse
import asyncio
import logging
import os
import sys
import time
from typing import AsyncIterator, Optional, Sequence

from rasa_persistent_tracker import importer, logids
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.config import mask_url
from rasa_persistent_tracker.crypto import new_key_entry
from rasa_persistent_tracker.endpoints_file import load_endpoint_backends, tracker_store_block
from rasa_persistent_tracker.errors import ConfigError, PersistentTrackerError
from rasa_persistent_tracker.inspection import inspect_conversation
from rasa_persistent_tracker.quarantine import QuarantineAdmin
from rasa_persistent_tracker.raw_access import RawHotAccess
from rasa_persistent_tracker.rotation import primary_key_id, rotate

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


# ------------------------------------------------------------------ command line


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
    for sub in (rotate_cmd, inspect_cmd, list_cmd, restore_cmd, import_cmd):
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
                  "quarantine": _run_quarantine, "import": _run_import}[args.command]
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
