"""The oracle: is a retrieved tracker the full tracker for everything Rasa reads?

``differences(reference, got, domain, max_history)`` lists every field of the
contract (docs/contract.md) on which ``got`` differs from ``reference`` (a
tracker holding every event of the conversation): the states the policies
slice (Rasa's own featurizer, with and without rule-only turns and
``action_unlikely_intent``), slots, the active loop, the latest action and
message, followup, paused, the last user message's time, the latest bot
message, what ``current_state`` sends to an action server, the reminder
decision of ``MessageProcessor.handle_reminder``, and what Rasa's own actions
(session start, back, default fallback, deactivate loop) produce on it.

``run_dialogue`` plays a generated dialogue through stores, retrieve → append
→ save per turn as Rasa's processor does, and checks every retrieved tracker.
``shrink`` removes turns from a failing dialogue while it still fails.
"""
import copy
import datetime
import dataclasses
import io
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence

import rasa.shared.utils.common
from rasa.core.actions.action import (
    ActionBack,
    ActionDeactivateLoop,
    ActionDefaultFallback,
    ActionSessionStart,
)
from rasa.core.channels.channel import CollectingOutputChannel
from rasa.core.featurizers.tracker_featurizers import MaxHistoryTrackerFeaturizer
from rasa.core.processor import MessageProcessor
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import (
    ActionExecuted,
    AllSlotsReset,
    ReminderScheduled,
    SessionStarted,
    SlotSet,
    UserUttered,
)
from rasa.shared.core.trackers import DialogueStateTracker, EventVerbosity

from tests.dialogues_gen import RULE_ONLY_DATA, Simulator, Turn

REMINDER_NAMES = ("r0", "r1", "r2")


def _cache_event_classes() -> None:
    """Rasa resolves an event's class by walking every subclass of ``Event``
    for each event it parses; the reference is parsed again every turn, so the
    walk (a pure function of the imported classes) is cached here."""
    walk = rasa.shared.utils.common.all_subclasses
    if getattr(walk, "cached", False):
        return
    cache: Dict[Any, List[Any]] = {}

    def all_subclasses(cls: Any) -> List[Any]:
        if cls not in cache:
            cache[cls] = walk(cls)
        return cache[cls]
    all_subclasses.cached = True  # type: ignore[attr-defined]
    rasa.shared.utils.common.all_subclasses = all_subclasses


_cache_event_classes()
_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def _since_last_user(tracker: DialogueStateTracker) -> Optional[List[Dict[str, Any]]]:
    """The events since the last user message, as the action server gets them
    (rasa_sdk's ``slots_to_validate`` reads the trailing slot events).

    ``current_state(EventVerbosity.ALL)["events"]`` is ``e.as_dict()`` of every
    event; only the events after the session's last user message are read,
    so only those are serialised (the same dicts, without serialising the
    whole history of the reference on every turn)."""
    events = list(tracker.events)
    for i in range(len(events) - 1, -1, -1):
        kind = events[i].type_name  # what as_dict() puts under "event"
        if kind == "session_started":  # the contract: this session
            return None
        if kind == "user":
            user = events[i].as_dict()
            # A user message parsed from its stored form shares its entity list
            # with parse_data, so EntitiesAdded shows there after any store's
            # round trip (Rasa's own stores too); latest_message has the entities.
            first = {**user, "parse_data": {
                k: v for k, v in user["parse_data"].items() if k != "entities"}}
            return [first] + [e.as_dict() for e in events[i + 1:]]
    return None  # no user message in reach: compared as "absent"


def _states(tracker: DialogueStateTracker, domain: Domain) -> Dict[str, Any]:
    """Rasa's prediction states (featurizer without slicing; ``sliced`` cuts
    them to a ``max_history`` as ``slice_state_history`` does)."""
    featurizer = MaxHistoryTrackerFeaturizer(None, max_history=None)
    out = {}
    for rule_only in (False, True):
        out[f"states(rule_only={rule_only})"] = featurizer.prediction_states(
            [tracker], domain, ignore_rule_only_turns=rule_only,
            rule_only_data=RULE_ONLY_DATA if rule_only else None,
            ignore_action_unlikely_intent=rule_only)[0]
    return out


def sliced(snap: Dict[str, Any], max_history: int) -> Dict[str, Any]:
    """A snapshot with its state lists cut to the last ``max_history``."""
    return {k: MaxHistoryTrackerFeaturizer.slice_state_history(v, max_history)
            if k.startswith("states(") else v for k, v in snap.items()}


def _bot(tracker: DialogueStateTracker) -> Optional[Dict[str, Any]]:
    bot = tracker.latest_bot_utterance
    if bot is None or (bot.text is None and not bot.data):
        return None  # Rasa's empty placeholder (stamped with the time of the reset)
    return bot.as_dict()


def _applied_once(tracker: DialogueStateTracker) -> DialogueStateTracker:
    """A view of ``tracker`` for Rasa's read-only code: a shallow copy (the
    same events, slots and latest message) whose ``applied_events()`` returns
    a copy of a list computed once. Both featurizer runs and every reminder
    check walk the applied events; this walks the history once per snapshot
    instead of once per call. ``applied_events`` is a pure function of the
    events, which nothing here changes."""
    view = copy.copy(tracker)
    applied = tracker.applied_events()
    view.applied_events = lambda: list(applied)  # type: ignore[method-assign]
    return view


def _reminders(tracker: DialogueStateTracker) -> Dict[str, bool]:
    """``handle_reminder``'s decision (True: cancel) for each reminder name and
    ``kill_on_user_message``. Both of Rasa's checks read only the reminder's
    name, so each is run once per name and combined for both flags exactly as
    ``handle_reminder`` combines them (``tracker``: a view from ``_applied_once``)."""
    out = {}
    for name in REMINDER_NAMES:
        reminder = ReminderScheduled("remind", _EPOCH, name=name)
        after = MessageProcessor._has_message_after_reminder(tracker, reminder)
        valid = MessageProcessor._is_reminder_still_valid(tracker, reminder)
        for kill in (False, True):
            out[f"{name}/{kill}"] = bool(kill and after or not valid)
    return out


def snapshot(tracker: DialogueStateTracker, domain: Domain) -> Dict[str, Any]:
    """Everything the contract promises, read from ``tracker``."""
    state = tracker.current_state(EventVerbosity.NONE)
    last_user = tracker.get_last_event_for(UserUttered)
    since_last_user = _since_last_user(tracker)
    view = _applied_once(tracker)
    out = {
        **_states(view, domain),
        "slots": tracker.current_slot_values(),
        "active_loop": state["active_loop"],
        "latest_action": tracker.latest_action,
        "latest_message": state["latest_message"],
        "followup_action": tracker.followup_action,
        "paused": tracker.is_paused(),
        "last_user_timestamp": last_user.timestamp if last_user else None,
        "latest_bot_utterance": _bot(tracker),
        "latest_event_time": state["latest_event_time"],
        "latest_input_channel": next(
            (e["input_channel"] for e in reversed(since_last_user or [])
             if e["event"] == "user"), None),
        "events_since_last_user": since_last_user,
        "reminders": _reminders(view),
    }
    return out


def _copies(tracker: DialogueStateTracker, count: int) -> List[DialogueStateTracker]:
    """``count`` independent deep copies of ``tracker``: pickled once, loaded
    ``count`` times. Neither the tracker nor its events and slots define
    ``__deepcopy__`` or custom pickling, so this rebuilds the same object
    graph (shared objects stay shared) as ``copy.deepcopy``, in C instead of
    Python's recursive copier."""
    data = pickle.dumps(tracker, pickle.HIGHEST_PROTOCOL)
    return [pickle.loads(data) for _ in range(count)]


_NLG: Dict[int, Any] = {}


def _nlg(domain: Domain) -> Any:
    """The templated NLG of ``domain``, built once (it only reads the
    responses) instead of with a whole ``Simulator`` per action run."""
    if id(domain) not in _NLG:
        _NLG[id(domain)] = (domain, Simulator(domain, "nlg").nlg)
    return _NLG[id(domain)][1]


async def _after(action: Any, name: str, tracker: DialogueStateTracker,
                 domain: Domain) -> DialogueStateTracker:
    """``tracker`` (a copy the caller gives away) after Rasa's processor ran
    ``action`` on it."""
    events = await action.run(CollectingOutputChannel(), _nlg(domain), tracker, domain)
    tracker.update(ActionExecuted(name))
    for event in events:
        tracker.update(event)
    return tracker


def _session_slot_events(tracker: DialogueStateTracker) -> int:
    """SlotSet and AllSlotsReset events among the current session's applied events."""
    events = tracker.applied_events()
    starts = [i for i, e in enumerate(events) if isinstance(e, SessionStarted)]
    session = events[starts[-1]:] if starts else events
    return sum(isinstance(e, (SlotSet, AllSlotsReset)) for e in session)


def _plain(events: Sequence[Any]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in e.as_dict().items() if k != "timestamp"} for e in events]


async def action_outputs(tracker: DialogueStateTracker, domain: Domain) -> Dict[str, Any]:
    """What Rasa's own actions produce when run on ``tracker``."""
    start = await ActionSessionStart().run(
        CollectingOutputChannel(), _nlg(domain), tracker, domain)
    out: Dict[str, Any] = {"action_session_start": _plain(start)}
    # Past slot_cap(max_history) slot events before the window, the record
    # lists the last value per slot (docs/contract.md): same values, fewer events.
    out["carried_values"] = {e.key: e.value for e in start if hasattr(e, "key")}
    actions = (("action_back", ActionBack()),
               ("action_default_fallback", ActionDefaultFallback()),
               ("action_deactivate_loop", ActionDeactivateLoop()))
    for (name, action), copy_ in zip(actions, _copies(tracker, len(actions))):
        after = await _after(action, name, copy_, domain)
        state = after.current_state()
        out[name] = {"states(rule_only=False)": after.past_states(domain),
                     "slots": after.current_slot_values(),
                     "active_loop": state["active_loop"],
                     "latest_message": state["latest_message"],
                     "latest_bot_utterance": _bot(after)}
    return out


def compare(expected: Dict[str, Any], actual: Dict[str, Any]) -> List[str]:
    """The fields on which two snapshots differ (with both values)."""
    return [f"{key}: expected {expected[key]!r}, got {actual.get(key)!r}"
            for key in expected if expected[key] != actual.get(key)]


@dataclasses.dataclass
class Mismatch:
    config: str
    turn: int
    stage: str
    fields: List[str]

    def __str__(self) -> str:
        shown = "\n    ".join(f[:600] for f in self.fields[:4])
        return f"[{self.config}] turn {self.turn} ({self.stage}):\n    {shown}"


class StoreRunner:
    """One configuration: stores that take turns retrieving and saving.

    With several stores (record memory off), each turn is retrieved and saved
    by the next store in turn, as when another process handles it.
    """

    def __init__(self, name: str, stores: List[Any], max_history: int) -> None:
        self.name, self.stores, self.max_history = name, stores, max_history
        self.turn = 0

    async def step(self, sender_id: str, events: List[Any], domain: Domain,
                   check_within: Callable[[DialogueStateTracker], List[str]]) -> Any:
        store = self.stores[self.turn % len(self.stores)]
        self.turn += 1
        tracker = await store.retrieve(sender_id)
        if tracker is None:
            tracker = DialogueStateTracker(sender_id, domain.slots)
        for event in pickle.loads(pickle.dumps(events, pickle.HIGHEST_PROTOCOL)):
            tracker.update(event)  # a copy each: see _copies
        within = check_within(tracker)
        await store.save(tracker)
        reader = self.stores[self.turn % len(self.stores)]
        return within, await reader.retrieve(sender_id)


async def run_dialogue(turns: Sequence[Turn], runners: List[StoreRunner], domain: Domain,
                       sender_id: str, actions: bool = True,
                       stop_at_first: bool = True) -> "Result":
    """Play ``turns`` through every runner; compare after each turn."""
    sim = Simulator(domain, sender_id)
    mismatches: List[Mismatch] = []
    histories = sorted({r.max_history for r in runners})
    for index, turn in enumerate(turns):
        events = await sim.play(turn)
        # The retrieved tracker is compared with what Rasa's own stores give:
        # the full history serialised and parsed back (a user message's
        # in-memory entity list does not survive that, in any store).
        ref = sim.stored()
        full = snapshot(ref, domain)
        expected = {mh: sliced(full, mh) for mh in histories}
        # Rasa's actions, and the tracker just before its save (against the
        # in-memory reference), on every third turn and the last: they cost most.
        check_actions = actions and (index % 3 == 2 or index == len(turns) - 1)
        if check_actions:
            live = snapshot(sim.reference, domain)
            expected_live = {mh: sliced(live, mh) for mh in histories}
        if check_actions:
            outputs = await action_outputs(ref, domain)
            # docs/contract.md: past 4 * (max_history + 1) slot events (SlotSet
            # and AllSlotsReset) in the session, the carry-over lists fewer
            # SlotSet events (the same values: "carried_values" is always checked).
            slot_events = _session_slot_events(ref)
            expected_actions = {mh: {k: sliced(v, mh) if isinstance(v, dict) else v
                                     for k, v in outputs.items()
                                     if k != "action_session_start"
                                     or slot_events <= 4 * (mh + 1)} for mh in histories}
        # Trackers that pickle to the same bytes are the same object graph, so
        # they agree on every field: a configuration whose tracker equals one
        # already checked this turn (record memory on and off read the same
        # record) reuses that check instead of computing it again.
        checked: Dict[Any, List[str]] = {}

        def check(key: Any, tracker: DialogueStateTracker, compute: Callable[[], List[str]]
                  ) -> List[str]:
            key = (key, _pickled(tracker))
            if key not in checked:
                checked[key] = compute()
            return checked[key]

        for number, runner in enumerate(runners):
            mh = runner.max_history
            within, got = await runner.step(
                f"{sender_id}/{number}", events, domain,
                lambda tr, mh=mh: check(("within", mh), tr, lambda: compare(
                    expected_live[mh], sliced(snapshot(tr, domain), mh)))
                if check_actions else [])
            if within:
                mismatches.append(Mismatch(runner.name, index, "before save", within))
            if got is None:
                mismatches.append(Mismatch(runner.name, index, "retrieve", ["retrieve gave None"]))
                continue
            fields = await _check_retrieved(
                checked, got, expected[mh], expected_actions[mh] if check_actions else None,
                domain, mh)
            if fields:
                mismatches.append(Mismatch(runner.name, index, "after retrieve", fields))
        if mismatches and stop_at_first:
            break
    return Result(len(turns), mismatches, sim.reference)


class _StringsInFull(pickle.Pickler):
    """A pickler that writes every string out in full where it occurs.

    Plain pickle writes a string met twice as a reference to the first, so
    two trackers with the same values differ in bytes when one shares a
    string object between events and the other does not: a store that parsed
    all its events from one JSON document (whose decoder shares repeated
    keys) against one that parsed them one by one. Strings cannot change and
    Rasa compares them by value, so that sharing changes no field; sharing of
    anything else (an entity list in two places, say) still shows.
    """

    def persistent_id(self, obj: Any) -> Optional[str]:
        # "s" + a non-empty string is a new object each time, which the memo
        # (it holds what it saw) has not seen: written out in full. For ""
        # it is the one cached "s", written once and then referenced, at the
        # same places in any two trackers with the same values. "s" + value
        # is one-to-one, so different strings never give the same bytes.
        return "s" + obj if type(obj) is str else None


def _pickled(tracker: DialogueStateTracker) -> bytes:
    """The tracker's whole object graph as bytes (strings in full, see
    ``_StringsInFull``), leaving out its sender id (each configuration plays
    its own conversation id; no field of the contract depends on it) and what
    the store keeps on it for itself."""
    out = io.BytesIO()
    _StringsInFull(out, pickle.HIGHEST_PROTOCOL).dump(
        {name: value for name, value in vars(tracker).items()
         if name != "sender_id" and not name.startswith("_rpt")})
    return out.getvalue()


async def _check_retrieved(checked: Dict[Any, List[str]], got: DialogueStateTracker,
                           expected: Dict[str, Any], expected_actions: Optional[Dict[str, Any]],
                           domain: Domain, mh: int) -> List[str]:
    """The contract fields on which a retrieved tracker differs (``checked``:
    the results for trackers already checked this turn, by their pickle)."""
    key = ("retrieved", mh, expected_actions is not None, _pickled(got))
    if key not in checked:
        fields = compare(expected, sliced(snapshot(got, domain), mh))
        if expected_actions is not None:
            outputs = await action_outputs(got, domain)
            fields += compare(expected_actions, {
                k: sliced(v, mh) if isinstance(v, dict) else v for k, v in outputs.items()})
        checked[key] = fields
    return checked[key]


@dataclasses.dataclass
class Result:
    turns: int
    mismatches: List[Mismatch]
    reference: DialogueStateTracker


async def shrink(turns: List[Turn], fails: Callable[[List[Turn]], Any]) -> List[Turn]:
    """Remove chunks of turns (halves, quarters, ... single turns) while
    ``await fails(candidate)`` stays true: a minimal failing dialogue."""
    chunk = max(1, len(turns) // 2)
    while chunk >= 1:
        i = 0
        changed = False
        while i < len(turns):
            candidate = turns[:i] + turns[i + chunk:]
            if candidate and await fails(candidate):
                turns, changed = candidate, True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return turns
