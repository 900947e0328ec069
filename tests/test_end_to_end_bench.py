"""Cheap checks of ``benchmarks/end_to_end.py`` (no servers, nothing timed).

The benchmark itself takes minutes and runs by hand; these only catch a script
that no longer starts, a timing wrapper that counts a nested call twice, or
pre-filled histories of the wrong length.
"""
import os
import subprocess
import sys
import time

import pytest

from rasa.core.tracker_store import InMemoryTrackerStore
from rasa.shared.core.domain import Domain
from rasa.shared.core.trackers import DialogueStateTracker

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import end_to_end  # noqa: E402
from benchmarks import e2e_timed  # noqa: E402


def test_help_runs() -> None:
    result = subprocess.run([sys.executable, os.path.join(BENCH, "end_to_end.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--turns" in result.stdout and "--quick" in result.stdout


async def test_timed_store_writes_one_line_per_outermost_call(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(e2e_timed.TIMING_FILE_ENV, str(tmp_path / "timing.tsv"))
    monkeypatch.setattr(e2e_timed, "_fd", None)
    store = e2e_timed._timed_class(InMemoryTrackerStore)(Domain.empty())
    await store.save(DialogueStateTracker("alice", []))
    assert await store.exists("alice")  # InMemoryTrackerStore.exists calls retrieve
    lines = [line.split("\t") for line in (tmp_path / "timing.tsv").read_text().splitlines()]
    assert [(method, sender) for method, sender, _, _ in lines] == [
        ("save", "alice"), ("exists", "alice")]
    assert all(float(seconds) >= 0 and float(cpu) >= 0 for _, _, seconds, cpu in lines)


@pytest.mark.parametrize("target", [100, 1000, 5000])
def test_history_has_about_the_target_length(target: int) -> None:
    start = [{"event": "action", "name": "action_session_start"},
             {"event": "session_started"}, {"event": "action", "name": "action_listen"}]
    turns = [[{"event": "user", "text": f"t{i}", "message_id": "m"}]
             + [{"event": "action", "name": "utter_x"}] * (i + 6)
             + [{"event": "action", "name": "action_listen"}] for i in range(11)]
    before = time.time()
    events, replayed = end_to_end.build_history(start, turns, target)
    longest = max(len(t) for t in turns)
    assert abs(len(events) - target) <= longest / 2 + 1
    assert len(events) == len(start) + sum(len(turns[i % 11]) for i in range(replayed))
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps) and before - 1.5 < stamps[-1] <= time.time()
    ids = [e["message_id"] for e in events if e["event"] == "user"]
    assert len(set(ids)) == len(ids) == replayed
