"""``rasa-persistent-tracker``: key generation, key rotation, inspection.

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

Exit codes: 0 done, 1 storage failure or work left, 2 configuration error.
Key material is never printed.
"""
import argparse
import asyncio
import logging
import os
import sys
import time
import warnings
from typing import AsyncIterator, Callable, Optional, Sequence, Tuple

import sqlalchemy as sa

from rasa_persistent_tracker import logids
from rasa_persistent_tracker.backends import Backends, open_backends
from rasa_persistent_tracker.config import mask_url
from rasa_persistent_tracker.crypto import key_id_of, new_key_entry
from rasa_persistent_tracker.errors import (
    ConfigError,
    CorruptRecordError,
    PersistentTrackerError,
)
from rasa_persistent_tracker.event_log import EVENTS
from rasa_persistent_tracker.rotation import (  # noqa: F401  (re-exported for callers)
    PHASES,
    Progress,
    RawHotAccess,
    RotationReport,
    _primary_key_id,
    rotate,
)

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


async def inspect_conversation(backends: Backends, raw: RawHotAccess, conversation_id: str,
                               show_values: bool = False,
                               out: Callable[[str], None] = print) -> bool:
    """Print a summary of one conversation; return False if it is unknown."""
    hot, log, codec, cid = backends.hot, backends.log, backends.codec, conversation_id
    entry = await hot.load(cid)
    found = entry.payload is not None or bool(entry.problem)
    out(f"Conversation '{cid}'")
    if entry.problem:
        out(f"  hot record: unusable ({entry.problem})")
    elif entry.payload is None:
        out("  hot record: none")
    else:
        ttl = await raw.ttl(cid)
        kid = key_id_of(entry.payload)
        expiry = f"expires in {ttl:.0f} s" if ttl is not None else "expired"
        out(f"  hot record: version {entry.version}, "
            f"{'encrypted with key ' + repr(kid) if kid else 'plaintext'}, {expiry}")
        try:
            record = codec.loads_record(entry.payload, cid)
            slots = dict(record["state"]["slots"])
            out(f"  next_seq {record['next_seq']}, {len(record['events'])} events kept, "
                f"active loop {(record['state'].get('active_loop') or {}).get('name')}")
            if show_values:
                out("  slots:" + ("".join(f"\n    {k} = {v!r}" for k, v in sorted(slots.items()))
                                  or " none set"))
            else:
                out(f"  slots set: {', '.join(sorted(slots)) or 'none'} "
                    f"(values hidden; --show-values prints them)")
        except (CorruptRecordError, KeyError, TypeError, AttributeError) as exc:
            out(f"  record cannot be read: {exc}")
    engine = log.sync.engine
    count, first, last = await log.run(_log_extent, engine, cid)
    found = found or count > 0
    out(f"  event log: {count} events" + (f" (seq {first}..{last})" if count else ""))
    snapshot = await log.run(log.sync.snapshot, cid)
    if snapshot is not None:
        kid = key_id_of(snapshot.payload)
        out(f"  snapshot: next_seq {snapshot.next_seq}, version {snapshot.version}, saved "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snapshot.saved_at))}, "
            f"{'key ' + repr(kid) if kid else 'plaintext'}")
    pending = await hot.pending(cid, 100_000)
    found = found or bool(pending.entries)
    out(f"  outbox: {len(pending.entries)} pending entries")
    quarantined = await raw.quarantined(cid)
    found = found or bool(quarantined)
    out(f"  quarantined: {len(quarantined)}" + "".join(f"\n    {k}" for k in quarantined))
    return found


def _log_extent(engine: sa.engine.Engine, cid: str) -> Tuple[int, Optional[int], Optional[int]]:
    query = sa.select(sa.func.count(), sa.func.min(EVENTS.c.seq), sa.func.max(EVENTS.c.seq)
                      ).where(EVENTS.c.conversation_id == cid)
    with engine.connect() as conn:
        count, first, last = conn.execute(query).first()
    return int(count or 0), first, last


# ------------------------------------------------------------------ command line


def load_endpoint_backends(path: str) -> Backends:
    """Open the storage of the ``tracker_store`` block of ``path`` as Rasa would.

    Raises:
        ConfigError: the file is missing or unreadable, or names no tracker store.
        StorageUnavailable: a server is unreachable.
    """
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
    if endpoint.type and not str(endpoint.type).startswith("rasa_persistent_tracker"):
        raise ConfigError(f"The 'tracker_store' in '{path}' has type {endpoint.type!r}, "
                          f"not rasa_persistent_tracker.PersistentTrackerStore.")
    return open_backends({"host": endpoint.url, **endpoint.kwargs})


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
        print(f"Rotating to key '{_primary_key_id(backends)}' (hot state "
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
    return EXIT_OK if found else EXIT_FAILED


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
    for sub in (rotate_cmd, inspect_cmd):
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
        backends = load_endpoint_backends(args.endpoints)
        runner = _run_rotate if args.command == "rotate-keys" else _run_inspect
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
