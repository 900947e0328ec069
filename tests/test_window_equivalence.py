"""Generated dialogues: a retrieved tracker is the full tracker for Rasa.

Every turn of every generated dialogue (tests/dialogues_gen.py) goes retrieve
→ append → save through the store, for store ``max_history`` 1, 3, 5 and 10,
with the per-process record memory on (one store) and off (two stores taking
turns, as two processes would); after every turn the retrieved tracker (and
the tracker just before its save) is compared with the reference, a tracker
of every event, on the contract (tests/equivalence.py, docs/contract.md).

The control shows the oracle can pass (the reference against itself) and can
fail (a store that keeps the last events only). On a failure the dialogue is
shrunk to a minimal one and printed with its seed. CI runs fixed seeds plus
one random seed; ``tests/long_equivalence.py`` runs thousands in the background.
"""
import copy
import os
import random
from typing import Any, List, Optional

import pytest
from rasa.shared.core.trackers import DialogueStateTracker

from tests.conftest import Backend
from tests.dialogues_gen import domain as gen_domain, generate
from tests.equivalence import StoreRunner, run_dialogue, shrink

HISTORIES = (1, 3, 5, 10)
FIXED_SEEDS = [int(s) for s in os.environ.get("RPT_EQ_SEEDS", "1,2,3,4,5,6").split(",")]
RANDOM_SEED = int(os.environ.get("RPT_EQ_RANDOM_SEED", random.randrange(10 ** 6)))


def runners(backend: Backend, dom: Any, histories=HISTORIES,
            memory=(True, False)) -> List[StoreRunner]:
    """Per configuration, the stores that take turns (memory off: two)."""
    out = []
    for mh in histories:
        for on in memory:
            stores = [backend.make_store(dom, max_history=mh,
                                         record_cache_size=32 if on else 0)
                      for _ in range(1 if on else 2)]
            out.append(StoreRunner(f"max_history={mh} memory={'on' if on else 'off'}",
                                   stores, mh))
    return out


class FullStore:
    """Control: keeps every event, serialised, as Rasa's InMemoryTrackerStore."""

    def __init__(self, dom: Any) -> None:
        self.domain, self.events = dom, {}

    async def retrieve(self, sender_id: str) -> Optional[DialogueStateTracker]:
        if sender_id not in self.events:
            return None
        return DialogueStateTracker.from_dict(
            sender_id, copy.deepcopy(self.events[sender_id]), self.domain.slots)

    async def save(self, tracker: DialogueStateTracker) -> None:
        self.events[tracker.sender_id] = [e.as_dict() for e in tracker.events]


class TruncatingStore(FullStore):
    """Control: a deliberately broken store, keeping the last 12 events."""

    async def retrieve(self, sender_id: str) -> Optional[DialogueStateTracker]:
        tracker = await super().retrieve(sender_id)
        if tracker is None:
            return None
        return DialogueStateTracker.from_events(
            sender_id, list(tracker.events)[-12:], self.domain.slots)


async def check_seed(seed: int, all_runners: List[StoreRunner], dom: Any,
                     make_runner=None) -> None:
    """Play dialogue ``seed``; on a mismatch shrink it and fail with the details."""
    turns = generate(seed)
    result = await run_dialogue(turns, all_runners, dom, f"seed-{seed}")
    if not result.mismatches:
        return
    first = result.mismatches[0]
    detail = str(first)
    if make_runner is not None:
        failing = [r for r in all_runners if r.name == first.config]
        counter = [0]

        async def fails(candidate):
            counter[0] += 1
            runner = make_runner(failing[0])
            return bool((await run_dialogue(candidate, [runner], dom,
                                            f"shrink-{seed}-{counter[0]}")).mismatches)
        small = await shrink(turns[:first.turn + 1], fails)
        res = await run_dialogue(small, [make_runner(failing[0])], dom, f"min-{seed}")
        events = "\n  ".join(str(e) for e in res.reference.events)
        detail += (f"\nminimal dialogue ({len(small)} turns): {small}\n"
                   f"{res.mismatches[0] if res.mismatches else ''}\nevents:\n  {events}")
    pytest.fail(f"seed {seed}: {len(result.mismatches)} mismatching turn(s); first:\n{detail}")


async def test_control_reference_against_itself() -> None:
    dom = gen_domain()
    for seed in FIXED_SEEDS[:4]:
        control = [StoreRunner("full", [FullStore(dom)], mh) for mh in HISTORIES]
        result = await run_dialogue(generate(seed), control, dom, f"c{seed}",
                                    stop_at_first=False)
        assert result.mismatches == []


async def test_control_broken_store_is_caught() -> None:
    dom = gen_domain()
    broken = [StoreRunner("truncating", [TruncatingStore(dom)], 5)]
    result = await run_dialogue(generate(3), broken, dom, "broken")
    assert result.mismatches, "the oracle must catch a store that forgets events"


@pytest.fixture
async def fake_backend(tmp_path: Any) -> Backend:
    pair = Backend("fake", str(tmp_path))
    yield pair
    await pair.cleanup()


@pytest.mark.parametrize("seed", FIXED_SEEDS + [RANDOM_SEED])
async def test_generated_dialogues(seed: int, fake_backend: Backend) -> None:
    dom = gen_domain()
    print(f"equivalence seed {seed} (set RPT_EQ_SEEDS={seed} to replay)")

    def fresh(runner: StoreRunner) -> StoreRunner:
        stores = [fake_backend.make_store(dom, max_history=runner.max_history,
                                          record_cache_size=s._recent._size)
                  for s in runner.stores]
        return StoreRunner(runner.name, stores, runner.max_history)
    await check_seed(seed, runners(fake_backend, dom), dom, fresh)


@pytest.mark.real
@pytest.mark.parametrize("seed", FIXED_SEEDS[:2])
async def test_generated_dialogues_real_servers(seed: int, tmp_path: Any) -> None:
    pair = Backend("real", str(tmp_path))
    try:
        dom = gen_domain()
        await check_seed(seed, runners(pair, dom, histories=(3, 10)), dom)
    finally:
        await pair.cleanup()

