"""Reads (and rotation's rewrites) the ``HotState`` protocol does not offer:
a record's remaining TTL and the quarantine copies, on Redis or on the
embedded hot state's SQLite file. Used by the CLI only.
"""
import contextlib
import pathlib
import re
import sqlite3
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from rasa_persistent_tracker.config import StoreConfig
from rasa_persistent_tracker.hot.redis_keys import KeyNames, key_tag, tag_id
from rasa_persistent_tracker.security.compressed import BINARY_FORMS, stored_bytes, stored_text

# Compare-and-set on a quarantine copy, whatever it holds: a moved hot record
# (a hash, payload in field d) or a moved outbox entry (a string).
_REPLACE_COPY = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'hash' and redis.call('HGET', KEYS[1], 'd') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'd', ARGV[2]) return 1
elseif kind == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') return 1
end
return 0
"""

# One quarantine copy: (where, conversation id, stored value).
Copy = Tuple[Any, str, str]


class RawHotAccess:
    """Direct reads of the hot state's keys or file.

    Args:
        config: the store config (prefix, embedded path).
        redis_client: a redis.asyncio client on the hot state's server (None:
            the embedded hot state, read from its SQLite file).
    """

    def __init__(self, config: StoreConfig, redis_client: Any = None) -> None:
        self._config = config
        self._redis = redis_client

    def _hash_key(self, cid: str) -> str:
        return KeyNames(self._config.key_prefix).record(cid)

    def _sqlite(self, sql: str, args: Tuple, write: bool = False) -> List[tuple]:
        uri = pathlib.Path(self._config.embedded_path).resolve().as_uri()
        uri += "?mode=rw" if write else "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            with conn:
                return conn.execute(sql, args).fetchall()

    def _copies_pattern(self, cid: str) -> str:
        literal = re.sub(r"([\\*?\[\]])", r"\\\1", key_tag(cid))  # SCAN glob syntax
        return f"{self._config.key_prefix}:q:{{{literal}}}:*"

    async def ttl(self, cid: str) -> Optional[float]:
        """Seconds the record has left; None if gone, ``record_exp`` if unknown."""
        if self._redis is not None:
            ms = await self._redis.pttl(self._hash_key(cid))
            return None if ms == -2 else self._config.record_exp if ms < 0 else ms / 1000
        rows = self._sqlite("SELECT expires_at FROM rpt_hot WHERE conversation_id=?", (cid,))
        left = rows[0][0] - time.time() if rows else -1.0
        return left if left > 0 else None

    async def quarantined(self, cid: str) -> List[str]:
        if self._redis is not None:
            pattern = self._copies_pattern(cid)
            return sorted([k.decode() if isinstance(k, bytes) else k
                           async for k in self._redis.scan_iter(match=pattern, count=1000)])
        rows = self._sqlite("SELECT id FROM rpt_quarantine WHERE conversation_id=? AND "
                            "expires_at>? ORDER BY id", (cid, time.time()))
        return [f"{self._config.embedded_path}#rpt_quarantine/{r[0]}" for r in rows]

    async def copies_of(self, cids: Sequence[str]) -> Dict[str, List[Any]]:
        """Conversation -> where its quarantine copies are (expired ones too:
        erasing leaves none behind). One SCAN for many ids."""
        wanted = set(cids)
        found: Dict[str, List[Any]] = {}
        if self._redis is None:
            for start in range(0, len(cids), 400):
                chunk = list(cids[start:start + 400])
                for row_id, cid in self._sqlite(
                        f"SELECT id, conversation_id FROM rpt_quarantine WHERE conversation_id "
                        f"IN ({','.join('?' * len(chunk))}) ORDER BY id", tuple(chunk)):
                    found.setdefault(cid, []).append(row_id)
            return found
        head = f"{self._config.key_prefix}:q:{{"
        # One conversation: its own pattern, so SCAN returns only its keys.
        pattern = self._copies_pattern(cids[0]) if len(wanted) == 1 else head + "*"
        async for key in self._redis.scan_iter(match=pattern, count=1000):
            name = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
            tag, sep, _ = name[len(head):].rpartition("}:")
            cid = tag_id(tag)
            if sep and cid in wanted:
                found.setdefault(cid, []).append(name)
        return found

    async def delete_copies(self, refs: Sequence[Any]) -> int:
        """Delete quarantine copies ``copies_of`` named."""
        if not refs:
            return 0
        if self._redis is None:
            deleted = 0
            for start in range(0, len(refs), 400):
                chunk = tuple(refs[start:start + 400])
                deleted += len(self._sqlite(
                    f"DELETE FROM rpt_quarantine WHERE id IN ({','.join('?' * len(chunk))}) "
                    f"RETURNING id", chunk, write=True))
            return deleted
        # One key per call: the copies of many conversations span cluster slots.
        return sum([int(await self._redis.delete(ref)) for ref in refs])

    async def copies(self) -> AsyncIterator[Copy]:
        """Every quarantine copy (values that are neither UTF-8 nor a compressed
        record are left out)."""
        if self._redis is None:
            for row_id, cid, value in self._sqlite(
                    "SELECT id, conversation_id, payload FROM rpt_quarantine WHERE "
                    "expires_at>? ORDER BY id", (time.time(),)):
                text = _text(value)
                if text is not None:
                    yield (row_id, value), cid, text
            return
        head = f"{self._config.key_prefix}:q:{{"
        async for key in self._redis.scan_iter(match=head + "*", count=1000):
            name = key.decode() if isinstance(key, bytes) else key
            tag, sep, _ = name[len(head):].rpartition("}:")
            cid = tag_id(tag) or tag
            kind = await self._redis.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            value = (await self._redis.hget(key, "d") if kind == "hash"
                     else await self._redis.get(key) if kind == "string" else None)
            text = _text(value)
            if sep and text is not None:
                yield name, cid, text

    async def replace_copy(self, where: Any, old: str, new: str) -> bool:
        """Rewrite a quarantine copy, unless it changed meanwhile."""
        if self._redis is None:
            row_id, raw = where
            return bool(self._sqlite("UPDATE rpt_quarantine SET payload=? WHERE id=? AND "
                                     "payload=? RETURNING id", (new, row_id, raw), write=True))
        return bool(await self._redis.eval(_REPLACE_COPY, 1, where, stored_bytes(old), new))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()


def _text(value: Any) -> Optional[str]:
    if isinstance(value, bytes):
        if value.startswith(BINARY_FORMS):  # a compressed hot record moved aside
            return stored_text(value)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None
