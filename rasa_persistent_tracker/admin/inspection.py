"""Summaries of one conversation for operators, without its values.

``inspect_conversation`` prints where a conversation's data sits (hot record,
log, snapshot, outbox, quarantine) and which key encrypts it; slot values only
when asked (``--show-values``).
"""
import time
from typing import Callable, Optional, Tuple

import sqlalchemy as sa

from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.errors import CorruptRecordError
from rasa_persistent_tracker.log.tables import EVENTS
from rasa_persistent_tracker.record.replay import validate_record
from rasa_persistent_tracker.security.compressed import PREFIX, stored_bytes
from rasa_persistent_tracker.security.crypto import BINARY_PREFIX, key_id_of


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
            record = validate_record(codec.loads_record(entry.payload, cid), cid)
            text = codec.record_text(entry.payload, cid)
            out(f"  stored in {len(stored_bytes(entry.payload)):,} bytes "
                f"({format_of(entry.payload)}; {len(text):,} bytes of JSON)")
            slots = dict(record["state"]["slots"])
            out(f"  next_seq {record['next_seq']}, {len(record['events'])} events kept, "
                f"active loop {(record['state'].get('active_loop') or {}).get('name')}")
            if show_values:
                out("  slots:" + ("".join(f"\n    {k} = {v!r}" for k, v in sorted(slots.items()))
                                  or " none set"))
            else:
                out(f"  slots set: {', '.join(sorted(slots)) or 'none'} "
                    f"(values hidden; --show-values prints them)")
        except (CorruptRecordError, KeyError, TypeError, ValueError, AttributeError) as exc:
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


def format_of(payload: str) -> str:
    """How a hot record is stored, in words."""
    if payload.startswith((PREFIX, BINARY_PREFIX)):
        return "compressed"
    return "uncompressed, rewritten compressed at the next turn"


def _log_extent(engine: sa.engine.Engine, cid: str) -> Tuple[int, Optional[int], Optional[int]]:
    query = sa.select(sa.func.count(), sa.func.min(EVENTS.c.seq), sa.func.max(EVENTS.c.seq)
                      ).where(EVENTS.c.conversation_id == cid)
    with engine.connect() as conn:
        count, first, last = conn.execute(query).first()
    return int(count or 0), first, last
