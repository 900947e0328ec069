"""Prediction equivalence: a trained Rasa bot behaves the same on our store.

A small but real Rasa 3.6 bot (``tests/equiv_bot``: a form with from_entity and
from_text mappings, rules with an interruption and a cancel, stories for
MemoizationPolicy, TEDPolicy for ML history, a text and a float slot, sessions
that expire after one minute with slots carried over, a FallbackClassifier with
the two-stage fallback, out-of-scope messages answered by the default fallback,
custom actions returning ``AllSlotsReset``, ``ReminderScheduled`` and
``ActionReverted``) is trained once and cached in ``tests/equiv_bot/models/``.
Its custom actions run in rasa_sdk's executor behind an in-test HTTP action
server (``tests/equiv_actions.py``).

A scripted conversation of 99 turns (greet, a story, form filling with
interruptions, a cancel, re-activation and completion, slot-setting entities,
two ``/restart``, a session expiry, then: a form with a digression and a
``/back`` mid-form, completed and followed by 42 more turns: five out-of-scope
fallbacks in a row, ``/back``, two-stage fallbacks ending in clarification and
in both ways of giving up, ``ActionReverted``, ``AllSlotsReset``, and three
reminders, fired the way Rasa's scheduler fires them: one cancelled by a user
message, one fired when the store's record holds it only in its summary) is
run through an ``Agent`` backed by Rasa's ``InMemoryTrackerStore`` (the
reference) and through an ``Agent`` backed by ``PersistentTrackerStore``. At
every turn the bot responses, ``tracker.current_slot_values()`` and
``tracker.active_loop_name`` must be identical. Afterwards the primary store
itself is checked directly (the Agent wraps it in ``FailSafeTrackerStore``,
which hides errors): ``retrieve`` must give the final slots and
``retrieve_full_tracker`` must give every event of every session.

Rasa's ``InMemoryTrackerStore`` only keeps the latest session (the processor
saves the tracker it retrieved, which holds the latest session only), so the
reference for "all events of all sessions" is the event stream Rasa publishes
to an event broker; ``test_rasa_sql_store_matches_reference`` proves that
Rasa's own persistent ``SQLTrackerStore`` returns exactly that stream from
``retrieve_full_tracker``.

Session expiry is simulated without touching stored timestamps: for one
message, ``time`` as seen by ``rasa.core.processor`` (which decides whether the
session expired) is shifted two minutes into the future.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import structlog

import rasa
import rasa.core.processor
from rasa.core import jobs
from rasa.core.agent import Agent
from rasa.core.brokers.broker import EventBroker
from rasa.core.channels import CollectingOutputChannel
from rasa.core.tracker_store import (
    FailSafeTrackerStore,
    InMemoryTrackerStore,
    SQLTrackerStore,
    TrackerStore,
)
from rasa.shared.core.trackers import DialogueStateTracker
from rasa.utils.endpoints import EndpointConfig

from tests.equiv_actions import NUDGE_REMINDER, OVEN_REMINDER, ActionServer

pytestmark = pytest.mark.equivalence

BOT_DIR = Path(__file__).resolve().parent / "equiv_bot"
MODEL_DIR = BOT_DIR / "models"
MODEL_NAME = "equiv_bot"
MODEL_PATH = MODEL_DIR / f"{MODEL_NAME}.tar.gz"
FINGERPRINT_PATH = MODEL_DIR / f"{MODEL_NAME}.fingerprint"
TRAIN_LOG = MODEL_DIR / "train.log"
TRAIN_TIMEOUT_S = 900

SENDER_ID = "equiv-user"


# --------------------------------------------------------------------------
# The scripted conversation
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Turn:
    text: str
    # Shift the clock seen by rasa.core.processor this many minutes forward
    # for this one message (the bot's session_expiration_time is 1 minute).
    jump_minutes: float = 0.0
    note: str = ""
    # Instead of a user message, fire the scheduled reminder of this name the
    # way Rasa's scheduler does (``MessageProcessor.handle_reminder``).
    fire_reminder: str = ""


CONVERSATION: Tuple[Turn, ...] = (
    Turn("hello", note="rule: greet"),
    Turn("I am sad", note="story (memoization): cheer up + did that help"),
    Turn("yes", note="story: affirm -> happy"),
    Turn("my name is alice", note="text slot user_name via lookup entity"),
    Turn("my budget is 15", note="float slot budget via regex entity"),
    Turn("thanks", note="response uses {user_name}"),
    Turn("I want a pizza", note="form activation, asks size"),
    Turn("are you a bot?", note="chitchat mid-form, back to form"),
    Turn("large", note="size via entity, asks topping"),
    Turn("stop", note="cancel mid-form: deactivate (unhappy path)"),
    Turn("are you a bot?", note="rule outside the form"),
    Turn("I want a pizza", note="form re-activation, asks topping"),
    Turn("anchovies", note="topping via from_text fallback"),
    Turn("are you real", note="chitchat mid-form again"),
    Turn("ring the bell twice", note="delivery_note via from_text: submit"),
    Turn("thank you"),
    Turn("perfect", note="TEDPolicy prediction"),
    Turn("my budget is 8.75", note="float slot overwritten"),
    Turn("goodbye"),
    Turn("hi again"),
    Turn("I want a medium pizza", note="entity + all slots filled: instant submit"),
    Turn("/restart", note="restart: slots reset, new session"),
    Turn("hello"),
    Turn("I am sad", note="story again after restart"),
    Turn("no", note="story: deny -> goodbye"),
    Turn("call me dave"),
    Turn("call me bob", note="user_name set twice in this session"),
    Turn("I can spend 12.5 dollars"),
    Turn("order a pizza", note="fresh form, asks size"),
    Turn("big", note="synonym big -> large, asks topping"),
    Turn(
        "hello again",
        jump_minutes=2.0,
        note="session expired mid-form: slots carried over, loop dropped",
    ),
    Turn("I am great", note="TEDPolicy prediction in the new session"),
    Turn("order a pizza", note="form resumes at the carried-over requested slot"),
    Turn("are you a bot?"),
    Turn("pepperoni"),
    Turn("stop"),
    Turn("back to my pizza order", note="re-activation asks delivery_note"),
    Turn("leave it at the door", note="submit"),
    Turn("thanks a lot"),
    Turn("call me carol", note="text slot overwritten"),
    Turn("no more than 40"),
    Turn("can I order a small pizza", note="instant submit with new size"),
    Turn("what is the meaning of life", note="out_of_scope: default fallback"),
    Turn("cheers"),
    Turn("bye"),
    Turn("/restart"),
    Turn("hey"),
    Turn("I am great", note="story happy path"),
    Turn("goodbye"),
    Turn("hi"),
    # --- fallbacks, reverts, custom actions, reminders (issue 12) -----------
    Turn("I want a pizza", note="form asks size"),
    Turn("am I talking to a bot?", note="digression mid-form: rule, form continues"),
    Turn("small"),
    Turn("/back", note="mid-form: reverts 'small', the form asks size again"),
    Turn("medium"),
    Turn("olives"),
    Turn("knock loudly", note="form completed; 10+ turns without it follow"),
    Turn("remind me to check the oven", note="custom action: ReminderScheduled"),
    Turn("thanks"),
    Turn("what is the weather like", note="out_of_scope: default fallback 1"),
    Turn("tell me a joke", note="out_of_scope: default fallback 2"),
    Turn("who won the football game", note="out_of_scope: default fallback 3"),
    Turn("recommend a movie", note="out_of_scope: default fallback 4"),
    Turn("how tall is mount everest", note="out_of_scope: default fallback 5"),
    Turn("hello"),
    Turn("/back", note="action_back: reverts two user messages"),
    Turn("nudge me later", note="custom action: reminder killed by a user message"),
    Turn("", fire_reminder=NUDGE_REMINDER, note="fires: no user message since"),
    Turn("nudge me later", note="the same reminder again"),
    Turn("I am great"),
    Turn("", fire_reminder=NUDGE_REMINDER, note="cancelled: the user wrote since"),
    Turn("call me erin"),
    Turn("undo that", note="custom action: ActionReverted"),
    Turn("xq zvbn", note="nlu_fallback: two-stage fallback asks to affirm"),
    Turn("/deny", note="'Yes' button: the message counts as the suggested intent"),
    Turn("qwpl mrtx", note="two-stage fallback again"),
    Turn("/out_of_scope", note="denied: asks to rephrase"),
    Turn("I am sad", note="rephrased: fallback events reverted"),
    Turn("zzkv xqw", note="two-stage fallback a third time"),
    Turn("/out_of_scope", note="denied"),
    Turn("brrp qnx", note="rephrase not understood: asks to affirm again"),
    Turn("/out_of_scope", note="second affirmation denied: gives up"),
    Turn("plmq zz", note="two-stage fallback"),
    Turn("vvbx qq", note="two low-confidence messages in a row: gives up"),
    # stories (not rule-only turns) push the reminder out of the window the
    # record keeps verbatim: only its summary still holds it
    Turn("hello"),
    Turn("I am sad"),
    Turn("no"),
    Turn("hey"),
    Turn("I am great"),
    Turn("hi"),
    Turn("I am sad"),
    Turn("yes"),
    Turn("hello"),
    Turn("I am great"),
    Turn("bye"),
    Turn("", fire_reminder=OVEN_REMINDER, note="fires: set 39 turns ago"),
    Turn("forget everything about me", note="custom action: AllSlotsReset"),
    Turn("my budget is 30"),
    Turn("goodbye"),
)


# --------------------------------------------------------------------------
# Training (once, cached) and quiet logging
# --------------------------------------------------------------------------


def _bot_files() -> List[Path]:
    return [BOT_DIR / "config.yml", BOT_DIR / "domain.yml"] + sorted(
        (BOT_DIR / "data").glob("*.yml")
    )


def _bot_fingerprint() -> str:
    digest = hashlib.sha256()
    digest.update(f"rasa=={rasa.__version__}\n".encode())
    for path in _bot_files():
        digest.update(str(path.relative_to(BOT_DIR)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _model_is_fresh(fingerprint: str) -> bool:
    if not MODEL_PATH.exists() or not FINGERPRINT_PATH.exists():
        return False
    if FINGERPRINT_PATH.read_text().strip() != fingerprint:
        return False
    newest_input = max(path.stat().st_mtime for path in _bot_files())
    if MODEL_PATH.stat().st_mtime >= newest_input:
        return True
    # Older than the bot files but built from identical content (e.g. a fresh
    # checkout touched the files): still valid, refresh its mtime.
    os.utime(MODEL_PATH)
    return True


def _train_model(fingerprint: str) -> None:
    tmp_out = MODEL_DIR / f".tmp-{os.getpid()}"
    env = dict(os.environ)
    env.update(
        RASA_TELEMETRY_ENABLED="false",
        RASA_MAX_CACHE_SIZE="0",
        RASA_CACHE_DIRECTORY=str(BOT_DIR / ".rasa" / "cache"),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONHASHSEED="0",
    )
    command = [
        sys.executable, "-m", "rasa", "train",
        "--config", "config.yml",
        "--domain", "domain.yml",
        "--data", "data",
        "--out", str(tmp_out),
        "--fixed-model-name", MODEL_NAME,
        "--force",
    ]  # fmt: skip
    started = time.monotonic()
    with TRAIN_LOG.open("w") as log:
        result = subprocess.run(
            command,
            cwd=BOT_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=TRAIN_TIMEOUT_S,
        )
    trained = tmp_out / f"{MODEL_NAME}.tar.gz"
    if result.returncode != 0 or not trained.exists():
        tail = TRAIN_LOG.read_text(errors="replace")[-4000:]
        pytest.fail(
            f"training the equivalence bot failed (exit {result.returncode}); "
            f"log tail:\n{tail}"
        )
    os.replace(trained, MODEL_PATH)
    tmp_out.rmdir()
    FINGERPRINT_PATH.write_text(fingerprint + "\n")
    with TRAIN_LOG.open("a") as log:
        log.write(f"\n# trained in {time.monotonic() - started:.1f} s\n")


@pytest.fixture(scope="session")
def equiv_model_path() -> Path:
    """Path of the trained bot; trains it only if missing or out of date."""
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    fingerprint = _bot_fingerprint()
    with (MODEL_DIR / ".train.lock").open("w") as lock:  # pytest-xdist safe
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _model_is_fresh(fingerprint):
                _train_model(fingerprint)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return MODEL_PATH


@pytest.fixture(scope="session", autouse=True)
def _quiet_rasa_structlog() -> Any:
    """Rasa 3.6 logs every prediction through an unconfigured structlog, which
    renders full tracker states at debug level (~20 s per turn). Filter it to
    WARNING for this module's session and restore the previous setting after."""
    previous = structlog.get_config().get("wrapper_class")
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
    )
    os.environ.setdefault("RASA_TELEMETRY_ENABLED", "false")
    yield
    structlog.configure(wrapper_class=previous)


# --------------------------------------------------------------------------
# Running a conversation and recording what the bot did
# --------------------------------------------------------------------------


class _ShiftedClock:
    """Stands in for the ``time`` module inside ``rasa.core.processor``."""

    def __init__(self, offset_seconds: float) -> None:
        self.offset_seconds = offset_seconds

    def time(self) -> float:
        return time.time() + self.offset_seconds


class RecordingBroker(EventBroker):
    """Collects every event Rasa streams, i.e. the full conversation log."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def publish(self, event: Dict[str, Any]) -> None:
        self.events.append(json.loads(json.dumps(event)))

    def is_ready(self) -> bool:
        return True


@dataclasses.dataclass
class TurnRecord:
    index: int
    text: str
    responses: List[Dict[str, Any]]
    slots: Dict[str, Any]
    active_loop: Optional[str]

    def observable(self) -> Dict[str, Any]:
        return {
            "responses": self.responses,
            "slots": self.slots,
            "active_loop": self.active_loop,
        }


@dataclasses.dataclass
class StoreErrors:
    """Errors that FailSafeTrackerStore would otherwise only log."""

    save: List[str] = dataclasses.field(default_factory=list)
    retrieve: List[str] = dataclasses.field(default_factory=list)

    def hook(self, store: TrackerStore) -> None:
        assert isinstance(store, FailSafeTrackerStore), type(store)
        store._on_tracker_store_error = lambda e: self.save.append(repr(e))
        store.on_tracker_store_retrieve_error = (  # type: ignore[assignment]
            lambda e: self.retrieve.append(repr(e))
        )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


@pytest.fixture
async def action_endpoint() -> Any:
    """The bot's custom actions (``tests/equiv_actions.py``) on a loopback
    port, and a reminder scheduler on this test's event loop (Rasa keeps one
    global scheduler, bound to the loop that created it)."""
    jobs.kill_scheduler()
    server = ActionServer()
    yield EndpointConfig(url=await server.start())
    await server.stop()
    jobs.kill_scheduler()


def load_agent(model_path: Path, store: TrackerStore, endpoint: EndpointConfig) -> Agent:
    return Agent.load(model_path, tracker_store=store, action_endpoint=endpoint)


async def fire_reminder(agent: Agent, name: str, sender_id: str) -> List[Dict[str, Any]]:
    """Run the scheduler job Rasa made for reminder ``name`` now, as the
    scheduler would at its trigger time (same callback, same event object),
    and return what the bot said."""
    scheduler = await jobs.scheduler()
    job = scheduler.get_job(name)
    assert job is not None, f"reminder {name!r} was never scheduled"
    event, job_sender, _ = job.args
    assert job_sender == sender_id
    scheduler.remove_job(name)
    channel = CollectingOutputChannel()
    await agent.processor.handle_reminder(event, sender_id, channel)
    return channel.messages


async def run_conversation(
    agent: Agent, sender_id: str = SENDER_ID
) -> List[TurnRecord]:
    records = []
    for index, turn in enumerate(CONVERSATION):
        if turn.fire_reminder:
            responses = await fire_reminder(agent, turn.fire_reminder, sender_id)
        elif turn.jump_minutes:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(
                    rasa.core.processor,
                    "time",
                    _ShiftedClock(turn.jump_minutes * 60.0),
                )
                responses = await agent.handle_text(turn.text, sender_id=sender_id)
        else:
            responses = await agent.handle_text(turn.text, sender_id=sender_id)
        tracker = await agent.tracker_store.get_or_create_tracker(sender_id)
        records.append(
            TurnRecord(
                index=index,
                text=turn.text or f"<reminder {turn.fire_reminder}>",
                responses=_jsonable(responses or []),
                slots=_jsonable(tracker.current_slot_values()),
                active_loop=tracker.active_loop_name,
            )
        )
    return records


def event_signature(event: Dict[str, Any]) -> Tuple[Any, ...]:
    """What must survive storage for one event (timestamps excluded)."""
    kind = event.get("event")
    if kind == "user":
        parse = event.get("parse_data") or {}
        entities = [(e.get("entity"), e.get("value")) for e in parse.get("entities", [])]
        return (kind, event.get("text"), (parse.get("intent") or {}).get("name"), entities)
    if kind == "bot":
        return (kind, event.get("text"))
    if kind == "action":
        return (kind, event.get("name"), event.get("policy"))
    if kind == "slot":
        return (kind, event.get("name"), event.get("value"))
    if kind in ("active_loop", "action_execution_rejected", "followup"):
        return (kind, event.get("name"))
    if kind == "reminder":  # its date_time is "in an hour" from when it ran
        return (kind, event.get("name"), event.get("intent"), event.get("kill_on_user_msg"))
    return (kind,)


@dataclasses.dataclass
class Transcript:
    turns: List[TurnRecord]
    full_log: List[Dict[str, Any]]  # every event of every session, in order
    final_slots: Dict[str, Any]
    final_active_loop: Optional[str]

    @property
    def full_log_types(self) -> List[str]:
        return [event["event"] for event in self.full_log]


_REFERENCE: Dict[str, Transcript] = {}


async def reference_transcript(model_path: Path, endpoint: EndpointConfig) -> Transcript:
    """The conversation on Rasa's InMemoryTrackerStore (computed once)."""
    key = str(model_path)
    if key not in _REFERENCE:
        broker = RecordingBroker()
        agent = load_agent(
            model_path, InMemoryTrackerStore(None, event_broker=broker), endpoint
        )
        errors = StoreErrors()
        errors.hook(agent.tracker_store)
        turns = await run_conversation(agent)
        assert not (errors.save or errors.retrieve), errors
        final = await agent.tracker_store.retrieve(SENDER_ID)
        _REFERENCE[key] = Transcript(
            turns=turns,
            full_log=broker.events,
            final_slots=_jsonable(final.current_slot_values()),
            final_active_loop=final.active_loop_name,
        )
    return _REFERENCE[key]


# --------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------


def assert_same_turns(
    expected: List[TurnRecord], actual: List[TurnRecord], label: str
) -> None:
    assert len(actual) == len(expected) == len(CONVERSATION)
    diverging = [
        e.index for e, a in zip(expected, actual) if e.observable() != a.observable()
    ]
    if not diverging:
        return
    first = diverging[0]
    exp, act = expected[first].observable(), actual[first].observable()
    details = "\n".join(
        f"  {field}:\n    expected (InMemoryTrackerStore): {exp[field]!r}\n"
        f"    actual   ({label}): {act[field]!r}"
        for field in exp
        if exp[field] != act[field]
    )
    pytest.fail(
        f"{label} diverges from InMemoryTrackerStore at turn {first} "
        f"(user text {expected[first].text!r}; note: "
        f"{CONVERSATION[first].note or '-'}):\n{details}\n"
        f"all diverging turns: {diverging}",
        pytrace=False,
    )


def _first_difference(expected: List[Any], actual: List[Any]) -> Optional[int]:
    for position, (exp, act) in enumerate(zip(expected, actual)):
        if exp != act:
            return position
    if len(expected) != len(actual):
        return min(len(expected), len(actual))
    return None


def assert_full_log(
    reference: Transcript, full: Optional[DialogueStateTracker], label: str
) -> None:
    assert full is not None, f"{label}: retrieve_full_tracker returned None"
    events = [_jsonable(event.as_dict()) for event in full.events]
    types = [event["event"] for event in events]
    expected_sigs = [event_signature(event) for event in reference.full_log]
    actual_sigs = [event_signature(event) for event in events]
    first = _first_difference(expected_sigs, actual_sigs)
    if first is None:
        return

    def show(sigs: List[Any], i: int) -> str:
        return repr(sigs[i]) if i < len(sigs) else "(none)"

    lines = []
    for i in range(max(0, first - 3), first + 8):
        if i >= max(len(expected_sigs), len(actual_sigs)):
            break
        lines.append(f"  [{i}] expected {show(expected_sigs, i)}")
        lines.append(f"  {'':{len(str(i)) + 2}} actual   {show(actual_sigs, i)}")
    context = "\n".join(lines)
    where = (
        f"retrieve_full_tracker returned {len(events)} events, the full conversation "
        f"(Rasa's event stream) has {len(reference.full_log)}; first difference at "
        f"event {first}:\n{context}"
    )
    if len(events) != len(reference.full_log):
        pytest.fail(f"{label}: {where}", pytrace=False)
    if types != reference.full_log_types:
        pytest.fail(f"{label}: event types differ; {where}", pytrace=False)
    pytest.fail(f"{label}: event contents differ; {where}", pytrace=False)


def assert_final_state(
    reference: Transcript, tracker: Optional[DialogueStateTracker], label: str
) -> None:
    assert tracker is not None, f"{label}: retrieve returned None"
    assert _jsonable(tracker.current_slot_values()) == reference.final_slots, label
    assert tracker.active_loop_name == reference.final_active_loop, label
    assert tracker.sender_id == SENDER_ID


# --------------------------------------------------------------------------
# Harness self-checks (need only Rasa)
# --------------------------------------------------------------------------


def test_conversation_covers_the_scenario() -> None:
    texts = [turn.text for turn in CONVERSATION]
    assert len(CONVERSATION) >= 40
    assert texts.count("/restart") >= 1
    assert sum(1 for turn in CONVERSATION if turn.jump_minutes) == 1
    jump = next(turn for turn in CONVERSATION if turn.jump_minutes)
    assert jump.jump_minutes * 60 > 60  # bot's session_expiration_time: 1 minute
    assert texts.index("/restart") < texts.index(jump.text) < len(texts) - 5
    # reminders are fired by the script, each once; the surviving one long
    # after it was set (the store's window no longer holds that turn raw)
    fired = [(i, turn.fire_reminder) for i, turn in enumerate(CONVERSATION)
             if turn.fire_reminder]
    assert [name for _, name in fired] == [NUDGE_REMINDER, NUDGE_REMINDER, OVEN_REMINDER]
    (nudged, _), (cancelled, _), (oven, _) = fired
    assert texts[nudged - 1] == "nudge me later"  # fires
    assert texts[cancelled - 2] == "nudge me later"  # a user message since
    assert oven - texts.index("remind me to check the oven") > 30
    assert texts.count("/back") >= 2


def _user_turns(log: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """The full log split before every user event (the first part dropped)."""
    starts = [i for i, event in enumerate(log) if event["event"] == "user"]
    return [log[a:b] for a, b in zip(starts, starts[1:] + [len(log)])]


def _actions(events: List[Dict[str, Any]]) -> List[str]:
    return [e["name"] for e in events if e["event"] == "action"]


async def test_reference_takes_every_path(
    equiv_model_path: Path, action_endpoint: EndpointConfig
) -> None:
    """The paths issue 12 added really occur in the reference conversation,
    so that passing the comparison means the store handled them."""
    ref = await reference_transcript(equiv_model_path, action_endpoint)
    log, turns = ref.full_log, _user_turns(ref.full_log)
    types = ref.full_log_types
    texts = [[r.get("text") for r in record.responses] for record in ref.turns]

    # at least four out-of-scope messages in a row, each reverted by the
    # default fallback
    run = longest = 0
    for turn in turns:
        reverted = (turn[0]["parse_data"]["intent"]["name"] == "out_of_scope"
                    and "action_default_fallback" in _actions(turn)
                    and any(e["event"] == "rewind" for e in turn))
        run = run + 1 if reverted else 0
        longest = max(longest, run)
    assert longest >= 4

    # two-stage fallback: affirmation, rephrase, clarification, both give-ups
    activations = [e for e in log if e["event"] == "active_loop"
                   and e["name"] == "action_two_stage_fallback"]
    assert len(activations) >= 4
    assert sum(t[:1] == ["Could you say that in other words?"] for t in texts) >= 2
    gave_up = [i for i, record in enumerate(ref.turns)
               if ref.turns[i - 1].active_loop == "action_two_stage_fallback"
               and record.active_loop is None
               and texts[i] == ["Sorry, I didn't get that."]]
    assert len(gave_up) >= 2
    clarified = [t for t in turns if "action_two_stage_fallback" in _actions(t)
                 and any(e["event"] == "rewind" for e in t)
                 and t[0]["parse_data"]["intent"]["name"] != "nlu_fallback"]
    assert len(clarified) >= 2

    # /back outside the form and inside it (the form asks again, the slot
    # filled by the reverted message is unset)
    backs = [i for i, turn in enumerate(CONVERSATION) if turn.text == "/back"]
    assert all(texts[i] == ["Okay, let's go back."] for i in backs)
    assert types.count("rewind") >= 5 + 2 * len(backs)
    mid_form = [i for i in backs if ref.turns[i - 1].active_loop == "pizza_form"]
    assert mid_form
    assert ref.turns[mid_form[0] - 1].slots["size"] == "small"
    assert ref.turns[mid_form[0]].slots["size"] is None
    assert ref.turns[mid_form[0]].slots["requested_slot"] == "size"
    assert ref.turns[mid_form[0]].active_loop == "pizza_form"

    # custom actions: ActionReverted, AllSlotsReset, two ReminderScheduled
    assert types.count("undo") == 1
    assert types.count("reset_slots") == 1
    reset = next(i for i, turn in enumerate(CONVERSATION)
                 if turn.text == "forget everything about me")
    assert any(value is not None for value in ref.turns[reset - 1].slots.values())
    assert all(value is None for value in ref.turns[reset].slots.values())
    reminders = [e for e in log if e["event"] == "reminder"]
    assert [(e["name"], e["kill_on_user_msg"]) for e in reminders] == [
        (OVEN_REMINDER, False), (NUDGE_REMINDER, True), (NUDGE_REMINDER, True)]
    # a nudge fires, the next one is cancelled by a user message, the oven
    # reminder fires long after it was set
    fired = [texts[i] for i, turn in enumerate(CONVERSATION) if turn.fire_reminder]
    assert fired == [["None, here is your reminder!"], [],
                     ["erin, here is your reminder!"]]
    external = [t for t in turns if t[0]["parse_data"]["intent"]["name"] == "EXTERNAL_reminder"]
    assert [_actions(t) for t in external] == [["utter_reminder", "action_listen"]] * 2

    # a digression mid-form in the last session, then the form goes on; it is
    # completed and ten user turns and more follow without reviving it
    last_session = max(i for i, e in enumerate(log)
                       if e["event"] in ("restart", "session_started"))
    tail = log[last_session:]
    assert any(_actions(t)[:2] == ["utter_iamabot", "pizza_form"] for t in _user_turns(tail))
    submitted = max(i for i, e in enumerate(tail)
                    if e["event"] == "action" and e["name"] == "utter_submit")
    assert (tail[submitted - 1]["event"], tail[submitted - 1]["name"]) == ("active_loop", None)
    after = tail[submitted:]
    assert sum(e["event"] == "user" for e in after) >= 10
    assert not any(e["event"] == "active_loop" and e["name"] == "pizza_form" for e in after)


async def test_reference_behaves_as_scripted(
    equiv_model_path: Path, action_endpoint: EndpointConfig
) -> None:
    """Pins the bot's behaviour, so a harness bug cannot make every store
    'equivalent' by accident (e.g. a bot that never answers)."""
    ref = await reference_transcript(equiv_model_path, action_endpoint)
    by_text = {}
    for record in ref.turns:
        by_text.setdefault(record.text, record)
    texts = [[r.get("text") for r in record.responses] for record in ref.turns]

    assert texts[0] == ["Hey! How are you?"]
    assert texts[1] == [
        "Here is something to cheer you up: a picture of a pizza.",
        "Did that help you?",
    ]
    # form: interruption returns to the form, cancel deactivates it
    assert ref.turns[7].active_loop == "pizza_form"
    assert texts[7][-1].startswith("What size")
    assert ref.turns[9].active_loop is None
    assert texts[9] == ["Okay, I stopped taking your order. Size so far: large."]
    # re-activation, from_text fallback, completion
    assert texts[11] == ["Which topping would you like?"]
    assert ref.turns[12].slots["topping"] == "anchovies"
    assert texts[14] == [
        "Order placed: a large pizza with anchovies (note: ring the bell twice) "
        "for alice, budget 15."
    ]
    assert ref.turns[14].active_loop is None
    # restart clears every slot
    assert all(value is None for value in ref.turns[21].slots.values())
    # session expiry mid-form: slots carried over, the form is not active
    jump = next(i for i, turn in enumerate(CONVERSATION) if turn.jump_minutes)
    assert ref.turns[jump - 1].active_loop == "pizza_form"
    assert ref.turns[jump].active_loop is None
    assert ref.turns[jump].slots["size"] == "large"
    assert ref.turns[jump].slots["user_name"] == "bob"
    assert ref.turns[jump].slots["requested_slot"] == "topping"
    assert texts[jump + 2] == ["Which topping would you like?"]
    # Rasa carries slots over by replaying every SlotSet of the old session,
    # in order, so user_name appears twice (dave, then bob)
    expiry_start = [
        i for i, e in enumerate(ref.full_log) if e["event"] == "session_started"
    ][2]
    carried = []
    for event in ref.full_log[expiry_start + 1 :]:
        if event["event"] != "slot":
            break
        carried.append((event["name"], event["value"]))
    assert carried == [
        ("mood", "sad"),
        ("user_name", "dave"),
        ("user_name", "bob"),
        ("budget", "12.5"),
        ("requested_slot", "size"),
        ("size", "large"),
        ("requested_slot", "topping"),
    ]
    # three sessions started by the script itself + two restarts
    assert ref.full_log_types.count("session_started") == 4
    assert ref.full_log_types.count("restart") == 2
    assert len(ref.full_log) > 200


async def test_reference_is_deterministic(
    equiv_model_path: Path, action_endpoint: EndpointConfig
) -> None:
    """A second, independently loaded agent on a second InMemoryTrackerStore
    produces exactly the same transcript: divergences found by the store tests
    are therefore caused by the store."""
    ref = await reference_transcript(equiv_model_path, action_endpoint)
    broker = RecordingBroker()
    agent = load_agent(
        equiv_model_path, InMemoryTrackerStore(None, event_broker=broker), action_endpoint
    )
    turns = await run_conversation(agent)
    assert_same_turns(ref.turns, turns, "second InMemoryTrackerStore")
    assert [event_signature(e) for e in broker.events] == [
        event_signature(e) for e in ref.full_log
    ]


async def test_rasa_sql_store_matches_reference(
    equiv_model_path: Path, action_endpoint: EndpointConfig, tmp_path: Path
) -> None:
    """Rasa's own persistent SQLTrackerStore passes the very checks applied to
    our store, which validates the reference full log (broker stream)."""
    ref = await reference_transcript(equiv_model_path, action_endpoint)
    store = SQLTrackerStore(None, dialect="sqlite", db=str(tmp_path / "rasa.db"))
    agent = load_agent(equiv_model_path, store, action_endpoint)
    errors = StoreErrors()
    errors.hook(agent.tracker_store)
    turns = await run_conversation(agent)
    assert not (errors.save or errors.retrieve), errors
    assert_same_turns(ref.turns, turns, "SQLTrackerStore")
    assert_final_state(ref, await store.retrieve(SENDER_ID), "SQLTrackerStore")
    assert_full_log(ref, await store.retrieve_full_tracker(SENDER_ID), "SQLTrackerStore")


# --------------------------------------------------------------------------
# The equivalence test proper
# --------------------------------------------------------------------------


ENCRYPTION_KEY = "eq1:" + "A" * 43 + "="  # a fixed 32-byte test key


@pytest.mark.parametrize(
    "overrides",
    [pytest.param({"max_history": 6}, id="window6"), pytest.param({}, id="default"),
     pytest.param({"max_history": 5}, id="window5"),  # = the policies' own
     pytest.param({"max_history": 6, "environ": {"RPT_ENCRYPTION_KEYS": ENCRYPTION_KEY}},
                  id="window6-encrypted")],
)
async def test_prediction_equivalence(
    equiv_model_path: Path,
    action_endpoint: EndpointConfig,
    make_store: Any,
    overrides: Dict[str, Any],
) -> None:
    ref = await reference_transcript(equiv_model_path, action_endpoint)

    store = make_store(**overrides)
    if inspect.isawaitable(store):
        store = await store
    assert store._codec.encrypting == ("environ" in overrides)
    label = f"{type(store).__name__}({overrides or 'defaults'})"

    agent = load_agent(equiv_model_path, store, action_endpoint)
    assert agent.tracker_store._tracker_store is store
    assert {slot.name for slot in store.domain.slots} == {
        slot.name for slot in agent.domain.slots
    }, f"{label}: Agent.load did not give the store the bot's domain"
    errors = StoreErrors()
    errors.hook(agent.tracker_store)

    turns = await run_conversation(agent)

    assert not errors.save, f"{label}: save failed (FailSafe fell back): {errors.save}"
    assert not errors.retrieve, f"{label}: retrieve failed: {errors.retrieve}"
    assert agent.tracker_store._fallback_tracker_store is None, label
    assert_same_turns(ref.turns, turns, label)

    # The primary store itself, without the FailSafe wrapper.
    assert_final_state(ref, await store.retrieve(SENDER_ID), label)
    assert_full_log(ref, await store.retrieve_full_tracker(SENDER_ID), label)
