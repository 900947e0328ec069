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
  another tracker store into this one (see ``admin/importer.py``).
* ``quarantine list [ID]`` / ``quarantine restore REF [--force]``: see
  ``admin/quarantine.py``.
* ``doctor [--domain PATH] [--strict]`` checks storage and configuration and
  explains what is wrong (see ``admin/doctor.py``).
* ``export [--since T] [--until T] [--conversation ID] [--output FILE|-]
  [--to-broker] [--cursor FILE]`` streams the log as JSON lines or to the
  endpoints file's event broker (see ``admin/exporting.py``).
* ``erase ID... [--dry-run]`` removes every trace of these conversations and
  leaves a tombstone so nothing brings them back (``admin/erasing.py``).
  Exit 1 if an id had nothing stored (the others are still erased).
* ``purge --inactive-for DURATION [--dry-run] [--batch N]`` erases every
  conversation without an event for DURATION (``90d``, ``12h``, ``30m``),
  batch by batch; on PostgreSQL a past month whose conversations all go is
  dropped whole (its partition, ``log/retention.py``). Safe from cron while
  the bot runs, and run again after an interruption.
* ``partitions [--ahead N]`` creates this month's and the next N months'
  partitions of the PostgreSQL log (the store creates 3 ahead at start) and
  lists every partition with its row count (see ``log/partitions.py``).

Relative embedded paths in the endpoints file are read from that file's
folder, as ``rasa run`` started there reads them.

Exit codes: 0 done, 1 storage failure or work left, 2 configuration error.
Key material is never printed.
"""
import argparse
import asyncio
import datetime
import logging
import sys
import time
from typing import Optional, Sequence

from rasa_persistent_tracker.admin import commands
from rasa_persistent_tracker.admin.endpoints_file import load_endpoint_backends
from rasa_persistent_tracker.admin.erasing import parse_duration
from rasa_persistent_tracker.errors import ConfigError, PersistentTrackerError
from rasa_persistent_tracker.security.keys import new_key_entry

__all__ = ["main"]

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------ command line


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _months(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 120:
        raise argparse.ArgumentTypeError(f"must be a number of months 0..120, got {text!r}")
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
    doctor_cmd = commands.add_parser(
        "doctor", help="check the storage and configuration, and explain",
        description="Checks that the hot state and the SQL log are reachable (versions), "
                    "the schema version, the outbox backlog and its oldest entry, "
                    "quarantined copies, key ids in use, record_exp against the domain's "
                    "session expiry and pool sizes. Exit 0 when healthy, 1 otherwise.")
    doctor_cmd.add_argument("--domain", default=None,
                            help="the bot's domain (default: domain.yml beside --endpoints)")
    doctor_cmd.add_argument("--strict", action="store_true",
                            help="warnings count as unhealthy too")
    erase_cmd = commands.add_parser(
        "erase", help="remove every trace of conversations (right to erasure)",
        description="Removes each conversation's hot record, outbox entries, quarantined "
                    "copies, log rows and snapshot, and leaves a tombstone (named by a "
                    "digest of the id, never the id) so that no save or delivery made "
                    "before the erasure, in any process, brings it back. Prints what was "
                    "removed, per place. The sender's next message starts a new "
                    "conversation. Exit 1 if an id had nothing stored.")
    erase_cmd.add_argument("conversation_ids", nargs="+", metavar="ID",
                           help="conversation (sender) ids")
    erase_cmd.add_argument("--dry-run", action="store_true",
                           help="print what would be removed; remove nothing")
    purge_cmd = commands.add_parser(
        "purge", help="erase every conversation inactive for longer than a duration",
        description="Erases, as 'erase' does, every conversation whose newest event is "
                    "older than --inactive-for, in batches in id order. On PostgreSQL a "
                    "past month whose conversations are all inactive (and in no other "
                    "month) goes whole: its partition is dropped. Safe to run from "
                    "cron while the bot serves traffic: a conversation active again is "
                    "skipped. Interrupted, run it again to finish.")
    purge_cmd.add_argument("--inactive-for", required=True, metavar="DURATION",
                           help="e.g. 90d, 12h or 30m")
    purge_cmd.add_argument("--dry-run", action="store_true",
                           help="print what would be erased and which months dropped; "
                                "remove nothing")
    purge_cmd.add_argument("--batch", type=_positive, default=200, metavar="N",
                           help="conversations per batch (default: 200)")
    partitions_cmd = commands.add_parser(
        "partitions", help="create the log's coming monthly partitions; list them",
        description="On PostgreSQL the log (rpt_events) is partitioned by the month each row "
                    "was written. Lists every partition with its exact row count (a count "
                    "reads the whole partition); with --ahead N first creates this month's "
                    "and the next N months' partitions where missing. Rows of a month "
                    "without a partition wait in rpt_events_default and move into the "
                    "month's partition when it is created.")
    partitions_cmd.add_argument("--ahead", type=_months, default=None, metavar="N",
                                help="create partitions up to N months ahead first")
    for sub in (rotate_cmd, inspect_cmd, list_cmd, restore_cmd, import_cmd, export_cmd,
                doctor_cmd, erase_cmd, purge_cmd, partitions_cmd):
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
            return commands.EXIT_OK
        if args.command == "purge":  # before opening any storage: a typo fails fast
            parse_duration(args.inactive_for)
        backends = load_endpoint_backends(args.endpoints, must_exist=args.command != "import")
        runner = {"rotate-keys": commands.run_rotate, "inspect": commands.run_inspect,
                  "quarantine": commands.run_quarantine, "import": commands.run_import,
                  "export": commands.run_export, "doctor": commands.run_doctor,
                  "erase": commands.run_erase, "purge": commands.run_purge,
                  "partitions": commands.run_partitions}[args.command]
        return asyncio.run(runner(backends, args))
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return commands.EXIT_CONFIG
    except PersistentTrackerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if args.command in ("rotate-keys", "purge"):
            print(f"Completed batches are kept; run {args.command} again to continue.",
                  file=sys.stderr)
        return commands.EXIT_FAILED
    except KeyboardInterrupt:
        print("Interrupted; completed batches are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
