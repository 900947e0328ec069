"""Per-turn cost of each tracker store at growing history lengths.

One turn = ``retrieve`` + append one realistic turn's five events + ``save``,
timed end to end, against real Redis and PostgreSQL in one process. Stores:
Rasa's InMemory/Redis/SQL tracker stores and ``PersistentTrackerStore`` with
and without encryption. Prints markdown tables and target PASS/FAIL lines (it
is a benchmark, not a test) and writes ``results/per_turn.json``.

Cells (store x history length) are measured in shuffled rounds, with a
``gc.collect()`` before each cell's turns so that no store pays for another's
garbage. Our store gets 300 measured turns per cell (about a millisecond
each), Rasa's stores 30 (12 at ~10,000 events, where a turn takes ~1 s).

    .venv/bin/python benchmarks/per_turn.py [--quick] [--profile]

``--profile`` additionally runs our store's turn path at ~1,000 events under
cProfile and prints the top cumulative entries from rasa and our package.
"""
import argparse
import cProfile
import gc
import os
import pstats
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import fmt, median, now, percentile, ratio  # noqa: E402

from rasa.shared.core.trackers import DialogueStateTracker  # noqa: E402

STORES = ["InMemoryTrackerStore", "RedisTrackerStore", "SQLTrackerStore",
          "ours", "ours+encryption"]
OURS = ("ours", "ours+encryption")
TARGETS = {"vs_redis_at_1k": 30.0, "vs_sql_at_1k": 60.0, "ours_10k_vs_100": 1.25,
           "encryption_overhead": 1.5}
# Issue 17 (scale and size): the same run, stricter.
SCALE_TARGETS = {"ours_ms_at_1k": 0.5, "vs_sql_at_1k": 100.0, "vs_redis_at_1k": 150.0,
                 "redis_bytes": {"ours": 4096, "ours+encryption": 5120}}


class Cell:
    """Measurements of one store at one history length."""

    def __init__(self, store: str, length: int) -> None:
        self.store = store
        self.length = length
        self.turn: List[float] = []
        self.retrieve: List[float] = []
        self.save: List[float] = []
        self.events_before = 0
        self.prefill_s = 0.0
        self.redis_bytes: Optional[int] = None
        self.extra: Dict[str, Any] = {}
        self.sid = ""
        self.rng = random.Random(length)
        self.next_turn = 0
        # Rasa's stores at ~10,000 events take ~1 s per turn: fewer turns there.
        self.slow = length >= 5000 and store not in OURS

    def as_dict(self) -> Dict[str, Any]:
        ms = lambda xs: [round(x * 1000, 4) for x in xs]  # noqa: E731
        return {
            "store": self.store, "target_events": self.length,
            "events_before_measuring": self.events_before, "turns": len(self.turn),
            "median_ms": median(self.turn) * 1000, "p90_ms": percentile(self.turn, 90) * 1000,
            "retrieve_median_ms": median(self.retrieve) * 1000,
            "save_median_ms": median(self.save) * 1000,
            "prefill_s": self.prefill_s, "redis_bytes": self.redis_bytes,
            "turn_ms": ms(self.turn), **self.extra,
        }


async def run_turns(store: Any, sid: str, cell: Optional[Cell], count: int, budget: float,
                    minimum: int, rng: random.Random, first: int,
                    after_turn: Optional[Callable[[], None]] = None) -> int:
    """Run up to ``count`` turns (fewer if over ``budget`` seconds, never < ``minimum``)."""
    started = now()
    done = 0
    while done < count:
        events = common.turn_events(first + done, rng)
        t0 = now()
        tracker = await store.retrieve(sid)
        t1 = now()
        for event in events:
            tracker.update(event)
        t2 = now()
        await store.save(tracker)
        t3 = now()
        done += 1
        if cell is not None:
            cell.turn.append(t3 - t0)
            cell.retrieve.append(t1 - t0)
            cell.save.append(t3 - t2)
        if after_turn is not None:
            after_turn()  # outside the timed part
        if done >= minimum and now() - started > budget:
            break
    return done


async def prefill_rasa(store: Any, domain: Any, sid: str, length: int,
                       rng: random.Random) -> int:
    """Build the history in memory and save it once (turn by turn is quadratic)."""
    events = common.history(length, rng)
    tracker = DialogueStateTracker.from_events(sid, events, domain.slots)
    await store.save(tracker)
    return len(events)


async def prefill_ours(store: Any, domain: Any, sid: str, length: int,
                       rng: random.Random) -> int:
    """Save a session start, then run real turns up to ``length`` events."""
    tracker = DialogueStateTracker(sid, domain.slots)
    for event in common.session_start():
        tracker.update(event)
    await store.save(tracker)
    turns = common.turns_for(length)
    await run_turns(store, sid, None, turns, float("inf"), turns, rng, 0)
    return common.SESSION_START_EVENTS + turns * common.EVENTS_PER_TURN


def make_store(name: str, domain: Any, servers: common.Servers) -> Any:
    if name in OURS:
        return common.ours(domain, servers, "ours" if name == "ours" else "enc",
                           encrypted=name != "ours")
    return common.rasa_store(name, domain, servers, "rasa")


def redis_key(name: str, store: Any, sid: str) -> Optional[str]:
    if name == "RedisTrackerStore":
        return store.key_prefix + sid
    if name in OURS:
        return f"{store.config.key_prefix}:h:{{{sid}}}"
    return None


def log_rows(servers: common.Servers, sid: str, encrypted: bool) -> int:
    schema = "rpt_enc" if encrypted else "rpt"  # common.Servers: one log schema per store
    return servers.execute(f"SELECT count(*) FROM {schema}.rpt_events WHERE conversation_id = :c",
                           c=sid)[0][0]


async def prepare(cell: Cell, store: Any, domain: Any, servers: common.Servers) -> None:
    """Create the cell's conversation with ~``cell.length`` events."""
    name, length = cell.store, cell.length
    cell.sid = f"{name.split('+')[0]}-{'enc' if '+' in name else 'plain'}-{length}-{servers.tag}"
    cell.rng = random.Random(length)
    t0 = now()
    if name in OURS:
        cell.events_before = await prefill_ours(store, domain, cell.sid, length, cell.rng)
        t1 = now()
        cell.extra["store_notes"] = await common.flush_reporting_errors(store, "prefill")
        cell.extra["prefill_flush_s"] = now() - t1
        cell.extra["prefill_log_events_per_s"] = cell.events_before / (now() - t0)
    else:
        cell.events_before = await prefill_rasa(store, domain, cell.sid, length, cell.rng)
    cell.prefill_s = now() - t0
    cell.next_turn = common.turns_for(length)


async def turns(cell: Cell, store: Any, count: int, measured: bool,
                servers: common.Servers) -> None:
    sample = None
    raw: List[Optional[bytes]] = []
    if measured and cell.store in OURS:
        key = redis_key(cell.store, store, cell.sid)

        def sample() -> None:
            # Only the stored bytes between turns; decoding them here would
            # leave garbage and cold caches in the next timed turn.
            raw.append(servers.redis.hget(key, "d"))
            peak = cell.extra.get("record_bytes_peak") or 0
            cell.extra["record_bytes_peak"] = max(peak, servers.memory_usage(key) or 0)

    done = await run_turns(store, cell.sid, cell if measured else None, count, float("inf"),
                           count, cell.rng, cell.next_turn, sample)
    if raw:
        cell.extra.setdefault("replayed_events", []).extend(
            record_shape(store, key, text) for text in raw)
    cell.next_turn += done
    if not measured:
        cell.events_before += done * common.EVENTS_PER_TURN


async def finish_ours(cells: List[Cell], store: Any, servers: common.Servers) -> None:
    """Deliver what the measured turns left in the outbox; check the log is complete."""
    prefix = store.config.key_prefix
    for cell in cells:
        cell.extra["outbox_entries_before_flush"] = servers.redis.llen(
            f"{prefix}:o:{{{cell.sid}}}")
    t0 = now()
    notes = await common.flush_reporting_errors(store, "measured turns")
    flush_ms = (now() - t0) * 1000
    for cell in cells:
        cell.extra["store_notes"] += notes
        cell.extra["flush_after_turns_ms"] = flush_ms
        cell.extra["log_rows"] = log_rows(servers, cell.sid, "+" in cell.store)
        cell.extra["log_rows_expected"] = (cell.events_before
                                           + len(cell.turn) * common.EVENTS_PER_TURN)
        cell.extra["outbox_bytes_after_flush"] = servers.memory_usage(
            f"{prefix}:o:{{{cell.sid}}}")


def record_shape(store: Any, key: str, text: Optional[bytes]) -> Optional[Dict[str, int]]:
    """How many events the hot record ``text`` (the stored bytes of ``key``)
    replays on retrieve: the base's slot events plus the verbatim window.
    Decoded with the store's own codec (a private attribute: best effort,
    None if that moved)."""
    try:
        cid = key.split(":h:{", 1)[1][:-1]  # <prefix>:h:{<id>}: records are bound to it
        record = store._codec.loads_record(text, cid)
        base = record["base"]
        replayed = (len(base.get("slot_events") or [])  # schema 1
                    + sum(len(base.get(k) or []) for k in ("head", "summary", "applied"))
                    + 2 * len(base.get("loops") or []))
        return {"base_slot_events": replayed, "window_events": len(record["events"])}
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


async def profile_ours(domain: Any, servers: common.Servers, turns: int) -> Dict[str, Any]:
    """cProfile our turn path at ~1,000 events; top cumulative rasa/our entries."""
    store = make_store("ours", domain, servers)
    sid = f"profile-{servers.tag}"
    rng = random.Random(7)
    await prefill_ours(store, domain, sid, 1000, rng)
    await common.flush_reporting_errors(store, "profile prefill")
    first = common.turns_for(1000)
    await run_turns(store, sid, None, 3, float("inf"), 3, rng, first)
    profiler = cProfile.Profile()
    profiler.enable()
    t0 = now()
    await run_turns(store, sid, None, turns, float("inf"), turns, rng, first + 3)
    wall = now() - t0
    profiler.disable()
    await common.close_reporting_errors(store, [])
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append({"where": f"{_short(path)}:{line}({func})", "path": path,
                     "ncalls": ncalls, "tottime_ms_per_turn": tottime * 1000 / turns,
                     "cumtime_ms_per_turn": cumtime * 1000 / turns})
    rows.sort(key=lambda r: r["cumtime_ms_per_turn"], reverse=True)
    ours = [r for r in rows if "/rasa_persistent_tracker/" in r["path"]][:15]
    rasa = [r for r in rows if "/site-packages/rasa/" in r["path"]][:15]
    rest = [r for r in rows][:25]
    for r in rows:
        r.pop("path")
    return {"turns": turns, "wall_ms_per_turn_under_profiler": wall * 1000 / turns,
            "top_rasa_persistent_tracker": ours, "top_rasa": rasa, "top_overall": rest}


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def print_profile(prof: Dict[str, Any]) -> None:
    print(f"\n### cProfile, ours at ~1,000 events ({prof['turns']} turns, "
          f"{prof['wall_ms_per_turn_under_profiler']:.2f} ms/turn under the profiler)\n")
    for title, key in (("rasa_persistent_tracker", "top_rasa_persistent_tracker"),
                       ("rasa", "top_rasa"), ("everything", "top_overall")):
        print(f"Top cumulative ({title}), ms per turn:\n")
        print(common.markdown_table(
            ["function", "calls/turn", "tottime", "cumtime"],
            [[r["where"], fmt(r["ncalls"] / prof["turns"], 1), fmt(r["tottime_ms_per_turn"], 3),
              fmt(r["cumtime_ms_per_turn"], 3)] for r in prof[key]]))
        print()


def summarise(cells: List[Cell], lengths: List[int]) -> Dict[str, Any]:
    by = {(c.store, c.length): c for c in cells}
    med = lambda s, n: median(by[(s, n)].turn) if (s, n) in by else None  # noqa: E731
    mid = 1000 if 1000 in lengths else lengths[len(lengths) // 2]
    enc = [ratio(med("ours+encryption", n), med("ours", n)) for n in lengths]
    enc = [e for e in enc if e is not None]
    summary = {
        "at_events": mid,
        "redis_over_ours": ratio(med("RedisTrackerStore", mid), med("ours", mid)),
        "sql_over_ours": ratio(med("SQLTrackerStore", mid), med("ours", mid)),
        "ours_longest_over_shortest": ratio(med("ours", lengths[-1]), med("ours", lengths[0])),
        "encryption_over_plain": {n: ratio(med("ours+encryption", n), med("ours", n))
                                  for n in lengths},
        "encryption_over_plain_max": max(enc) if enc else None,
        "ours_ms_at_mid": None if med("ours", mid) is None else med("ours", mid) * 1000,
        "redis_bytes": {s: {n: by[(s, n)].redis_bytes for n in lengths if (s, n) in by}
                        for s in OURS},
        # MEMORY USAGE of the hot record's key after each measured turn: the
        # record grows until a compaction, so the end of a run may be a low point.
        "redis_bytes_peak": {s: {n: by[(s, n)].extra.get("record_bytes_peak")
                                 for n in lengths if (s, n) in by} for s in OURS},
    }
    return summary


def print_report(cells: List[Cell], lengths: List[int], summary: Dict[str, Any]) -> None:
    by = {(c.store, c.length): c for c in cells}
    stores = [s for s in STORES if any((s, n) in by for n in lengths)]
    print("\n### Per-turn latency, ms: median (p90) [turns measured]\n")
    header = ["store"] + [f"~{n:,} events" for n in lengths]
    rows = []
    for s in stores:
        row = [s]
        for n in lengths:
            c = by.get((s, n))
            row.append("—" if c is None else
                       f"{fmt(median(c.turn) * 1000, 3)} ({fmt(percentile(c.turn, 90) * 1000, 3)})"
                       f" [{len(c.turn)}]")
        rows.append(row)
    print(common.markdown_table(header, rows))

    print("\n### Split of the median turn, ms: retrieve / save\n")
    rows = [[s] + ["—" if (s, n) not in by else
                   f"{fmt(median(by[(s, n)].retrieve) * 1000, 3)} / "
                   f"{fmt(median(by[(s, n)].save) * 1000, 3)}" for n in lengths]
            for s in stores]
    print(common.markdown_table(header, rows))

    print("\n### Redis memory per conversation, bytes (MEMORY USAGE: Rasa's tracker key; ours: "
          "every key of the conversation, after delivery)\n")
    rows = []
    for s in ("RedisTrackerStore", "ours", "ours+encryption"):
        if any((s, n) in by for n in lengths):
            rows.append([s] + [fmt(by[(s, n)].redis_bytes, 0) if (s, n) in by else "—"
                               for n in lengths])
    for s in OURS:
        if any((s, n) in by and by[(s, n)].extra.get("record_bytes_peak") for n in lengths):
            rows.append([f"{s}: peak of the hot record over the measured turns"] + [
                fmt(by[(s, n)].extra.get("record_bytes_peak"), 0) if (s, n) in by else "—"
                for n in lengths])
    if any(("RedisTrackerStore", n) in by and ("ours", n) in by for n in lengths):
        rows.append(["RedisTrackerStore / ours"] + [
            fmt(ratio(by[("RedisTrackerStore", n)].redis_bytes, by[("ours", n)].redis_bytes), 1)
            if ("RedisTrackerStore", n) in by and ("ours", n) in by else "—" for n in lengths])
    print(common.markdown_table(header, rows))

    rows = []
    for s in OURS:
        row = [s]
        for n in lengths:
            samples = [x for x in (by[(s, n)].extra.get("replayed_events") or [] if (s, n) in by
                                   else []) if x]
            if not samples:
                row.append("?")
                continue
            base = sorted(x["base_slot_events"] for x in samples)
            window = sorted(x["window_events"] for x in samples)
            row.append(f"{base[0]}–{base[-1]} (median {base[len(base) // 2]}) + "
                       f"{window[0]}–{window[-1]}")
        rows.append(row)
    print("\n### Our hot record during the measured turns: events retrieve replays "
          "(base events + window events)\n")
    print(common.markdown_table(header, rows))

    print("\n### Our SQL event log (background delivery through the Redis outbox)\n")
    rows = []
    for s in OURS:
        for n in lengths:
            c = by.get((s, n))
            if c is None:
                continue
            x = c.extra
            rows.append([s, f"~{n:,}", fmt(c.prefill_s, 2),
                         fmt(x["prefill_log_events_per_s"], 0),
                         str(x["outbox_entries_before_flush"]),
                         fmt(x["flush_after_turns_ms"], 2),
                         f"{x['log_rows']} / {x['log_rows_expected']}"])
    print(common.markdown_table(
        ["store", "history", "prefill s (turns + flush)", "prefill events/s into SQL",
         "outbox entries left after measured turns", "flush() ms (whole store)",
         "SQL rows / expected"], rows))

    print("\n### Ratios and targets (a benchmark, not a test)\n")
    mid = summary["at_events"]

    def line(label: str, value: Optional[float], target: float, higher: bool) -> None:
        if value is None:
            print(f"SKIP  {label}: not measured")
            return
        ok = value >= target if higher else value <= target
        sign = ">=" if higher else "<="
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {value:.2f}x (target {sign} {target}x)")

    line(f"RedisTrackerStore / ours at ~{mid:,} events", summary["redis_over_ours"],
         TARGETS["vs_redis_at_1k"], True)
    line(f"SQLTrackerStore / ours at ~{mid:,} events", summary["sql_over_ours"],
         TARGETS["vs_sql_at_1k"], True)
    line(f"ours@~{lengths[-1]:,} / ours@~{lengths[0]:,}", summary["ours_longest_over_shortest"],
         TARGETS["ours_10k_vs_100"], False)
    for n, value in summary["encryption_over_plain"].items():
        line(f"encryption on / off at ~{n:,} events", value, TARGETS["encryption_overhead"], False)

    print("\n### Scale and size targets (issue 17), same run\n")
    value = summary["ours_ms_at_mid"]
    if value is None:
        print(f"SKIP  ours median at ~{mid:,} events: not measured")
    else:
        ok = value <= SCALE_TARGETS["ours_ms_at_1k"]
        print(f"{'PASS' if ok else 'FAIL'}  ours median at ~{mid:,} events: {value:.3f} ms "
              f"(target <= {SCALE_TARGETS['ours_ms_at_1k']} ms)")
    line(f"SQLTrackerStore / ours at ~{mid:,} events", summary["sql_over_ours"],
         SCALE_TARGETS["vs_sql_at_1k"], True)
    line(f"RedisTrackerStore / ours at ~{mid:,} events", summary["redis_over_ours"],
         SCALE_TARGETS["vs_redis_at_1k"], True)
    for store, sizes in summary["redis_bytes"].items():
        limit = SCALE_TARGETS["redis_bytes"][store]
        for n, size in sizes.items():
            if size is None:
                print(f"SKIP  Redis bytes of {store} at ~{n:,} events: not measured")
                continue
            print(f"{'PASS' if size <= limit else 'FAIL'}  Redis bytes of {store} at ~{n:,} "
                  f"events: {size:,} (target <= {limit:,})")
            peak = summary["redis_bytes_peak"][store].get(n)
            if peak:
                print(f"{'PASS' if peak <= limit else 'FAIL'}  Redis bytes of {store} at ~{n:,} "
                      f"events, peak of the hot record over the measured turns: {peak:,} "
                      f"(target <= {limit:,})")


async def main(args: argparse.Namespace) -> Dict[str, Any]:
    domain = common.make_domain()
    servers = common.Servers()
    lengths = args.lengths
    cells: List[Cell] = []
    notes: List[str] = []
    started = time.time()
    load_at_start = os.getloadavg()
    result: Dict[str, Any] = {}
    stores: Dict[str, Any] = {}
    try:
        for name in args.stores:
            stores[name] = make_store(name, domain, servers)
            for n in lengths:
                if args.quick and n >= 5000 and name not in OURS:
                    continue
                cell = Cell(name, n)
                await prepare(cell, stores[name], domain, servers)
                cells.append(cell)
                print(f"  prefilled {name:22s} ~{n:>6,} events in {cell.prefill_s:.1f}s",
                      flush=True)
        for cell in cells:
            await turns(cell, stores[cell.store], args.warmup, False, servers)
        # Production tables have planner statistics; fresh ones may not yet.
        servers.execute("ANALYZE")
        # Rounds over all cells in shuffled order, so that noise from anything
        # else on the machine spreads over every cell instead of hitting one.
        for r in range(args.rounds):
            t0 = now()
            order = cells[:]
            random.Random(r).shuffle(order)
            for cell in order:
                target = (args.slow_turns if cell.slow else
                          args.fast_turns if cell.store in OURS else args.turns)
                count = -(-target // args.rounds)
                count = min(count, target - len(cell.turn))
                if count > 0:
                    # Garbage left by the previous cell's store is collected
                    # now, untimed, instead of in this store's turns.
                    gc.collect()
                    await turns(cell, stores[cell.store], count, True, servers)
            print(f"  round {r + 1}/{args.rounds} done in {now() - t0:.1f}s", flush=True)
        for name in OURS:
            if name in stores:
                await finish_ours([c for c in cells if c.store == name], stores[name], servers)
        for cell in cells:
            key = redis_key(cell.store, stores[cell.store], cell.sid)
            if cell.store in OURS:  # after delivery: every key the conversation holds
                cell.redis_bytes = servers.conversation_usage(
                    stores[cell.store].config.key_prefix, cell.sid)
            elif key:
                cell.redis_bytes = servers.memory_usage(key)
            if cell.store in OURS:
                cell.extra["hot_record"] = record_shape(stores[cell.store], key,
                                                         servers.redis.hget(key, "d"))
        for store in stores.values():
            await common.close_store(store, notes)
        stores.clear()
        summary = summarise(cells, lengths)
        print_report(cells, lengths, summary)
        problems = notes + [n for c in cells for n in c.extra.get("store_notes", [])]
        if problems:
            print("\n### Store problems seen during the run\n")
            for text in problems:
                print(text)
        if args.profile:
            prof = await profile_ours(domain, servers, args.profile_turns)
            print_profile(prof)
            result["profile"] = prof
    finally:
        for store in stores.values():
            await common.close_store(store, notes)
        servers.cleanup()
    result.update({
        **common.run_header("per_turn", args.quick, started, load_at_start),
        "servers": {"redis": common.REDIS_URL.split("@")[-1],
                    "postgresql": common.DATABASE_URL.split("@")[-1]},
        "turn": "retrieve + 5 events (user with 10-intent ranking and an entity, "
                "utter_x, bot, slot, action_listen) + save",
        "lengths": lengths, "targets": TARGETS, "scale_targets": SCALE_TARGETS, "summary": summary,
        "cells": [c.as_dict() for c in cells],
        "store_notes": notes + [n for c in cells for n in c.extra.get("store_notes", [])],
    })
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer turns; skip Rasa's stores at 10,000 events")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile our turn path at ~1,000 events")
    parser.add_argument("--stores", nargs="+", default=STORES, choices=STORES)
    parser.add_argument("--lengths", nargs="+", type=int, default=[100, 1000, 10000])
    common.add_loop_option(parser)
    parser.add_argument("--output", default=os.path.join(common.RESULTS, "per_turn.json"))
    args = parser.parse_args()
    args.lengths = sorted(args.lengths)
    args.turns, args.slow_turns, args.warmup = (10, 5, 2) if args.quick else (30, 12, 3)
    # Our turns take about a millisecond: many more of them for a stable median.
    args.fast_turns = 60 if args.quick else 300
    args.rounds = 2 if args.quick else 6
    args.profile_turns = 50 if args.quick else 200
    return args


if __name__ == "__main__":
    arguments = parse_args()
    output = common.run(main(arguments), arguments.loop)
    common.write_results(output, arguments.output)
