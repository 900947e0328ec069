"""Many concurrent conversations through one store in one asyncio process.

For each store (ours, Rasa's RedisTrackerStore and SQLTrackerStore) and each
number of conversations N, against real Redis and PostgreSQL:

* closed loop: every conversation sends its next turn as soon as the last one
  is saved; reports turns/s and per-turn latency;
* open loop: turns are scheduled at a fixed total rate spread evenly over the
  N conversations (a conversation's turns still run one after another, as
  Rasa's lock does); latency counts from the scheduled time, so queueing
  shows. Turns still unfinished at the cut-off count with the time they had
  waited (a lower bound, flagged ``>=``).

A turn is ``retrieve`` + five realistic events + ``save``, with one
``asyncio.sleep(0)`` before ``save`` where the assistant would run its
policies. Event-loop health is watched two ways: a ticker task sleeping 1 ms
records its lateness, and every loop callback is timed (the longest single
callback is the longest stall, named by its task), first during an idle
baseline period and then in every cell. Garbage collection is watched too:
its pauses, and how many objects per turn survive into the old generation.
CPython collects the whole heap once those add up to a quarter of it (Rasa's
heap: ~50 ms), so that rate decides how often a full collection stops the
loop. Each cell starts after an untimed ``gc.collect()``.

    .venv/bin/python benchmarks/load.py [--quick] [--plot-only]

Writes ``results/load.json`` and ``results/latency.png``.
"""
import argparse
import asyncio
import collections
import gc
import json
import logging
import os
import random
import sys
import time
from typing import Any, Deque, Dict, List, Optional, Set

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import fmt, now, percentile  # noqa: E402

from rasa.shared.core.trackers import DialogueStateTracker  # noqa: E402

STORES = ["ours", "RedisTrackerStore", "SQLTrackerStore"]
TARGET_THROUGHPUT_RATIO = 30.0
TARGET_P99_MS = 20.0
TARGET_STALL_MS = 5.0


# ------------------------------------------------------------ loop watching


class LoopWatch:
    """Ticker lateness, the duration of every event-loop callback, and GC pauses.

    Callbacks are timed by wrapping ``asyncio.Handle._run`` (what debug mode's
    ``slow_callback_duration`` does, without debug mode's other overheads).
    Garbage-collector pauses are timed with ``gc.callbacks``; a callback's time
    minus the GC pauses inside it is what the code it ran spent by itself.
    """

    def __init__(self) -> None:
        self.lateness: List[float] = []
        self.max_callback = 0.0
        self.max_owner = ""
        self.max_own = 0.0
        self.max_own_owner = ""
        # CPU time of the loop's thread during that callback: far below its wall
        # time means the thread was waiting (for the GIL, or for a core).
        self.max_own_cpu = 0.0
        self.callbacks_over = 0
        self.own_over = 0
        self.owners_over: Dict[str, int] = {}
        self.gc_pauses: List[tuple] = []
        self.promoted = 0
        self._young = 0
        self._gc_total = 0.0
        self._gc_start = 0.0
        self._task: Optional[asyncio.Task] = None
        self._original = None

    def _gc(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            if info["generation"] == 1:
                self._young = len(gc.get_objects(0)) + len(gc.get_objects(1))
            self._gc_start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_start
            self._gc_total += pause
            self.gc_pauses.append((info["generation"], pause))
            if info["generation"] == 1:
                # Survivors of a middle-generation collection age into the old
                # one; when they add up to a quarter of it, CPython runs a full
                # collection. (Plain tuples it stops tracking count here too,
                # so this is an upper bound.)
                self.promoted += self._young - info["collected"]

    def start(self) -> None:
        self._original = asyncio.events.Handle._run
        original, watch = self._original, self
        limit = TARGET_STALL_MS / 1000

        def timed_run(handle: asyncio.Handle) -> None:
            gc_before = watch._gc_total
            c0 = time.thread_time()
            t0 = time.perf_counter()
            original(handle)
            spent = time.perf_counter() - t0
            cpu = time.thread_time() - c0
            own = spent - (watch._gc_total - gc_before)
            if spent > limit:
                watch.callbacks_over += 1
            if own > limit:
                watch.own_over += 1
                name = _owner(handle)
                watch.owners_over[name] = watch.owners_over.get(name, 0) + 1
            if spent > watch.max_callback:
                watch.max_callback, watch.max_owner = spent, _owner(handle)
            if own > watch.max_own:
                watch.max_own, watch.max_own_owner = own, _owner(handle)
                watch.max_own_cpu = cpu

        asyncio.events.Handle._run = timed_run
        gc.callbacks.append(self._gc)
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="ticker")

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lateness.append(time.perf_counter() - t0 - 0.001)

    async def stop(self) -> Dict[str, Any]:
        asyncio.events.Handle._run = self._original
        gc.callbacks.remove(self._gc)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        late = self.lateness
        gen2 = [p for g, p in self.gc_pauses if g == 2]
        return {
            "ticks": len(late),
            "ticker_p50_ms": percentile(late, 50) * 1000,
            "ticker_p99_ms": percentile(late, 99) * 1000,
            "ticker_max_ms": max(late) * 1000 if late else None,
            "ticks_late_over_5ms": sum(1 for x in late if x > TARGET_STALL_MS / 1000),
            "max_callback_ms": self.max_callback * 1000,
            "max_callback_owner": self.max_owner,
            "callbacks_over_5ms": self.callbacks_over,
            "max_callback_without_gc_ms": self.max_own * 1000,
            "max_callback_without_gc_owner": self.max_own_owner,
            "max_callback_without_gc_cpu_ms": self.max_own_cpu * 1000,
            "callbacks_over_5ms_without_gc": self.own_over,
            "callbacks_over_5ms_without_gc_by_owner": dict(sorted(
                self.owners_over.items(), key=lambda kv: -kv[1])[:5]),
            "gc_collections": len(self.gc_pauses),
            "gc_gen2_collections": len(gen2),
            "gc_max_pause_ms": max((p for _, p in self.gc_pauses), default=0.0) * 1000,
            "gc_total_ms": self._gc_total * 1000,
            "gc_promoted_to_old": self.promoted,
        }


def _owner(handle: asyncio.Handle) -> str:
    callback = handle._callback
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        return f"task {task.get_name()!r}: {getattr(coro, '__qualname__', repr(coro))}"
    return getattr(callback, "__qualname__", type(callback).__name__)


class LogCounter(logging.Handler):
    """Counts our package's WARNING+ records during a cell; keeps the first few."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 3:
            self.first.append(f"{record.levelname} {record.name}: {record.getMessage()}")


# ------------------------------------------------------------ setup


class Conversations:
    """N conversations with ~``history`` events each in one store.

    Ours: every conversation is built in memory with ``from_events`` and saved
    once through the public API, then ``flush()`` waits until the log holds it
    all (so no backlog is delivered during the measurement). Rasa's stores: one
    template conversation is built the same way and saved once by the store;
    the others are copies of what it wrote (Redis value / SQL rows) with the
    conversation id changed, which is exactly what it would have written.
    """

    def __init__(self, name: str, n: int, history: int, domain: Any,
                 servers: common.Servers, config: Optional[Dict[str, Any]] = None,
                 variant: int = 0) -> None:
        self.name = name
        self.config = config or {}
        self.n = n
        self.history = history
        self.domain = domain
        self.servers = servers
        self.store: Any = None
        self.sids: List[str] = []
        self.turn_index: List[int] = []
        self.notes: List[str] = []
        self._cell = f"{name[:4].lower()}{n}v{variant}"
        self._prefix = ""
        self._sql_url = ""

    async def open(self) -> None:
        servers, cell = self.servers, self._cell
        tag = servers.tag
        rng = random.Random(self.n)
        events = common.history(self.history, rng)
        self.turn_index = [common.turns_for(self.history)] * self.n
        if self.name == "ours":
            self._sql_url = servers.new_schema(f"rpt_{cell}")
            self._prefix = servers.prefix(cell)
            self.use_variant(self.config)
            self.sids = [f"c{i}-{cell}-{tag}" for i in range(self.n)]
            for sid in self.sids:
                await self.store.save(DialogueStateTracker.from_events(
                    sid, events, self.domain.slots))
            self.notes += await common.flush_reporting_errors(self.store, "setup")
            return
        self.store = common.rasa_store(self.name, self.domain, servers, cell)
        self.sids = [f"c{i}-{cell}-{tag}" for i in range(self.n)]
        await self.store.save(DialogueStateTracker.from_events(
            self.sids[0], events, self.domain.slots))
        self._copy(self.sids[0], self.sids[1:])

    def use_variant(self, config: Dict[str, Any]) -> None:
        """(Ours) a store instance with extra config on the same keys and schema."""
        self.store = common.ours(self.domain, self.servers, self._cell, sql_url=self._sql_url,
                                 key_prefix_override=self._prefix, **config)

    def _copy(self, template: str, targets: List[str]) -> None:
        servers = self.servers
        if self.name == "SQLTrackerStore":
            servers.execute(
                "INSERT INTO events (sender_id, type_name, timestamp, intent_name, "
                "action_name, data) SELECT t.sid, e.type_name, e.timestamp, e.intent_name, "
                "e.action_name, e.data FROM unnest(CAST(:sids AS text[])) WITH ORDINALITY "
                "AS t(sid, n) CROSS JOIN events e WHERE e.sender_id = :tpl ORDER BY t.n, e.id",
                sids=targets, tpl=template)
            servers.execute("ANALYZE events")
            return
        red = servers.redis
        key = lambda sid: self.store.key_prefix + sid  # noqa: E731
        value = red.get(key(template)).decode("utf-8")
        quoted = json.dumps(template)
        if value.count(quoted) != 1:
            raise RuntimeError("template id not found exactly once in the stored tracker")
        ttl = red.pttl(key(template))
        pipe = red.pipeline(transaction=False)
        for i, sid in enumerate(targets, 1):
            pipe.set(key(sid), value.replace(quoted, json.dumps(sid)),
                     px=ttl if ttl > 0 else None)
            if i % 100 == 0:
                pipe.execute()
        pipe.execute()

    async def close(self) -> None:
        await common.close_store(self.store, self.notes)
        if self.name == "ours":
            self.servers.delete_prefix(self._prefix)
        elif self.name == "RedisTrackerStore":
            self.servers.delete_prefix(self.store.key_prefix.split(":")[0])
        else:
            self.servers.execute("TRUNCATE events")


# ------------------------------------------------------------ running turns


class Errors:
    def __init__(self) -> None:
        self.count = 0
        self.first: List[str] = []

    def add(self, exc: BaseException) -> None:
        self.count += 1
        if len(self.first) < 2:
            self.first.append(common.format_error(exc))


class Abandoned(Exception):
    """The cell's hard cut-off passed between retrieve and save."""


async def one_turn(convs: Conversations, c: int, rng: random.Random,
                   hard_cut: float = float("inf")) -> None:
    sid = convs.sids[c]
    events = common.turn_events(convs.turn_index[c], rng)
    tracker = await convs.store.retrieve(sid)
    if tracker is None:
        raise RuntimeError(f"retrieve({sid!r}) returned None for an existing conversation")
    for event in events:
        tracker.update(event)
    await asyncio.sleep(0)  # the assistant's policies and actions would run here
    if now() > hard_cut:
        raise Abandoned()
    await convs.store.save(tracker)
    convs.turn_index[c] += 1


async def closed_loop(convs: Conversations, duration: float, drain_cap: float
                      ) -> Dict[str, Any]:
    """Turns start until ``duration`` has passed; turns in flight then finish
    (abandoned if still unsaved ``drain_cap`` seconds later). Throughput is
    completed turns over the time until the last one completed: stores that
    block the loop finish whole rounds late, so a fixed window would count 0."""
    latencies: List[float] = []
    errors = Errors()
    t_start = now()
    deadline, hard_cut = t_start + duration, t_start + duration + drain_cap
    last_done = t_start
    abandoned = 0

    async def worker(c: int) -> None:
        nonlocal last_done, abandoned
        rng = random.Random(c)
        while True:
            await asyncio.sleep(0)  # the next message arrives over HTTP
            t0 = now()
            if t0 >= deadline:
                return
            try:
                await one_turn(convs, c, rng, hard_cut)
            except Abandoned:
                abandoned += 1
                return
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                errors.add(exc)
                continue
            t1 = now()
            latencies.append(t1 - t0)
            last_done = max(last_done, t1)

    await asyncio.gather(*(worker(c) for c in range(convs.n)))
    span = max(last_done - t_start, 1e-9)
    return {"completed": len(latencies), "turns_per_s": len(latencies) / span,
            "span_s": span, "cell_s": now() - t_start, "abandoned": abandoned,
            "latencies": latencies, "errors": errors}


async def open_loop(convs: Conversations, rate: float, duration: float, grace: float
                    ) -> Dict[str, Any]:
    """Turn k is due at k/rate, for conversation k mod N. One dispatcher starts
    each turn as a task when it is due (as a server starts a request handler),
    or queues it behind the conversation's turn still in flight. Nothing new
    starts after schedule end + ``grace``; what is still due then is counted
    with the time it had waited (a lower bound on its latency).

    Waiting conversations hold no timers: per-conversation sleepers would
    each keep a one-second timer, future and context alive per turn, and the
    garbage collector would count those against the store (see LoopWatch)."""
    n = convs.n
    latencies: List[float] = []
    errors = Errors()
    t0 = now() + 0.05
    end_schedule = t0 + duration
    hard_cut = end_schedule + grace
    scheduled = int(rate * duration)
    settled = [False] * scheduled  # completed or failed
    waiting: List[Deque[int]] = [collections.deque() for _ in range(n)]
    busy = [False] * n
    rngs = [random.Random(c) for c in range(n)]
    running: Set[asyncio.Task] = set()

    def due(k: int) -> float:
        return t0 + k / rate

    def start(c: int, k: int) -> None:
        busy[c] = True
        task = asyncio.get_running_loop().create_task(turn(c, k))
        running.add(task)
        task.add_done_callback(running.discard)

    async def turn(c: int, k: int) -> None:
        try:
            await one_turn(convs, c, rngs[c], hard_cut)
            latencies.append(now() - due(k))
            settled[k] = True
        except Abandoned:
            waiting[c].clear()
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            errors.add(exc)
            settled[k] = True
        busy[c] = False
        if waiting[c] and now() <= hard_cut:
            start(c, waiting[c].popleft())

    for k in range(scheduled):
        delay = due(k) - now()
        if delay > 0:
            await asyncio.sleep(delay)
        c = k % n
        if busy[c]:
            waiting[c].append(k)
        else:
            start(c, k)
    while running:
        await asyncio.wait(set(running))
    cutoff = now()
    unfinished = [max(0.0, cutoff - due(k)) for k in range(scheduled) if not settled[k]]
    return {"scheduled": scheduled,
            "completed": len(latencies), "unfinished": len(unfinished),
            "latencies": latencies, "censored": unfinished, "errors": errors,
            "achieved_turns_per_s": len(latencies) / max(cutoff - t0, 1e-9),
            "cell_s": cutoff - t0}


# ------------------------------------------------------------ cells


def describe(latencies: List[float], censored: Optional[List[float]] = None) -> Dict[str, Any]:
    values = latencies + (censored or [])
    return {"p50_ms": percentile(values, 50) * 1000, "p99_ms": percentile(values, 99) * 1000,
            "max_ms": max(values) * 1000 if values else None,
            "lower_bound": bool(censored)}


async def run_cell(convs: Conversations, label: str, mode: str, args: argparse.Namespace
                   ) -> Dict[str, Any]:
    counter = LogCounter()
    logging.getLogger("rasa_persistent_tracker").addHandler(counter)
    old_generation = len(gc.get_objects(2))
    watch = LoopWatch()
    watch.start()
    try:
        if mode == "closed":
            raw = await closed_loop(convs, args.closed_duration, args.drain)
        else:
            raw = await open_loop(convs, args.rate, args.duration, args.grace)
    finally:
        loop_stats = await watch.stop()
        logging.getLogger("rasa_persistent_tracker").removeHandler(counter)
    errors: Errors = raw.pop("errors")
    latencies = raw.pop("latencies")
    censored = raw.pop("censored", [])
    cell = {"store": label, "mode": mode, "conversations": convs.n,
            "history_events": convs.history, **raw, **describe(latencies, censored),
            "loop": loop_stats, "errors": errors.count, "first_errors": errors.first,
            "store_warnings": counter.count, "first_store_warnings": counter.first}
    if mode == "open":
        cell["rate_turns_per_s"] = args.rate
    per_turn = loop_stats["gc_promoted_to_old"] / max(len(latencies), 1)
    loop_stats["gc_old_generation_at_start"] = old_generation
    loop_stats["gc_promoted_per_turn"] = per_turn
    # How often this load alone would bring on a full collection of this heap.
    loop_stats["gc_turns_per_full_collection"] = (old_generation / 4 / per_turn
                                                  if per_turn else None)
    if convs.name == "ours":
        t0 = now()
        cell["flush_errors"] = await common.flush_reporting_errors(convs.store, f"{label} {mode}")
        cell["flush_after_cell_s"] = now() - t0
    return cell


async def baseline(seconds: float) -> Dict[str, Any]:
    """The ticker and callback timer on an idle loop: the machine's own noise."""
    watch = LoopWatch()
    watch.start()
    await asyncio.sleep(seconds)
    return await watch.stop()


def labels(cells: List[Dict[str, Any]]) -> List[str]:
    seen: List[str] = []
    for c in cells:
        if c["store"] not in seen:
            seen.append(c["store"])
    return seen


def print_tables(cells: List[Dict[str, Any]], base: Dict[str, Any]) -> None:
    print("\n### Baseline (idle loop, ticker only, no store calls)\n")
    print(f"ticker lateness p50 {fmt(base['ticker_p50_ms'], 3)} ms, p99 "
          f"{fmt(base['ticker_p99_ms'], 3)} ms, max {fmt(base['ticker_max_ms'], 3)} ms; "
          f"longest callback {fmt(base['max_callback_ms'], 3)} ms; GC collections "
          f"{base['gc_collections']}")
    for mode in ("closed", "open"):
        rows = []
        for c in (c for c in cells if c["mode"] == mode):
            ge = ">=" if c.get("lower_bound") else ""
            loop = c["loop"]
            if mode == "closed":
                rate = f"{fmt(c['turns_per_s'], 1)} ({c['completed']} in {c['span_s']:.1f}s)"
            else:
                rate = f"{fmt(c['achieved_turns_per_s'], 1)} ({c['completed']}/{c['scheduled']})"
            rows.append([
                c["store"], str(c["conversations"]), rate,
                ge + fmt(c["p50_ms"], 2), ge + fmt(c["p99_ms"], 2),
                fmt(loop["ticker_p99_ms"], 2), fmt(loop["ticker_max_ms"], 2),
                f"{fmt(loop['max_callback_ms'], 1)} / {fmt(loop['max_callback_without_gc_ms'], 1)}",
                f"{loop['callbacks_over_5ms']} / {loop['callbacks_over_5ms_without_gc']}",
                f"{fmt(loop['gc_max_pause_ms'], 1)} ({loop['gc_gen2_collections']})",
                f"{fmt(loop['gc_promoted_per_turn'], 1)} "
                f"({fmt(loop['gc_turns_per_full_collection'], 0)})",
                str(c["errors"]), str(c["store_warnings"]),
                fmt(c.get("flush_after_cell_s"), 2) if "flush_after_cell_s" in c else "—"])
        if not rows:
            continue
        if mode == "closed":
            print("\n### Closed loop (each conversation sends its next turn when the last is "
                  "saved)\n")
            rate_head = "turns/s (turns in s)"
        else:
            print(f"\n### Open loop ({cells[-1].get('rate_turns_per_s', '')} turns/s in total, "
                  f"latency from the scheduled time)\n")
            rate_head = "turns/s done (done/scheduled)"
        print(common.markdown_table(
            ["store", "N", rate_head, "p50 ms", "p99 ms", "ticker p99 ms", "ticker max ms",
             "longest callback ms (raw / minus GC)", "callbacks > 5 ms (raw / minus GC)",
             "longest GC pause ms (gen-2 runs)",
             "objects aged into the old generation per turn (turns per full GC at that rate)",
             "errors", "store warnings",
             "flush() after s"], rows))


def check_targets(cells: List[Dict[str, Any]], base: Dict[str, Any],
                  args: argparse.Namespace) -> Dict[str, Any]:
    def find(store: str, mode: str, n: int) -> Optional[Dict[str, Any]]:
        return next((c for c in cells if c["store"] == store and c["mode"] == mode
                     and c["conversations"] == n), None)

    print("\n### Targets (a benchmark, not a test)\n")
    out: Dict[str, Any] = {}
    redis_cell = find("RedisTrackerStore", "closed", 200)
    for label in (x for x in labels(cells) if x.startswith("ours")):
        ours = find(label, "closed", 200)
        if ours and redis_cell and redis_cell["turns_per_s"]:
            value = ours["turns_per_s"] / redis_cell["turns_per_s"]
            out[f"{label}: closed_200_throughput_ratio_vs_redis"] = value
            print(f"{'PASS' if value >= TARGET_THROUGHPUT_RATIO else 'FAIL'}  [{label}] closed "
                  f"loop, 200 conversations at ~{args.history:,} events: "
                  f"{ours['turns_per_s']:.1f} turns/s vs RedisTrackerStore "
                  f"{redis_cell['turns_per_s']:.1f} = {value:.1f}x (target >= "
                  f"{TARGET_THROUGHPUT_RATIO:g}x); {ours['errors']} failed turns")
        else:
            print(f"SKIP  [{label}] closed-loop throughput ratio: cells missing")
        ours = find(label, "open", 200)
        if not ours:
            print(f"SKIP  [{label}] open-loop targets: cell missing")
            continue
        p99 = ours["p99_ms"]
        ok = p99 < TARGET_P99_MS and not ours["lower_bound"] and not ours["errors"]
        out[f"{label}: open_200_p99_ms"] = p99
        print(f"{'PASS' if ok else 'FAIL'}  [{label}] open loop, {args.rate:g} turns/s over 200 "
              f"conversations: p99 {'>=' if ours['lower_bound'] else ''}{p99:.2f} ms "
              f"(target < {TARGET_P99_MS:g} ms); {ours['errors']} failed turns")
        loop = ours["loop"]
        raw, own = loop["max_callback_ms"], loop["max_callback_without_gc_ms"]
        out[f"{label}: open_200_max_callback_ms"] = raw
        out[f"{label}: open_200_max_callback_without_gc_ms"] = own
        out[f"{label}: open_200_ticker_max_ms"] = loop["ticker_max_ms"]
        print(f"{'PASS' if raw <= TARGET_STALL_MS else 'FAIL'}  [{label}] open loop, 200 "
              f"conversations: longest single loop callback {raw:.2f} ms, "
              f"{loop['callbacks_over_5ms']} callbacks > 5 ms (target: none > "
              f"{TARGET_STALL_MS:g} ms; idle baseline longest {base['max_callback_ms']:.2f} ms)")
        print(f"{'PASS' if own <= TARGET_STALL_MS else 'FAIL'}  [{label}] same, minus garbage-"
              f"collector pauses inside the callback: longest {own:.2f} ms "
              f"({loop['max_callback_without_gc_owner']}; of which the loop's thread ran "
              f"{loop['max_callback_without_gc_cpu_ms']:.2f} ms on a CPU), "
              f"{loop['callbacks_over_5ms_without_gc']} "
              f"> 5 ms; GC: {loop['gc_gen2_collections']} gen-2 collections, longest pause "
              f"{loop['gc_max_pause_ms']:.1f} ms")
        print(f"INFO  [{label}] open loop, 200 conversations: "
              f"{fmt(loop['gc_promoted_per_turn'], 1)} objects per turn aged into the old "
              f"generation (of {loop['gc_old_generation_at_start']:,}); at that rate alone "
              f"CPython runs a full collection every "
              f"~{fmt(loop['gc_turns_per_full_collection'], 0)} turns")
        print(f"INFO  [{label}] open loop, 200 conversations: ticker lateness max "
              f"{loop['ticker_max_ms']:.2f} ms, p99 {loop['ticker_p99_ms']:.2f} ms (idle "
              f"baseline max {base['ticker_max_ms']:.2f} ms, p99 {base['ticker_p99_ms']:.2f} ms)")
    return out


# ------------------------------------------------------------ plot


def plot(load: Optional[Dict[str, Any]], per_turn: Optional[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.6))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = (["InMemoryTrackerStore", "RedisTrackerStore", "SQLTrackerStore", "ours",
              "ours+encryption"] + [x for x in labels((load or {}).get("cells", []))
                                    if x.startswith("ours,")])
    color = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    ax = axes[0]
    if per_turn:
        stores: Dict[str, List] = {}
        for c in per_turn["cells"]:
            stores.setdefault(c["store"], []).append(c)
        for name, cs in stores.items():
            cs.sort(key=lambda c: c["events_before_measuring"])
            xs = [c["events_before_measuring"] for c in cs]
            ax.errorbar(xs, [c["median_ms"] for c in cs],
                        yerr=[[0] * len(cs), [c["p90_ms"] - c["median_ms"] for c in cs]],
                        marker="o", capsize=3, label=name, color=color.get(name))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "run per_turn.py first", ha="center", transform=ax.transAxes)
    ax.set_title("Per-turn latency vs history (1 conversation)\nmedian, bar to p90")
    ax.set_xlabel("events in the conversation")
    ax.set_ylabel("ms per turn")
    ax.grid(True, which="both", alpha=0.3)

    if load:
        cells = load["cells"]
        for mode, ax, key, title in (
                ("closed", axes[1], "turns_per_s", "Closed loop: throughput vs concurrency"),
                ("open", axes[2], "p99_ms", "Open loop: latency vs concurrency")):
            for name in labels(cells):
                cs = sorted((c for c in cells if c["store"] == name and c["mode"] == mode),
                            key=lambda c: c["conversations"])
                if not cs:
                    continue
                xs = [c["conversations"] for c in cs]
                if mode == "closed":
                    ax.plot(xs, [c[key] for c in cs], marker="o", label=name,
                            color=color.get(name))
                else:
                    ax.plot(xs, [c["p99_ms"] for c in cs], marker="o", label=f"{name} p99",
                            color=color.get(name))
                    ax.plot(xs, [c["p50_ms"] for c in cs], marker="x", linestyle="--",
                            color=color.get(name), label=f"{name} p50")
                    if any(c["lower_bound"] for c in cs):
                        ax.annotate("≥, saturated", (xs[-1], cs[-1]["p99_ms"]), fontsize=7,
                                    textcoords="offset points", xytext=(-40, 6),
                                    color=color.get(name))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("concurrent conversations")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, framealpha=0.7)
            history = cells[0]["history_events"] if cells else "?"
            if mode == "closed":
                ax.set_ylabel("turns per second")
                ax.set_title(f"{title}\n(~{history:,} events per conversation)")
            else:
                ax.set_ylabel("ms from scheduled time to saved")
                ax.set_title(f"{title}\n({load.get('rate_turns_per_s')} turns/s total, "
                             f"~{history:,} events)")
                ax.axhline(TARGET_P99_MS, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------ main


POOL_VARIANT = ("ours, redis_max_connections=2000", {"redis_max_connections": 2000})
# Remembered records speed up turns but are objects the garbage collector
# walks: this variant shows what they cost (and save) under load.
NO_CACHE_VARIANT = ("ours, record_cache_size=0", {"record_cache_size": 0})


def progress(cell: Dict[str, Any], setup_s: float) -> None:
    ge = ">=" if cell["lower_bound"] else ""
    rate = (f"{cell['turns_per_s']:.1f} turns/s" if cell["mode"] == "closed" else
            f"{cell['completed']}/{cell['scheduled']} done")
    print(f"  {cell['store']:34s} N={cell['conversations']:5d} {cell['mode']:6s}: {rate}, "
          f"p50 {ge}{cell['p50_ms']:.2f} ms, p99 {ge}{cell['p99_ms']:.2f} ms, longest callback "
          f"{cell['loop']['max_callback_ms']:.1f} ms ({cell['loop']['max_callback_without_gc_ms']:.1f}"
          f" minus GC), errors {cell['errors']}, store warnings "
          f"{cell['store_warnings']} ({cell['cell_s']:.1f}s; setup {setup_s:.1f}s)", flush=True)
    for text in cell["first_errors"][:1]:
        print("    first error: " + "\n    ".join(text.rstrip().splitlines()[-14:]))
    for text in cell["first_store_warnings"][:2]:
        print("    store log: " + text[:300])


async def main(args: argparse.Namespace) -> Dict[str, Any]:
    domain = common.make_domain()
    servers = common.Servers()
    started = time.time()
    cells: List[Dict[str, Any]] = []
    notes: List[str] = []
    load_at_start = os.getloadavg()
    try:
        base = await baseline(args.baseline)
        for name in args.stores:
            variants: List[tuple] = [(name, None)]
            if name == "ours" and args.pool_variant:
                variants.append(POOL_VARIANT)
            if name == "ours" and args.cache_variant:
                variants.append(NO_CACHE_VARIANT)
            for n in args.conversations:
                for number, (label, config) in enumerate(variants):
                    t0 = now()
                    convs = Conversations(name, n, args.history, domain, servers, config, number)
                    try:
                        await convs.open()
                        setup_s = now() - t0
                        if args.gc_freeze:
                            gc.collect()
                            gc.freeze()
                        for mode in args.modes:
                            # Untimed: no cell pays for garbage left by setup or
                            # by the cell before it.
                            gc.collect()
                            cell = await run_cell(convs, label, mode, args)
                            cell["setup_s"] = setup_s
                            cells.append(cell)
                            progress(cell, setup_s)
                    finally:
                        await convs.close()
                        notes += convs.notes
                        if args.gc_freeze:
                            gc.unfreeze()
        print_tables(cells, base)
        targets = check_targets(cells, base, args)
        if notes:
            print("\n### Store problems seen during setup / shutdown\n")
            for text in notes:
                print(text)
    finally:
        servers.cleanup()
    return {
        **common.run_header("load", args.quick, started, load_at_start),
        "history_events": args.history, "rate_turns_per_s": args.rate,
        "duration_s": args.duration, "gc_freeze": args.gc_freeze, "baseline": base, "targets": targets, "cells": cells,
        "store_notes": notes,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N in 50, 200; 4 s cells")
    parser.add_argument("--plot-only", action="store_true",
                        help="only redraw results/latency.png from the JSON files")
    parser.add_argument("--stores", nargs="+", default=STORES, choices=STORES)
    parser.add_argument("--conversations", nargs="+", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["closed", "open"],
                        choices=["closed", "open"])
    parser.add_argument("--history", type=int, default=1000,
                        help="events per conversation before the run (default 1000)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="open loop: total turns per second (default 200)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after each setup (moves setup objects out of the "
                             "collector's reach, as servers often do after loading)")
    parser.add_argument("--no-pool-variant", dest="pool_variant", action="store_false",
                        help=f"skip the extra run of ours with {POOL_VARIANT[1]}")
    parser.add_argument("--no-cache-variant", dest="cache_variant", action="store_false",
                        help=f"skip the extra run of ours with {NO_CACHE_VARIANT[1]}")
    parser.add_argument("--output", default=os.path.join(common.RESULTS, "load.json"))
    args = parser.parse_args()
    if args.conversations is None:
        args.conversations = [50, 200] if args.quick else [50, 200, 1000]
    if args.duration is None:
        args.duration = 4.0 if args.quick else 10.0
    # Closed loop: turns start for this long, then those in flight may take up
    # to `drain` seconds more (Rasa's stores finish a whole round late).
    args.closed_duration = args.duration * 0.6
    args.drain = 25.0
    args.grace = 3.0 if args.quick else 5.0
    args.baseline = 2.0 if args.quick else 5.0
    return args


if __name__ == "__main__":
    arguments = parse_args()
    png = os.path.join(common.RESULTS, "latency.png")
    os.makedirs(common.RESULTS, exist_ok=True)
    per_turn_json = load_json(os.path.join(common.RESULTS, "per_turn.json"))
    if not arguments.plot_only:
        # asyncio's own loop, not uvloop: callbacks are timed by wrapping
        # asyncio.Handle._run, which uvloop's C handles do not go through.
        result = asyncio.run(main(arguments))
        common.write_results(result, arguments.output)
    plot(load_json(arguments.output), per_turn_json, png)
    print(f"Plot written to {os.path.relpath(png)}.")
