"""The SQL log at size: what gets slower when ``rpt_events`` holds 10,000,000 events.

Fills this store's log in one throwaway PostgreSQL database (filling.py:
PostgreSQL COPY, conversations of ``--events-per-conversation`` realistic
events spread over the last 60 days, plus one conversation of 10,000 events),
step by step to each of ``--sizes`` (default 1,000,000 and 10,000,000), and at
each size measures, in the same run:

* **append**: the log's own delivery path (``SQLEventLog.append``, as the
  outbox deliverer calls it): batches of 50 conversations, one turn (5 rows)
  each, appended after their existing rows; rows/s and batch latency;
* **retrieve_full_tracker** of the 10,000-event conversation through a
  ``PersistentTrackerStore`` on this log (median of 5);
* **export** through the command line: one conversation (``--conversation``)
  and the last day (``--since``: about 1/60 of the filled log plus the rows
  ``append`` just wrote), events/s, next to the command's start-up time
  (an export of an unknown conversation), which both include;
* the table's size on disk (``pg_total_relation_size``).

Prints markdown tables, writes ``results/log_at_scale.json``. A benchmark, not
a test. Filling 10,000,000 events takes several minutes and ~10 GB of disk.

    .venv/bin/python benchmarks/log_at_scale.py [--sizes 1000000,10000000]
"""
import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import filling  # noqa: E402
from common import fmt  # noqa: E402

import sqlalchemy as sa  # noqa: E402

BIN = os.path.dirname(sys.executable)
LONG = "long-10000"
COLUMNS = ("rpt.rpt_events (conversation_id, seq, type_name, timestamp, intent_name, "
           "action_name, data)")


class Log:
    """This run's log: its engine, what is in it, and how to grow it."""

    def __init__(self, servers: common.Servers, per_conversation: int) -> None:
        from rasa_persistent_tracker.log.event_log import SQLEventLog, make_engine

        self.servers = servers
        self.log = SQLEventLog(make_engine(servers.ours_sql_url, 4))
        self.log.migrate()
        self.template = filling.Template(per_conversation)
        self.conversations = 0
        self.events = 0
        self.appended: Dict[str, int] = {}  # conversation -> rows appended by `append`

    def raw(self) -> Any:
        # The schema URL: the log's uniqueness trigger names rpt_events unqualified.
        return sa.create_engine(self.servers.ours_sql_url,
                                poolclass=sa.pool.NullPool).raw_connection()

    def grow(self, target: int) -> float:
        """Fill to about ``target`` events; return the seconds it took."""
        started = time.perf_counter()
        raw = self.raw()
        try:
            if self.events == 0:
                long = filling.Template(10_000, seed=7)
                self.events += filling.copy_conversations(
                    raw, [(COLUMNS, True)], long, [LONG],
                    lambda _: time.time() - 30 * filling.DAY)
            count = max(0, (target - self.events) // len(self.template))
            ids = [f"conv-{self.conversations + i:08d}" for i in range(count)]
            last = [0]

            def progress(written: int) -> None:
                if written - last[0] >= 1_000_000:
                    last[0] = written
                    print(f"  ... {self.events + written:,} events", flush=True)
            self.events += filling.copy_conversations(
                raw, [(COLUMNS, True)], self.template, ids,
                filling.spread(count, 60, len(self.template)), progress=progress)
            self.conversations += count
            cursor = raw.cursor()
            cursor.execute("ANALYZE rpt.rpt_events")
            raw.commit()
        finally:
            raw.close()
        return time.perf_counter() - started

    def size_mb(self) -> float:
        rows = self.servers.execute("SELECT pg_total_relation_size('rpt.rpt_events')")
        return rows[0][0] / 2 ** 20


def append_batches(log: Log, batches: int = 200) -> Dict[str, Any]:
    """The delivery path: ``batches`` batches of 50 conversations x 5 rows."""
    import random

    rng = random.Random(log.events)
    turn = [e.as_dict() for e in common.turn_events(0, rng)]
    import json

    durations: List[float] = []
    for b in range(batches):
        rows: Dict[str, List[Dict[str, Any]]] = {}
        for c in range(50):
            index = (b * 50 + c) * 7919 % max(1, log.conversations)
            cid = f"conv-{index:08d}"
            first = len(log.template) + 1 + log.appended.get(cid, 0)
            rows[cid] = [{"seq": first + i, "type_name": e["event"], "timestamp": time.time(),
                          "intent_name": None, "action_name": e.get("name"),
                          "data": json.dumps(e)} for i, e in enumerate(turn)]
            log.appended[cid] = log.appended.get(cid, 0) + len(turn)
        started = time.perf_counter()
        log.log.append(rows, {})
        durations.append(time.perf_counter() - started)
    total_rows = batches * 50 * len(turn)
    log.events += total_rows
    return {"rows_per_s": total_rows / sum(durations),
            "batch_p50_ms": statistics.median(durations) * 1000,
            "batch_p99_ms": common.percentile(durations, 99) * 1000}


async def full_tracker(log: Log) -> Dict[str, Any]:
    from rasa_persistent_tracker import PersistentTrackerStore

    store = PersistentTrackerStore(common.make_domain(), host=common.REDIS_URL,
                                   key_prefix=log.servers.prefix("scale"),
                                   sql_url=log.servers.ours_sql_url, environ={})
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


def export(log: Log, workdir: str, *args: str) -> Dict[str, Any]:
    endpoints = os.path.join(workdir, "endpoints.yml")
    with open(endpoints, "w", encoding="utf-8") as handle:
        handle.write("tracker_store:\n  type: rasa_persistent_tracker.PersistentTrackerStore\n"
                     f"  url: {common.REDIS_URL}\n  key_prefix: {log.servers.prefix('exp')}\n"
                     f"  sql_url: \"{log.servers.ours_sql_url}\"\n")
    out = os.path.join(workdir, "out.jsonl")
    started = time.perf_counter()
    subprocess.run([os.path.join(BIN, "rasa-persistent-tracker"), "export", "--endpoints",
                    endpoints, "--output", out, *args], check=True, cwd=workdir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    with open(out, "rb") as handle:
        events = sum(1 for _ in handle)
    return {"events": events, "wall_s": wall, "events_per_s": events / wall if events else None}


async def main() -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--events-per-conversation", type=int, default=100)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    started, load = time.time(), os.getloadavg()
    servers = common.Servers()
    workdir = tempfile.mkdtemp(prefix="rpt-log-bench-")
    cells: List[Dict[str, Any]] = []
    try:
        log = Log(servers, args.events_per_conversation)
        for size in sizes:
            fill_s = log.grow(size)
            print(f"Filled to {log.events:,} events in {fill_s:.0f} s.", flush=True)
            cell = {"events": log.events, "fill_s": fill_s, "size_mb": log.size_mb()}
            cell["append"] = append_batches(log)
            cell["full_tracker"] = await full_tracker(log)
            # The command's start (imports Rasa) without reading a row: the
            # baseline the two exports below include.
            cell["export_startup"] = export(log, workdir, "--conversation", "no-such-id")
            cell["export_conversation"] = export(log, workdir, "--conversation", LONG)
            since = repr(time.time() - filling.DAY)
            cell["export_last_day"] = export(log, workdir, "--since", since)
            cells.append(cell)
            print(f"  measured at {log.events:,} events", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        servers.cleanup()
    print("\n### The log at size (PostgreSQL 15, this store's rpt_events)\n")
    print(common.markdown_table(
        ["events in the log", "table + indexes", "append rows/s (batch p50 / p99 ms)",
         "retrieve_full_tracker, 10,000 events", "export: command start",
         "export one conversation (10,000 events)", "export last day (events/s)"],
        [[f"{c['events']:,}", f"{c['size_mb']:,.0f} MB",
          f"{c['append']['rows_per_s']:,.0f} ({fmt(c['append']['batch_p50_ms'])} / "
          f"{fmt(c['append']['batch_p99_ms'])})",
          f"{fmt(c['full_tracker']['median_ms'], 0)} ms",
          f"{fmt(c['export_startup']['wall_s'], 1)} s",
          f"{fmt(c['export_conversation']['wall_s'], 1)} s",
          f"{c['export_last_day']['events']:,} in {fmt(c['export_last_day']['wall_s'], 1)} s "
          f"({c['export_last_day']['events_per_s']:,.0f})"] for c in cells]))
    if len(cells) > 1:
        a, b = cells[0], cells[-1]
        print(f"\nAppend throughput at {b['events']:,} events / at {a['events']:,}: "
              f"{b['append']['rows_per_s'] / a['append']['rows_per_s']:.2f}.")
    result = {**common.run_header("log_at_scale", False, started, load), "cells": cells}
    common.write_results(result, os.path.join(common.RESULTS, "log_at_scale.json"))
    return result


if __name__ == "__main__":
    asyncio.run(main())
