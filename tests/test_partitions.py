"""The PostgreSQL log partitioned by month (issue 17), on a real server.

Each test owns a throwaway schema. The month a row is written in is the
database clock's (``log_month``'s default); tests move that clock by setting
the column's default to a chosen month, as the month turning would.
"""
import asyncio
import contextlib
import threading
import uuid
from typing import Iterator, List

import pytest
import redis
import sqlalchemy as sa

from rasa_persistent_tracker import cli
from rasa_persistent_tracker.errors import ConcurrentSaveError, ConfigError
from rasa_persistent_tracker.log import direct, migrations, partitions
from rasa_persistent_tracker.log.event_log import SQLEventLog
from rasa_persistent_tracker.log.tables import LogRow, Snapshot, metadata_for
from tests.conftest import Backend, real_urls
from tests.dialogue import run_turns
from tests.test_schema import shape

pytestmark = pytest.mark.real


@pytest.fixture
def engine() -> Iterator[sa.engine.Engine]:
    """An engine on an empty schema of its own (not migrated)."""
    yield from _schema_engine()


def _schema_engine() -> Iterator[sa.engine.Engine]:
    url = real_urls()["sql"]
    admin = sa.create_engine(url)
    schema = f"part_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    engine = sa.create_engine(f"{url}{sep}options=-csearch_path%3D{schema}")
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def log(engine) -> SQLEventLog:
    log = SQLEventLog(engine)
    log.migrate()
    return log


def clock_at(engine: sa.engine.Engine, month: int) -> None:
    """Rows written from now on get ``log_month = month``."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE rpt_events ALTER COLUMN log_month SET DEFAULT {month}"))


def row(seq: int, data: str = None, timestamp: float = None) -> dict:
    return LogRow(seq, "user", timestamp, "greet", None, data or f"event {seq}").as_dict()


def placed(engine: sa.engine.Engine, cid: str) -> List[tuple]:
    """(seq, partition, data) of a conversation, in order."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT seq, tableoid::regclass::text, data FROM rpt_events "
            "WHERE conversation_id = :c ORDER BY seq"), {"c": cid})]


def insert(engine: sa.engine.Engine, cid: str, seq: int, month: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO rpt_events (conversation_id, seq, type_name, data, log_month) "
            "VALUES (:c, :s, 'user', 'x', :m)"), {"c": cid, "s": seq, "m": month})


def test_partitions_are_created_ahead_once(log, engine):
    # The store's start (migrate) made this month's and 3 more.
    with engine.connect() as conn:
        now = partitions.current_month(conn)
    made = [p.name for p in partitions.list_partitions(engine)]
    month, expected = now, []
    for _ in range(4):
        expected.append(partitions.partition_name(month))
        month = partitions.next_month(month)
    assert made == expected + ["rpt_events_default"]
    created = partitions.ensure_partitions(engine, months_ahead=2, month=209911)
    assert created == ["rpt_events_p209911", "rpt_events_p209912", "rpt_events_p210001"]
    assert partitions.ensure_partitions(engine, months_ahead=2, month=209911) == []
    with pytest.raises(ConfigError, match="YYYYMM"):
        partitions.ensure_partitions(engine, month=209913)


def test_a_row_lands_in_the_partition_of_the_month_it_is_written(log, engine):
    partitions.ensure_partitions(engine, months_ahead=1, month=209911)
    clock_at(engine, 209912)
    # The event's own timestamp (a client's, here from 2001) does not decide.
    log.append({"c": [row(1, timestamp=1e9)]}, {})
    assert placed(engine, "c") == [(1, "rpt_events_p209912", "event 1")]


def test_order_and_seq_are_gap_free_across_a_partition_border(log, engine):
    partitions.ensure_partitions(engine, months_ahead=1, month=209911)
    clock_at(engine, 209911)
    log.append({"c": [row(1), row(2)], "other": [row(1)]}, {})
    log.append({"c": [row(3)]}, {})
    clock_at(engine, 209912)  # the month turns between two turns
    log.append({"c": [row(4), row(5)]}, {})
    # The first turn's entry delivered again after the border: skipped.
    log.append({"c": [row(1), row(2)]}, {})
    # A turn numbered while SQL was unreachable clashes with seq 5: it goes
    # after the history, in the new month, not into a second seq 5.
    assert log.append({"c": [row(5, data="numbered offline"), row(6, data="offline 2")]},
                      {}) == 1  # the clashing row; the next follows it
    rows = placed(engine, "c")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r[1][-6:] for r in rows] == ["209911"] * 3 + ["209912"] * 4
    assert [r[2] for r in rows[-2:]] == ["numbered offline", "offline 2"]
    assert [r.seq for r in log.read("c")] == [1, 2, 3, 4, 5, 6, 7]
    assert [r.seq for r in log.read("c", after_seq=2)] == [3, 4, 5, 6, 7]
    assert log.next_seq("c") == 8


def test_a_seq_logged_in_another_partition_is_refused(log, engine):
    partitions.ensure_partitions(engine, months_ahead=1, month=209911)
    insert(engine, "c", 1, 209911)
    with pytest.raises(sa.exc.IntegrityError, match="already holds seq 1"):
        insert(engine, "c", 1, 209912)
    with pytest.raises(sa.exc.IntegrityError):
        insert(engine, "c", 1, 209911)  # the same partition: the primary key
    insert(engine, "d", 1, 209912)  # another conversation's seq 1 is fine
    # A turn saved straight to SQL (hot state down) from a stale history.
    clock_at(engine, 209912)
    stale = [LogRow(1, "user", None, None, None, "stale")]
    with pytest.raises(ConcurrentSaveError):
        direct.commit(log, "c", stale, Snapshot(2, 0, 0.0, "{}"), 0)
    assert placed(engine, "c") == [(1, "rpt_events_p209911", "x")]


def test_two_writers_of_one_seq_in_two_months_one_wins(log, engine):
    """The second writer waits for the first (the trigger's lock) and then
    finds its row, although the two rows would go to different partitions."""
    partitions.ensure_partitions(engine, months_ahead=1, month=209911)
    first = engine.connect()
    transaction = first.begin()
    first.execute(sa.text("INSERT INTO rpt_events (conversation_id, seq, type_name, data, "
                          "log_month) VALUES ('race', 1, 'user', 'first', 209911)"))
    outcome: List[BaseException] = []

    def second() -> None:
        try:
            insert(engine, "race", 1, 209912)
        except sa.exc.IntegrityError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # waiting for the first writer's lock
    transaction.commit()
    first.close()
    thread.join(10)
    assert len(outcome) == 1 and "already holds seq 1" in str(outcome[0])
    assert placed(engine, "race") == [(1, "rpt_events_p209911", "first")]


def test_a_month_without_partition_uses_the_default_until_it_is_created(log, engine):
    clock_at(engine, 209905)
    log.append({"c": [row(1), row(2)]}, {})
    assert {r[1] for r in placed(engine, "c")} == {"rpt_events_default"}
    assert partitions.ensure_partitions(engine, months_ahead=0, month=209905) == [
        "rpt_events_p209905"]
    assert {r[1] for r in placed(engine, "c")} == {"rpt_events_p209905"}
    log.append({"c": [row(3)]}, {})
    assert [r[:2] for r in placed(engine, "c")][-1] == (3, "rpt_events_p209905")
    # The moved-into partition is a full partition: keys, trigger, indexes.
    with pytest.raises(sa.exc.IntegrityError):
        insert(engine, "c", 3, 209905)


def test_the_migration_keeps_every_row(engine, monkeypatch):
    """An unpartitioned log (migrations 1-4) with rows from several months,
    and odd client timestamps, becomes the partitioned table: same rows."""
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:4])
    migrations.migrate(engine)
    monkeypatch.undo()
    old = SQLEventLog(engine)  # no partitions yet: the plain table
    stamps = [1.7e9, 1.7e9 + 40 * 86400, 1.7e9 + 80 * 86400, None, float("nan"),
              float("inf"), -5.0, 4e9]
    old.append({f"c{n}": [row(seq, data=f"{n}/{seq}", timestamp=stamps[(n + seq) % len(stamps)])
                          for seq in range(1, 6)] for n in range(40)}, {})
    columns = "id, conversation_id, seq, type_name, timestamp, intent_name, action_name, data"
    select = sa.text(f"SELECT {columns} FROM rpt_events ORDER BY id")

    def content() -> List[tuple]:
        with engine.connect() as conn:
            # NaN != NaN in Python: compare timestamps as text.
            return [tuple(repr(v) if isinstance(v, float) else v for v in r)
                    for r in conn.execute(select)]
    before = content()
    assert len(before) == 200

    assert migrations.migrate(engine) == [5, 6]
    assert content() == before
    with engine.connect() as conn:
        months = dict(conn.execute(sa.text(
            "SELECT tableoid::regclass::text, count(*) FROM rpt_events GROUP BY 1")).all())
        now = partitions.current_month(conn)
    assert sum(months.values()) == 200 and "rpt_events_default" not in months
    # Plausible event times decide the old rows' months, anything else this month.
    assert {"rpt_events_p202311", "rpt_events_p202312", "rpt_events_p202402",
            f"rpt_events_p{now}"} == set(months)
    # New rows go on with the next ids; the schema is the declared one.
    SQLEventLog(engine).append({"c0": [row(6)]}, {})
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT max(id) FROM rpt_events")).scalar() == 201
    with contextlib.contextmanager(_schema_engine)() as declared:
        metadata_for("postgresql").create_all(declared)
        assert shape(engine) == shape(declared)


def test_a_partition_is_dropped_only_when_its_conversations_are_gone(log, engine):
    with engine.connect() as conn:
        now = partitions.current_month(conn)
    partitions.ensure_partitions(engine, months_ahead=3, month=202601)
    insert(engine, "gone", 1, 202601)
    insert(engine, "gone", 2, 202601)
    insert(engine, "goes-on", 1, 202602)
    insert(engine, "goes-on", 2, now)  # continued this month
    insert(engine, "snapshot", 1, 202603)
    log.append({}, {"snapshot": Snapshot(2, 1, 0.0, "{}")})
    insert(engine, "hot", 1, 202604)
    report = partitions.drop_partitions_before(engine, 202605, live=lambda ids: [
        i for i in ids if i == "hot"])
    outcome = {r.name: (r.dropped, r.reason) for r in report}
    assert outcome == {
        "rpt_events_p202601": (True, ""),
        "rpt_events_p202602": (False, "1 conversation(s) with rows in another partition"),
        "rpt_events_p202603": (False, "1 conversation(s) with a snapshot"),
        "rpt_events_p202604": (False, "1 conversation(s) live"),
    }
    assert [(r.rows, r.conversations) for r in report if r.dropped] == [(2, 1)]
    names = [p.name for p in partitions.list_partitions(engine)]
    assert "rpt_events_p202601" not in names and "rpt_events_p202602" in names
    assert placed(engine, "gone") == [] and len(placed(engine, "goes-on")) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('rpt_events_p202601')")).scalar() is None
    # Detach only: the month's table stays, out of the log, for an archive.
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM rpt_snapshots"))
    report = partitions.drop_partitions_before(engine, 202604, detach_only=True)
    assert [(r.name, r.dropped) for r in report] == [
        ("rpt_events_p202602", False), ("rpt_events_p202603", True)]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM rpt_events_p202603_detached")).scalar() == 1
    assert placed(engine, "snapshot") == []
    with pytest.raises(ConfigError, match="before the current month"):
        partitions.drop_partitions_before(engine, partitions.next_month(now))


def test_sqlite_keeps_one_table(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/log.sqlite3")
    log = SQLEventLog(engine)
    assert 5 in log.migrate()
    assert partitions.ensure_partitions(engine) == []
    assert partitions.list_partitions(engine) == []
    assert partitions.drop_partitions_before(engine, 202601) == []
    engine.dispose()


async def test_cli_lists_and_creates_partitions(engine, tmp_path, capsys):
    url = engine.url.render_as_string(hide_password=False)
    path = tmp_path / "endpoints.yml"
    prefix = f"t{uuid.uuid4().hex[:10]}"
    path.write_text("tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n"
                    f"  url: \"{real_urls()['redis']}\"\n  key_prefix: {prefix}\n"
                    f"  sql_url: \"{url}\"\n")
    try:
        assert await asyncio.to_thread(cli.main, ["partitions", "--endpoints", str(path),
                                                  "--ahead", "5"]) == 0
    finally:
        client = redis.Redis.from_url(real_urls()["redis"])
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()
    out = capsys.readouterr().out
    assert "Created 2 partition(s)" in out  # start-up made 3 ahead already
    assert out.count(" rows") == 7 and "rpt_events_default" in out and "default" in out


async def test_a_store_conversation_across_a_month_border(domain, tmp_path):
    """The whole path (hot state, outbox, delivery): turns before and after
    the month turns read back whole and in order from the partitioned log."""
    pair = Backend("real", str(tmp_path))
    try:
        store = pair.make_store(domain)
        await run_turns(store, "border", 3)
        await store.flush()
        engine = pair.engine()
        with engine.connect() as conn:
            now = partitions.current_month(conn)
        clock_at(engine, partitions.next_month(now))  # created ahead at start
        tracker = await run_turns(store, "border", 3)
        await store.flush()
        rows = placed(engine, "border")
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
        assert [r[1] for r in rows] == sorted(r[1] for r in rows)
        assert {r[1] for r in rows} == {partitions.partition_name(now), partitions.partition_name(
            partitions.next_month(now))}
        full = await store.retrieve_full_tracker("border")
        assert len(full.events) == len(rows)
        said = [e.text for e in full.events if getattr(e, "text", "").startswith("my name")]
        assert said == [f"my name is bob {i}" for i in (0, 1, 2, 0, 1, 2)]
        assert tracker.events[-1].as_dict() == full.events[-1].as_dict()
        engine.dispose()
    finally:
        await pair.cleanup()


def test_migrating_a_log_created_from_the_declared_tables_changes_nothing(engine):
    metadata_for("postgresql").create_all(engine)
    before = shape(engine)
    assert migrations.migrate(engine) == [1, 2, 3, 4, 5, 6]
    assert shape(engine) == before
