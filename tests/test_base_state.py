"""A remembered record's base state is copied, not replayed (``record/base_state.py``).

A process that remembers a record replays its base once and copies the
state it left on later retrieves. Every copy must read like a tracker that a
process remembering nothing decodes from the stored record: checked on
generated dialogues (forms, fallbacks, reverts, restarts, session starts)
with the edits Rasa makes in place on a handed-out tracker, with a count of
the copies so the check cannot pass without copying.
"""
import pytest
from rasa.shared.core.events import (
    ActionExecuted,
    DefinePrevUserUtteredFeaturization,
    EntitiesAdded,
    LoopInterrupted,
    UserUttered,
    UserUtteranceReverted,
)
from rasa.shared.core.trackers import DialogueStateTracker, EventVerbosity

from rasa_persistent_tracker.record import base_state
from tests import dialogues_gen


def full_view(tracker):
    """Everything Rasa can read of a tracker, with the identities it relies on."""
    latest = tracker.latest_message
    loop = tracker.active_loop
    events = list(tracker.events)
    return {
        "state": tracker.current_state(EventVerbosity.ALL),
        "applied": [e.as_dict() for e in tracker.applied_events()],
        "latest": (latest.as_dict() if latest and latest.text is not None else None,
                   list(latest.entities) if latest else None,
                   latest.use_text_for_featurization if latest else None),
        # the latest message is one of the tracker's events (or a fresh empty one)
        "latest_is_event": any(e is latest for e in events),
        "loop": repr(loop),
        "trigger_is_a_message": (loop is not None and loop.trigger_message is not None
                                 and any(getattr(e, "parse_data", None) is loop.trigger_message
                                         for e in events)),
        "slots": {n: (repr(s.value), s._has_been_set) for n, s in tracker.slots.items()},
        "paused": tracker.is_paused(), "followup": tracker.followup_action,
        "bot": {k: v for k, v in tracker.latest_bot_utterance.as_dict().items()
                if k != "timestamp" or tracker.latest_bot_utterance.text}
        if tracker.latest_bot_utterance else None,
    }


def rasa_edits(tracker):
    tracker.update(EntitiesAdded([{"entity": "size", "value": "huge", "start": 0, "end": 1}]))
    tracker.update(DefinePrevUserUtteredFeaturization(True))
    if tracker.active_loop is not None:
        tracker.update(LoopInterrupted(True))
    if tracker.slots:
        next(iter(tracker.slots.values())).value = "edited in place"


async def play_turn(store, sim, sender, turn, n, policy_events, flag=False):
    """One generated turn as Rasa's processor takes it (retrieve, the turn's
    events, save). With ``policy_events``, each user message is followed by
    what policies' predictions log after it (``flag`` for the featurisation):
    both edit the message in place when replayed, so a base holding them must
    keep that."""
    events = await sim.play(turn)
    tracker = await store.retrieve(sender) or store.init_tracker(sender)
    for event in events:
        tracker.update(event)
        if policy_events and isinstance(event, UserUttered):
            tracker.update(DefinePrevUserUtteredFeaturization(flag))
            tracker.update(EntitiesAdded([{"entity": "size", "value": f"v{n}",
                                           "start": 0, "end": 1}]))
    await store.save(tracker)


@pytest.fixture
def clones(monkeypatch):
    counted = []
    clone = base_state.BaseState.clone

    def counting(self, sender_id):
        counted.append(sender_id)
        return clone(self, sender_id)
    monkeypatch.setattr(base_state.BaseState, "clone", counting)
    return counted


# fakeredis' Lua lacks redis.sha1hex: there every retrieve decodes, nothing is copied.
@pytest.mark.parametrize("backend", ["real"], indirect=True)
@pytest.mark.parametrize("max_history", [2, 5])
@pytest.mark.parametrize("seed", [11, 12, 13, 14])
async def test_copied_base_reads_like_a_decoded_record(make_store, clones, seed, max_history):
    dom = dialogues_gen.domain()
    store = make_store(dom, max_history=max_history)
    fresh = make_store(dom, max_history=max_history, record_cache_size=0)
    sender = f"bs{seed}-{max_history}"
    sim = dialogues_gen.Simulator(dom, sender)
    for n, t in enumerate(dialogues_gen.generate(seed, 90)[:70]):
        await play_turn(store, sim, sender, t, n, n % 2, n % 4 == 1)
        first = await store.retrieve(sender)
        theirs = full_view(await fresh.retrieve(sender))
        assert full_view(first) == theirs, (n, t)
        rasa_edits(first)  # never saved: the next copy must not see it
        first.update(UserUtteranceReverted())
        first.update(ActionExecuted("action_listen"))
        assert full_view(await store.retrieve(sender)) == theirs, (n, t)
    assert len(clones) > 20  # the copies were made (and checked)


def test_a_tracker_with_an_attribute_of_its_own_is_not_kept(domain):
    tracker = DialogueStateTracker("x", domain.slots)
    assert base_state.capture(tracker, [], {}, [], 1.0, list(domain.slots), None,
                              None) is not None
    tracker.custom_flag = True  # set by some custom event's apply_to
    assert base_state.capture(tracker, [], {}, [], 1.0, list(domain.slots), None,
                              None) is None


def test_a_state_fits_only_its_own_base_and_slots(domain):
    tracker = DialogueStateTracker("x", domain.slots)
    base, source, slots = {}, [], list(domain.slots)
    state = base_state.capture(tracker, [], base, source, 1.0, slots, None, None)
    assert state.fits(base, source, 1.0, slots, None)
    assert not state.fits({}, source, 1.0, slots, None)  # an equal but other base
    assert not state.fits(base, [], 1.0, slots, None)
    assert not state.fits(base, source, 2.0, slots, None)
    assert not state.fits(base, source, True, slots, None)  # 1.0 == True, another type
    assert not state.fits(base, source, 1.0, slots[:-1], None)
    assert not state.fits(base, source, 1.0, slots, 100)
