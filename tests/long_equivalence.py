"""The long run of the generative equivalence suite (not a pytest module).

    python -m tests.long_equivalence --dialogues 10000 [--first-seed 1000]
        [--histories 1,3,5,10] [--max-turns 150] [--report-every 100]
        [--backend fake|real] [--jobs N]

Plays ``--dialogues`` generated dialogues (seeds ``first-seed`` onwards)
through the store on fakeredis + SQLite (``--backend real``: the Redis and
PostgreSQL of REDIS_URL and DATABASE_URL, about twice as fast), for every ``max_history`` given and
the record memory on and off, and compares every turn with the full tracker
(tests/equivalence.py). Prints progress lines and, at the end, the seeds, the
dialogue and turn counts, the mismatching turns (each with its seed) and the
run time. Exit status 1 if any turn mismatched.

``--jobs N`` plays the seeds in N worker processes (each with its own backend
pair: its own key prefix and SQL schema or file), taking seeds from a shared
queue so that long and short dialogues even out; the parent prints the same
progress lines and one summary for all of them.
"""
import argparse
import asyncio
import dataclasses
import multiprocessing
import queue
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterable, List, Optional, Tuple

from tests.conftest import Backend
from tests.dialogues_gen import domain, generate
from tests.equivalence import run_dialogue
from tests.test_window_equivalence import runners


@dataclasses.dataclass
class Played:
    """One dialogue's outcome: what the summary counts, small enough to send
    from a worker process."""
    seed: int
    turns: int
    bad_turns: int
    first: Optional[str]


def histories_of(args: argparse.Namespace) -> Tuple[int, ...]:
    return tuple(int(h) for h in args.histories.split(","))


async def play_seeds(seeds: Iterable[int], args: argparse.Namespace,
                     report: Callable[[Played], None]) -> None:
    """Play each seed through every configuration on one backend pair of this
    process, reporting each dialogue as it ends."""
    dom = domain()
    pair = Backend(args.backend, tempfile.mkdtemp(prefix="rpt-long-"))
    configured = runners(pair, dom, histories=histories_of(args))
    try:
        for seed in seeds:
            plan = generate(seed, args.max_turns)
            result = await run_dialogue(plan, configured, dom, f"long-{seed}",
                                        stop_at_first=False)
            bad = {m.turn for m in result.mismatches}
            report(Played(seed, len(plan), len(bad),
                          str(result.mismatches[0]) if bad else None))
    finally:
        await pair.cleanup()


class Tally:
    """The counts of a run and its output lines (the same with any --jobs)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.started = args, time.monotonic()
        self.dialogues = self.turns = self.mismatched = 0
        self.failing: List[int] = []

    def add(self, played: Played) -> None:
        self.dialogues += 1
        self.turns += played.turns
        self.mismatched += played.bad_turns
        if played.bad_turns:
            self.failing.append(played.seed)
            print(f"MISMATCH seed {played.seed}: {played.bad_turns} turn(s); first: "
                  f"{played.first}", flush=True)
        if self.dialogues % self.args.report_every == 0:
            print(f"{self.dialogues} dialogues, {self.turns} turns, {self.mismatched} "
                  f"mismatching turns, {time.monotonic() - self.started:.0f} s", flush=True)

    def summary(self) -> str:
        args = self.args
        return (f"seeds {args.first_seed}..{args.first_seed + args.dialogues - 1}; "
                f"configurations: max_history {histories_of(args)} x record memory on/off; "
                f"{self.dialogues} dialogues, {self.turns} turns (each under every "
                f"configuration), {self.mismatched} mismatching turns (seeds "
                f"{sorted(self.failing)[:20]}), {time.monotonic() - self.started:.0f} s")


def seeds_of(args: argparse.Namespace) -> range:
    return range(args.first_seed, args.first_seed + args.dialogues)


async def run_here(args: argparse.Namespace) -> int:
    """--jobs 1: every seed in this process."""
    tally = Tally(args)
    await play_seeds(seeds_of(args), args, tally.add)
    print(tally.summary(), flush=True)
    return 1 if tally.mismatched else 0


def worker(tasks: Any, results: Any, args: argparse.Namespace) -> None:
    """A worker process: seeds from ``tasks`` until None, each outcome to
    ``results``; then ``("done", None)``, or ``("error", traceback)`` if the
    run itself broke (which must fail the whole run, not pass for a short one)."""
    try:
        asyncio.run(play_seeds(iter(tasks.get, None), args,
                               lambda played: results.put(("played", played))))
        results.put(("done", None))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def run_parallel(args: argparse.Namespace) -> int:
    """--jobs N: the seeds shared among N worker processes (spawned, not
    forked: the parent has TensorFlow and event-loop state a fork would copy)."""
    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for seed in seeds_of(args):
        tasks.put(seed)
    for _ in range(args.jobs):
        tasks.put(None)
    tally = Tally(args)
    procs = [ctx.Process(target=worker, args=(tasks, results, args), daemon=True)
             for _ in range(args.jobs)]
    for proc in procs:
        proc.start()
    running, errors = len(procs), []
    while running:
        try:
            kind, payload = results.get(timeout=10)
        except queue.Empty:
            if any(proc.is_alive() for proc in procs):
                continue
            # every worker is gone but not all said so: one was killed
            kind, payload, running = "error", "a worker process died without reporting", 1
        if kind == "played":
            tally.add(payload)
        else:
            running -= 1
            if kind == "error":
                errors.append(payload)
                print(f"worker failed:\n{payload}", file=sys.stderr, flush=True)
    for proc in procs:
        proc.join()
    print(tally.summary(), flush=True)
    return 1 if tally.mismatched or errors or tally.dialogues != args.dialogues else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dialogues", type=int, default=10_000)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--histories", default="1,3,5,10")
    parser.add_argument("--max-turns", type=int, default=150)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--backend", choices=("fake", "real"), default="fake")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes (each with its own backend pair)")
    arguments = parser.parse_args()
    if arguments.jobs < 1:
        parser.error("--jobs must be at least 1")
    sys.exit(run_parallel(arguments) if arguments.jobs > 1
             else asyncio.run(run_here(arguments)))
