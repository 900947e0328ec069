"""``purge`` on the partitioned log drops whole months (issue 17), on real
Redis + PostgreSQL.

A month's rows are written as the store writes any rows (turns delivered
from the outbox) while the log's clock is set to that month (``clock_at``:
``log_month``'s default, as the month turning would), with event times 100
days back; ``--inactive-for 90d`` then finds them inactive. The oracle: the
month's partition and its conversations' rows are gone, their tombstones
are there (SQL and hot state: they cannot come back), every other row and
snapshot is unchanged, byte for byte, and a conversation that cannot go
whole keeps its month, whose erased conversations go row by row.
"""
import os
import random
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.admin.endpoints_file import load_endpoint_backends
from rasa_persistent_tracker.admin.erasing import Eraser
from rasa_persistent_tracker.admin.raw_access import RawHotAccess
from rasa_persistent_tracker.log import partitions, retention
from rasa_persistent_tracker.log.event_log import SQLEventLog
from rasa_persistent_tracker.log.tables import LOG_MONTH_NOW
from tests.conftest import Backend
from tests.test_erase import DAY, open_store, run_cli, stored_bytes, turn
from tests.test_partitions import _schema_engine, clock_at, insert, placed
from tests.test_rotation import endpoints

pytestmark = pytest.mark.real

OLD = 100 * DAY


@pytest.fixture
async def real(tmp_path: Any) -> Any:
    """Real Redis + PostgreSQL (skipped locally without them, failed in CI)."""
    pair = Backend("real", str(tmp_path))
    yield pair
    await pair.cleanup()


@pytest.fixture
def engine(real: Backend) -> Iterator[sa.engine.Engine]:
    engine = real.engine()
    yield engine
    engine.dispose()


def clock_now(engine: sa.engine.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(
            f"ALTER TABLE rpt_events ALTER COLUMN log_month SET DEFAULT {LOG_MONTH_NOW}"))


async def write_in(engine: sa.engine.Engine, store: Any, month: Optional[int],
                   conversations: Dict[str, Optional[float]]) -> None:
    """One turn of each conversation (events at the time given, None: now),
    logged in ``month`` (None: the current month)."""
    if month is None:
        clock_now(engine)
    else:
        clock_at(engine, month)
    for cid, at in conversations.items():
        await turn(store, cid, f"m{cid}", 0, at=at)
    await store.flush()
    clock_now(engine)


def rows_outside(engine: sa.engine.Engine, *names: str) -> List[tuple]:
    """Every row of the log outside the partitions ``names``, and every
    snapshot, as stored (all columns), in a fixed order."""
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(sa.text(
            "SELECT tableoid::regclass::text, * FROM rpt_events "
            "WHERE tableoid::regclass::text <> ALL(:names) ORDER BY conversation_id, seq"),
            {"names": list(names)})]
        return rows + [tuple(r) for r in conn.execute(sa.text(
            "SELECT * FROM rpt_snapshots ORDER BY conversation_id"))]


def exists(engine: sa.engine.Engine, name: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None


def this_month(engine: sa.engine.Engine) -> int:
    with engine.connect() as conn:
        return partitions.current_month(conn)


class Purger:
    """``Eraser.purge`` on the endpoints file of ``real``, as the CLI opens it."""

    def __init__(self, real: Backend, tmp_path: Any) -> None:
        self.backends = load_endpoint_backends(endpoints(real, tmp_path))
        self.raw = RawHotAccess(self.backends.config, aioredis.from_url(real.redis_url))

    async def purge(self, batch: int = 10) -> Any:
        return await Eraser(self.backends, self.raw).purge(90 * DAY, batch)

    async def close(self) -> None:
        await self.raw.close()
        await self.backends.outbox.stop()
        await self.backends.hot.close()
        self.backends.log.close()


async def test_purge_drops_a_month_whose_conversations_are_all_inactive(
        real, engine, domain, tmp_path, capsys):
    store = open_store(real, domain, tmp_path, None)
    partitions.ensure_partitions(engine, months_ahead=2, month=202412)
    long_ago = time.time() - OLD
    await write_in(engine, store, 202501, {"old-a": long_ago, "old-b": long_ago})
    await write_in(engine, store, 202502, {"kept": long_ago, "goes-on": long_ago})
    await write_in(engine, store, None, {"goes-on": None, "recent": None})
    path = endpoints(real, tmp_path)
    everything = stored_bytes(real, tmp_path, own=True)

    code, out, err = await run_cli(capsys, "purge", "--inactive-for", "90d", "--dry-run",
                                   "--endpoints", path)
    assert code == 0, out + err
    assert "would drop partition rpt_events_p202501 (12 rows of 2 conversation(s), " \
           "all inactive)" in out, out
    assert "kept partition rpt_events_p202502: 1 conversation(s) with rows in another " \
           "partition" in out, out
    assert out.count("would erase 'old-") == 2 and "would erase 'kept'" in out
    assert out.strip().splitlines()[-1].endswith(
        "would drop 2 month partition(s) (rpt_events_p202412: 0 rows, rpt_events_p202501: "
        "12 rows); dry run, nothing removed")
    assert stored_bytes(real, tmp_path, own=True) == everything
    assert exists(engine, "rpt_events_p202412") and exists(engine, "rpt_events_p202501")

    others = rows_outside(engine, "rpt_events_p202501", "rpt_events_p202502")
    kept_month = [r for r in rows_outside(engine) if r[0] == "rpt_events_p202502"]
    dropped_before = metrics.DROPPED_PARTITIONS._value.get()
    code, out, err = await run_cli(capsys, "purge", "--inactive-for", "90d",
                                   "--endpoints", path)
    assert code == 0, out + err
    assert "dropped partition rpt_events_p202501 (12 rows of 2 conversation(s), " \
           "all inactive)" in out, out
    assert "dropped partition rpt_events_p202412 (0 rows" in out
    assert out.strip().splitlines()[-1] == (
        "purge (inactive for 90d): erased 3 conversation(s) (hot record 3, outbox entries 0, "
        "quarantined copies 0, log rows 18, snapshot 3); dropped 2 month partition(s) "
        "(rpt_events_p202412: 0 rows, rpt_events_p202501: 12 rows)")
    assert metrics.DROPPED_PARTITIONS._value.get() == dropped_before + 2

    # The month is gone, the rest is untouched, byte for byte: the other
    # months (but 'kept', erased row by row from 202502) and every snapshot
    # but the erased conversations'.
    assert not exists(engine, "rpt_events_p202501") and not exists(engine, "rpt_events_p202412")
    erased = ("old-a", "old-b", "kept")
    assert rows_outside(engine, "rpt_events_p202502") == [r for r in others
                                                          if r[0] not in erased]
    assert [r for r in rows_outside(engine) if r[0] == "rpt_events_p202502"] == [
        r for r in kept_month if r[2] != "kept"]
    assert {p.name for p in partitions.list_partitions(engine)} >= {
        "rpt_events_p202502", partitions.partition_name(this_month(engine)),
        "rpt_events_default"}
    after = stored_bytes(real, tmp_path, own=True)
    assert not [cid for cid in erased if f"m{cid}".encode() in after]

    # Tombstones: in SQL, and in the hot state (the record does not come back).
    log = SQLEventLog(engine)
    assert all(log.erased_floor(cid) for cid in erased)
    assert await store.retrieve("old-a") is None
    # The sender's next message starts a new conversation, numbered from 1,
    # in this month: nothing of the dropped month is under its id.
    await turn(store, "old-a", "again", 0)
    await store.flush()
    rows = placed(engine, "old-a")
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert {r[1] for r in rows} == {partitions.partition_name(this_month(engine))}


async def test_a_month_stays_while_a_conversation_in_it_goes_on(real, engine, domain, tmp_path,
                                                                capsys):
    """Rows in another month (inactive or not), a client's NaN time, and the
    default partition keep a month; its erased conversations go row by row.
    A later purge drops the months they emptied."""
    store = open_store(real, domain, tmp_path, None)
    partitions.ensure_partitions(engine, months_ahead=4, month=202501)
    long_ago = time.time() - OLD
    await write_in(engine, store, 202501, {"spans": long_ago, "alone-1": long_ago})
    await write_in(engine, store, 202502, {"spans": long_ago, "alone-2": long_ago})
    await write_in(engine, store, 202503, {"active": long_ago})
    await write_in(engine, store, None, {"active": None})
    await write_in(engine, store, 202401, {"in-default": long_ago})  # no partition
    insert(engine, "null-time", 1, 202504)  # no time: as old as can be
    insert(engine, "nan-time", 1, 202505)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE rpt_events SET timestamp = 'NaN' "
                             "WHERE conversation_id = 'nan-time'"))
    active_before = placed(engine, "active")
    code, out, err = await run_cli(capsys, "purge", "--inactive-for", "90d",
                                   "--endpoints", endpoints(real, tmp_path))
    assert code == 0, out + err
    for month in (202501, 202502):
        assert f"kept partition rpt_events_p{month}: 1 conversation(s) with rows in another " \
               f"partition" in out, out
    assert "kept partition rpt_events_p202503: 1 conversation(s) with rows in another " \
           "partition" in out
    assert "kept partition rpt_events_p202505: events after the cut-off" in out
    assert "dropped partition rpt_events_p202504 (1 rows of 1 conversation(s)" in out
    assert "rpt_events_default" not in out
    for cid in ("spans", "alone-1", "alone-2", "in-default", "null-time"):
        assert placed(engine, cid) == [], cid
    assert placed(engine, "active") == active_before
    assert len(placed(engine, "nan-time")) == 1  # never inactive, as purge has it
    assert all(exists(engine, f"rpt_events_p{m}") for m in (202501, 202502, 202503, 202505))
    assert exists(engine, "rpt_events_default")

    code, out, err = await run_cli(capsys, "purge", "--inactive-for", "90d",
                                   "--endpoints", endpoints(real, tmp_path))
    assert "dropped partition rpt_events_p202501 (0 rows" in out
    assert "dropped partition rpt_events_p202502 (0 rows" in out
    assert exists(engine, "rpt_events_p202503")  # 'active' is still there


async def test_a_turn_during_the_months_erasure_keeps_the_month(real, engine, domain,
                                                                 tmp_path):
    """A conversation of the month gets a turn between the plan and its hot
    erasure: it is skipped (its turn kept), the month stays, and the
    others are erased row by row."""
    store = open_store(real, domain, tmp_path, None)
    partitions.ensure_partitions(engine, months_ahead=0, month=202501)
    long_ago = time.time() - OLD
    await write_in(engine, store, 202501, {"kept": long_ago, "gone": long_ago})
    purger = Purger(real, tmp_path)
    real_erase = purger.backends.hot.erase

    async def erase(cid: str, *args: Any, **kwargs: Any) -> Any:
        if cid == "kept":
            await turn(store, "kept", "live", 1)
        return await real_erase(cid, *args, **kwargs)

    purger.backends.hot.erase = erase
    try:
        totals = await purger.purge()
    finally:
        await purger.close()
    assert [(m.name, m.dropped, m.reason) for m in totals.months] == [
        ("rpt_events_p202501", False, "1 conversation(s) active again")]
    assert (totals.erased, totals.skipped) == (1, 1)
    assert placed(engine, "gone") == [] and placed(engine, "kept")
    assert (await store.retrieve("kept")).get_slot("name") == "slot-live-1"
    assert exists(engine, "rpt_events_p202501")


async def test_an_interrupted_month_purge_resumes(real, engine, domain, tmp_path,
                                                  monkeypatch):
    """Killed while erasing the month's conversations in the hot state, then
    just before the drop: each rerun picks up, the third drops the month."""
    store = open_store(real, domain, tmp_path, None)
    partitions.ensure_partitions(engine, months_ahead=0, month=202501)
    long_ago = time.time() - OLD
    ids = [f"c{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    await write_in(engine, store, 202501, {cid: long_ago for cid in ids})
    await store.close()
    purger = Purger(real, tmp_path)
    real_erase, calls = purger.backends.hot.erase, []

    async def killed_on_second(cid: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(cid)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would
        return await real_erase(cid, *args, **kwargs)

    purger.backends.hot.erase = killed_on_second
    try:
        with pytest.raises(KeyboardInterrupt):
            await purger.purge(batch=1)
        purger.backends.hot.erase = real_erase
        assert all(placed(engine, cid) for cid in ids)  # SQL's step not reached
        real_drop = retention.drop

        def killed(*_args: Any) -> str:
            raise RuntimeError("killed before the drop")
        monkeypatch.setattr(retention, "drop", killed)
        with pytest.raises(RuntimeError, match="killed"):
            await purger.purge(batch=1)
        assert exists(engine, "rpt_events_p202501")
        monkeypatch.setattr(retention, "drop", real_drop)
        totals = await purger.purge(batch=1)
    finally:
        await purger.close()
    assert [(m.name, m.dropped) for m in totals.months] == [("rpt_events_p202501", True)]
    assert totals.erased == 3
    assert not exists(engine, "rpt_events_p202501")
    log = SQLEventLog(engine)
    assert all(log.erased_floor(cid) for cid in ids)
    assert not [cid for cid in ids if f"m{cid}".encode() in stored_bytes(real, tmp_path,
                                                                          own=True)]


@pytest.fixture
def bare() -> Iterator[sa.engine.Engine]:
    """A migrated log in a schema of its own, no store."""
    for engine in _schema_engine():
        SQLEventLog(engine).migrate()
        yield engine


def test_a_delivery_that_checked_the_tombstones_before_the_drop_keeps_the_month(bare):
    """A deliverer read 'c' has no tombstone, then the drop starts: the drop
    waits for it (``rpt_erased`` locked), sees its row in this month and
    leaves the month, writing nothing; without it the month goes and a late
    delivery is refused by the tombstone."""
    log = SQLEventLog(bare)
    partitions.ensure_partitions(bare, months_ahead=0, month=202501)
    for cid in ("c", "d"):
        insert(bare, cid, 1, 202501)
    month = {m.name: m for m in retention.plan(bare, time.time())}["rpt_events_p202501"]
    assert (month.reason, month.conversation_ids, month.rows) == ("", ("c", "d"), 2)
    deliverer = bare.connect()
    transaction = deliverer.begin()
    assert log.erasure.guard(deliverer, ["c"]) == {}
    outcome: List[str] = []
    dropper = threading.Thread(target=lambda: outcome.append(retention.drop(
        bare, log.erasure, month, time.time(), {"c": 3, "d": 3})))
    dropper.start()
    dropper.join(1)
    assert dropper.is_alive()  # waiting for the deliverer
    deliverer.execute(sa.text("INSERT INTO rpt_events (conversation_id, seq, type_name, data) "
                              "VALUES ('c', 2, 'user', 'late')"))
    transaction.commit()
    deliverer.close()
    dropper.join(10)
    assert outcome == ["1 conversation(s) with rows in another partition"]
    assert exists(bare, "rpt_events_p202501") and log.erased_floor("c") is None

    with bare.begin() as conn:
        conn.execute(sa.text("DELETE FROM rpt_events WHERE seq = 2"))
    assert retention.drop(bare, log.erasure, month, time.time(), {"c": 3, "d": 3}) == ""
    assert not exists(bare, "rpt_events_p202501")
    assert log.erased_floor("c") == 3 and log.erased_floor("d") == 3
    _, refused = log.deliver({"c": [{"seq": 1, "type_name": "user", "timestamp": None,
                                     "intent_name": None, "action_name": None,
                                     "data": "queued before"}]}, {}, versions={"c": 2})
    assert refused == {"c"} and placed(bare, "c") == []
    # The plan never offers the current month, the months ahead or the default.
    now = this_month(bare)
    insert(bare, "e", 1, now)
    insert(bare, "f", 1, 202001)  # no partition: the default one
    partitions.ensure_partitions(bare, months_ahead=0, month=202412)
    insert(bare, "g", 1, 202412)
    planned = retention.plan(bare, time.time() + 10 * DAY)
    assert [(m.name, m.reason) for m in planned] == [("rpt_events_p202412", "")]


def test_sqlite_has_no_months_to_drop(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/log.sqlite3")
    SQLEventLog(engine).migrate()
    assert retention.plan(engine, time.time()) == []
    engine.dispose()


# ------------------------------------------------ generated layouts of the log

PAST = [202501, 202502, 202503, 202504]
NO_PARTITION = 202412  # its rows go to the default partition
OLD_TIME, NEW_TIME = "old", "new"


def layout(rng: random.Random, now_month: int) -> Dict[str, List[tuple]]:
    """Conversation -> its rows (seq, log month, time), as purge may find a
    log: one to three months each (past ones, the default partition's, this
    month), event times old, recent, missing or NaN."""
    months = PAST + [NO_PARTITION, now_month]
    found: Dict[str, List[tuple]] = {}
    for n in range(rng.randint(1, 7)):
        first = rng.randrange(len(PAST))
        spans = sorted({PAST[first]} | {rng.choice(months) for _ in range(rng.choice(
            [0, 0, 0, 1, 2]))})
        rows, seq = [], 0
        for month in spans:
            for _ in range(rng.randint(1, 3)):
                seq += 1
                rows.append((seq, month, rng.choices(
                    [OLD_TIME, NEW_TIME, None, "NaN"], [12, 3, 1, 1])[0]))
        found[f"g{n}-\u00e9'{rng.randrange(1000)}"] = rows  # quotes, non-ASCII
    return found


def inactive(rows: List[tuple]) -> bool:
    """purge's test: newest coalesce(time, 0) before the cut-off (NaN never)."""
    return all(t in (OLD_TIME, None) for _, _, t in rows)


def expected_drops(log: Dict[str, List[tuple]]) -> List[str]:
    """Past months with rows whose conversations are all inactive and in no
    other partition (the default partition counts as one)."""
    drops = []
    for month in PAST:
        here = [cid for cid, rows in log.items() if any(m == month for _, m, _ in rows)]
        if all(inactive(log[cid]) and {m for _, m, _ in log[cid]} == {month} for cid in here):
            drops.append(partitions.partition_name(month))
    return drops


def log_state(engine: sa.engine.Engine) -> "tuple[set, List[tuple]]":
    """(partitions, every row with its partition, as stored)."""
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(sa.text(
            "SELECT tableoid::regclass::text, conversation_id, seq, timestamp::text, data "
            "FROM rpt_events ORDER BY conversation_id, seq"))]
    return {p.name for p in partitions.list_partitions(engine)}, rows


def oracle_failures(before: "tuple[set, List[tuple]]", after: "tuple[set, List[tuple]]",
                    log: Dict[str, List[tuple]], floors: Dict[str, Optional[int]]) -> List[str]:
    """What is wrong with ``after``: the inactive conversations gone and
    tombstoned, every other row as it was, exactly the expected months gone."""
    gone = {cid for cid, rows in log.items() if inactive(rows)}
    failures = []
    drops = set(expected_drops(log))
    if after[0] != before[0] - drops:
        failures.append(f"partitions {sorted(after[0])}, expected {sorted(before[0] - drops)}")
    kept = [r for r in before[1] if r[1] not in gone]
    if after[1] != kept:
        failures.append(f"rows {after[1]}, expected {kept}")
    untombstoned = sorted(cid for cid in gone if floors.get(cid) is None)
    if untombstoned:
        failures.append(f"no tombstone for {untombstoned}")
    return failures


# A fixed set everywhere, plus one random seed (``RPT_FUZZ_SEED=<n>`` replays it).
SEEDS = [1, 2, 3, 5, 8, 13, 21, 34,
         int(os.environ.get("RPT_FUZZ_SEED") or random.randrange(10 ** 6))]


async def test_purge_of_generated_logs_drops_exactly_the_months_that_can_go(tmp_path):
    """For any layout of conversations over past months, the default
    partition and this month: purge erases exactly the inactive ones,
    drops exactly the past months whose conversations are all inactive and
    in no other partition, and leaves every other row where and as it was.
    Fixed seeds plus one random seed (named on failure); the oracle is
    shown to fail on the log before the purge (a control)."""
    for seed in SEEDS:
        rng = random.Random(seed)
        pair = Backend("real", str(tmp_path / str(seed)))
        (tmp_path / str(seed)).mkdir()
        engine = pair.engine()
        purger = None
        try:
            purger = Purger(pair, tmp_path / str(seed))  # migrates
            partitions.ensure_partitions(engine, months_ahead=len(PAST) - 1, month=PAST[0])
            log = layout(rng, this_month(engine))
            times = {OLD_TIME: time.time() - OLD, NEW_TIME: time.time(), None: None,
                     "NaN": float("nan")}
            with engine.begin() as conn:
                conn.execute(sa.text(
                    "INSERT INTO rpt_events (conversation_id, seq, type_name, timestamp, data, "
                    "log_month) VALUES (:c, :s, 'user', :t, :d, :m)"),
                    [{"c": cid, "s": seq, "t": times[t], "d": f"{cid}/{seq}", "m": month}
                     for cid, rows in log.items() for seq, month, t in rows])
            before = log_state(engine)
            sql_log = SQLEventLog(engine)
            gone = [cid for cid, rows in log.items() if inactive(rows)]
            if gone:  # the control: the oracle rejects a log where nothing happened
                assert oracle_failures(before, before, log, {}), seed
            totals = await purger.purge(batch=rng.choice([1, 2, 50]))
            floors = {cid: sql_log.erased_floor(cid) for cid in log}
            failures = oracle_failures(before, log_state(engine), log, floors)
            assert not failures, f"RPT_FUZZ_SEED={seed}: {log}\n" + "\n".join(failures)
            assert sorted(m.name for m in totals.months if m.dropped) == \
                expected_drops(log), seed
            assert totals.erased == len(gone), seed
        finally:
            if purger is not None:
                await purger.close()
            engine.dispose()
            await pair.cleanup()
