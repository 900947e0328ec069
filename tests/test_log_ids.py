"""``log_conversation_ids: hashed``: the store's log lines never name a
conversation in clear, and ``inspect`` finds it from the hash."""
import asyncio
import logging

import pytest

from rasa_persistent_tracker import ConfigError, cli
from rasa_persistent_tracker.logids import ConversationIds, resolve
from rasa_persistent_tracker.security.compressed import stored_bytes

from test_encryption import K1, K2, chat, hot_key, keyed_store, tamper
from test_rotation import endpoint_store, endpoints

PHONE = "whatsapp:+4915112345678"


async def faults(store, backend, cid: str) -> None:
    """Warnings of every kind: an unreadable record, a skipped row, a moved entry."""
    await chat(store, cid, 2)
    await store.flush()
    client = backend.redis_client()
    client.hset(hot_key(backend, cid), "d", stored_bytes(tamper(
        client.hget(hot_key(backend, cid), "d").decode("utf-8", "surrogateescape"))))
    client.rpush(f"{backend.prefix}:o:{{{cid}}}", "not an entry")
    await store.retrieve(cid)
    await store.flush()


@pytest.mark.parametrize("mode", ["hashed", "clear"])
async def test_log_lines_name_conversations_by_a_keyed_hash(backend, domain, caplog, mode):
    store = keyed_store(backend, domain, K1, log_conversation_ids=mode)
    with caplog.at_level(logging.DEBUG, logger="rasa_persistent_tracker"):
        await faults(store, backend, PHONE)
    lines = [r.getMessage() for r in caplog.records
             if r.name.startswith("rasa_persistent_tracker")]
    assert len([line for line in lines if "Conversation '" in line]) >= 3
    shown = store._backends.ids(PHONE)
    if mode == "clear":  # the control: the scan finds the id
        assert shown == PHONE and all(PHONE in line for line in lines if "Conversation" in line)
        return
    assert shown.startswith("h:") and len(shown) == 14
    assert not [line for line in lines if "4915112345678" in line]
    assert all(shown in line for line in lines if "Conversation '" in line)


async def test_inspect_finds_the_conversation_from_its_hash(backend, domain, tmp_path,
                                                           monkeypatch, capsys):
    writer = endpoint_store(backend, domain, tmp_path, K1)
    await chat(writer, PHONE, 1)
    await writer.flush()
    old_hash = ConversationIds("hashed", writer._backends.codec._protected.keyring.derived(
        b"rpt-log-id"))(PHONE)
    path = endpoints(backend, tmp_path, log_conversation_ids="hashed")
    monkeypatch.setenv("RPT_ENCRYPTION_KEYS", f"{K2},{K1}")  # rotated since the line was logged
    code = await asyncio.to_thread(cli.main, ["inspect", old_hash, "--endpoints", path])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"Conversation '{PHONE}'" in out and "event log: 6 events" in out


async def test_resolve_and_configuration():
    ids = ConversationIds("hashed", [b"k" * 32, b"o" * 32])

    async def candidates():
        for cid in ("a", PHONE, "b"):
            yield cid

    assert await resolve(ids, ids(PHONE), candidates()) == PHONE
    assert await resolve(ids, ConversationIds("hashed", [b"o" * 32])(PHONE),
                         candidates()) == PHONE  # a hash under an older key
    assert await resolve(ids, "h:000000000000", candidates()) is None
    with pytest.raises(ConfigError, match="needs an encryption key"):
        ConversationIds("hashed", [])
    assert ConversationIds()(PHONE) == PHONE
