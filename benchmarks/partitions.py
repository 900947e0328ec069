"""What partitioning the PostgreSQL log costs: migration 5's time, appends after.

1. An unpartitioned log (migrations 1-3) is filled with ``--rows`` rows
   (default 1,000,000: 50,000 conversations of 20 events spread over 12
   months of event time) straight in SQL, then migration 5 converts it,
   timed: the copy and index builds hold the table's ACCESS EXCLUSIVE lock.
2. Delivery batches (50 conversations x 4 rows, ``SQLEventLog.append``) are
   timed on the unpartitioned and on the partitioned table (whose trigger
   checks every row's (conversation_id, seq) across the partitions).

Runs in a throwaway schema of ``DATABASE_URL`` (default: the local server),
dropped at the end. Prints a markdown table; not a pass/fail test.

    .venv/bin/python benchmarks/partitions.py [--rows N] [--batches N]
"""
import argparse
import os
import statistics
import sys
import time
import uuid
from typing import List

import sqlalchemy as sa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rasa_persistent_tracker.log import migrations, partitions  # noqa: E402
from rasa_persistent_tracker.log.event_log import SQLEventLog  # noqa: E402
from rasa_persistent_tracker.log.tables import LogRow  # noqa: E402

URL = os.environ.get("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def fill(engine: sa.engine.Engine, rows: int) -> None:
    per_conversation = 20
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO rpt_events (conversation_id, seq, type_name, timestamp, intent_name, "
            "action_name, data) "
            "SELECT 'conv-' || (n / :k), n % :k + 1, 'user', "
            "1700000000 + (n / :k) * (365 * 86400.0 / (:rows / :k)), 'greet', NULL, "
            "repeat('x', 200) FROM generate_series(0, :rows - 1) AS n"),
            {"k": per_conversation, "rows": rows})
        conn.execute(sa.text("ANALYZE rpt_events"))


def appends(log: SQLEventLog, batches: int, tag: str) -> List[float]:
    took = []
    for b in range(batches):
        batch = {f"{tag}-{b}-{c}": [LogRow(s, "user", time.time(), "greet", None,
                                           "y" * 200).as_dict() for s in range(1, 5)]
                 for c in range(50)}
        start = time.perf_counter()
        log.append(batch, {})
        took.append((time.perf_counter() - start) * 1000)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    admin = sa.create_engine(URL)
    schema = f"bench_part_{uuid.uuid4().hex[:8]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in URL else "?"
    engine = sa.create_engine(f"{URL}{sep}options=-csearch_path%3D{schema}")
    try:
        all_migrations = migrations.MIGRATIONS
        migrations.MIGRATIONS = [m for m in all_migrations if m.version <= 3]
        migrations.migrate(engine)
        migrations.MIGRATIONS = all_migrations
        log = SQLEventLog(engine)
        start = time.perf_counter()
        fill(engine, args.rows)
        filled = time.perf_counter() - start
        before = appends(log, args.batches, "plain")
        start = time.perf_counter()
        migrations.migrate(engine)
        migrated = time.perf_counter() - start
        partitions.ensure_partitions(engine)
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM rpt_events")).scalar()
        after = appends(log, args.batches, "part")
        found = partitions.list_partitions(engine)
        print(f"| {args.rows:,} rows in {len(found)} partitions | |")
        print("|---|---|")
        print(f"| fill (INSERT ... SELECT, unpartitioned) | {filled:.1f} s |")
        print(f"| migration 5 (copy, keys, indexes; table locked) | {migrated:.1f} s |")
        print(f"| rows after / before | {count:,} / {args.rows + args.batches * 200:,} |")
        for name, took in (("unpartitioned", before), ("partitioned", after)):
            print(f"| append 50 conv x 4 rows, {name}: median / p95 | "
                  f"{statistics.median(took):.1f} / "
                  f"{sorted(took)[int(len(took) * 0.95)]:.1f} ms |")
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
