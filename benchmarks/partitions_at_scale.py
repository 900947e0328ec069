"""The partitioned log at size: 10,000,000 events over several months.

Two phases, so the long fill can run in the background while nothing else
waits for it (both print what they do, with times):

``fill``
    Creates the database ``--database`` (default ``bench_part``; an old one
    of that name is dropped first) on ``DATABASE_URL``'s server, migrates
    this store's log into its schema ``rpt`` (partitioned by month) and
    creates the partitions of the months the fill spans. Then bulk-fills it
    with PostgreSQL ``COPY`` (filling.py's 100-event conversations in
    common.py's turn shape) to ``--events``: the conversations end evenly
    from the first day of the month ``--months - 1`` months back until now,
    and each conversation's rows carry the ``log_month`` of its last event,
    as if the store had written them then (no conversation spans two
    months). They are written in an interleaved order, so any prefix of the
    fill spreads over every month like the whole. One more conversation of
    10,000 events sits in the current month. The uniqueness trigger is
    disabled for the load (docs/partitioning.md, "Bulk loads": the fill
    numbers every conversation 1..n itself) and enabled again. At
    ``--checkpoint`` events (default 1,000,000) it measures **append**: the
    delivery path, ``SQLEventLog.append``, 200 batches of 50 conversations x
    one turn (5 rows) after their existing rows, conversations of the
    current month. A file ``<state>.stop`` ends the fill early, cleanly.

``measure``
    At the filled size: append again (other conversations of the current
    month); ``retrieve_full_tracker`` of the 10,000-event conversation
    (median of 5); ``export`` of the last day through the command line;
    then retention of the oldest month: (a) ``rasa-persistent-tracker purge
    --inactive-for`` set to the start of the next month, which erases the
    month's conversations and drops their partition, and (b) the same rows
    removed by ``DELETE`` (batches of 500 conversations, as purge deletes)
    from an unpartitioned copy of the log (``CREATE TABLE ... AS`` plus the
    unpartitioned schema's key and indexes), then ``VACUUM`` of that copy
    (which a ``DELETE`` needs before the space is reused). With
    ``--row-purge``, then (c) ``purge`` of the next month with the month
    drops switched off: row by row, as purge did before it dropped months,
    on the same log. Prints markdown tables, writes
    ``results/partitions_at_scale.json``, drops the database (``--keep``
    keeps it).

A benchmark, not a test. 10,000,000 events need ~13 GB of disk with the
unpartitioned copy.

    .venv/bin/python benchmarks/partitions_at_scale.py fill --events 10000000
    .venv/bin/python benchmarks/partitions_at_scale.py measure --row-purge
"""
import argparse
import asyncio
import datetime
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import filling  # noqa: E402
from common import fmt  # noqa: E402

import sqlalchemy as sa  # noqa: E402

from rasa_persistent_tracker.log import partitions  # noqa: E402
from rasa_persistent_tracker.log.event_log import SQLEventLog, make_engine  # noqa: E402
from rasa_persistent_tracker.log.tables import UNIQUE_SEQ_TRIGGER  # noqa: E402

BIN = os.path.dirname(sys.executable)
LONG = "long-10000"
COLUMNS = ("rpt_events (conversation_id, seq, type_name, timestamp, intent_name, "
           "action_name, data, log_month)")
UTC = datetime.timezone.utc


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {text}", flush=True)


def month_start(month: int) -> float:
    year, mon = divmod(month, 100)
    return datetime.datetime(year, mon, 1, tzinfo=UTC).timestamp()


def month_at(moment: float) -> int:
    return partitions.month_of(datetime.datetime.fromtimestamp(moment, UTC))


def months_back(month: int, count: int) -> int:
    year, mon = divmod(month, 100)
    index = year * 12 + mon - 1 - count
    return (index // 12) * 100 + index % 12 + 1


class Bench:
    """The run's database, its URLs and the state both phases share."""

    def __init__(self, database: str, state_path: str) -> None:
        self.admin_url = sa.engine.make_url(common.DATABASE_URL)
        self.database = database
        self.db_url = self.admin_url.set(database=database)
        self.url = (self.db_url.render_as_string(hide_password=False)
                    + "?options=-csearch_path%3Drpt")
        self.state_path = state_path
        self.state: Dict[str, Any] = {}
        if os.path.exists(state_path):
            with open(state_path, encoding="utf-8") as handle:
                self.state = json.load(handle)

    def save(self) -> None:
        with open(self.state_path, "w", encoding="utf-8") as handle:
            json.dump(self.state, handle)

    def admin(self, statement: str) -> None:
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT",
                                  poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text(statement))
        engine.dispose()

    def run(self, statement: str) -> Any:
        """One statement in the run's schema (autocommit); its rows, if any."""
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT",
                                  poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                result = conn.execute(sa.text(statement))
                return result.fetchall() if result.returns_rows else result.rowcount
        finally:
            engine.dispose()

    def raw(self) -> Any:
        # The schema URL: the uniqueness trigger names rpt_events unqualified.
        return sa.create_engine(self.url, poolclass=sa.pool.NullPool).raw_connection()

    def size_mb(self, table: str = "rpt_events") -> float:
        return float(self.run(
            f"SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            f"WHERE c.oid = to_regclass('{table}') OR c.oid IN (SELECT inhrelid FROM "
            f"pg_inherits WHERE inhparent = to_regclass('{table}'))")[0][0]) / 2 ** 20


def copy_lines(template: filling.Template, cid: str, start: float, month: int) -> List[str]:
    tail = f"\t{month}\n"
    return [line[:-1] + tail for line in
            filling.conversation_lines(template, cid, 1, start, with_seq=True)]


def fill(args: argparse.Namespace) -> None:
    bench = Bench(args.database, args.state)
    stop_file = args.state + ".stop"
    if os.path.exists(stop_file):
        os.remove(stop_file)
    bench.admin(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    bench.admin(f'CREATE DATABASE "{args.database}"')
    engine = sa.create_engine(bench.db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA rpt"))
    engine.dispose()
    log = SQLEventLog(make_engine(bench.url, 4))
    log.migrate()
    now = time.time()
    current = month_at(now)
    first = months_back(current, args.months - 1)
    partitions.ensure_partitions(log.engine, months_ahead=args.months - 1 + 3, month=first)
    template = filling.Template(100)
    per = len(template)
    total = max(1, (args.events - 10_000) // per)
    begin, end = month_start(first), now - 3600
    # Conversation i ends at begin + (end - begin) * (i + 1) / total; written in
    # the order i = k * stride mod total, so every prefix covers every month.
    stride = 7919 if total % 7919 else 7907
    starts = [begin + (end - begin) * (i + 1) / total - per for i in range(total)]
    months = [month_at(s + per - 1) for s in starts]
    bench.state = {"database": args.database, "current_month": current, "first_month": first,
                   "conversations": total, "per_conversation": per,
                   "filled": 0, "events": 0, "appended": {}, "cells": [], "fill_s": 0.0}
    say(f"Fill: {total:,} conversations of {per} events ending {first}..{current}, "
        f"+ {LONG}; checkpoint at {args.checkpoint:,} events.")
    raw = bench.raw()
    cursor = raw.cursor()
    cursor.execute(f"ALTER TABLE rpt_events DISABLE TRIGGER {UNIQUE_SEQ_TRIGGER}")
    raw.commit()
    started = time.perf_counter()
    long = filling.Template(10_000, seed=7)
    buf = io.StringIO()
    buf.writelines(copy_lines(long, LONG, now - 2 * 3600 - 10_000, current))
    buf.seek(0)
    cursor.copy_expert(f"COPY {COLUMNS} FROM STDIN", buf)
    raw.commit()
    events, k, checkpoint_done, last_say = len(long), 0, False, time.perf_counter()
    filled_ids: List[int] = []
    try:
        while k < total and not os.path.exists(stop_file):
            buf = io.StringIO()
            for _ in range(min(500, total - k)):
                i = k * stride % total
                buf.writelines(copy_lines(template, f"conv-{i:08d}", starts[i], months[i]))
                filled_ids.append(i)
                k += 1
                events += per
            buf.seek(0)
            cursor.copy_expert(f"COPY {COLUMNS} FROM STDIN", buf)
            raw.commit()
            if time.perf_counter() - last_say > 60:
                last_say = time.perf_counter()
                elapsed = last_say - started
                say(f"  {events:,} events in {elapsed:.0f} s ({events / elapsed:,.0f}/s)")
            if not checkpoint_done and events >= args.checkpoint:
                checkpoint_done = True
                bench.state["fill_s"] += time.perf_counter() - started
                checkpoint(bench, log, cursor, raw, events, filled_ids, months)
                started = time.perf_counter()
    finally:
        bench.state["fill_s"] += time.perf_counter() - started
        cursor.execute(f"ALTER TABLE rpt_events ENABLE TRIGGER {UNIQUE_SEQ_TRIGGER}")
        raw.commit()
        bench.state.update(filled=k, events=events, filled_ids=filled_ids,
                           months=months)
        bench.save()
    say(f"Filled {events:,} events ({k:,} conversations) in {bench.state['fill_s']:.0f} s; "
        f"ANALYZE ...")
    cursor.execute("ANALYZE rpt_events")
    raw.commit()
    raw.close()
    log.engine.dispose()
    say(f"Fill done: {bench.size_mb():,.0f} MB. State in {args.state}.")


def checkpoint(bench: Bench, log: SQLEventLog, cursor: Any, raw: Any, events: int,
               filled_ids: List[int], months: List[int]) -> None:
    cursor.execute(f"ALTER TABLE rpt_events ENABLE TRIGGER {UNIQUE_SEQ_TRIGGER}")
    cursor.execute("ANALYZE rpt_events")
    raw.commit()
    say(f"Checkpoint at {events:,} events: append ...")
    current = bench.state["current_month"]
    ids = [i for i in filled_ids if months[i] == current]
    cell = {"events": events, "size_mb": bench.size_mb(),
            "append": append_batches(log, bench.state, ids[0::2], events)}
    bench.state["cells"].append(cell)
    bench.save()
    say(f"  append at {events:,}: {cell['append']['rows_per_s']:,.0f} rows/s "
        f"(p50 {cell['append']['batch_p50_ms']:.1f} ms)")
    cursor.execute(f"ALTER TABLE rpt_events DISABLE TRIGGER {UNIQUE_SEQ_TRIGGER}")
    raw.commit()


def append_batches(log: SQLEventLog, state: Dict[str, Any], ids: List[int], events: int,
                   batches: int = 200) -> Dict[str, Any]:
    """The delivery path: ``batches`` batches of 50 conversations x one turn (5 rows),
    after each conversation's existing rows."""
    rng = random.Random(events)
    turn = [e.as_dict() for e in common.turn_events(0, rng)]
    appended = state["appended"]
    per = state["per_conversation"]
    durations: List[float] = []
    for b in range(batches):
        rows: Dict[str, List[Dict[str, Any]]] = {}
        for c in range(50):
            cid = f"conv-{ids[(b * 50 + c) % len(ids)]:08d}"
            first = per + 1 + appended.get(cid, 0)
            rows[cid] = [{"seq": first + n, "type_name": e["event"], "timestamp": time.time(),
                          "intent_name": None, "action_name": e.get("name"),
                          "data": json.dumps(e)} for n, e in enumerate(turn)]
            appended[cid] = appended.get(cid, 0) + len(turn)
        started = time.perf_counter()
        log.append(rows, {})
        durations.append(time.perf_counter() - started)
    total = batches * 50 * len(turn)
    return {"rows": total, "rows_per_s": total / sum(durations),
            "batch_p50_ms": statistics.median(durations) * 1000,
            "batch_p99_ms": common.percentile(durations, 99) * 1000}


async def full_tracker(bench: Bench, prefix: str) -> Dict[str, Any]:
    from rasa_persistent_tracker import PersistentTrackerStore

    store = PersistentTrackerStore(common.make_domain(), host=common.REDIS_URL,
                                   key_prefix=prefix, sql_url=bench.url, environ={})
    try:
        times, events = [], 0
        for _ in range(5):
            started = time.perf_counter()
            tracker = await store.retrieve_full_tracker(LONG)
            times.append(time.perf_counter() - started)
            events = len(tracker.events)
        return {"events": events, "median_ms": statistics.median(times) * 1000}
    finally:
        await store.close()


def endpoints_file(bench: Bench, workdir: str, prefix: str) -> str:
    path = os.path.join(workdir, "endpoints.yml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n"
                     f"  url: {common.REDIS_URL}\n  key_prefix: {prefix}\n"
                     f"  sql_url: \"{bench.url}\"\n")
    return path


def export(endpoints: str, workdir: str, *args: str) -> Dict[str, Any]:
    out = os.path.join(workdir, "out.jsonl")
    started = time.perf_counter()
    subprocess.run([os.path.join(BIN, "rasa-persistent-tracker"), "export", "--endpoints",
                    endpoints, "--output", out, *args], check=True, cwd=workdir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    with open(out, "rb") as handle:
        events = sum(1 for _ in handle)
    os.remove(out)
    return {"events": events, "wall_s": wall, "events_per_s": events / wall if events else None}


def plain_copy(bench: Bench, month_name: str, scope: str) -> Dict[str, Any]:
    """The unpartitioned table (migration 4's shape: key on id, unique
    (conversation_id, seq), the same indexes) with the log's rows: all of
    them (``scope`` "all") or the month's and the next one's ("two")."""
    where = ""
    if scope == "two":
        month = partitions.month_in(month_name)
        where = (f" WHERE log_month >= {month} AND log_month <= "
                 f"{partitions.next_month(month)}")
    started = time.perf_counter()
    bench.run("DROP TABLE IF EXISTS plain_events")
    bench.run("CREATE TABLE plain_events AS SELECT id, conversation_id, seq, type_name, "
              f"timestamp, intent_name, action_name, data FROM rpt_events{where}")
    bench.run("ALTER TABLE plain_events ADD PRIMARY KEY (id)")
    bench.run("CREATE UNIQUE INDEX plain_conversation_seq ON plain_events (conversation_id, seq)")
    bench.run("CREATE INDEX plain_type_time ON plain_events (type_name, timestamp)")
    bench.run("CREATE INDEX plain_intent ON plain_events (intent_name)")
    bench.run("CREATE INDEX plain_time ON plain_events (timestamp, id)")
    bench.run("VACUUM ANALYZE plain_events")
    rows = bench.run("SELECT count(*) FROM plain_events")[0][0]
    return {"rows": rows, "build_s": time.perf_counter() - started,
            "size_mb": bench.size_mb("plain_events")}


def delete_month(bench: Bench, ids: List[str], batch: int = 500) -> Dict[str, Any]:
    """DELETE the rows of ``ids`` from the unpartitioned copy, ``batch``
    conversations per statement and transaction (purge's set-based batches),
    then VACUUM it."""
    engine = sa.create_engine(bench.url, poolclass=sa.pool.NullPool)
    deleted = 0
    started = time.perf_counter()
    try:
        for start in range(0, len(ids), batch):
            with engine.begin() as conn:
                deleted += conn.execute(sa.text(
                    "DELETE FROM plain_events WHERE conversation_id = ANY(:ids)"),
                    {"ids": ids[start:start + batch]}).rowcount
    finally:
        engine.dispose()
    delete_s = time.perf_counter() - started
    started = time.perf_counter()
    bench.run("VACUUM plain_events")
    return {"rows": deleted, "delete_s": delete_s, "vacuum_s": time.perf_counter() - started}


async def purge_month(bench: Bench, endpoints: str, first: int,
                      by_month: bool = True) -> Dict[str, Any]:
    """``purge`` as the command runs it, with the cut-off at the start of the
    month after ``first``: that month goes whole, by partition drop (without
    ``by_month``: row by row, as purge did before it dropped months)."""
    import redis.asyncio as aioredis

    from rasa_persistent_tracker.admin.endpoints_file import load_endpoint_backends
    from rasa_persistent_tracker.admin.erasing import Eraser
    from rasa_persistent_tracker.admin.raw_access import RawHotAccess
    from rasa_persistent_tracker.log import retention

    boundary = month_start(partitions.next_month(first))
    minutes = int((time.time() - boundary) // 60)
    real_drop, timings = retention.drop, {}

    def timed_drop(*args: Any) -> str:
        started = time.perf_counter()
        try:
            return real_drop(*args)
        finally:
            timings["drop_s"] = time.perf_counter() - started

    retention.drop = timed_drop
    real_plan = retention.plan
    if not by_month:
        retention.plan = lambda *_args: []
    backends = load_endpoint_backends(endpoints)
    raw = RawHotAccess(backends.config, aioredis.from_url(common.REDIS_URL))
    marks: Dict[str, float] = {}
    started = time.perf_counter()

    def month_done(outcome: Any) -> None:
        if outcome.dropped:
            marks.setdefault("month_s", time.perf_counter() - started)
        say(f"  {outcome.line(False)}")
    try:
        totals = await Eraser(backends, raw).purge(minutes * 60.0, 500,
                                                   report_month=month_done)
    finally:
        retention.drop, retention.plan = real_drop, real_plan
        await raw.close()
        await backends.outbox.stop()
        await backends.hot.close()
        backends.log.close()
    wall = time.perf_counter() - started
    dropped = [m for m in totals.months if m.dropped]
    return {"inactive_for": f"{minutes}m", "wall_s": wall, "month_s": marks.get("month_s"),
            "drop_s": timings.get("drop_s"), "erased": totals.erased,
            "log_rows": totals.places.log_rows,
            "dropped": [(m.name, m.rows, m.conversations) for m in dropped],
            "summary": totals.summary("purge", False)}


async def measure(args: argparse.Namespace) -> None:
    bench = Bench(args.database, args.state)
    state = bench.state
    started_at, load = time.time(), os.getloadavg()
    bench.run(f"ALTER TABLE rpt_events ENABLE TRIGGER {UNIQUE_SEQ_TRIGGER}")
    events = bench.run("SELECT count(*) FROM rpt_events")[0][0]
    say(f"Measure at {events:,} events ({bench.size_mb():,.0f} MB).")
    log = SQLEventLog(make_engine(bench.url, 4))
    current = state["current_month"]
    ids = [i for i in state["filled_ids"] if state["months"][i] == current]
    cell: Dict[str, Any] = {"events": events, "size_mb": bench.size_mb()}
    cell["append"] = append_batches(log, state, ids[1::2], events)
    log.engine.dispose()
    say(f"  append: {cell['append']['rows_per_s']:,.0f} rows/s")
    tag = f"benchpart{os.getpid()}"
    prefixes = [f"{tag}full", f"{tag}exp"]
    workdir = tempfile.mkdtemp(prefix="rpt-part-bench-")
    cell["full_tracker"] = await full_tracker(bench, prefixes[0])
    say(f"  retrieve_full_tracker: {cell['full_tracker']['median_ms']:.0f} ms")
    endpoints = endpoints_file(bench, workdir, prefixes[1])
    cell["export_startup"] = export(endpoints, workdir, "--conversation", "no-such-id")
    cell["export_last_day"] = export(endpoints, workdir, "--since",
                                     repr(time.time() - filling.DAY))
    say(f"  export last day: {cell['export_last_day']['events']:,} events in "
        f"{cell['export_last_day']['wall_s']:.1f} s")
    first = state["first_month"]
    month_name = partitions.partition_name(first)
    month_rows, month_ids = bench.run(
        f'SELECT count(*), count(DISTINCT conversation_id) FROM "{month_name}"')[0]
    cell["month"] = {"name": month_name, "rows": month_rows, "conversations": month_ids}
    if args.plain != "none":
        say(f"  unpartitioned copy ({args.plain}) ...")
        cell["plain"] = plain_copy(bench, month_name, args.plain)
        say(f"  unpartitioned copy: {cell['plain']['rows']:,} rows, "
            f"{cell['plain']['build_s']:.0f} s")
        month_conversations = [r[0] for r in bench.run(
            f'SELECT DISTINCT conversation_id FROM "{month_name}" ORDER BY 1')]
        cell["delete"] = delete_month(bench, month_conversations)
        say(f"  DELETE: {cell['delete']['rows']:,} rows in {cell['delete']['delete_s']:.1f} s, "
            f"VACUUM {cell['delete']['vacuum_s']:.1f} s")
        bench.run("DROP TABLE plain_events")
    say("  purge (drops the oldest month) ...")
    cell["purge"] = await purge_month(bench, endpoints_file(bench, workdir, f"{tag}purge"),
                                      first)
    prefixes.append(f"{tag}purge")
    say(f"  {cell['purge']['summary']} in {cell['purge']['wall_s']:.1f} s")
    if args.row_purge:
        second = partitions.next_month(first)
        name = partitions.partition_name(second)
        rows, conversations = bench.run(
            f'SELECT count(*), count(DISTINCT conversation_id) FROM "{name}"')[0]
        say(f"  purge row by row (no month drops) of {name} ...")
        cell["row_purge"] = await purge_month(
            bench, endpoints_file(bench, workdir, f"{tag}rows"), second, by_month=False)
        cell["row_purge"].update(month=name, month_rows=rows, month_conversations=conversations)
        prefixes.append(f"{tag}rows")
        say(f"  {cell['row_purge']['summary']} in {cell['row_purge']['wall_s']:.1f} s")
    state["cells"].append(cell)
    bench.save()
    for prefix in prefixes:
        common_redis_cleanup(prefix)
    if not args.keep:
        bench.admin(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    report(bench, started_at, load, args)


def common_redis_cleanup(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(common.REDIS_URL)
    batch = [key for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for start in range(0, len(batch), 500):
        client.delete(*batch[start:start + 500])
    client.close()


def report(bench: Bench, started_at: float, load: Any, args: argparse.Namespace) -> None:
    state = bench.state
    cells = state["cells"]
    command = " ".join(["benchmarks/partitions_at_scale.py"] + sys.argv[1:])
    print(f"\n### The partitioned log at size ({time.strftime('%Y-%m-%d', time.gmtime())}, "
          f"`{command}`)\n")
    print(f"Fill: {state['events']:,} events by COPY in {state['fill_s']:.0f} s "
          f"({state['filled']:,} conversations of {state['per_conversation']} events over "
          f"{state['first_month']}..{state['current_month']}, + {LONG}).\n")
    print(common.markdown_table(
        ["events in the log", "table + indexes", "append rows/s (batch p50 / p99 ms)"],
        [[f"{c['events']:,}", f"{c['size_mb']:,.0f} MB",
          f"{c['append']['rows_per_s']:,.0f} ({fmt(c['append']['batch_p50_ms'])} / "
          f"{fmt(c['append']['batch_p99_ms'])})"] for c in cells]))
    last = cells[-1]
    if "full_tracker" not in last:
        return
    lines = [
        ["retrieve_full_tracker, 10,000 events (median of 5)",
         f"{fmt(last['full_tracker']['median_ms'], 0)} ms"],
        ["export: command start (unknown conversation)",
         f"{fmt(last['export_startup']['wall_s'], 1)} s"],
        ["export last day", f"{last['export_last_day']['events']:,} events in "
         f"{fmt(last['export_last_day']['wall_s'], 1)} s "
         f"({last['export_last_day']['events_per_s']:,.0f}/s)"],
    ]
    month = last["month"]
    purge = last["purge"]
    lines += [
        [f"purge --inactive-for {purge['inactive_for']}: the month {month['name']} "
         f"({month['rows']:,} rows, {month['conversations']:,} conversations) erased whole",
         f"{fmt(purge['month_s'], 1)} s (of which the drop transaction "
         f"{fmt(purge['drop_s'], 2)} s)"],
        ["purge, whole command (then the rest of the log checked for inactive "
         "conversations)", f"{fmt(purge['wall_s'], 1)} s"],
    ]
    if "row_purge" in last:
        rows = last["row_purge"]
        lines.append(
            [f"purge as before (row by row, `DELETE` per 500 conversations), the next month "
             f"{rows['month']} ({rows['month_rows']:,} rows, {rows['month_conversations']:,} "
             f"conversations), whole command", f"{fmt(rows['wall_s'], 1)} s"])
    if "delete" in last:
        plain = last["plain"]
        lines += [
            [f"unpartitioned copy ({plain['rows']:,} rows, {plain['size_mb']:,.0f} MB): "
             f"DELETE the same {last['delete']['rows']:,} rows, 500 conversations a "
             f"statement", f"{fmt(last['delete']['delete_s'], 1)} s"],
            ["... then VACUUM (the space a DELETE frees is reusable only after it)",
             f"{fmt(last['delete']['vacuum_s'], 1)} s"],
        ]
    print()
    print(common.markdown_table([f"at {last['events']:,} events", ""], lines))
    print(f"\nPurge: {purge['summary']}")
    result = {"benchmark": "partitions_at_scale", "command": command,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
              "runtime_s": time.time() - started_at,
              "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
              "fill_s": state["fill_s"], "cells": cells}
    path = os.path.join(common.RESULTS, "partitions_at_scale.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(f"\nResults written to {os.path.relpath(path)}; load average {load} at start, "
          f"{os.getloadavg()} at end.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=["fill", "measure"])
    parser.add_argument("--database", default="bench_part")
    parser.add_argument("--state", default=os.path.join(tempfile.gettempdir(),
                                                        "rpt-partitions-at-scale.json"))
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--checkpoint", type=int, default=1_000_000)
    parser.add_argument("--months", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="measure: keep the database")
    parser.add_argument("--row-purge", action="store_true",
                        help="measure: then purge the next month row by row (month drops "
                             "off), as purge did before")
    parser.add_argument("--plain", choices=["all", "two", "none"], default="all",
                        help="measure: the unpartitioned copy holds every row, the month's "
                             "and the next month's, or is not made")
    args = parser.parse_args()
    if args.phase == "fill":
        fill(args)
    else:
        asyncio.run(measure(args))


if __name__ == "__main__":
    main()
