"""The long run of the generative equivalence suite (not a pytest module).

    python -m tests.long_equivalence --dialogues 10000 [--first-seed 1000]
        [--histories 1,3,5,10] [--max-turns 150] [--report-every 100]
        [--backend fake|real]

Plays ``--dialogues`` generated dialogues (seeds ``first-seed`` onwards)
through the store on fakeredis + SQLite (``--backend real``: the Redis and
PostgreSQL of REDIS_URL and DATABASE_URL, about twice as fast), for every ``max_history`` given and
the record memory on and off, and compares every turn with the full tracker
(tests/equivalence.py). Prints progress lines and, at the end, the seeds, the
dialogue and turn counts, the mismatching turns (each with its seed) and the
run time. Exit status 1 if any turn mismatched.
"""
import argparse
import asyncio
import sys
import tempfile
import time

from tests.conftest import Backend
from tests.dialogues_gen import domain, generate
from tests.equivalence import run_dialogue
from tests.test_window_equivalence import runners


async def main(args: argparse.Namespace) -> int:
    dom = domain()
    histories = tuple(int(h) for h in args.histories.split(","))
    started = time.monotonic()
    turns = mismatched = dialogues = 0
    failing = []
    pair = Backend(args.backend, tempfile.mkdtemp(prefix="rpt-long-"))
    configured = runners(pair, dom, histories=histories)
    try:
        for seed in range(args.first_seed, args.first_seed + args.dialogues):
            plan = generate(seed, args.max_turns)
            result = await run_dialogue(plan, configured, dom, f"long-{seed}",
                                        stop_at_first=False)
            dialogues += 1
            turns += len(plan)
            bad = {m.turn for m in result.mismatches}
            mismatched += len(bad)
            if bad:
                failing.append(seed)
                print(f"MISMATCH seed {seed}: {len(bad)} turn(s); first: "
                      f"{result.mismatches[0]}", flush=True)
            if dialogues % args.report_every == 0:
                print(f"{dialogues} dialogues, {turns} turns, {mismatched} mismatching "
                      f"turns, {time.monotonic() - started:.0f} s", flush=True)
    finally:
        await pair.cleanup()
    print(f"seeds {args.first_seed}..{args.first_seed + args.dialogues - 1}; "
          f"configurations: max_history {histories} x record memory on/off; "
          f"{dialogues} dialogues, {turns} turns (each under every configuration), "
          f"{mismatched} mismatching turns (seeds {failing[:20]}), "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return 1 if mismatched else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dialogues", type=int, default=10_000)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--histories", default="1,3,5,10")
    parser.add_argument("--max-turns", type=int, default=150)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--backend", choices=("fake", "real"), default="fake")
    sys.exit(asyncio.run(main(parser.parse_args())))
