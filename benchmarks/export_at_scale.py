"""Exporting a large log: ``rasa-persistent-tracker export`` next to ``rasa export``.

Fills one throwaway PostgreSQL database with the same conversations twice
(``--events``, default 1,000,000, in conversations of
``--events-per-conversation`` realistic events, common.py's turn shape): into
this store's log (schema ``rpt``, ``rpt_events``) and into the ``events``
table of Rasa's ``SQLTrackerStore`` (schema ``public``). Rows go in with
PostgreSQL ``COPY``, as a bulk load would; neither store's ``save`` is timed.

Then, in the same run, as subprocesses on the same data:

* ``rasa-persistent-tracker export --endpoints E --output FILE``
  (JSON lines in Rasa's event-broker shape, streamed in keyset pages);
* ``rasa export --endpoints E`` with Rasa's ``file`` event broker (one JSON
  line per event), reading Rasa's ``SQLTrackerStore``.

Each is timed (wall clock) and its peak resident memory read from
``/usr/bin/time``; the events written are counted. Then retention on the same
log: ``rasa-persistent-tracker purge --inactive-for 30d`` (conversations end
evenly over the last 60 days, so about half of them go), timed the same way. Prints a markdown table
and writes ``results/export_at_scale.json``. It is a benchmark, not a test.

    .venv/bin/python benchmarks/export_at_scale.py [--events N] [--events-per-conversation K]
"""
import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import filling  # noqa: E402
from common import fmt  # noqa: E402

import sqlalchemy as sa  # noqa: E402

BIN = os.path.dirname(sys.executable)


def fill(servers: common.Servers, total: int, per_conversation: int) -> Dict[str, Any]:
    """Bulk-load ``total`` events into both logs; return counts and timings."""
    from rasa.core.tracker_store import SQLTrackerStore
    from rasa_persistent_tracker.log.migrations import migrate

    ours = sa.create_engine(servers.ours_sql_url, poolclass=sa.pool.NullPool)
    migrate(ours)
    ours.dispose()
    SQLTrackerStore(common.make_domain(), **servers.rasa_sql_kwargs())  # creates `events`

    template = filling.Template(per_conversation)
    ids = [f"conv-{c:07d}" for c in range(max(1, total // len(template)))]
    started = time.perf_counter()
    # On the schema URL: the log's uniqueness trigger names rpt_events unqualified.
    raw = sa.create_engine(servers.ours_sql_url, poolclass=sa.pool.NullPool).raw_connection()
    try:
        written = filling.copy_conversations(raw, [
            ("rpt.rpt_events (conversation_id, seq, type_name, timestamp, intent_name, "
             "action_name, data)", True),
            ("public.events (sender_id, type_name, timestamp, intent_name, action_name, "
             "data)", False),
        ], template, ids, filling.spread(len(ids), 60, len(template)))
        cursor = raw.cursor()
        cursor.execute("ANALYZE rpt.rpt_events")
        cursor.execute("ANALYZE public.events")
        raw.commit()
    finally:
        raw.close()
    return {"events": written, "conversations": len(ids),
            "fill_s": time.perf_counter() - started}


def endpoints(workdir: str, servers: common.Servers) -> Tuple[str, str]:
    """Endpoints files: this store on the run's schema; Rasa's SQL store plus
    a file event broker."""
    ours = os.path.join(workdir, "ours.yml")
    with open(ours, "w", encoding="utf-8") as handle:
        handle.write(
            "tracker_store:\n"
            "  type: rasa_persistent_tracker.PersistentTrackerStore\n"
            f"  url: {json.dumps(common.REDIS_URL)}\n"
            f"  key_prefix: {servers.prefix('export')}\n"
            f"  sql_url: {json.dumps(servers.ours_sql_url)}\n")
    url = servers.db_url
    rasa = os.path.join(workdir, "rasa.yml")
    with open(rasa, "w", encoding="utf-8") as handle:
        handle.write(
            "tracker_store:\n"
            "  type: SQL\n"
            "  dialect: postgresql\n"
            f"  url: {url.host or '127.0.0.1'}\n"
            f"  port: {url.port or 5432}\n"
            f"  db: {url.database}\n"
            f"  username: {url.username or 'postgres'}\n"
            + (f"  password: {json.dumps(url.password)}\n" if url.password else "") +
            "event_broker:\n"
            "  type: file\n"
            f"  path: {json.dumps(os.path.join(workdir, 'rasa-export.jsonl'))}\n")
    return ours, rasa


def timed(command: List[str], cwd: str) -> Dict[str, Any]:
    """Run ``command`` under /usr/bin/time; wall seconds and peak RSS."""
    stats = os.path.join(cwd, "time.txt")
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-o", stats, "-f", "%M"] + command, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    with open(stats, encoding="utf-8") as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": int(lines[-1]) / 1024,
            "stdout_tail": proc.stdout[-500:]}


def count_log(servers: common.Servers) -> Dict[str, int]:
    """Conversations and events in this store's log."""
    (conversations, events), = servers.execute(
        "SELECT count(DISTINCT conversation_id), count(*) FROM rpt.rpt_events")
    return {"conversations": conversations, "events": events}


def count_lines(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


async def main() -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--events-per-conversation", type=int, default=100)
    args = parser.parse_args()
    started, load = time.time(), os.getloadavg()
    servers = common.Servers()
    workdir = tempfile.mkdtemp(prefix="rpt-export-bench-")
    runs: Dict[str, Any] = {}
    try:
        filled = fill(servers, args.events, args.events_per_conversation)
        print(f"Filled {filled['events']:,} events in {filled['conversations']:,} "
              f"conversations into both logs in {filled['fill_s']:.0f} s.", flush=True)
        ours_yml, rasa_yml = endpoints(workdir, servers)
        out = os.path.join(workdir, "ours-export.jsonl")
        runs["rasa-persistent-tracker export"] = timed(
            [os.path.join(BIN, "rasa-persistent-tracker"), "export", "--endpoints", ours_yml,
             "--output", out], workdir)
        runs["rasa-persistent-tracker export"]["events"] = count_lines(out)
        print("ours done", flush=True)
        runs["rasa export"] = timed(
            [os.path.join(BIN, "rasa"), "export", "--endpoints", rasa_yml], workdir)
        runs["rasa export"]["events"] = count_lines(os.path.join(workdir, "rasa-export.jsonl"))
        print("rasa export done", flush=True)
        # Retention on the same log: the conversations whose last event is
        # older than 30 days (about half of them: they end evenly over 60).
        purge = count_log(servers)
        purge.update(timed([os.path.join(BIN, "rasa-persistent-tracker"), "purge",
                            "--endpoints", ours_yml, "--inactive-for", "30d", "--batch", "500"],
                           workdir))
        after = count_log(servers)
        purge["erased_conversations"] = purge["conversations"] - after["conversations"]
        purge["removed_events"] = purge["events"] - after["events"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        servers.cleanup()
    print(f"\n### Export of {filled['events']:,} events "
          f"({filled['conversations']:,} conversations), PostgreSQL 15\n")
    print(common.markdown_table(
        ["command", "events written", "wall s", "events/s", "peak RSS MB"],
        [[name, f"{r['events']:,}", fmt(r["wall_s"], 1), f"{r['events'] / r['wall_s']:,.0f}",
          fmt(r["peak_rss_mb"], 0)] for name, r in runs.items()]))
    print(f"\n### purge --inactive-for 30d on that log (rpt_events, ours)\n")
    print(common.markdown_table(
        ["conversations erased", "events removed", "wall s", "events removed/s", "peak RSS MB"],
        [[f"{purge['erased_conversations']:,} of {purge['conversations']:,}",
          f"{purge['removed_events']:,}", fmt(purge["wall_s"], 1),
          f"{purge['removed_events'] / purge['wall_s']:,.0f}", fmt(purge["peak_rss_mb"], 0)]]))
    ours, theirs = runs["rasa-persistent-tracker export"], runs["rasa export"]
    print(f"\nThroughput ratio: {(ours['events'] / ours['wall_s']) / (theirs['events'] / theirs['wall_s']):.1f}x "
          f"rasa export; peak memory {ours['peak_rss_mb']:.0f} MB vs {theirs['peak_rss_mb']:.0f} MB.")
    result = {**common.run_header("export_at_scale", False, started, load),
              "fill": filled, "runs": runs, "purge": purge}
    common.write_results(result, os.path.join(common.RESULTS, "export_at_scale.json"))
    return result


if __name__ == "__main__":
    asyncio.run(main())
