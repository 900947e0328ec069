"""End to end: `rasa run` with the demo bot, its action server and each store.

The demo banking bot (``example_bot/``) is trained once into a temp dir. Its
action server and one ``rasa run --enable-api`` per store (this store,
Rasa's ``RedisTrackerStore``, Rasa's ``SQLTrackerStore`` on PostgreSQL) run
side by side on loopback ports, each with an endpoints.yml of its own that
loads the store through ``benchmarks/e2e_timed.py``: the unchanged class,
with the time spent inside its ``retrieve`` / ``retrieve_full_tracker`` /
``save`` / ``keys`` / ``exists`` appended to a file per call.

One scripted dialogue (greet, balance behind the login form, a transfer
through the transfer form, thanks, "where were we?", log out: 11 user
messages) is first recorded over REST on a throwaway conversation. Each
conversation is then pre-filled to ~100, ~1,000 or ~5,000 events by
replaying that recording's turns in order (fresh message ids, timestamps
ending now), built with ``DialogueStateTracker.from_events`` and written
with the store's own ``save`` from this process. The measured turns continue
the script over ``POST /webhooks/rest/webhook``, one request at a time, in
shuffled rounds over all cells so that competing work on the machine is
spread over every store. Per turn: the request's wall time and the store's
time during it; share = store time / wall time.

    .venv/bin/python benchmarks/end_to_end.py [--quick] [--turns N]

Prints markdown tables and the target line (this store's share <= 5 % of the
turn at every length), writes ``results/end_to_end.json`` and
``results/end_to_end.png``. A benchmark, not a test: FAIL does not change
the exit code.
"""
import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import fmt, median, percentile  # noqa: E402

# tests/processes.py runs the demo bot's processes for the process tests; its
# `rasa` is the one next to this interpreter unless RPT_VENV_BIN says otherwise.
os.environ.setdefault("RPT_VENV_BIN", os.path.dirname(sys.executable))
from tests.processes import BOT_DIR, RASA, BotProcess, process_env, tail  # noqa: E402

STORES = ["ours", "RedisTrackerStore", "SQLTrackerStore"]
LABELS = {"ours": "this store", "RedisTrackerStore": "RedisTrackerStore",
          "SQLTrackerStore": "SQLTrackerStore (PostgreSQL)"}
TIMED_TYPE = {"ours": "benchmarks.e2e_timed.TimedPersistentTrackerStore",
              "RedisTrackerStore": "benchmarks.e2e_timed.TimedRedisTrackerStore",
              "SQLTrackerStore": "benchmarks.e2e_timed.TimedSQLTrackerStore"}
TARGET_SHARE = 0.05
TRAIN_TIMEOUT_S = 900
Call = Tuple[str, str, float, float]  # method, conversation, seconds, CPU seconds

# (user message, a text one of the bot's replies must contain)
SCRIPT: List[Tuple[str, str]] = [
    ("hi", "I'm Penny"),
    ("what's my balance?", "8-digit account number"),
    ("12345678", "4-digit PIN"),
    ("1234", "The balance of account"),
    ("send money", "Who would you like to send money to?"),
    ("Bob", "How much would you like to send to Bob Smith?"),
    ("$5", "Please confirm: send $5.00"),
    ("yes", "Done! I sent $5.00 to Bob Smith"),
    ("thanks", "You're welcome"),
    ("where were we?", "Nothing is in progress right now"),
    ("log out", "You're logged out"),
]


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(workdir: Path) -> Path:
    """``rasa train`` of the demo bot (its own light pipeline) into ``workdir``."""
    log = workdir / "train.log"
    env = process_env(RASA_CACHE_DIRECTORY=str(workdir / "train_cache"))
    with open(log, "wb") as out:
        result = subprocess.run(
            [RASA, "train", "--quiet", "--out", str(workdir), "--fixed-model-name", "demo"],
            cwd=BOT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, timeout=TRAIN_TIMEOUT_S)
    model = workdir / "demo.tar.gz"
    if result.returncode != 0 or not model.exists():
        raise RuntimeError(f"rasa train failed (exit {result.returncode}):\n{tail(log)}")
    return model


def store_endpoint(store: str, servers: common.Servers, prefix: str) -> Dict[str, Any]:
    """The ``tracker_store`` block for ``store`` on this run's keys and database."""
    if store == "ours":
        # The keys of example_bot/endpoints.yml, pointed at this run's servers.
        return {"type": TIMED_TYPE[store], "url": common.REDIS_URL,
                "sql_url": servers.ours_sql_url, "key_prefix": prefix, "record_exp": 3600,
                "sync_actions": ["action_execute_transfer"]}
    if store == "RedisTrackerStore":
        redis = servers.rasa_redis_kwargs()
        return {"type": TIMED_TYPE[store], "url": redis.pop("host"), "key_prefix": prefix,
                **{k: v for k, v in redis.items() if v is not None}}
    sql = servers.rasa_sql_kwargs()
    return {"type": TIMED_TYPE[store], "url": sql.pop("host"), **sql}


class Server:
    """One ``rasa run`` with one timed store, and the file its store times into."""

    def __init__(self, store: str, workdir: Path, model: Path, action_port: int,
                 servers: common.Servers, prefix: str) -> None:
        import yaml

        self.store = store
        self.timing = workdir / f"timing-{store}.tsv"
        self.timing.touch()
        endpoints = workdir / f"endpoints-{store}.yml"
        endpoints.write_text(yaml.safe_dump({
            "action_endpoint": {"url": f"http://127.0.0.1:{action_port}/webhook"},
            "tracker_store": store_endpoint(store, servers, prefix)}))
        credentials = workdir / "credentials.yml"
        credentials.write_text("rest:\n")
        # The repository first, so `rasa run` imports this checkout's package and
        # `benchmarks.e2e_timed`.
        path = [str(common.REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        env = process_env(E2E_TIMING_FILE=str(self.timing), PYTHONPATH=os.pathsep.join(path))
        env.pop("RPT_ENCRYPTION_KEYS", None)  # the bench's store is unencrypted
        self.port = free_port()
        self.process = BotProcess(
            f"rasa-{store}", [RASA, "run", "--enable-api", "-p", str(self.port),
                              "-i", "127.0.0.1", "--endpoints", str(endpoints),
                              "--credentials", str(credentials), "-m", str(model)],
            self.port, f"http://127.0.0.1:{self.port}/status", workdir, env)
        self._offset = 0

    def cpu_seconds(self) -> float:
        """CPU time of the ``rasa run`` process so far, all its threads (schedstat)."""
        total = 0
        task_dir = f"/proc/{self.process.process.pid}/task"
        for task in os.listdir(task_dir):
            try:
                with open(f"{task_dir}/{task}/schedstat") as handle:
                    total += int(handle.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended meanwhile
        return total / 1e9

    def turn(self, sender: str, text: str) -> Tuple[float, float, List[str], List[Call]]:
        """One REST turn: (wall seconds, server CPU seconds, reply texts, store calls)."""
        body = json.dumps({"sender": sender, "message": text}).encode()
        cpu_before = self.cpu_seconds()
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", "/webhooks/rest/webhook", body,
                         {"Content-Type": "application/json"})
            reply = conn.getresponse()
            payload = reply.read()
        finally:
            conn.close()
        wall = time.perf_counter() - started
        cpu = max(0.0, self.cpu_seconds() - cpu_before)
        if reply.status != 200:
            raise RuntimeError(f"{self.store}: POST -> {reply.status}: {payload[:500]!r}")
        texts = [m.get("text") or "" for m in json.loads(payload)]
        return wall, cpu, texts, self.new_calls()

    def new_calls(self) -> List[Call]:
        with open(self.timing, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        calls = []
        for line in complete.decode().splitlines():
            method, sender, seconds, cpu = line.split("\t")
            calls.append((method, sender, float(seconds), float(cpu)))
        return calls

    def tracker_events(self, sender: str) -> List[Dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("GET", f"/conversations/{sender}/tracker?include_events=ALL")
            return json.loads(conn.getresponse().read())["events"]
        finally:
            conn.close()


# ---------------------------------------------------------------- histories


def record_dialogue(server: Server, sender: str) -> Tuple[List[Dict], List[List[Dict]]]:
    """Drive one pass of SCRIPT; return (session-start events, one event list per turn)."""
    for text, expected in SCRIPT:
        _, _, replies, _ = server.turn(sender, text)
        if not any(expected in r for r in replies):
            raise RuntimeError(f"recording: {text!r} answered {replies!r}, expected {expected!r}")
    events = server.tracker_events(sender)
    server.new_calls()  # this conversation's store calls are no turn's
    first_user = next(i for i, e in enumerate(events) if e["event"] == "user")
    turns: List[List[Dict]] = []
    for event in events[first_user:]:
        if event["event"] == "user":
            turns.append([])
        turns[-1].append(event)
    if len(turns) != len(SCRIPT):
        raise RuntimeError(f"recording: {len(turns)} user turns, expected {len(SCRIPT)}")
    return events[:first_user], turns


def build_history(start: List[Dict], turns: List[List[Dict]], target: int
                  ) -> Tuple[List[Dict], int]:
    """Session start + the recorded turns in order until ~``target`` events.

    Returns the events (fresh message ids, timestamps 0.1 s apart ending now)
    and how many turns were replayed (the script continues from there).
    """
    events = [dict(e) for e in start]
    replayed = 0
    while True:
        nxt = turns[replayed % len(turns)]
        if abs(len(events) + len(nxt) - target) > abs(len(events) - target) and replayed:
            break
        for event in nxt:
            event = json.loads(json.dumps(event))
            if event["event"] == "user":
                event["message_id"] = uuid.uuid4().hex
            events.append(event)
        replayed += 1
    end = time.time() - 1.0
    for i, event in enumerate(events):
        event["timestamp"] = end - (len(events) - 1 - i) * 0.1
    return events, replayed


async def prefill(store_name: str, servers: common.Servers, prefix: str, domain: Any,
                  conversations: Dict[str, List[Dict]]) -> Dict[str, float]:
    """Write each conversation with the store's own ``save`` (ours: then ``flush``)."""
    from rasa.core.tracker_store import RedisTrackerStore, SQLTrackerStore
    from rasa.shared.core.events import Event
    from rasa.shared.core.trackers import DialogueStateTracker

    if store_name == "ours":
        store = common.ours(domain, servers, "unused", key_prefix_override=prefix)
    elif store_name == "RedisTrackerStore":
        store = RedisTrackerStore(domain, key_prefix=prefix, **servers.rasa_redis_kwargs())
    else:
        store = SQLTrackerStore(domain, **servers.rasa_sql_kwargs())
    seconds = {}
    notes: List[str] = []
    try:
        for sender, events in conversations.items():
            began = time.perf_counter()
            tracker = DialogueStateTracker.from_events(
                sender, [Event.from_parameters(e) for e in events], slots=domain.slots)
            await store.save(tracker)
            if store_name == "ours":
                notes += await common.flush_reporting_errors(store, "prefill")
            seconds[sender] = time.perf_counter() - began
    finally:
        await common.close_store(store, notes)
    if notes:
        raise RuntimeError("prefill of ours: " + "\n".join(notes))
    return seconds


# ---------------------------------------------------------------- measuring


class Cell:
    """One store at one history length: one conversation and its measured turns."""

    def __init__(self, store: str, length: int, sender: str) -> None:
        self.store, self.length, self.sender = store, length, sender
        self.events_before = 0
        self.position = 0  # next SCRIPT step
        self.wall: List[float] = []
        self.store_s: List[float] = []
        self.cpu: List[float] = []  # the rasa run process's CPU time per turn
        self.store_cpu: List[float] = []  # the store calls' thread CPU time per turn
        self.calls: Dict[str, int] = {}
        self.method_s: Dict[str, List[float]] = {}  # per measured turn, 0 if not called
        self.off_script: List[str] = []
        self.texts: List[str] = []  # the user message of each measured turn
        self.prefill_s = 0.0

    def turn(self, server: Server, measured: bool) -> None:
        text, expected = SCRIPT[self.position % len(SCRIPT)]
        self.position += 1
        wall, cpu, replies, calls = server.turn(self.sender, text)
        stray = [c for c in calls if c[1] != self.sender]
        if stray:
            raise RuntimeError(f"{self.store}: store calls for other conversations "
                               f"during a turn: {stray[:3]}")
        if not any(expected in r for r in replies):
            self.off_script.append(f"{text!r} -> {replies!r}")
        if measured:
            self.texts.append(text)
            self.wall.append(wall)
            self.store_s.append(sum(c[2] for c in calls))
            self.cpu.append(cpu)
            self.store_cpu.append(sum(c[3] for c in calls))
            for method, *_ in calls:
                self.calls[method] = self.calls.get(method, 0) + 1
            for method in set(self.method_s) | {c[0] for c in calls}:
                per_turn = self.method_s.setdefault(method, [0.0] * (len(self.wall) - 1))
                per_turn.append(sum(c[2] for c in calls if c[0] == method))

    def summary(self) -> Dict[str, Any]:
        shares = [s / w for s, w in zip(self.store_s, self.wall)]
        return {
            "store": self.store, "history_target": self.length,
            "events_before": self.events_before, "turns": len(self.wall),
            "p50_ms": median(self.wall) * 1e3, "p99_ms": percentile(self.wall, 99) * 1e3,
            "store_p50_ms": median(self.store_s) * 1e3,
            "store_p99_ms": percentile(self.store_s, 99) * 1e3,
            "share_median": median(shares),
            "share_of_total": sum(self.store_s) / sum(self.wall) if self.wall else None,
            "method_p50_ms": {m: median(v) * 1e3 for m, v in sorted(self.method_s.items())},
            "server_cpu_p50_ms": median(self.cpu) * 1e3,
            "store_cpu_p50_ms": median(self.store_cpu) * 1e3,
            "store_cpu_share_of_total": sum(self.store_cpu) / sum(self.cpu)
            if sum(self.cpu) else None,
            "calls_per_turn": {m: n / len(self.wall) for m, n in sorted(self.calls.items())}
            if self.wall else {},
            "off_script_replies": self.off_script, "prefill_s": self.prefill_s,
            "turn_texts": self.texts, "wall_ms": [w * 1e3 for w in self.wall],
            "store_ms": [s * 1e3 for s in self.store_s],
        }


def measure(cells: List[Cell], servers_by_store: Dict[str, Server], turns: int,
            warmup: int, block: int, seed: int) -> None:
    """Warm-up turns per cell, then shuffled rounds of ``block`` turns per cell."""
    rng = random.Random(seed)
    for cell in cells:
        for _ in range(warmup):
            cell.turn(servers_by_store[cell.store], measured=False)
    rounds = -(-turns // block)
    for r in range(rounds):
        order = cells[:]
        rng.shuffle(order)
        began = time.perf_counter()
        for cell in order:
            for _ in range(min(block, turns - len(cell.wall))):
                cell.turn(servers_by_store[cell.store], measured=True)
        print(f"  round {r + 1}/{rounds}: {time.perf_counter() - began:.0f}s, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)


# ------------------------------------------------------------------ report


def pct(value: Optional[float]) -> str:
    return "—" if value is None or value != value else f"{value * 100:.1f}%"


def report(summaries: List[Dict[str, Any]], lengths: List[int]) -> Tuple[str, bool]:
    by = {(s["store"], s["history_target"]): s for s in summaries}
    stores = [st for st in STORES if any((st, n) in by for n in lengths)]
    header = ["store"] + [f"~{n:,} events" for n in lengths]
    latency, split, methods, cpu = [], [], [], []
    for store in stores:
        lat_row, split_row, method_row, cpu_row = ([LABELS[store]] for _ in range(4))
        for n in lengths:
            s = by.get((store, n))
            if s is None:
                for row in (lat_row, split_row, method_row, cpu_row):
                    row.append("—")
                continue
            cpu_row.append(f"{fmt(s['server_cpu_p50_ms'])} ms, "
                           f"store {pct(s['store_cpu_share_of_total'])}")
            lat_row.append(f"{fmt(s['p50_ms'])} / {fmt(s['p99_ms'])}")
            split_row.append(f"{fmt(s['store_p50_ms'])} ms, {pct(s['share_median'])} "
                             f"({pct(s['share_of_total'])})")
            m = s["method_p50_ms"]
            method_row.append(f"{fmt(m.get('retrieve'))} / {fmt(m.get('save'))}")
        latency.append(lat_row)
        split.append(split_row)
        methods.append(method_row)
        cpu.append(cpu_row)
    ours = [by[("ours", n)] for n in lengths if ("ours", n) in by]
    ok = bool(ours) and all(s["share_median"] <= TARGET_SHARE and s["share_of_total"]
                            <= TARGET_SHARE for s in ours)
    worst = max((max(s["share_median"], s["share_of_total"]) for s in ours), default=None)
    text = "\n".join([
        "### Turn latency over REST, p50 / p99 in ms",
        "", common.markdown_table(header, latency), "",
        "### Store time per turn: p50 ms, median share of the turn (share of total time)",
        "", common.markdown_table(header, split), "",
        "### retrieve / save per turn, p50 ms", "",
        common.markdown_table(header, methods), "",
        "### CPU time of the rasa run process per turn (p50), and the store calls' share of "
        "it (of total)", "", common.markdown_table(header, cpu), "",
        f"this store's share <= {TARGET_SHARE:.0%} at every length (median and of total): "
        f"{'PASS' if ok else 'FAIL'} (highest {pct(worst)})",
    ])
    return text, ok


def plot(summaries: List[Dict[str, Any]], path: str, subtitle: str) -> None:
    import warnings

    import matplotlib

    warnings.filterwarnings("ignore")  # matplotlib's pyparsing deprecations
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for store in STORES:
        rows = sorted((s for s in summaries if s["store"] == store),
                      key=lambda s: s["events_before"])
        if not rows:
            continue
        xs = [s["events_before"] for s in rows]
        line, = left.plot(xs, [s["p50_ms"] for s in rows], marker="o", label=LABELS[store])
        left.plot(xs, [s["p99_ms"] for s in rows], linestyle="--", color=line.get_color(),
                  alpha=0.6)
        right.plot(xs, [s["share_median"] * 100 for s in rows], marker="o",
                   color=line.get_color(), label=LABELS[store])
    right.axhline(TARGET_SHARE * 100, color="red", linestyle=":", label="target for this store")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("events in the conversation before the measured turns")
        ax.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("turn latency over REST, ms (p50 solid, p99 dashed)")
    right.set_ylabel("store's share of the turn, % (median)")
    right.set_ylim(0, 100)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"rasa run, demo bot, REST channel: {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> Dict[str, Any]:
    started, load_at_start = time.time(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="e2e_bench_"))
    servers = common.Servers()
    procs: List[BotProcess] = []
    try:
        began = time.perf_counter()
        if args.model:
            model, train_s = Path(args.model).resolve(), None
            print(f"Using the trained model {model}", flush=True)
        else:
            print(f"Training the demo bot (its own config.yml: light pipeline) into "
                  f"{workdir}...", flush=True)
            model = train(workdir)
            train_s = time.perf_counter() - began
            print(f"  trained in {train_s:.0f}s", flush=True)

        action_port = free_port()
        actions = BotProcess(
            "actions", [RASA, "run", "actions", "--actions", "actions",
                        "--port", str(action_port)],
            action_port, f"http://127.0.0.1:{action_port}/health", workdir,
            process_env(LEDGER_STATE_PATH=str(workdir / "ledger_state.json")))
        prefixes = {st: servers.prefix(st.lower()[:5]) for st in args.stores}
        by_store = {st: Server(st, workdir, model, action_port, servers, prefixes[st])
                    for st in args.stores}
        procs = [actions] + [s.process for s in by_store.values()]
        print(f"Starting the action server and {len(by_store)} `rasa run` servers...",
              flush=True)
        began = time.perf_counter()
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda p: p.start(), procs))
        print(f"  all up in {time.perf_counter() - began:.0f}s", flush=True)

        recorder = by_store["RedisTrackerStore" if "RedisTrackerStore" in by_store
                            else args.stores[0]]
        start_events, turn_events = record_dialogue(recorder, f"e2e-recording-{servers.tag}")
        per_pass = sum(len(t) for t in turn_events)
        print(f"Recorded the script on {recorder.store}: {len(start_events)} session-start "
              f"events + {per_pass} events in {len(SCRIPT)} turns", flush=True)

        from rasa.shared.core.domain import Domain

        domain = Domain.load(str(BOT_DIR / "domain.yml"))
        cells: List[Cell] = []
        for store in args.stores:
            conversations = {}
            for length in args.lengths:
                cell = Cell(store, length, f"e2e-{store[:5].lower()}-{length}-{servers.tag}")
                events, replayed = build_history(start_events, turn_events, length)
                cell.events_before, cell.position = len(events), replayed
                conversations[cell.sender] = events
                cells.append(cell)
            began = time.perf_counter()
            seconds = await prefill(store, servers, prefixes[store], domain, conversations)
            for cell in cells:
                cell.prefill_s = seconds.get(cell.sender, cell.prefill_s)
            print(f"  prefilled {store}: {len(conversations)} conversations in "
                  f"{time.perf_counter() - began:.1f}s", flush=True)

        print(f"Measuring {args.turns} turns per cell ({args.warmup} warm-up), rounds of "
              f"{args.block}...", flush=True)
        measure(cells, by_store, args.turns, args.warmup, args.block, args.seed)
        for store, server in by_store.items():
            if not server.process.alive():
                raise RuntimeError(f"{store}'s rasa run died:\n{tail(server.process.log)}")

        summaries = [c.summary() for c in cells]
        text, ok = report(summaries, args.lengths)
        print("\n" + text)
        off = sum(len(s["off_script_replies"]) for s in summaries)
        print(f"Off-script replies: {off} (turns whose reply lacked the expected text).")
        result = common.run_header("end_to_end", args.quick, started, load_at_start)
        result["machine"]["event_loop"] = "rasa run (Sanic on uvloop); prefill on asyncio"
        result.update({
            "command": " ".join(["benchmarks/end_to_end.py"] + sys.argv[1:]),
            "model": "example_bot/config.yml (light pipeline: LogisticRegression, "
                     "Memoization + Rule policies)",
            "train_s": train_s, "script": SCRIPT, "events_per_script_pass": per_pass,
            "turns_per_cell": args.turns, "warmup": args.warmup, "target_share": TARGET_SHARE,
            "target_met": ok, "cells": summaries, "table": text,
            # What the histories were built from, to replay a turn in-process later.
            "recording": {"session_start": start_events, "turns": turn_events},
        })
        return result
    finally:
        for proc in procs:
            proc.stop(grace=10)
        servers.cleanup()
        if args.keep_workdir:
            print(f"Logs and endpoints kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 11 measured turns per cell, 1 warm-up")
    parser.add_argument("--turns", type=int, default=None,
                        help="measured turns per cell (default 33; --quick 11)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="unmeasured turns per cell first (default 3; --quick 1)")
    parser.add_argument("--block", type=int, default=len(SCRIPT),
                        help="turns per cell per shuffled round (default: one script pass)")
    parser.add_argument("--stores", nargs="+", default=STORES, choices=STORES)
    parser.add_argument("--lengths", nargs="+", type=int, default=[100, 1000, 5000])
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--model", default=None,
                        help="a trained model of the demo bot to use instead of training one")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temp dir (process logs, endpoints, timing files)")
    parser.add_argument("--output", default=os.path.join(common.RESULTS, "end_to_end.json"))
    parser.add_argument("--plot", default=os.path.join(common.RESULTS, "end_to_end.png"))
    args = parser.parse_args()
    if args.turns is None:
        args.turns = 11 if args.quick else 33
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # runs main's cleanup


if __name__ == "__main__":
    arguments = parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    outcome = asyncio.run(main(arguments))
    common.write_results(outcome, arguments.output)
    plot(outcome["cells"], arguments.plot,
         f"{outcome['started_at']}, load {outcome['machine']['loadavg_1_5_15_at_start'][0]}"
         f" at start, {arguments.turns} turns per cell")
    print(f"Plot written to {os.path.relpath(arguments.plot)}.")
