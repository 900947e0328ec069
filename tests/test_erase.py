"""``erase`` and ``purge`` (issue 16), on the embedded default (``fake``: the
embedded hot state + SQLite, as the CLI opens it from endpoints.yml) and on
real Redis + PostgreSQL (``real``).

The oracle is a scan of everything stored: every Redis key of the database
(names and values, as bytes) and every row of every table of every SQL file
or schema (reflected, as text). After an erasure it holds no byte of the
erased conversation - its id, its hashed log id, its texts and slot values
(plaintext when encryption is off) - while the other conversations are
unchanged. The races run in a real second process.
"""
import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any, Dict, List, Optional

import pytest
import sqlalchemy as sa
import yaml
from rasa.shared.core.events import ActionExecuted, BotUttered, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import PersistentTrackerStore, cli
from rasa_persistent_tracker.admin.endpoints_file import load_endpoint_backends
from rasa_persistent_tracker.admin.erasing import Eraser
from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.errors import ConcurrentSaveError
from rasa_persistent_tracker.hot.redis_keys import KeyNames
from rasa_persistent_tracker.logids import HASHED, PURPOSE, ConversationIds
from rasa_persistent_tracker.security.keys import parse_keys
from tests.conftest import DOMAIN_YAML
from tests.test_encryption import ENV, K1, track
from tests.test_rotation import endpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = 86400.0


# ------------------------------------------------------------------- helpers

def store_config(backend: Any, tmp_path: Any, **extra: Any) -> Dict[str, Any]:
    """The tracker_store block the CLI reads (``endpoints()``), as store kwargs:
    the test's stores and the commands work on the same storage."""
    with open(endpoints(backend, tmp_path, **extra)) as handle:
        block = yaml.safe_load(handle)["tracker_store"]
    del block["type"]
    block["host"] = block.pop("url")
    return block


def open_store(backend: Any, domain: Any, tmp_path: Any, keys: Optional[str],
               **extra: Any) -> PersistentTrackerStore:
    environ = {ENV: keys} if keys else {}
    return track(backend, PersistentTrackerStore(
        domain, environ=environ, **store_config(backend, tmp_path, **extra)))


async def turn(store: PersistentTrackerStore, cid: str, mark: str, i: int,
               at: Optional[float] = None) -> DialogueStateTracker:
    """One turn whose text and slot value carry ``mark`` (findable in plaintext)."""
    tracker = await store.retrieve(cid)
    if tracker is None:
        tracker = DialogueStateTracker(cid, store.domain.slots)
        tracker.update(ActionExecuted("action_listen", timestamp=at))
    tracker.update(UserUttered(f"text-{mark}-{i}", {"name": "inform", "confidence": 1.0},
                               timestamp=at))
    tracker.update(ActionExecuted("utter_greet", timestamp=at))
    tracker.update(BotUttered(f"reply-{mark}-{i}", timestamp=at))
    tracker.update(SlotSet("name", f"slot-{mark}-{i}", timestamp=at))
    tracker.update(ActionExecuted("action_listen", timestamp=at))
    await store.save(tracker)
    return tracker


def _text(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


def stored_bytes(backend: Any, tmp_path: Any, own: bool = False) -> bytes:
    """Everything stored: every Redis key of the database and its value (only
    this test's, with ``own``: other tests may share the server), every row of
    every table (reflected), as bytes."""
    chunks: List[bytes] = []
    if backend.kind == "real":
        client = backend.redis_client()
        for key in sorted(client.scan_iter(match=f"{backend.prefix}:*" if own else None,
                                           count=1000)):
            chunks.append(key)
            kind = client.type(key)
            if kind == b"string":
                chunks.append(client.get(key) or b"")
            elif kind == b"hash":
                for field, value in client.hgetall(key).items():
                    chunks += [field, value]
            elif kind == b"list":
                chunks += client.lrange(key, 0, -1)
            elif kind == b"set":
                chunks += list(client.smembers(key))
            elif kind == b"zset":
                chunks += client.zrange(key, 0, -1)
            elif kind == b"stream":
                chunks += [_text(entry) for entry in client.xrange(key)]
        client.close()
        engines = [backend.engine()]
    else:
        engines = [sa.create_engine(f"sqlite:///{tmp_path}/{name}")
                   for name in ("hot.sqlite3", "events.sqlite3")]
    for engine in engines:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                # Raw rows: the embedded file keeps text in BLOB columns.
                for row in conn.exec_driver_sql(f'SELECT * FROM "{table.name}"'):
                    chunks.append(table.name.encode() + b": " + b" | ".join(
                        _text(v) for v in row))
        engine.dispose()
    return b"\n".join(chunks)


def traces(cid: str, mark: str, keys: Optional[str], plaintext: bool) -> List[bytes]:
    """What must not be found of conversation ``cid`` once it is erased."""
    needles = [cid.encode()]
    if keys:
        keyring = parse_keys(keys, "test")
        needles.append(ConversationIds(HASHED, keyring.derived(PURPOSE))(cid).encode())
    if plaintext:
        needles += [f"text-{mark}".encode(), f"slot-{mark}".encode(),
                    f"reply-{mark}".encode()]
    return needles


async def run_cli(capsys: Any, *argv: str) -> "tuple[int, str, str]":
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def rows_of(backend: Any, tmp_path: Any, cid: str) -> List[tuple]:
    """The conversation's log rows and snapshot, every column."""
    engine = (backend.engine() if backend.kind == "real"
              else sa.create_engine(f"sqlite:///{tmp_path}/events.sqlite3"))
    meta = sa.MetaData()
    meta.reflect(engine, only=["rpt_events", "rpt_snapshots"])
    try:
        with engine.connect() as conn:
            return [tuple(r) for t in ("rpt_events", "rpt_snapshots") for r in conn.execute(
                sa.select(meta.tables[t]).where(meta.tables[t].c.conversation_id == cid)
                .order_by(*meta.tables[t].primary_key.columns))]
    finally:
        engine.dispose()


def hot_bytes(backend: Any, tmp_path: Any, cid: str) -> Any:
    """The conversation's hot record, as stored."""
    if backend.kind == "real":
        client = backend.redis_client()
        try:
            return client.hgetall(KeyNames(backend.prefix).record(cid))
        finally:
            client.close()
    engine = sa.create_engine(f"sqlite:///{tmp_path}/hot.sqlite3")
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT version, payload FROM rpt_hot WHERE "
                                        "conversation_id=:c"), {"c": cid}).all()
    finally:
        engine.dispose()


async def quarantine_record(backend: Any, store: PersistentTrackerStore, cid: str) -> None:
    """Overwrite the live record with garbage; the next read quarantines it."""
    if backend.kind == "fake":
        store._hot._conn.execute("UPDATE rpt_hot SET payload='garbage' WHERE conversation_id=?",
                                 (cid,))
    else:
        client = backend.redis_client()
        client.hset(KeyNames(backend.prefix).record(cid), "d", "garbage")
        client.close()
    assert await store.retrieve(cid) is not None  # resumed from the snapshot


# --------------------------------------------------------------------- erase

@pytest.mark.parametrize("keys", [None, K1], ids=["plaintext", "encrypted"])
async def test_erase_leaves_no_byte_of_the_conversation(backend, domain, tmp_path, capsys,
                                                       monkeypatch, keys):
    victim, keeper = f"+49170{uuid.uuid4().int % 10**7:07d}", f"keep-{uuid.uuid4().hex[:8]}"
    mark, keep_mark = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
    extra = {"log_conversation_ids": "hashed"} if keys else {}
    store = open_store(backend, domain, tmp_path, keys, **extra)
    for i in range(3):
        await turn(store, victim, mark, i)
        await turn(store, keeper, keep_mark, i)
    await store.flush()
    await quarantine_record(backend, store, victim)
    await store.close()
    # Turns its outbox still holds: a store that delivers only after 60 s.
    slow = open_store(backend, domain, tmp_path, keys, outbox_linger=60, **extra)
    await turn(slow, victim, mark, 3)
    keeper_before = (await rows_of(backend, tmp_path, keeper), hot_bytes(backend, tmp_path, keeper))
    before = stored_bytes(backend, tmp_path)
    needles = traces(victim, mark, keys, plaintext=not keys)
    assert needles[0] in before, "the oracle finds the conversation"
    if not keys:
        assert all(n in before for n in needles)

    monkeypatch.setenv(ENV, keys or "")
    if not keys:
        monkeypatch.delenv(ENV)
    path = endpoints(backend, tmp_path, **extra)
    # Encrypted, with hashed log ids: the request names it as a log line does.
    given = needles[1].decode() if keys else victim
    code, out, err = await run_cli(capsys, "erase", given, "--endpoints", path)
    assert code == 0, out + err
    assert f"erased '{victim}': hot record 1, outbox entries 1, quarantined copies 1, " \
           f"log rows 16, snapshot 1" in out, out
    assert out.strip().splitlines()[-1] == (
        "erase: erased 1 conversation(s) (hot record 1, outbox entries 1, quarantined "
        "copies 1, log rows 16, snapshot 1)")

    await slow.close()  # its deliverer finds nothing left to deliver
    after = stored_bytes(backend, tmp_path)
    found = [n for n in needles if n in after]
    assert not found, found
    assert (await rows_of(backend, tmp_path, keeper), hot_bytes(backend, tmp_path, keeper)) \
        == keeper_before

    # The sender's next message starts a new conversation that works normally.
    fresh = open_store(backend, domain, tmp_path, keys, **extra)
    assert await fresh.retrieve(victim) is None
    await turn(fresh, victim, "again", 0)
    await turn(fresh, victim, "again", 1)
    await fresh.flush()
    tracker = await fresh.retrieve(victim)
    assert tracker.get_slot("name") == "slot-again-1"
    texts = [e.text for e in tracker.events if isinstance(e, UserUttered)]
    assert texts == ["text-again-0", "text-again-1"]
    full = await fresh.retrieve_full_tracker(victim)
    assert [e.text for e in full.events if isinstance(e, UserUttered)] == texts
    assert mark.encode() not in stored_bytes(backend, tmp_path)


async def test_erase_dry_run_and_an_unknown_id(backend, domain, tmp_path, capsys):
    store = open_store(backend, domain, tmp_path, None)
    await turn(store, "dry", "drymark", 0)
    await store.flush()
    await store.close()
    path = endpoints(backend, tmp_path)
    rows = await rows_of(backend, tmp_path, "dry")
    code, out, err = await run_cli(capsys, "erase", "dry", "--dry-run", "--endpoints", path)
    assert code == 0, out + err
    assert "would erase 'dry': hot record 1, outbox entries 0, quarantined copies 0, " \
           "log rows 6, snapshot 1" in out
    assert "dry run, nothing removed" in out
    assert await rows_of(backend, tmp_path, "dry") == rows and hot_bytes(backend, tmp_path, "dry")

    code, out, err = await run_cli(capsys, "erase", "nobody-here", "dry", "--endpoints", path)
    assert code == 1, out + err
    assert "'nobody-here': nothing found" in out
    assert "erased 'dry'" in out
    assert out.strip().splitlines()[-1].endswith("; 1 not found")
    assert await rows_of(backend, tmp_path, "dry") == []


async def test_a_stale_tracker_never_overwrites_the_new_conversation(backend, domain, tmp_path,
                                                                     capsys, caplog):
    store = open_store(backend, domain, tmp_path, None)
    for i in range(3):
        await turn(store, "stale", "old", i)
    stale = await store.retrieve("stale")
    code, out, err = await run_cli(capsys, "erase", "stale", "--endpoints",
                                   endpoints(backend, tmp_path))
    assert code == 0, out + err
    # The erased conversation's tracker: dropped with a warning, nothing written.
    stale.update(UserUttered("text-old-late", {"name": "inform", "confidence": 1.0}))
    await store.save(stale)
    assert "was erased after this tracker was read" in caplog.text
    assert await store.retrieve("stale") is None
    # The new conversation is past the stale tracker's version: still refused.
    for i in range(3):
        await turn(store, "stale", "new", i)
    with pytest.raises(ConcurrentSaveError):
        await store.save(stale)
    await store.flush()
    assert b"text-old" not in stored_bytes(backend, tmp_path)
    tracker = await store.retrieve("stale")
    assert [e.text for e in tracker.events if isinstance(e, UserUttered)] == [
        f"text-new-{i}" for i in range(3)]


RACER = textwrap.dedent("""
    import asyncio, json, logging, sys
    from rasa.shared.core.domain import Domain
    from rasa.shared.core.events import UserUttered
    from rasa_persistent_tracker import PersistentTrackerStore

    def wait(what):
        print(what, flush=True)
        assert sys.stdin.readline().strip() == "go"

    async def main(mode, cid, config):
        logging.basicConfig(level=logging.WARNING)
        store = PersistentTrackerStore(Domain.from_yaml(sys.argv[4]), **config)
        loop, delivered = asyncio.get_running_loop(), asyncio.Event()
        if mode == "deliver":
            real = store._log.sync.deliver
            def deliver(*args):  # the rows were read from the outbox before the erasure
                wait("delivering")  # in the SQL worker thread: the loop runs on
                try:
                    return real(*args)
                finally:
                    loop.call_soon_threadsafe(delivered.set)
            store._log.sync.deliver = deliver
        tracker = await store.retrieve(cid)
        if mode == "save":
            wait("read")
        tracker.update(UserUttered("text-racemark-late", {"name": "inform", "confidence": 1}))
        await store.save(tracker)
        if mode == "deliver":
            await delivered.wait()  # the background delivery, after the erasure
        await store.close()
        print("done", flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
""")


def start_racer(tmp_path: Any, mode: str, cid: str, config: Dict[str, Any]) -> Any:
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore"}
    env.pop(ENV, None)
    return subprocess.Popen([sys.executable, str(script), mode, cid, json.dumps(config),
                             DOMAIN_YAML], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


async def expect_line(process: Any, wanted: str) -> None:
    # Generous: a loaded CI machine starts Rasa in a new process slowly.
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 300)
    if line.strip() != wanted:
        process.kill()
        raise AssertionError(f"racer said {line!r}, not {wanted!r}: {process.stderr.read()}")


async def go(process: Any) -> None:
    process.stdin.write("go\n")
    process.stdin.flush()


@pytest.mark.parametrize("mode", ["save", "deliver"])
async def test_erase_races_another_process(backend, domain, tmp_path, capsys, mode):
    """save: another process read the tracker before the erasure and saves after it.
    deliver: another process read outbox rows before the erasure and writes them
    to SQL after it. Either way nothing comes back."""
    cid = f"race-{mode}-{uuid.uuid4().hex[:6]}"
    store = open_store(backend, domain, tmp_path, None)
    for i in range(2):
        await turn(store, cid, "racemark", i)
    await store.flush()
    await store.close()
    racer = start_racer(tmp_path, mode, cid, store_config(backend, tmp_path))
    try:
        await expect_line(racer, "read" if mode == "save" else "delivering")
        code, out, err = await run_cli(capsys, "erase", cid, "--endpoints",
                                       endpoints(backend, tmp_path))
        assert code == 0, out + err
        await go(racer)
        await expect_line(racer, "done")
        stderr = racer.stderr.read()
    finally:
        racer.kill()
        racer.wait()
    assert racer.returncode in (0, -9), stderr
    expected = ("was erased after this tracker was read" if mode == "save"
                else "were erased after these rows were queued")
    assert expected in stderr, stderr
    found = [n for n in traces(cid, "racemark", None, True) if n in stored_bytes(backend,
                                                                                  tmp_path)]
    assert not found, found
    fresh = open_store(backend, domain, tmp_path, None)
    assert await fresh.retrieve(cid) is None


# --------------------------------------------------------------------- purge

async def make_conversations(backend: Any, domain: Any, tmp_path: Any,
                             old: List[str], recent: List[str]) -> None:
    store = open_store(backend, domain, tmp_path, None)
    long_ago = time.time() - 100 * DAY
    for cid in old:
        await turn(store, cid, f"m{cid}", 0, at=long_ago)
    for cid in recent:
        await turn(store, cid, f"m{cid}", 0, at=long_ago)
        await turn(store, cid, f"m{cid}", 1)
    await store.flush()
    await store.close()


async def test_purge_erases_only_inactive_conversations(backend, domain, tmp_path, capsys):
    tag = uuid.uuid4().hex[:6]
    old = [f"old-{tag}-{i}" for i in range(5)]
    recent = [f"new-{tag}-{i}" for i in range(2)]
    await make_conversations(backend, domain, tmp_path, old, recent)
    path = endpoints(backend, tmp_path)
    kept = {cid: (await rows_of(backend, tmp_path, cid), hot_bytes(backend, tmp_path, cid))
            for cid in recent}
    everything = stored_bytes(backend, tmp_path, own=True)

    code, out, err = await run_cli(capsys, "purge", "--inactive-for", "90d", "--dry-run",
                                   "--endpoints", path)
    assert code == 0, out + err
    assert out.count("would erase 'old-") == 5 and "new-" not in out
    assert stored_bytes(backend, tmp_path, own=True) == everything

    code, out, err = await run_cli(capsys, "purge", "--inactive-for", "90d", "--batch", "2",
                                   "--endpoints", path)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1].startswith(
        "purge (inactive for 90d): erased 5 conversation(s) (hot record 5, outbox entries 0, "
        "quarantined copies 0, log rows 30, snapshot 5)")
    after = stored_bytes(backend, tmp_path)
    assert not [cid for cid in old if cid.encode() in after]
    for cid in recent:
        assert (await rows_of(backend, tmp_path, cid), hot_bytes(backend, tmp_path, cid)) \
            == kept[cid]
    code, out, err = await run_cli(capsys, "purge", "--inactive-for", "90d",
                                   "--endpoints", path)
    assert code == 0 and "erased 0 conversation(s)" in out


async def test_a_bad_duration_is_named(capsys, tmp_path):
    for bad in ("90", "3w", "-1d", "0d", "ninety"):
        code, out, err = await run_cli(capsys, "purge", f"--inactive-for={bad}",
                                       "--endpoints", str(tmp_path / "none.yml"))
        assert code == 2, (bad, out, err)
        assert f"--inactive-for {bad!r} is not a duration" in err


async def test_an_interrupted_purge_resumes(backend, domain, tmp_path):
    tag = uuid.uuid4().hex[:6]
    old = [f"old-{tag}-{i}" for i in range(4)]
    await make_conversations(backend, domain, tmp_path, old, [f"new-{tag}"])
    path = endpoints(backend, tmp_path)

    def stop_after_first_batch(_erasures: Any) -> None:
        raise KeyboardInterrupt  # as a kill after the first batch would

    backends = load_endpoint_backends(path)
    raw = RawHotAccess(backends.config, None if backend.kind == "fake" else
                       __import__("redis.asyncio", fromlist=["x"]).from_url(backend.redis_url))
    try:
        with pytest.raises(KeyboardInterrupt):
            await Eraser(backends, raw).purge(90 * DAY, 1, report=stop_after_first_batch)
        left = [cid for cid in old if await rows_of(backend, tmp_path, cid)]
        assert len(left) == 3
        totals = await Eraser(backends, raw).purge(90 * DAY, 1)
        assert totals.erased == 3
        assert not [cid for cid in old if cid.encode() in stored_bytes(backend, tmp_path)]
        assert await rows_of(backend, tmp_path, f"new-{tag}")
    finally:
        await raw.close()
        await backends.outbox.stop()
        await backends.hot.close()
        backends.log.close()


async def test_purge_racing_a_live_turn(backend, domain, tmp_path, caplog):
    """Documented semantics: a turn committed before the erasure's atomic step
    keeps its conversation (purge skips it); a turn whose save comes after it
    is refused like any late write, and the next message starts fresh."""
    tag = uuid.uuid4().hex[:6]
    kept, gone = f"kept-{tag}", f"gone-{tag}"
    await make_conversations(backend, domain, tmp_path, [kept, gone], [])
    path = endpoints(backend, tmp_path)
    store = open_store(backend, domain, tmp_path, None)
    in_flight = await store.retrieve(gone)  # a turn of 'gone' is being handled

    backends = load_endpoint_backends(path)
    real_erase = backends.hot.erase

    async def erase(cid: str, *args: Any, **kwargs: Any) -> Any:
        if cid == kept:  # selected as inactive, then a new turn arrives
            await turn(store, kept, "live", 1)
        return await real_erase(cid, *args, **kwargs)

    backends.hot.erase = erase
    raw = RawHotAccess(backends.config, None if backend.kind == "fake" else
                       __import__("redis.asyncio", fromlist=["x"]).from_url(backend.redis_url))
    try:
        totals = await Eraser(backends, raw).purge(90 * DAY, 10)
    finally:
        await raw.close()
        await backends.outbox.stop()
        await backends.hot.close()
        backends.log.close()
    assert (totals.erased, totals.skipped) == (1, 1)
    tracker = await store.retrieve(kept)  # the new turn is not lost
    assert tracker.get_slot("name") == "slot-live-1"
    in_flight.update(UserUttered("late", {"name": "inform", "confidence": 1.0}))
    await store.save(in_flight)  # refused: 'gone' was erased after it was read
    assert "was erased after this tracker was read" in caplog.text
    assert await store.retrieve(gone) is None
    await turn(store, gone, "fresh", 0)
    assert (await store.retrieve(gone)).get_slot("name") == "slot-fresh-0"


async def test_a_restore_from_sql_read_before_the_erasure_is_refused(backend, domain, tmp_path):
    """Between the erasure's hot step and its SQL step, a retrieve finds the
    record gone and SQL still full: restoring from the snapshot, or from the
    log without one, must not bring the conversation back."""
    store = open_store(backend, domain, tmp_path, None)
    for cid in ("from-snapshot", "from-log"):
        await turn(store, cid, "restoremark", 0)
    await store.flush()
    engine = (backend.engine() if backend.kind == "real"
              else sa.create_engine(f"sqlite:///{tmp_path}/events.sqlite3"))
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM rpt_snapshots WHERE conversation_id='from-log'"))
    engine.dispose()
    for cid in ("from-snapshot", "from-log"):
        assert (await store._hot.erase(cid, 0, DAY)).floor  # the hot step only
        assert await store.retrieve(cid) is None
        assert (await store._hot.load(cid)).payload is None
        assert await rows_of(backend, tmp_path, cid)  # SQL's step is still to come
