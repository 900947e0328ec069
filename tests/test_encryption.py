"""Encryption at rest: tampering, wrong / missing / old keys, mixed data, key errors.

Runs on both backend pairs. Stores here are built with an encryption keyring
(``keyed_store``), which ``conftest.make_store`` cannot pass; the helpers are
shared with test_rotation.py and test_pii_at_rest.py.
"""
import logging
from typing import Any, List, Optional

import fakeredis
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, BotUttered, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import ConfigError, EncryptionKeyMissing, PersistentTrackerStore
from rasa_persistent_tracker.backends import assemble
from rasa_persistent_tracker.config import parse_config
from rasa_persistent_tracker.hot.redis_state import RedisHotState
from rasa_persistent_tracker.log.event_log import SQLEventLog, make_engine
from rasa_persistent_tracker.log.tables import EVENTS, SNAPSHOTS
from rasa_persistent_tracker.security.compressed import stored_bytes
from rasa_persistent_tracker.security.crypto import BINARY_PREFIX, is_encrypted, key_id_of
from rasa_persistent_tracker.security.keys import new_key_entry

K1 = new_key_entry("k1")
K2 = new_key_entry("k2")
K1_OTHER = new_key_entry("k1")  # same id, different key: the "wrong key"
ENV = "RPT_ENCRYPTION_KEYS"


def material(entry: str) -> str:
    return entry.split(":", 1)[1]


def track(backend: Any, store: PersistentTrackerStore) -> PersistentTrackerStore:
    """Have the ``backend`` fixture close ``store`` at the end of the test."""
    backend.stores.append(store)
    return store


def keyed_store(backend: Any, domain: Domain, keys: Optional[str] = None,
                **overrides: Any) -> PersistentTrackerStore:
    """Like ``Backend.make_store`` but with ``keys`` in the store's environment."""
    environ = {ENV: keys} if keys else {}
    config_keys = {"key_prefix": backend.prefix, "sql_url": backend.sql_url, **overrides}
    if backend.kind == "fake":
        config = parse_config({"host": "redis://fake", **config_keys}, environ={})
        hot = RedisHotState(lambda: fakeredis.aioredis.FakeRedis(server=backend.server),
                            config.key_prefix, config.quarantine_ttl)
        log = SQLEventLog(make_engine(config.sql_url, 2))
        log.migrate()
        try:
            store = PersistentTrackerStore(domain, backends=assemble(config, hot, log, environ))
        except Exception:
            log.engine.dispose()
            raise
    else:
        store = PersistentTrackerStore(domain, host=backend.redis_url, environ=environ,
                                       **config_keys)
    return track(backend, store)


def async_redis(backend: Any) -> Any:
    """A redis.asyncio client on the backend's server (for the CLI's raw reads)."""
    if backend.kind == "fake":
        return fakeredis.aioredis.FakeRedis(server=backend.server)
    return aioredis.from_url(backend.redis_url)


def hot_key(backend: Any, cid: str) -> str:
    return f"{backend.prefix}:h:{{{cid}}}"


def log_rows(backend: Any, cid: Optional[str] = None) -> List[Any]:
    engine = backend.engine()
    query = sa.select(EVENTS).order_by(EVENTS.c.id)
    if cid is not None:
        query = query.where(EVENTS.c.conversation_id == cid)
    try:
        with engine.connect() as conn:
            return list(conn.execute(query))
    finally:
        engine.dispose()


def snapshot_payloads(backend: Any) -> List[str]:
    engine = backend.engine()
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(SNAPSHOTS.c.payload))]
    finally:
        engine.dispose()


def execute(backend: Any, statement: Any) -> None:
    engine = backend.engine()
    try:
        with engine.begin() as conn:
            conn.execute(statement)
    finally:
        engine.dispose()


def tamper(token: str) -> str:
    """Change one character in the middle of a ciphertext's body: base64, or
    the raw bytes of the binary form (hot records, as stored text)."""
    if token.startswith(BINARY_PREFIX):
        i = len(token) // 2
        return f"{token[:i]}{'B' if token[i] == 'A' else 'A'}{token[i + 1:]}"
    head, body = token.rsplit(":", 1)
    i = len(body) // 2
    return f"{head}:{body[:i]}{'B' if body[i] == 'A' else 'A'}{body[i + 1:]}"


def secret_turn(tracker: DialogueStateTracker, i: int) -> None:
    tracker.update(UserUttered(f"my name is Zed Secret{i}", {"name": "inform", "confidence": 1.0}))
    tracker.update(ActionExecuted("utter_greet"))
    tracker.update(BotUttered(f"hello Zed Secret{i}"))
    tracker.update(SlotSet("name", f"Zed Secret{i}"))
    tracker.update(ActionExecuted("action_listen"))


async def chat(store: PersistentTrackerStore, sender: str, turns: int,
               start: int = 0) -> DialogueStateTracker:
    """``turns`` secret-bearing turns (a conversation is created if needed)."""
    tracker = await store.retrieve(sender) or await store.get_or_create_tracker(sender)
    for i in range(start, start + turns):
        tracker = await store.retrieve(sender)
        secret_turn(tracker, i)
        await store.save(tracker)
    return tracker


def warnings_of(caplog: Any, needle: str) -> List[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and needle in r.getMessage()]


# ----------------------------------------------------------------------- tests


async def test_hot_record_and_sensitive_rows_are_encrypted(backend, domain):
    store = keyed_store(backend, domain, K1)
    await chat(store, "e1", 2)
    await store.flush()
    payload = backend.redis_client().hget(hot_key(backend, "e1"), "d").decode("utf-8", "surrogateescape")
    assert key_id_of(payload) == "k1" and "Secret" not in payload
    rows = log_rows(backend, "e1")
    kinds = {r.type_name: key_id_of(r.data) for r in rows}
    assert kinds["user"] == kinds["bot"] == kinds["slot"] == kinds["action"] == "k1"
    # Action names are not user data: authenticated, but readable in SQL.
    assert {is_encrypted(r.data) for r in rows if r.type_name == "action"} == {False}
    assert all('"action_listen"' in r.data or '"utter_greet"' in r.data
               for r in rows if r.type_name == "action")
    assert all(key_id_of(p) == "k1" for p in snapshot_payloads(backend))
    loaded = await store.retrieve("e1")
    assert loaded.get_slot("name") == "Zed Secret1"


async def test_tampered_hot_record_resumes_from_snapshot(backend, domain, caplog):
    store = keyed_store(backend, domain, K1)
    await chat(store, "t1", 2)
    await store.flush()
    client = backend.redis_client()
    tampered = tamper(client.hget(hot_key(backend, "t1"), "d").decode("utf-8", "surrogateescape"))
    client.hset(hot_key(backend, "t1"), "d", stored_bytes(tampered))
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await store.retrieve("t1")
    assert tracker.get_slot("name") == "Zed Secret1"  # the true value, from SQL
    [warning] = warnings_of(caplog, "unreadable")
    assert "'t1'" in warning and "decryption failed" in warning
    assert tampered not in caplog.text and tampered[-20:] not in caplog.text
    quarantined = list(client.scan_iter(match=f"{backend.prefix}:q:{{t1}}:*"))
    assert len(quarantined) == 1 and client.hget(quarantined[0], "d").decode("utf-8", "surrogateescape") == tampered
    # The record was rebuilt, under the key, and the conversation goes on.
    assert key_id_of(client.hget(hot_key(backend, "t1"), "d").decode("utf-8", "surrogateescape")) == "k1"
    secret_turn(tracker, 2)
    await store.save(tracker)
    await store.flush()
    assert len((await store.retrieve_full_tracker("t1")).events) == 1 + 3 * 5


async def test_tampered_hot_record_without_snapshot_never_gives_a_wrong_value(backend, domain,
                                                                            caplog):
    store = keyed_store(backend, domain, K1)
    await chat(store, "t2", 2)
    await store.flush()
    execute(backend, SNAPSHOTS.delete())
    client = backend.redis_client()
    client.hset(hot_key(backend, "t2"), "d",
                stored_bytes(tamper(client.hget(hot_key(backend, "t2"), "d").decode("utf-8", "surrogateescape"))))
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await store.retrieve("t2")
    # Replayed from the log (true value) or a fresh session: never a wrong value.
    if warnings_of(caplog, "fresh session"):
        assert tracker.get_slot("name") is None
    else:
        assert warnings_of(caplog, "resumed") and tracker.get_slot("name") == "Zed Secret1"
    secret_turn(tracker, 7)
    await store.save(tracker)
    await store.flush()
    full = await store.retrieve_full_tracker("t2")  # nothing logged before is lost
    assert len(full.events) == 1 + 3 * 5 and full.get_slot("name") == "Zed Secret7"


async def test_tampered_snapshot_and_hot_record_never_give_a_wrong_value(backend, domain,
                                                                        caplog):
    store = keyed_store(backend, domain, K1)
    await chat(store, "t3", 1)
    await store.flush()
    [payload] = snapshot_payloads(backend)
    execute(backend, SNAPSHOTS.update().values(payload=tamper(payload)))
    client = backend.redis_client()
    client.hset(hot_key(backend, "t3"), "d",
                stored_bytes(tamper(client.hget(hot_key(backend, "t3"), "d").decode("utf-8", "surrogateescape"))))
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        tracker = await store.retrieve("t3")
    assert warnings_of(caplog, "snapshot is unreadable too")
    # Replayed from the (intact) log, or fresh: never a wrong value.
    expected = None if warnings_of(caplog, "fresh session") else "Zed Secret0"
    assert tracker.get_slot("name") == expected


async def test_tampered_log_row_is_skipped_with_its_seq(backend, domain, caplog):
    store = keyed_store(backend, domain, K1)
    await chat(store, "t4", 3)
    await store.flush()
    victim = [r for r in log_rows(backend, "t4") if r.type_name == "slot"][1]
    execute(backend, EVENTS.update().where(EVENTS.c.id == victim.id)
            .values(data=tamper(victim.data)))
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        full = await store.retrieve_full_tracker("t4")
    [warning] = warnings_of(caplog, "skipped corrupt log row")
    assert f"seq={victim.seq}" in warning and "'t4'" in warning
    assert len(full.events) == 1 + 3 * 5 - 1
    assert [e.value for e in full.events if isinstance(e, SlotSet)] == ["Zed Secret0",
                                                                       "Zed Secret2"]
    # The hot record is not affected by a bad log row.
    assert (await store.retrieve("t4")).get_slot("name") == "Zed Secret2"


def stored_state(backend: Any) -> Any:
    """Every Redis key of this test (with its value) and every log/snapshot row."""
    client = backend.redis_client()
    try:
        keys = {}
        for key in client.scan_iter(match=f"{backend.prefix}:*"):
            kind = client.type(key)
            keys[key] = (kind, client.hgetall(key) if kind == b"hash" else
                         client.lrange(key, 0, -1) if kind == b"list" else client.get(key))
    finally:
        client.close()
    engine = backend.engine()
    try:
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.select(EVENTS).order_by(EVENTS.c.id))]
            snaps = [tuple(r) for r in conn.execute(sa.select(SNAPSHOTS))]
    finally:
        engine.dispose()
    return keys, rows, snaps


@pytest.mark.parametrize("keys, error, reason", [
    (K1_OTHER, ConfigError, "is not the key the stored data under id 'k1' was written with"),
    (None, EncryptionKeyMissing, "holds data encrypted at rest, but no encryption key"),
], ids=["wrong-key", "no-key"])
async def test_a_process_without_the_key_refuses_to_start(backend, domain, keys, error, reason):
    # Issue 11: such a process used to take every value for corruption,
    # quarantine the live record and start a fresh session.
    writer = keyed_store(backend, domain, K1)
    await chat(writer, "w1", 2)
    await writer.flush()
    before = stored_state(backend)
    with pytest.raises(error, match=reason):
        keyed_store(backend, domain, keys)
    assert stored_state(backend) == before


async def test_a_value_under_an_unconfigured_key_id_is_refused_not_quarantined(
        backend, domain, caplog):
    writer = keyed_store(backend, domain, K1)
    await chat(writer, "w1", 2)
    await writer.flush()
    before = stored_state(backend)
    reader = keyed_store(backend, domain, K2)  # a key, but not the one k1 data needs
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        with pytest.raises(EncryptionKeyMissing, match="key id 'k1', which this process"):
            await reader.retrieve("w1")
        with pytest.raises(EncryptionKeyMissing):
            await reader.retrieve_full_tracker("w1")
        tracker = DialogueStateTracker.from_events("w1", [], domain.slots)
        tracker.update(UserUttered("hello"))
        with pytest.raises(EncryptionKeyMissing):
            await reader.save(tracker)  # what Rasa's FailSafe store does next
    assert not warnings_of(caplog, "unreadable")
    assert stored_state(backend) == before
    fixed = keyed_store(backend, domain, f"{K2},{K1}")  # the right key is back
    assert (await fixed.retrieve("w1")).get_slot("name") == "Zed Secret1"
    assert len((await fixed.retrieve_full_tracker("w1")).events) == 1 + 2 * 5


async def test_old_key_second_still_reads_and_new_writes_use_new_key(backend, domain):
    old = keyed_store(backend, domain, K1)
    await chat(old, "o1", 2)
    await old.flush()
    both = keyed_store(backend, domain, f"{K2},{K1}")
    assert (await both.retrieve("o1")).get_slot("name") == "Zed Secret1"
    await chat(both, "o1", 1, start=2)
    await both.flush()
    payload = backend.redis_client().hget(hot_key(backend, "o1"), "d").decode("utf-8", "surrogateescape")
    assert key_id_of(payload) == "k2"
    kids = [key_id_of(r.data) for r in log_rows(backend, "o1") if r.type_name == "user"]
    assert kids == ["k1", "k1", "k2"]
    full = await both.retrieve_full_tracker("o1")
    assert len(full.events) == 1 + 3 * 5 and full.get_slot("name") == "Zed Secret2"


async def test_plaintext_then_encrypted_turns_all_read(backend, domain, caplog):
    plain = keyed_store(backend, domain, None)
    await chat(plain, "m1", 2)
    await plain.flush()
    assert backend.redis_client().hget(hot_key(backend, "m1"), "d").startswith(b"rpt-z1:")
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        keyed = keyed_store(backend, domain, K1, accept_plaintext=True)  # the migration switch
    assert warnings_of(caplog, "accept_plaintext is on")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rasa_persistent_tracker"):
        assert (await keyed.retrieve("m1")).get_slot("name") == "Zed Secret1"
        await chat(keyed, "m1", 2, start=2)
        await keyed.flush()
        full = await keyed.retrieve_full_tracker("m1")
    assert not warnings_of(caplog, "")
    assert len(full.events) == 1 + 4 * 5
    assert [e.text for e in full.events if isinstance(e, UserUttered)] == [
        f"my name is Zed Secret{i}" for i in range(4)]
    kids = [key_id_of(r.data) for r in log_rows(backend, "m1") if r.type_name == "user"]
    assert kids == [None, None, "k1", "k1"]
    assert (await keyed.retrieve("m1")).get_slot("name") == "Zed Secret3"


@pytest.mark.parametrize("keys, problem", [
    ("k1:abcde", "not valid base64"),
    (f"k1:{material(K1)[:-8]}", "bytes; AES-256 needs 32"),
    (f"{K1},k1:{material(K2)}", "appears twice"),
    (f"bad id!:{material(K1)}", "must look like '<key id>:<base64 key>'"),
    (f"k1{material(K1)}", "must look like '<key id>:<base64 key>'"),
], ids=["bad-base64", "short", "duplicate-id", "bad-id", "no-separator"])
async def test_invalid_keys_are_config_errors_without_key_material(backend, domain, keys,
                                                                   problem):
    with pytest.raises(ConfigError) as info:
        keyed_store(backend, domain, keys)
    message = str(info.value)
    assert problem in message and "RPT_ENCRYPTION_KEYS" in message
    assert material(K1)[:12] not in message and material(K2)[:12] not in message


@pytest.mark.parametrize("keys", ["k1:!!!!!!!!", f"{K1}!!!!", f"{K1}AAAA"],
                         ids=["only-junk", "junk-after", "data-after-padding"])
async def test_non_base64_characters_are_rejected(backend, domain, keys):
    with pytest.raises(ConfigError, match="not valid base64"):
        keyed_store(backend, domain, keys)


async def test_inline_keys_and_unreadable_key_file_are_config_errors(backend, domain, tmp_path):
    with pytest.raises(ConfigError, match="'encryption_keys' is not accepted inline") as info:
        keyed_store(backend, domain, None, encryption_keys=K1)
    assert material(K1)[:12] not in str(info.value)
    missing = tmp_path / "no-such-keys"
    with pytest.raises(ConfigError, match="'encryption_key_file'.*cannot be read"):
        keyed_store(backend, domain, None, encryption_key_file=str(missing))
    with pytest.raises(ConfigError, match="need encryption keys"):
        keyed_store(backend, domain, None, sensitive_slots=["name"])


async def test_key_file_works_like_the_environment(backend, domain, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated 2025-01\n{K2}\n{K1}\n")
    key_file.chmod(0o600)
    writer = keyed_store(backend, domain, K1)
    await chat(writer, "f1", 1)
    await writer.flush()
    reader = keyed_store(backend, domain, None, encryption_key_file=str(key_file))
    assert (await reader.retrieve("f1")).get_slot("name") == "Zed Secret0"
    await chat(reader, "f1", 1, start=1)
    payload = backend.redis_client().hget(hot_key(backend, "f1"), "d").decode("utf-8", "surrogateescape")
    assert key_id_of(payload) == "k2"


async def test_repr_and_logs_never_show_key_material(backend, domain, caplog):
    with caplog.at_level(logging.DEBUG):
        store = keyed_store(backend, domain, f"{K2},{K1}")
        await chat(store, "r1", 2)
        await store.flush()
        client = backend.redis_client()
        client.hset(hot_key(backend, "r1"), "d",
                    stored_bytes(tamper(client.hget(hot_key(backend, "r1"), "d").decode("utf-8", "surrogateescape"))))
        await store.retrieve("r1")
        await store.retrieve_full_tracker("r1")
    shown = "\n".join([repr(store), str(store.config), repr(store._codec._protected),
                       caplog.text])
    assert "k2" in repr(store._codec._protected)  # key ids may be shown ...
    for entry in (K1, K2):  # ... key material never
        assert material(entry)[:12] not in shown
        assert material(entry)[-16:] not in shown


@pytest.mark.parametrize("keys", [None, K2], ids=["no-key", "other-key"])
async def test_undecryptable_rows_never_resurrect_an_older_value(backend, domain, keys):
    plain = keyed_store(backend, domain, None)
    await chat(plain, "s1", 1)  # name = "Zed Secret0", written in plaintext
    await plain.flush()
    keyed = keyed_store(backend, domain, K1, accept_plaintext=True)
    await chat(keyed, "s1", 1, start=1)  # name = "Zed Secret1", encrypted
    await keyed.flush()
    # Without any key the process refuses to start; with another key the
    # conversation is refused: never an older value believed (issue 11).
    if keys is None:
        with pytest.raises(EncryptionKeyMissing):
            keyed_store(backend, domain, keys)
        return
    reader = keyed_store(backend, domain, keys)
    with pytest.raises(EncryptionKeyMissing):
        await reader.retrieve("s1")
