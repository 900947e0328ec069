"""Quarantined copies, for operators: list them, put one back.

The store moves an unreadable hot record or outbox entry aside instead of
deleting it (``<prefix>:q:{<id>}:<ms>-<hex>`` in Redis, a ``rpt_quarantine``
row in the embedded file) and keeps it ``quarantine_ttl``. When the cause was
a mistake (say a process ran with the wrong keys), ``restore`` puts a copy
back once it reads with the configured keys:

* a hot record becomes the live record again (version above any live one, so
  a turn in flight from before conflicts instead of overwriting it). A live
  record is never replaced silently: ``force`` quarantines it first.
* an outbox entry's rows go straight into the SQL log, which skips rows it
  holds already (exactly once), then the copy is deleted.

Refs are what ``list_copies`` prints and the store's warnings name.
"""
import dataclasses
import sqlite3
import time
from typing import Any, Dict, List, Optional

from rasa_persistent_tracker.admin.copies import (
    OUTBOX_ENTRY,
    UNKNOWN,
    check,
    kind_of,
    record_of,
    rows_of,
)
from rasa_persistent_tracker.backends import Backends
from rasa_persistent_tracker.errors import (
    ConfigError,
    CorruptRecordError,
    EncryptionKeyMissing,
)
from rasa_persistent_tracker.hot.redis_keys import KeyNames, key_tag, tag_id
from rasa_persistent_tracker.security.compressed import stored_bytes, stored_text
from rasa_persistent_tracker.security.crypto import key_id_of

_EMBEDDED_MARK = "#rpt_quarantine/"

# KEYS: live record, the copy, where a replaced live record goes.
# ARGV: record TTL ms, force, quarantine TTL ms, the payload to write.
_RESTORE_RECORD = """
local live_v = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[2] ~= '1' then return -1 end
  if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
    live_v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') or 0
  end
  redis.call('RENAME', KEYS[1], KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
local copy_v = 0
if redis.call('TYPE', KEYS[2])['ok'] == 'hash' then
  copy_v = tonumber(redis.call('HGET', KEYS[2], 'v') or '0') or 0
end
local v = math.max(live_v, copy_v) + 1
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return v
"""


@dataclasses.dataclass
class Copy:
    """One quarantined value, described without its content."""

    ref: str
    conversation_id: str
    kind: str
    created: Optional[float]
    size: int
    key_id: Optional[str]
    problem: Optional[str]  # None: it reads with the configured keys

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created)) \
            if self.created else "?"
        state = "readable, can be restored" if self.problem is None else self.problem
        key = f"key {self.key_id!r}" if self.key_id else "plaintext"
        return (f"{self.ref}\n    conversation '{self.conversation_id}', {self.kind}, "
                f"{self.size} bytes, {key}, quarantined {when}: {state}")


class QuarantineAdmin:
    """List and restore quarantined copies of one store (see module docstring).

    Args:
        backends: the store's storage (config, codec, log).
        redis_client: a redis.asyncio client on the hot state's server; None
            for the embedded hot state.
    """

    def __init__(self, backends: Backends, redis_client: Any = None) -> None:
        self._backends = backends
        self._config = backends.config
        self._redis = redis_client

    # ------------------------------------------------------------- listing

    async def list_copies(self, conversation_id: Optional[str] = None) -> List[Copy]:
        """Every quarantined copy (of one conversation, if given), oldest first."""
        if self._redis is None:
            return self._embedded_copies(conversation_id)
        prefix = self._config.key_prefix
        pattern = f"{prefix}:q:*" if conversation_id is None else \
            f"{prefix}:q:{{{_glob_literal(key_tag(conversation_id))}}}:*"
        copies = []
        async for raw in self._redis.scan_iter(match=pattern, count=1000):
            key = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
            copy = await self._redis_copy(key)
            if copy is not None:
                copies.append(copy)
        return sorted(copies, key=lambda c: (c.created or 0, c.ref))

    async def _redis_copy(self, key: str) -> Optional[Copy]:
        head = f"{self._config.key_prefix}:q:{{"
        if not key.startswith(head) or "}:" not in key:
            return None
        cid, stamp = tag_id(key[len(head):key.rindex("}:")]), key[key.rindex("}:") + 2:]
        if cid is None:
            return None
        kind_name = await self._redis.type(key)
        kind_name = kind_name.decode() if isinstance(kind_name, bytes) else kind_name
        if kind_name == "hash":
            value = await self._redis.hget(key, "d")
        elif kind_name == "string":
            value = await self._redis.get(key)
        else:
            value = None
        text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        kind = kind_of(self._backends.codec, cid, text, kind_name == "hash") if text \
            else UNKNOWN
        return Copy(key, cid, kind, _stamp_time(stamp), len(stored_bytes(text or "")),
                    key_id_of(text) if text else None,
                    check(self._backends, cid, kind, text) if text else "empty")

    def _embedded_copies(self, conversation_id: Optional[str]) -> List[Copy]:
        sql = "SELECT id, conversation_id, payload, created_at FROM rpt_quarantine WHERE " \
              "expires_at > ?" + (" AND conversation_id = ?" if conversation_id else "") + \
              " ORDER BY id"
        args = (time.time(),) + ((conversation_id,) if conversation_id else ())
        copies = []
        for row_id, cid, payload, created in self._sqlite(lambda c: c.execute(sql, args)
                                                          .fetchall()):
            text = payload.decode("utf-8", "surrogateescape") if isinstance(payload, bytes) \
                else str(payload)
            kind = kind_of(self._backends.codec, cid, text, False)
            copies.append(Copy(f"{self._config.embedded_path}{_EMBEDDED_MARK}{row_id}", cid,
                               kind, created, len(stored_bytes(text)), key_id_of(text),
                               check(self._backends, cid, kind, text)))
        return copies

    def _sqlite(self, work: Any) -> Any:
        conn = sqlite3.connect(self._config.embedded_path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()

    # ------------------------------------------------------------- restoring

    async def restore(self, ref: str, force: bool = False) -> str:
        """Put the copy ``ref`` back; return what was done.

        Raises:
            ConfigError: no such copy, it does not read with the configured
                keys, or a live record would be replaced without ``force``.
        """
        copies = [c for c in await self.list_copies() if c.ref == ref]
        if not copies:
            raise ConfigError(f"No quarantined copy {ref!r} (see `quarantine list`).")
        copy = copies[0]
        if copy.problem is not None:
            raise ConfigError(f"Quarantined copy {ref!r} cannot be restored: {copy.problem}.")
        if copy.kind == OUTBOX_ENTRY:
            return await self._restore_entry(copy)
        return await self._restore_record(copy, force)

    async def _restore_entry(self, copy: Copy) -> str:
        rows = rows_of(self._backends.codec, copy.conversation_id, await self._payload(copy))
        log = self._backends.log
        await log.run(log.sync.append, {copy.conversation_id: rows}, {})
        await self._delete(copy)
        return (f"Wrote the {len(rows)} event(s) of {copy.ref} to the SQL log (rows it held "
                f"already were skipped) and deleted the copy.")

    async def _restore_record(self, copy: Copy, force: bool) -> str:
        ttl_ms = int(self._config.record_exp * 1000)
        codec = self._backends.codec
        record = record_of(codec, copy.conversation_id, await self._payload(copy))
        payload = codec.dumps_record(record)  # sealed for its place as the live record
        if self._redis is not None:
            names = KeyNames(self._config.key_prefix)
            hot = names.record(copy.conversation_id)
            aside = names.quarantine(copy.conversation_id, f"{int(time.time() * 1000)}-restore")
            version = await self._redis.eval(
                _RESTORE_RECORD, 3, hot, copy.ref, aside, ttl_ms, "1" if force else "0",
                int(self._config.quarantine_ttl * 1000), stored_bytes(payload))
        else:
            version = self._sqlite(lambda c: _restore_embedded(
                c, copy, stored_bytes(payload), force, self._config.record_exp,
                self._config.quarantine_ttl))
        if int(version) == -1:
            raise ConfigError(
                f"Conversation '{copy.conversation_id}' has a live hot record; restoring "
                f"{copy.ref} would replace it. Pass --force to quarantine the live one first.")
        return (f"Restored {copy.ref} as the live hot record of conversation "
                f"'{copy.conversation_id}' (version {int(version)}).")

    async def _payload(self, copy: Copy) -> str:
        if self._redis is not None:
            kind = await self._redis.type(copy.ref)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            value = await (self._redis.hget(copy.ref, "d") if kind == "hash"
                           else self._redis.get(copy.ref))
            return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        row_id = int(copy.ref.rsplit(_EMBEDDED_MARK, 1)[1])
        value = self._sqlite(lambda c: c.execute(
            "SELECT payload FROM rpt_quarantine WHERE id=?", (row_id,)).fetchone()[0])
        return stored_text(value) if isinstance(value, bytes) else value

    async def _delete(self, copy: Copy) -> None:
        if self._redis is not None:
            await self._redis.delete(copy.ref)
            return
        row_id = int(copy.ref.rsplit(_EMBEDDED_MARK, 1)[1])
        self._sqlite(lambda c: c.execute("DELETE FROM rpt_quarantine WHERE id=?", (row_id,)))


def _restore_embedded(conn: sqlite3.Connection, copy: Copy, payload: bytes, force: bool,
                      record_exp: float, quarantine_ttl: float) -> int:
    now = time.time()
    row_id = int(copy.ref.rsplit(_EMBEDDED_MARK, 1)[1])
    live = conn.execute("SELECT version, payload, expires_at FROM rpt_hot WHERE "
                        "conversation_id=?", (copy.conversation_id,)).fetchone()
    live_version = live[0] if live else 0
    if live is not None and live[2] > now:
        if not force:
            return -1
        conn.execute("INSERT INTO rpt_quarantine (conversation_id, payload, created_at, "
                     "expires_at) VALUES (?,?,?,?)",
                     (copy.conversation_id, live[1], now, now + quarantine_ttl))
    version = live_version + 1
    conn.execute("INSERT OR REPLACE INTO rpt_hot (conversation_id, version, payload, "
                 "expires_at) VALUES (?,?,?,?)",
                 (copy.conversation_id, version, payload, now + record_exp))
    conn.execute("DELETE FROM rpt_quarantine WHERE id=?", (row_id,))
    return version


def _glob_literal(text: str) -> str:
    return "".join(f"\\{ch}" if ch in "\\*?[]" else ch for ch in text)


def _stamp_time(stamp: str) -> Optional[float]:
    try:
        return int(stamp.split("-", 1)[0]) / 1000
    except ValueError:
        return None
