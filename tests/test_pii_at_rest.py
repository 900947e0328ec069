"""No personal data at rest: every stored byte is searched for the values of
banking conversations, for this store and (as a contrast) for Rasa's own stores.

Ciphertext is random, so a short digit string such as a PIN turns up inside
base64 by chance about once in 16 million positions; wall-clock timestamps
likewise hold arbitrary digit runs. Both are masked before searching, after
checking that the ciphertext does not simply encode the plaintext.
"""
import base64
import binascii
import logging
import re
from typing import Any, Dict, Iterable, List

import pytest
import sqlalchemy as sa
from rasa.core.tracker_store import RedisTrackerStore, SQLTrackerStore, TrackerStore
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, BotUttered, Event, SlotSet, UserUttered
from redis.connection import parse_url

from test_encryption import K1, keyed_store

SENSITIVE = ("12345678", "4321", "Alice Martin", "$1,250.75", "1250.75")
CONVERSATIONS = ("bank-1", "bank-2", "bank-3")
T0 = 1_700_000_000.0
TABLES = ("rpt_events", "rpt_snapshots", "rpt_schema_version")

BANK_DOMAIN = """
version: "3.1"
intents: [greet, transfer_money, inform]
entities: [account_number, pin, recipient, amount]
slots:
  account_number: {type: text, mappings: [{type: from_entity, entity: account_number}]}
  pin: {type: text, mappings: [{type: from_entity, entity: pin}]}
  recipient: {type: text, mappings: [{type: from_entity, entity: recipient}]}
  amount: {type: float, max_value: 100000, mappings: [{type: from_entity, entity: amount}]}
responses:
  utter_greet: [{text: "Hello {recipient}"}]
  utter_ask_pin: [{text: "Your PIN please"}]
  utter_confirm_transfer: [{text: "Done"}]
"""


@pytest.fixture
def bank_domain() -> Domain:
    return Domain.from_yaml(BANK_DOMAIN)


def _user(text: str, intent: str, ts: float, **entities: str) -> UserUttered:
    found = [{"entity": name, "value": value, "start": text.find(value),
              "end": text.find(value) + len(value), "extractor": "RegexEntityExtractor"}
             for name, value in entities.items()]
    return UserUttered(text, {"name": intent, "confidence": 0.97}, found, timestamp=ts,
                       parse_data={"text": text, "intent": {"name": intent, "confidence": 0.97},
                                   "entities": found})


def banking_turns(n: int) -> List[List[Event]]:
    """One conversation, as the events each turn adds (fixed timestamps)."""
    t = iter(T0 + n * 1000 + i for i in range(100))
    return [
        [ActionExecuted("action_listen", timestamp=next(t)),
         _user("Hi, this is Alice Martin", "greet", next(t)),
         ActionExecuted("utter_greet", timestamp=next(t)),
         BotUttered("Hello Alice Martin, how can I help?", timestamp=next(t)),
         ActionExecuted("action_listen", timestamp=next(t))],
        [_user("Please send $1,250.75 from account 12345678 to Alice Martin",
               "transfer_money", next(t), amount="1250.75", account_number="12345678",
               recipient="Alice Martin"),
         SlotSet("account_number", "12345678", timestamp=next(t)),
         SlotSet("amount", 1250.75, timestamp=next(t)),
         SlotSet("recipient", "Alice Martin", timestamp=next(t)),
         ActionExecuted("utter_ask_pin", timestamp=next(t)),
         SlotSet("requested_slot", "pin", timestamp=next(t)),
         BotUttered("Please enter the PIN for account 12345678", timestamp=next(t)),
         ActionExecuted("action_listen", timestamp=next(t))],
        [_user("my PIN is 4321", "inform", next(t), pin="4321"),
         SlotSet("pin", "4321", timestamp=next(t)),
         SlotSet("requested_slot", None, timestamp=next(t)),
         ActionExecuted("utter_confirm_transfer", timestamp=next(t)),
         BotUttered("Sent $1,250.75 (1250.75) to Alice Martin.", timestamp=next(t)),
         ActionExecuted("action_listen", timestamp=next(t))],
    ]


EVENTS_PER_CONVERSATION = sum(len(turn) for turn in banking_turns(0))


async def run_conversations(store: TrackerStore) -> None:
    for n, cid in enumerate(CONVERSATIONS):
        for turn in banking_turns(n):
            tracker = await store.retrieve(cid) or store.init_tracker(cid)
            for event in turn:
                tracker.update(event)
            await store.save(tracker)


# ----------------------------------------------------------- searching bytes

_CIPHERTEXT = re.compile(r"rpt-enc:[12]:([A-Za-z0-9_\-]+):([A-Za-z0-9_\-=]+)")
_MAC_TAG = re.compile(r"rpt-mac:2:([A-Za-z0-9_\-]+):([A-Za-z0-9_\-=]+):")
_CLOCK = re.compile(r"\d{10}\.\d+")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def redis_dump(client: Any, pattern: str) -> str:
    """Names and raw contents of every key matching ``pattern``, any type."""
    parts: List[str] = []
    for key in client.scan_iter(match=pattern):
        kind = _text(client.type(key))
        parts.append(_text(key))
        if kind == "hash":
            parts.extend(_text(x) for kv in client.hgetall(key).items() for x in kv)
        elif kind == "list":
            parts.extend(_text(x) for x in client.lrange(key, 0, -1))
        elif kind == "string":
            parts.append(_text(client.get(key)))
        elif kind == "set":
            parts.extend(_text(x) for x in client.smembers(key))
        elif kind == "zset":
            parts.extend(_text(x) for x in client.zrange(key, 0, -1))
        else:
            parts.append(f"<unexpected type {kind}>")
    return "\n".join(parts)


def sql_dump(engine: sa.engine.Engine, tables: Iterable[str]) -> str:
    parts: List[str] = []
    with engine.connect() as conn:
        for table in tables:
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                parts.append("\t".join(_text(v) for v in row))
    return "\n".join(parts)


def masked(dump: str, noise: Iterable[str] = ()) -> str:
    """``dump`` with ciphertext bodies, wall-clock timestamps and ``noise`` masked.

    Raises AssertionError if a ciphertext merely encodes a sensitive value.
    """
    for match in _CIPHERTEXT.finditer(dump):
        body = match.group(2)
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            continue
        assert not [s for s in SENSITIVE if s.encode() in raw], "ciphertext is not encrypted"
    dump = _CIPHERTEXT.sub(r"rpt-enc:\1:<ciphertext>", dump)
    dump = _MAC_TAG.sub(r"rpt-mac:2:\1:<tag>:", dump)
    dump = _CLOCK.sub("<time>", dump)
    for word in noise:
        dump = dump.replace(word, "<noise>")
    return dump


def hits(dump: str) -> Dict[str, List[str]]:
    """Every occurrence of a sensitive value, with 30 characters of context."""
    found: Dict[str, List[str]] = {}
    for secret in SENSITIVE:
        for match in re.finditer(re.escape(secret), dump):
            found.setdefault(secret, []).append(
                dump[max(0, match.start() - 30):match.end() + 30])
    return found


def counts(found: Dict[str, List[str]]) -> Dict[str, int]:
    return {s: len(found.get(s, [])) for s in SENSITIVE}


# ----------------------------------------------------------------------- tests


async def test_no_sensitive_value_is_stored_in_clear(backend, bank_domain, monkeypatch):
    store = keyed_store(backend, bank_domain, K1)
    monkeypatch.setattr(store._outbox, "notify", lambda cid: None)  # keep the outbox full
    await run_conversations(store)
    client = backend.redis_client()
    queued = redis_dump(client, f"{backend.prefix}:*")
    assert queued.count(f"{backend.prefix}:o:") == len(CONVERSATIONS)
    found = hits(masked(queued, [backend.prefix]))
    assert not found, f"in Redis, before delivery: {found}"

    await store.flush()
    stored = redis_dump(client, f"{backend.prefix}:*")
    engine = backend.engine()
    try:
        rows = sql_dump(engine, TABLES)
    finally:
        engine.dispose()
    assert rows.count("\t") > 100  # the dump really holds the log
    found = hits(masked(stored + "\n" + rows, [backend.prefix]))
    print(f"\n[{backend.kind}] PersistentTrackerStore hits: {counts(found)}")
    assert not found, f"sensitive values stored in clear: {found}"
    reader = keyed_store(backend, bank_domain, K1)
    tracker = await reader.retrieve("bank-2")
    assert tracker.get_slot("pin") == "4321" and tracker.get_slot("amount") == 1250.75


async def test_query_columns_stay_plaintext_and_queryable(backend, bank_domain):
    store = keyed_store(backend, bank_domain, K1)
    await run_conversations(store)
    await store.flush()
    expected = [e for turn in banking_turns(0) for e in turn]
    engine = backend.engine()
    try:
        with engine.connect() as conn:
            rows = list(conn.execute(sa.text(
                "SELECT seq, type_name, intent_name, action_name, timestamp FROM rpt_events "
                "WHERE conversation_id = 'bank-1' ORDER BY seq")))
            transfers = conn.execute(sa.text(
                "SELECT count(*) FROM rpt_events WHERE intent_name = 'transfer_money' "
                "AND type_name = 'user' AND timestamp BETWEEN :a AND :b"),
                {"a": T0, "b": T0 + 10_000}).scalar()
    finally:
        engine.dispose()
    assert [r.seq for r in rows] == list(range(1, EVENTS_PER_CONVERSATION + 1))
    assert [r.type_name for r in rows] == [e.type_name for e in expected]
    assert [r.timestamp for r in rows] == [e.timestamp for e in expected]
    assert [r.intent_name for r in rows if r.type_name == "user"] == [
        "greet", "transfer_money", "inform"]
    assert [r.action_name for r in rows if r.type_name == "action"] == [
        "action_listen", "utter_greet", "action_listen", "utter_ask_pin", "action_listen",
        "utter_confirm_transfer", "action_listen"]
    assert transfers == len(CONVERSATIONS)


async def test_rasa_builtin_stores_keep_the_same_values_in_clear(backend, bank_domain,
                                                                 tmp_path):
    totals: Dict[str, Dict[str, int]] = {}
    if backend.kind == "real":
        server = parse_url(backend.redis_url)
        prefix = f"{backend.prefix}rasa"  # Rasa accepts alphanumeric prefixes only
        redis_store = RedisTrackerStore(
            bank_domain, host=server["host"], port=server.get("port", 6379),
            db=server.get("db", 0), username=server.get("username"),
            password=server.get("password"), key_prefix=prefix)
        client = backend.redis_client()
        try:
            await run_conversations(redis_store)
            totals["RedisTrackerStore"] = counts(hits(masked(
                redis_dump(client, f"{prefix}:*"), [backend.prefix]))
            )
        finally:
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)
        sql = sa.engine.make_url(backend.sql_url.split("?")[0])
        sql_store = SQLTrackerStore(bank_domain, dialect="postgresql", host=sql.host,
                                    port=sql.port, db=sql.database, username=sql.username,
                                    password=sql.password,
                                    query={"options": f"-csearch_path={backend.schema}"})
    else:
        sql_store = SQLTrackerStore(bank_domain, dialect="sqlite",
                                    db=str(tmp_path / "rasa.db"))
    try:
        await run_conversations(sql_store)
        totals["SQLTrackerStore"] = counts(hits(masked(sql_dump(sql_store.engine, ["events"]),
                                                       [backend.prefix])))
    finally:
        sql_store.engine.dispose()
    print(f"\n[{backend.kind}] sensitive values found in clear: {totals}")
    for name, found in totals.items():
        assert all(n >= len(CONVERSATIONS) for n in found.values()), (name, found)
        assert sum(found.values()) >= 10 * len(CONVERSATIONS), (name, found)


def store_log(caplog: Any) -> str:
    """Everything the store's own loggers said (messages and tracebacks)."""
    return "\n".join(f"{r.getMessage()}\n{r.exc_text or ''}" for r in caplog.records
                     if r.name.startswith("rasa_persistent_tracker"))


async def faults_and_reads(store: TrackerStore, backend: Any, cids: List[str]) -> str:
    """Make the store quarantine a hot record and an outbox entry, and read the
    conversations every way; returns the outbox as it was before delivery."""
    client = backend.redis_client()
    hot = f"{backend.prefix}:h:{{{cids[0]}}}"
    payload = client.hget(hot, "d")  # binary (compressed, encrypted)
    i = len(payload) // 2
    client.hset(hot, "d", payload[:i] + (b"A" if payload[i:i + 1] != b"A" else b"B")
                + payload[i + 1:])
    outbox = f"{backend.prefix}:o:{{{cids[1]}}}"
    entry = client.lindex(outbox, -1).decode()
    client.rpush(outbox, "x" + entry)  # an unreadable header: moved out at delivery
    queued = redis_dump(client, f"{backend.prefix}:o:*")
    await store.retrieve(cids[0])
    await store.flush()
    for cid in cids:
        await store.retrieve(cid)
        await store.retrieve_full_tracker(cid)
    return queued


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["INFO", "DEBUG"])
async def test_logs_quarantine_and_outbox_hold_no_sensitive_value(backend, bank_domain,
                                                                 caplog, monkeypatch, level):
    found: Dict[str, Dict[str, Dict[str, int]]] = {}
    # The control first: a process without the key refuses to start on a log
    # that already holds ciphertext (issue 11).
    for mode, keys in (("control", None), ("key", K1)):  # the control must find them
        caplog.clear()
        cids = [f"{mode}-{n}" for n in range(3)]
        with caplog.at_level(level):
            store = keyed_store(backend, bank_domain, keys)
            monkeypatch.setattr(store._outbox, "notify", lambda cid: None)  # outbox stays full
            for n, cid in enumerate(cids):
                for turn in banking_turns(n):
                    tracker = await store.retrieve(cid) or store.init_tracker(cid)
                    for event in turn:
                        tracker.update(event)
                    await store.save(tracker)
            queued = await faults_and_reads(store, backend, cids)
            if mode == "control":  # and the log scan can fail too
                logging.getLogger("rasa_persistent_tracker.test").info("for Alice Martin")
        client = backend.redis_client()
        quarantine = redis_dump(client, f"{backend.prefix}:q:{{{mode}-*")
        assert quarantine.count(f"{backend.prefix}:q:") == 2  # the record and the entry
        noise = [backend.prefix]
        found[mode] = {name: counts(hits(masked(text, noise))) for name, text in (
            ("log", store_log(caplog)), ("outbox", queued), ("quarantine", quarantine))}
        assert store_log(caplog).count("moved to") == 1  # the entry was quarantined
    print(f"\n[{backend.kind}] sensitive values found: {found}")
    assert not any(sum(n.values()) for n in found["key"].values()), found["key"]
    assert all(sum(n.values()) for n in found["control"].values()), found["control"]
