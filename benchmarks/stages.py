"""Where one turn of ours goes: median time of each stage, one conversation.

The stages are the store's own steps, timed by wrapping them (the product
code is unchanged): the hot state's ``load`` and ``commit`` (each one Lua
call), the rebuild from the remembered record or the decode of a stored
one, the log rows, building the record, encoding it, the outbox entry, and
the record kept in memory. The rebuild runs while the load's reply is in
flight and the record to remember while the commit's is, so the load and
the commit include them (``retrieve`` and ``save`` do not add them twice).
``--no-memory`` turns off both per-process memories (``record_cache_size:
0`` and the recent compressed bases), as in a process serving more
conversations than they hold: every turn decodes its record.

    .venv/bin/python benchmarks/stages.py [--no-memory] [--turns 300] [--rounds 2]
"""
import argparse
import collections
import functools
import inspect
import os
import random
import sys
import time
from statistics import mean, median
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import per_turn  # noqa: E402

from rasa_persistent_tracker.hot.redis_state import RedisHotState  # noqa: E402
from rasa_persistent_tracker.log.entries import Entries  # noqa: E402
from rasa_persistent_tracker.record.trackers import Records  # noqa: E402
from rasa_persistent_tracker.record.turns import TurnEncoder  # noqa: E402

STAGES: Dict[str, List[float]] = collections.defaultdict(list)


def _timed(cls: type, name: str, label: str) -> None:
    call = getattr(cls, name)
    if inspect.iscoroutinefunction(call):
        @functools.wraps(call)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                STAGES[label].append(time.perf_counter() - started)
    else:
        @functools.wraps(call)
        def wrapper(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                STAGES[label].append(time.perf_counter() - started)
    setattr(cls, name, wrapper)


for owner, method, stage in (
        (RedisHotState, "load", "redis load (one Lua call)"),
        (Records, "rebuild_remembered", "rebuild (remembered record)"),
        (Records, "decode", "decode (stored record)"),
        (TurnEncoder, "rows", "log rows"),
        (TurnEncoder, "build", "build record"),
        (TurnEncoder, "encode_parts", "encode record"),
        (TurnEncoder, "_remembered", "record to remember (during the commit)"),
        (Entries, "make", "outbox entry"),
        (RedisHotState, "commit", "redis commit (one Lua call)")):
    _timed(owner, method, stage)


async def main(args: argparse.Namespace) -> None:
    domain = common.make_domain()
    servers = common.Servers()
    try:
        extra = {"record_cache_size": 0} if args.no_memory else {}
        store = common.ours(domain, servers, "ours", **extra)
        if args.no_memory:
            store._codec._deflater._size = 0
        sid = f"stages-{servers.tag}"
        rng = random.Random(7)
        await per_turn.prefill_ours(store, domain, sid, args.length, rng)
        await common.flush_reporting_errors(store, "prefill")
        first = common.turns_for(args.length)
        await per_turn.run_turns(store, sid, None, 20, float("inf"), 20, rng, first)
        print(f"\n### Stages of our turn at ~{args.length:,} events"
              f"{' (nothing remembered)' if args.no_memory else ''}, ms\n")
        for r in range(args.rounds):
            STAGES.clear()
            cell = per_turn.Cell("ours", args.length)
            await per_turn.run_turns(store, sid, cell, args.turns, float("inf"), args.turns,
                                     rng, first + 20 + r * args.turns)
            rows = [["turn (retrieve + save)", median(cell.turn), mean(cell.turn)],
                    ["retrieve", median(cell.retrieve), mean(cell.retrieve)],
                    ["save", median(cell.save), mean(cell.save)]]
            rows += [[label, median(xs), mean(xs)] for label, xs in STAGES.items()]
            print(f"Round {r + 1} ({args.turns} turns):\n")
            print(common.markdown_table(
                ["stage", "median", "mean"],
                [[label, common.fmt(med * 1000, 3), common.fmt(avg * 1000, 3)]
                 for label, med, avg in rows]))
            print()
        await common.close_reporting_errors(store, [])
    finally:
        servers.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    arguments = parser.parse_args()
    common.run(main(arguments), arguments.loop)
