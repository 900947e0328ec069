"""A seeded generator of processor-shaped dialogues (Rasa 3.6 event order).

A dialogue is a list of ``Turn``s (a kind and a seed). ``play_turn`` turns one
into the events Rasa's ``MessageProcessor`` would log for it, given the
conversation so far (the *reference* tracker, built from every event): a
session start when one is due, the user message (with entities, policy
events), ``action_extract_slots``, then the predicted actions, each logged as
``ActionExecuted`` followed by the events it returned. Rasa's own actions
(session start, back, restart, default and two-stage fallback, deactivate
loop) are run for real on the reference tracker. Events get timestamps from a
counter, so a seed always gives the same events.

Because a turn's events depend only on the reference state and the turn's
seed, any sub-list of turns is a valid dialogue too: that is what shrinking
removes turns from.
"""
import dataclasses
import datetime
import json
import pickle
import random
from typing import Any, Dict, List, Optional

from rasa.core.actions.action import (
    ActionBack,
    ActionDeactivateLoop,
    ActionDefaultFallback,
    ActionRestart,
    ActionSessionStart,
)
from rasa.core.actions.two_stage_fallback import TwoStageFallbackAction
from rasa.core.channels.channel import CollectingOutputChannel
from rasa.core.nlg import TemplatedNaturalLanguageGenerator
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import (
    ActionExecuted,
    ActionExecutionRejected,
    ActionReverted,
    ActiveLoop,
    AllSlotsReset,
    BotUttered,
    ConversationPaused,
    ConversationResumed,
    DefinePrevUserUtteredFeaturization,
    EntitiesAdded,
    Event,
    FollowupAction,
    LoopInterrupted,
    ReminderCancelled,
    ReminderScheduled,
    SlotSet,
    UserUttered,
)
from rasa.shared.core.trackers import DialogueStateTracker

DOMAIN_YAML = """
version: "3.1"
intents: [greet, inform, chitchat, request_pizza, stop, affirm, deny, back, restart,
          nlu_fallback, out_of_scope, remind, reset, bye]
entities: [size, topping, name]
slots:
  name: {type: text, mappings: [{type: from_entity, entity: name}]}
  size: {type: categorical, values: [small, large], mappings: [{type: from_entity, entity: size}]}
  toppings: {type: list, mappings: [{type: from_entity, entity: topping}]}
  confirmed: {type: bool, mappings: [{type: custom}]}
  amount: {type: float, min_value: 0, max_value: 100, mappings: [{type: custom}]}
  blob: {type: any, mappings: [{type: custom}]}
  note: {type: text, influence_conversation: false, mappings: [{type: custom}]}
forms:
  pizza_form: {required_slots: [size, toppings, confirmed]}
  name_form: {required_slots: [name]}
responses:
  utter_greet: [{text: hi}]
  utter_chitchat: [{text: chat}]
  utter_done: [{text: done}]
  utter_default: [{text: sorry}]
  utter_back: [{text: going back}]
  utter_restart: [{text: restarted}]
  utter_ask_rephrase: [{text: rephrase}]
  utter_ask_size: [{text: ask size}]
  utter_ask_toppings: [{text: ask toppings}]
  utter_ask_confirmed: [{text: sure}]
  utter_ask_name: [{text: ask name}]
actions: [action_custom, action_submit]
session_config:
  session_expiration_time: 60
  carry_over_slots_to_new_session: true
"""

KINDS = {  # kind -> weight
    "chitchat": 14, "custom": 10, "fallback": 8, "two_stage": 4, "back": 5,
    "form_start": 6, "form_fill": 16, "digress": 5, "stop": 3, "unlikely": 3,
    "restart": 1, "expire": 2, "reset": 2, "remind": 3, "fire_reminder": 2,
    "pause": 1, "revert_action": 1,
}
FORMS = {"pizza_form": ["size", "toppings", "confirmed"], "name_form": ["name"]}
RULE_ONLY_DATA = {"rule_only_slots": ["note"], "rule_only_loops": ["name_form"]}


def domain() -> Domain:
    return Domain.from_yaml(DOMAIN_YAML)


@dataclasses.dataclass(frozen=True)
class Turn:
    kind: str
    seed: int


# Share of dialogues that begin without a session start, as a tracker begun
# by ``TrackerStore.get_or_create_tracker`` or the HTTP API does
# (``action_listen`` first); drawn from its own stream, so the turns of a
# seed are the same either way.
SESSIONLESS = 0.15


def generate(seed: int, max_turns: int = 150) -> List[Turn]:
    """The turns of dialogue ``seed``: 1..max_turns of them (plus, for some
    seeds, an ``open`` turn first: the conversation begins without a session)."""
    rng = random.Random(seed)
    count = rng.randint(1, max_turns)
    kinds, weights = zip(*KINDS.items())
    turns = [Turn(rng.choices(kinds, weights)[0], rng.randrange(2 ** 31)) for _ in range(count)]
    if random.Random(f"sessionless-{seed}").random() < SESSIONLESS:
        turns.insert(0, Turn("open", seed))
    return turns


class Clock:
    """Timestamps for generated events: strictly increasing, from a seed."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def stamp(self, events: List[Event], step: float = 1.0) -> List[Event]:
        for event in events:
            self.now += step
            event.timestamp = self.now
        return events


def _value(rng: random.Random, slot: str) -> Any:
    return {
        "name": lambda: rng.choice(["ann", "bob", None]),
        "size": lambda: rng.choice(["small", "large", None]),
        "toppings": lambda: rng.sample(["ham", "olive", "egg"], rng.randint(0, 2)),
        "confirmed": lambda: rng.choice([True, False, None]),
        "amount": lambda: rng.choice([0.0, 12.5, 99.0, None]),
        "blob": lambda: rng.choice([{"a": [1, 2]}, "x", 3, None]),
        "note": lambda: rng.choice(["n1", "n2", None]),
    }[slot]()


class Simulator:
    """Plays turns onto a reference tracker; returns each turn's new events."""

    def __init__(self, dom: Domain, sender_id: str) -> None:
        self.domain = dom
        self.nlg = TemplatedNaturalLanguageGenerator(dom.responses)
        self.reference = DialogueStateTracker(sender_id, dom.slots)
        self.clock = Clock()
        # Every event of the finished turns as JSON, the way a tracker store
        # keeps them: each event is serialised once, when its turn ends (no
        # generated turn edits an event of an earlier one).
        self._stored: List[str] = []
        # The stored view, parsed: updated with each finished turn's events
        # parsed back, in order (what ``from_dict`` of every event replays).
        self._parsed = DialogueStateTracker(sender_id, dom.slots)
        self._parsed_upto = 0

    def stored(self) -> DialogueStateTracker:
        """What a tracker store gives back: every event of the finished
        turns, serialised and parsed again. Each event is parsed once and
        applied in order, as ``DialogueStateTracker.from_dict`` of the whole
        list would; callers only read it."""
        for text in self._stored[self._parsed_upto:]:
            self._parsed.update(Event.from_parameters(json.loads(text)))
        self._parsed_upto = len(self._stored)
        return self._parsed

    async def _run(self, action: Any) -> List[Event]:
        return await action.run(CollectingOutputChannel(), self.nlg, self.reference, self.domain)

    def _log(self, events: List[Event]) -> None:
        for event in self.clock.stamp(events):
            self.reference.update(event)
        self.new.extend(events)

    def _act(self, name: str, events: Optional[List[Event]] = None, rule: bool = False,
             rng: Optional[random.Random] = None) -> None:
        hide = bool(rule and rng is not None and rng.random() < 0.5)
        self._log([ActionExecuted(name, policy="RulePolicy" if rule else "TEDPolicy",
                                  confidence=1.0, hide_rule_turn=hide)])
        self._log(list(events or []))

    async def _real(self, name: str, action: Any) -> None:
        """Run one of Rasa's own actions on the reference and log it (the
        processor runs an action first, then logs ``ActionExecuted``)."""
        events = await self._run(action)
        self._act(name, events)

    def _user(self, rng: random.Random, intent: str, entities: bool = True) -> None:
        ents: List[Dict[str, Any]] = []
        if entities and rng.random() < 0.5:
            entity = rng.choice(["size", "topping", "name"])
            value = {"size": rng.choice(["small", "large"]), "topping": rng.choice(["ham", "egg"]),
                     "name": rng.choice(["ann", "bob"])}[entity]
            ents.append({"entity": entity, "value": value, "start": 0, "end": 1})
        confidence = 0.2 if intent == "nlu_fallback" else 0.9
        ranking = [{"name": intent, "confidence": confidence}, {"name": "greet", "confidence": 0.1}]
        self._log([UserUttered(f"{intent} {rng.randrange(1000)}",
                               {"name": intent, "confidence": confidence}, ents,
                               parse_data={"intent_ranking": ranking},
                               input_channel="test")])
        if rng.random() < 0.1:
            self._log([DefinePrevUserUtteredFeaturization(rng.random() < 0.5)])
        if rng.random() < 0.1:
            self._log([EntitiesAdded([{"entity": "name", "value": "eve"}])])
        extracted = [SlotSet({"topping": "toppings"}.get(e["entity"], e["entity"]),
                             [e["value"]] if e["entity"] == "topping" else e["value"])
                     for e in ents]
        self._act("action_extract_slots", extracted)

    async def _session_start(self) -> None:
        await self._real("action_session_start", ActionSessionStart())

    def _form_step(self, form: str, rng: random.Random) -> None:
        """One happy-path execution of an active form: validate, ask or finish."""
        todo = [s for s in FORMS[form] if self.reference.get_slot(s) in (None, [])]
        events: List[Event] = []
        if todo and rng.random() < 0.7:
            slot = todo[0]
            events.append(SlotSet(slot, _value(rng, slot) or ({"toppings": ["ham"]}.get(slot, True)
                                                              if slot != "size" else "large")))
            todo = todo[1:]
        if todo:
            events += [SlotSet("requested_slot", todo[0]), BotUttered(f"ask {todo[0]}")]
            self._act(form, events)
            return
        events += [SlotSet("requested_slot", None), ActiveLoop(None)]
        self._act(form, events)
        self._act("action_submit", [BotUttered("submitted"), SlotSet("note", "n2")])

    async def play(self, turn: Turn) -> List[Event]:
        """The events of ``turn`` (already applied to ``self.reference``)."""
        self.new: List[Event] = []
        rng = random.Random(turn.seed)
        # Between turns every Rasa tracker store (InMemoryTrackerStore too)
        # stores the events serialised and parses them back.
        # (A copy: this turn's events go onto the reference as Rasa's
        # processor holds them, unserialised.)
        self.reference = pickle.loads(pickle.dumps(self.stored()))
        try:
            return await self._play(turn, rng)
        finally:
            self._stored.extend(json.dumps(event.as_dict()) for event in self.new)

    async def _play(self, turn: Turn, rng: random.Random) -> List[Event]:
        ref = self.reference
        if turn.kind == "open":
            if not ref.events:  # as get_or_create_tracker begins a tracker
                self._log([ActionExecuted("action_listen")])
            return self.new
        if not ref.events or turn.kind == "expire":
            if turn.kind == "expire":
                self.clock.now += 3600  # past session_expiration_time
            await self._session_start()
        loop = self.reference.active_loop_name
        kind = turn.kind
        if kind == "fire_reminder":
            self._fire_reminder(rng)
            return self.new
        intent = {"form_start": "request_pizza", "stop": "stop", "back": "back",
                  "restart": "restart", "fallback": rng.choice(["nlu_fallback", "out_of_scope"]),
                  "two_stage": "nlu_fallback", "reset": "reset", "remind": "remind",
                  "form_fill": "inform", "digress": "chitchat"}.get(kind, "greet")
        if loop == "action_two_stage_fallback":
            intent = rng.choice(["affirm", "deny", "nlu_fallback", "out_of_scope", "greet"])
            kind = "two_stage"
        self._user(rng, intent)
        if rng.random() < 0.08:
            self._act("action_unlikely_intent")
        if kind == "unlikely":
            self._act("action_unlikely_intent")
            self._act("utter_chitchat", [BotUttered("chat")])
        elif kind == "fallback":
            await self._real("action_default_fallback", ActionDefaultFallback())
        elif kind == "two_stage":
            await self._real("action_two_stage_fallback", TwoStageFallbackAction())
        elif kind == "back":
            await self._real("action_back", ActionBack())
        elif kind == "restart":
            await self._real("action_restart", ActionRestart())
            await self._session_start()
            return self.new
        elif kind == "stop" and loop:
            self._act(loop, [ActionExecutionRejected(loop)])
            await self._real("action_deactivate_loop", ActionDeactivateLoop())
        elif kind == "form_start" and not loop:
            form = rng.choice(list(FORMS))
            self._act(form, [ActiveLoop(form)])
            self._form_step(form, rng)
        elif kind in ("form_fill", "form_start") and loop:
            self._form_step(loop, rng)
        elif kind == "digress" and loop:
            self._act(loop, [ActionExecutionRejected(loop)])
            if rng.random() < 0.3:
                self._act("action_custom", [LoopInterrupted(True)])
            self._act("utter_chitchat", [BotUttered("chat")], rule=True, rng=rng)
            self._form_step(loop, rng)
        elif kind == "custom":
            self._custom(rng)
        elif kind == "reset":
            self._act("action_custom", [AllSlotsReset(), BotUttered("reset")])
        elif kind == "remind":
            name = f"r{rng.randrange(3)}"
            when = datetime.datetime.fromtimestamp(self.clock.now + 60, datetime.timezone.utc)
            events: List[Event] = [ReminderScheduled(
                "remind", when, name=name,
                kill_on_user_message=rng.random() < 0.5)]
            if rng.random() < 0.3:
                events.append(ReminderCancelled(name=f"r{rng.randrange(3)}"))
            self._act("action_custom", events)
        elif kind == "pause":
            self._act("action_custom", [ConversationPaused()])
            self._act("action_custom", [ConversationResumed()])
        elif kind == "revert_action":
            self._act("action_custom", [SlotSet("amount", 5.0)])
            self._act("action_custom", [ActionReverted()])
        else:
            self._act("utter_greet", [BotUttered("hi")], rule=True, rng=rng)
        if isinstance(self.reference.events[-1], UserUttered):
            # the two-stage fallback's clarification: the processor goes on
            # predicting for the clarified message
            self._act("utter_greet", [BotUttered("hi")], rule=True, rng=rng)
        if self.reference.latest_action_name != "action_listen":
            self._act("action_listen")
        return self.new

    def _custom(self, rng: random.Random) -> None:
        events: List[Event] = []
        for _ in range(rng.randint(0, 3)):
            slot = rng.choice(["name", "size", "toppings", "confirmed", "amount", "blob", "note"])
            events.append(SlotSet(slot, _value(rng, slot)))
        if rng.random() < 0.3:
            events.append(BotUttered("custom"))
        if rng.random() < 0.25:
            events.append(FollowupAction("utter_chitchat"))
            self._act("action_custom", events)
            self._act("utter_chitchat", [BotUttered("chat")])
            return
        self._act("action_custom", events)

    def _fire_reminder(self, rng: random.Random) -> None:
        """An external message (what handle_reminder triggers), then a reply."""
        self._log([UserUttered("EXTERNAL: remind", {"name": "remind", "confidence": 1.0})])
        self._act("action_extract_slots")
        self._act("utter_chitchat", [BotUttered("reminded")])
        self._act("action_listen")


async def play_through(store: Any, sender_id: str, seed: int, turns: int) -> Any:
    """The first ``turns`` turns of dialogue ``seed`` through ``store`` as Rasa's
    processor takes them (retrieve, append the turn's events, save); the
    tracker last saved."""
    sim = Simulator(store.domain, sender_id)
    tracker = None
    for turn in generate(seed)[:turns]:
        events = await sim.play(turn)
        tracker = await store.retrieve(sender_id) or store.init_tracker(sender_id)
        for event in events:
            tracker.update(event)
        await store.save(tracker)
    return tracker
