"""Our per-turn cost at two commits, side by side in one run.

    .venv/bin/python benchmarks/compare_commits.py [--old REF] [--new REF]
        [--rounds 4] [--lengths 100 1000 10000] [--stores ours ours+encryption]

Each commit's ``rasa_persistent_tracker/`` is extracted (``git archive``) into
a temporary folder; the harness is this checkout's ``per_turn.py`` for both,
so only the package differs. Rounds alternate the commits (in shuffled order
per round), each a ``per_turn.py --quick`` subprocess with ``PYTHONPATH``
pointing at that commit's package, against the same Redis and PostgreSQL.
Prints, per store and history length, the median of every measured turn of
each commit and their ratio (new / old: above 1 is slower). It is a benchmark,
not a test: the exit code does not depend on the numbers.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACKAGE = "rasa_persistent_tracker"


def resolve(ref: str) -> str:
    return subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout.strip()


def extract(sha: str, into: str) -> str:
    """The package at ``sha``, unpacked under ``into``; returns the PYTHONPATH entry."""
    os.makedirs(into)
    archive = subprocess.run(["git", "archive", sha, PACKAGE], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def imported_from(path: str) -> str:
    """Where a subprocess with ``PYTHONPATH=path`` imports the package from."""
    out = subprocess.run([sys.executable, "-c", f"import {PACKAGE} as m; print(m.__file__)"],
                         env={**os.environ, "PYTHONPATH": path}, cwd=path, check=True,
                         capture_output=True, text=True).stdout.strip()
    if not out.startswith(path):
        raise SystemExit(f"compare_commits: {PACKAGE} imported from {out}, not {path}")
    return out


def measure(path: str, stores: List[str], lengths: List[int], output: str) -> Dict[Tuple[str, int], List[float]]:
    """One ``per_turn.py --quick`` run on the package under ``path``: turn times (ms)."""
    cmd = [sys.executable, os.path.join(HERE, "per_turn.py"), "--quick", "--stores", *stores,
           "--lengths", *map(str, lengths), "--output", output]
    # cwd: not this checkout, whose package would shadow the extracted one
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, cwd=path,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compare_commits: per_turn.py failed:\n{done.stderr[-3000:]}")
    with open(output) as f:
        result = json.load(f)
    # The harness must have measured the extracted package, not this checkout's
    # (until 2026-11-30, common.py put the checkout first on sys.path, so both
    # sides of every comparison ran the checkout's code).
    if not str(result.get("package_file", "")).startswith(path):
        raise SystemExit(f"compare_commits: per_turn.py measured {result.get('package_file')}, "
                         f"not the package under {path}")
    return {(c["store"], c["target_events"]): c["turn_ms"] for c in result["cells"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="HEAD~1")
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lengths", nargs="+", type=int, default=[100, 1000, 10000])
    parser.add_argument("--stores", nargs="+", default=["ours", "ours+encryption"])
    args = parser.parse_args()
    shas = {"old": resolve(args.old), "new": resolve(args.new)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rpt-compare-") as tmp:
        paths = {label: extract(sha, os.path.join(tmp, label)) for label, sha in shas.items()}
        for label, path in paths.items():
            print(f"{label}: {args.old if label == 'old' else args.new} = {shas[label][:10]}, "
                  f"imported from {imported_from(path)}", flush=True)
        turns: Dict[str, Dict[Tuple[str, int], List[float]]] = {"old": {}, "new": {}}
        for round_no in range(1, args.rounds + 1):
            order = list(paths)
            random.shuffle(order)
            for label in order:
                got = measure(paths[label], args.stores, args.lengths,
                              os.path.join(tmp, f"{label}-{round_no}.json"))
                for cell, values in got.items():
                    turns[label].setdefault(cell, []).extend(values)
            print(f"  round {round_no}/{args.rounds} done ({' then '.join(order)})", flush=True)
    print(f"\n### Per-turn median, ms, old {shas['old'][:10]} vs new {shas['new'][:10]} "
          f"({args.rounds} alternating rounds, {time.monotonic() - started:.0f} s)\n")
    print("| store | history | old median (turns) | new median (turns) | new / old |")
    print("|---|---:|---:|---:|---:|")
    for cell in sorted(turns["old"], key=lambda c: (args.stores.index(c[0]), c[1])):
        old, new = turns["old"][cell], turns["new"].get(cell, [])
        if not new:
            continue
        a, b = statistics.median(old), statistics.median(new)
        print(f"| {cell[0]} | ~{cell[1]:,} | {a:.3f} ({len(old)}) | {b:.3f} ({len(new)}) "
              f"| {b / a:.2f} |")
    load = os.getloadavg()
    print(f"\nMachine: {os.cpu_count()} CPUs, load average at end {load[0]:.2f}/{load[1]:.2f}/"
          f"{load[2]:.2f}. Command: benchmarks/compare_commits.py --old {args.old} "
          f"--new {args.new} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
