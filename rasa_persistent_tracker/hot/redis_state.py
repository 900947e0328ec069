"""``RedisHotState``: the hot state (``protocol.HotState``) on Redis.

One small record per conversation, versioned, with a TTL, on redis-py's
asyncio client (standalone, Sentinel or Cluster). Per conversation there are three
keys, all sharing one hash tag (``redis_keys.py``: the id itself, or its hex
when it holds braces) so the Lua scripts (``redis_scripts.py``) touch one
cluster slot:

* ``<prefix>:h:{id}`` hash ``v`` (version) + ``d`` (record payload), TTL
  ``record_exp``, refreshed on every save;
* ``<prefix>:o:{id}`` list, the outbox: log rows written atomically with the
  record and removed once they are in SQL;
* ``<prefix>:q:{id}:<ms>`` quarantined copies of unreadable values;
* ``<prefix>:e:{<digest>}`` an erased conversation's tombstone (its version
  floor), named by a digest of the id but in the same slot (``redis_keys``).
"""
import asyncio
import logging
import os
import time
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

from rasa_persistent_tracker.errors import ConcurrentSaveError
from rasa_persistent_tracker.hot import redis_scripts as scripts
from rasa_persistent_tracker.hot.protocol import (
    Erased,
    HotEntry,
    Pending,
    RecordMissing,
    Removed,
    UnusableValue,
)
from rasa_persistent_tracker.hot.redis_calls import Disconnected, RedisCaller
from rasa_persistent_tracker.hot.redis_keys import KeyNames
from rasa_persistent_tracker.security.compressed import Payload, stored_bytes, stored_text
from rasa_persistent_tracker.security.erasure import ErasureIds

# The logger's name from before the layer packages: logging configs keep working.
logger = logging.getLogger("rasa_persistent_tracker.hot_state")


# Pauses before retrying a commit whose connection failed (see ``commit``).
COMMIT_RETRY_DELAYS = (0.0, 0.05, 0.25)
# Conversations whose key names (with their tombstones' digests) are kept.
KEY_CACHE_SIZE = 1024


def _decode(value: object) -> Optional[str]:
    if value is None or value is False:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class RedisHotState:
    """``HotState`` on Redis (standalone, Sentinel or Cluster).

    Args:
        client_factory: returns a redis.asyncio client; called once per event
            loop, because asyncio connections are bound to the loop that made them.
        prefix: key prefix (``key_prefix`` config).
        outbox_ttl: seconds an undelivered outbox survives.
        description: what to name in errors (URL with the password masked).
    """

    def __init__(self, client_factory: Callable[[], object], prefix: str,
                 outbox_ttl: float, description: str = "redis", busy_wait: float = 1.0) -> None:
        self._factory = client_factory
        self._names = KeyNames(prefix)
        self._prefix = prefix
        self._outbox_ttl_ms = int(outbox_ttl * 1000)
        self._description = description
        self._clients: dict = {}
        self._redis = RedisCaller(self._client, description, busy_wait)
        self._digests: Callable[[str], List[str]] = ErasureIds()
        # conversation id -> [record, outbox] and its tombstone keys: names a
        # turn needs twice, one a digest per key (``_conversation_keys``).
        self._key_cache: Dict[str, Tuple[List[str], List[str]]] = {}

    def bind_erasure(self, digests: Callable[[str], List[str]]) -> None:
        self._digests = digests
        self._key_cache.clear()

    def _conversation_keys(self, conversation_id: str) -> Tuple[List[str], List[str]]:
        """``_keys`` and ``_tombstones`` of a conversation, remembered for the
        last ``KEY_CACHE_SIZE`` conversations (copies: callers extend them)."""
        names = self._key_cache.get(conversation_id)
        if names is None:
            if len(self._key_cache) >= KEY_CACHE_SIZE:
                self._key_cache.clear()
            names = self._key_cache[conversation_id] = (
                [self._names.record(conversation_id), self._names.outbox(conversation_id)],
                self._tombstones(conversation_id))
        return names

    def _tombstones(self, conversation_id: str) -> List[str]:
        return [self._names.tombstone(conversation_id, d)
                for d in self._digests(conversation_id)]

    def __repr__(self) -> str:
        return f"RedisHotState({self._description}, prefix={self._prefix!r})"

    def _client(self):
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # Forget clients of closed loops: their connections are unusable.
            self._clients = {lp: c for lp, c in self._clients.items() if not lp.is_closed()}
            client = self._clients[loop] = self._factory()
        return client

    def _keys(self, conversation_id: str) -> List[str]:
        return list(self._conversation_keys(conversation_id)[0])

    async def _call(self, script: str, keys: List[str], *args: object):
        return await self._redis.eval(script, keys, *args)

    async def load(self, conversation_id: str, known: Optional[str] = None) -> HotEntry:
        kind, version, payload, seq, same = await self._call(
            scripts.LOAD, self._keys(conversation_id), known or "")
        kind = _decode(kind)
        outbox_seq = int(_decode(seq) or 0)
        if kind == "none":
            return HotEntry(outbox_seq=outbox_seq)
        if kind != "hash":
            return HotEntry(problem=f"value has Redis type {kind}", outbox_seq=outbox_seq)
        text = _decode(version)
        if text is None or not text.isdigit():
            return HotEntry(problem="version field unreadable", outbox_seq=outbox_seq)
        if int(same):
            return HotEntry(version=int(text), outbox_seq=outbox_seq, unchanged=True)
        if payload is None:
            return HotEntry(version=int(text), problem="payload field missing",
                            outbox_seq=outbox_seq)
        # Any bytes: compressed records are binary; the codec judges them.
        body = stored_text(payload) if isinstance(payload, bytes) else str(payload)
        return HotEntry(version=int(text), payload=body, outbox_seq=outbox_seq)

    async def commit(self, conversation_id: str, expected_version: Optional[int],
                     payload: Payload, ttl: float, outbox_entry: Optional[str],
                     expect_record: bool = False, restoring: bool = False) -> int:
        # A commit whose connection broke (pooled connections of a restarted
        # Redis fail on first use) is retried on a fresh one. The token makes
        # that safe: if the first attempt ran and only its reply was lost, the
        # script finds its token on the record and reports it as applied.
        token = os.urandom(16).hex()
        hot, tombstones = self._conversation_keys(conversation_id)
        keys = hot + [self._quarantine_key(conversation_id)] + tombstones
        args = ("" if expected_version is None else expected_version,
                stored_bytes(payload),
                max(1, int(ttl * 1000)), outbox_entry or "", self._outbox_ttl_ms, token,
                "1" if expect_record else "", "1" if restoring else "")
        for delay in COMMIT_RETRY_DELAYS + (None,):
            try:
                result = await self._call(scripts.COMMIT, keys, *args)
                break
            except Disconnected:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        code = int(result[0])
        if code > 0:
            if len(result) > 2 and int(result[2]):
                logger.warning("Conversation '%s': its outbox key held a value of the wrong "
                               "Redis type; kept as %s.", conversation_id, keys[2])
            return code
        if code == -1:
            raise ConcurrentSaveError(conversation_id, expected_version or 0, int(result[1]))
        if code == -4:
            raise RecordMissing(conversation_id)
        if code == -5:
            raise Erased(conversation_id, int(result[1]))
        raise UnusableValue(_decode(result[1]) or "unknown")

    async def quarantine(self, conversation_id: str, ttl: float) -> Optional[str]:
        hot = self._keys(conversation_id)[0]
        target = self._quarantine_key(conversation_id)
        moved = await self._call(scripts.QUARANTINE, [hot, target], int(ttl * 1000))
        return target if int(moved) else None

    async def quarantine_entry(self, conversation_id: str, entry: str, ttl: float) -> str:
        target = self._quarantine_key(conversation_id)
        await self._call(scripts.QUARANTINE_ENTRY, [target, self._keys(conversation_id)[1]],
                         entry.encode("utf-8", "surrogateescape"), int(ttl * 1000))
        return target

    def _quarantine_key(self, conversation_id: str) -> str:
        stamp = f"{int(time.time() * 1000)}-{os.urandom(3).hex()}"
        return self._names.quarantine(conversation_id, stamp)

    async def pending(self, conversation_id: str, limit: int) -> Pending:
        hot, outbox = self._keys(conversation_id)
        entries, version, payload = await self._call(scripts.PENDING, [hot, outbox], limit - 1)
        # surrogateescape: an entry that is not UTF-8 keeps its exact bytes, so
        # quarantine_entry can find it in the list (parsing refuses it).
        texts = [e.decode("utf-8", "surrogateescape") if isinstance(e, bytes) else str(e)
                 for e in entries]
        text_version = _decode(version)
        return Pending(
            entries=texts,
            payload=stored_text(payload) if isinstance(payload, bytes) else _decode(payload),
            version=int(text_version) if text_version and text_version.isdigit() else 0,
            complete=len(texts) < limit,
        )

    async def ack(self, conversation_id: str, upto_seq: int) -> int:
        return int(await self._call(scripts.ACK, [self._keys(conversation_id)[1]], upto_seq))

    async def touch(self, conversation_id: str, ttl: float) -> None:
        await self._call("return redis.call('PEXPIRE', KEYS[1], ARGV[1])",
                         [self._keys(conversation_id)[0]], max(1, int(ttl * 1000)))

    async def erase(self, conversation_id: str, floor: int, ttl: float,
                    only_at_version: Optional[int] = None) -> Removed:
        keys: Sequence[str] = self._keys(conversation_id) + self._tombstones(conversation_id)
        result = await self._call(scripts.ERASE, list(keys), floor, max(1, int(ttl * 1000)),
                                  "" if only_at_version is None else only_at_version)
        if int(result[0]) < 0:
            return Removed(floor=None)
        return Removed(floor=int(result[0]), record=bool(int(result[1])),
                       outbox_entries=int(result[2]))

    async def tombstone(self, conversation_id: str) -> Optional[int]:
        keys = self._tombstones(conversation_id)
        if not keys:
            return None
        floor = await self._call(scripts.TOMBSTONE, keys)
        return None if floor is None else int(floor)

    async def _scan(self, kind: str) -> AsyncIterator[str]:
        try:
            async for key in self._client().scan_iter(match=self._names.pattern(kind),
                                                       count=1000):
                conversation_id = self._names.conversation_of(kind, _decode(key) or "")
                if conversation_id is not None:
                    yield conversation_id
        except Exception as exc:  # every driver error is translated
            raise self._redis.translate(exc) from exc

    def conversations(self) -> AsyncIterator[str]:
        return self._scan("h")

    def outboxes(self) -> AsyncIterator[str]:
        return self._scan("o")

    async def ping(self) -> None:
        await self._call("return 1", [f"{self._prefix}:ping"])

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for loop, client in clients.items():
            if loop is asyncio.get_running_loop():
                await client.close()
