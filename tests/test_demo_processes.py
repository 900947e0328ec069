"""The banking demo, end to end, as separate processes on real Redis and PostgreSQL.

The bot is trained once (if ``example_bot/models/`` is stale), then run as a
user would: ``rasa run actions`` and ``rasa run --enable-api`` as separate
processes, a scripted client talking to the REST channel. The tracker store is
``PersistentTrackerStore`` on ``REDIS_URL`` (own key prefix) and
``DATABASE_URL`` (own schema); the action server writes its ledger to a temp
file (``LEDGER_STATE_PATH``), never to the demo's ``.ledger_state.json``.

* ``rasa test core`` passes on the test stories.
* ``kill -9`` of Rasa after the account number (before the PIN) and again after
  the recipient (before the amount): the restarted bot resumes at the same step
  with the same slots and finishes (balance shown, transfer made, ledger changed).
* With ``record_exp: 5`` an idle conversation is not resumed although its SQL
  snapshot is there: the next balance request asks for the account number again.
* The test stories replayed over HTTP (their intents and entities, as Rasa's
  ``/intent{...}`` messages, which is what ``rasa test core`` predicts on) run
  the same actions per user turn, say the responses the stories name and set
  the slots the stories list.
* Afterwards ``rasa export`` and ``GET /conversations/<id>/tracker`` return
  every event of every session of every conversation, and the SQL log holds it.

Slow (about 70 s on 2 cores): runs when ``RPT_PROCESS_TESTS=1`` or in CI.
"""
import json
import os
import subprocess
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import redis
import sqlalchemy as sa
import yaml

from tests.conftest import IN_CI, real_urls
from tests.processes import (
    BOT_DIR, RASA, BotProcess, Client, action_server, process_env, rasa_server, tail,
    trained_model,
)
from tests.servers import free_port

RUN = IN_CI or os.environ.get("RPT_PROCESS_TESTS") == "1"
pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        not RUN, reason="slow process tests: set RPT_PROCESS_TESTS=1 (CI runs them)"),
]

SHORT_EXP = 5.0  # record_exp of the bot that lets conversations expire
LOG_CATCH_UP_S = 10.0  # background delivery to SQL takes milliseconds when idle
DOMAIN = yaml.safe_load((BOT_DIR / "domain.yml").read_text())
TEST_STORIES = BOT_DIR / "tests" / "test_stories.yml"
DEMO_LEDGER_STATE = BOT_DIR / ".ledger_state.json"


def utter(name: str, **values: str) -> str:
    return DOMAIN["responses"][name][0]["text"].format(**values)


def dollars(value: Any) -> str:
    return f"${Decimal(str(value)):,.2f}"


# ------------------------------------------------------------------ fixtures

class Stack:
    """Schema, key prefix, action server and Rasa servers of this module."""

    def __init__(self, workdir: Path, urls: Dict[str, str], model: Path) -> None:
        self.dir = workdir
        self.model = model
        self.token = uuid.uuid4().hex[:10]
        self.schema = f"p_{self.token}"
        self.prefix = f"rpt-proc-{self.token}"
        self.redis_url = urls["redis"]
        sep = "&" if "?" in urls["sql"] else "?"
        self.sql_url = f"{urls['sql']}{sep}options=-csearch_path%3D{self.schema}"
        self.admin = sa.create_engine(urls["sql"])
        self.ledger = workdir / "ledger_state.json"
        self.credentials = workdir / "credentials.yml"
        self.credentials.write_text("rest:\n")
        self.action_port = free_port()
        self.bots: Dict[str, BotProcess] = {}
        self.actions: Optional[BotProcess] = None
        # sender id -> (user texts sent, number of sessions expected)
        self.journal: Dict[str, Tuple[List[str], int]] = {}

    def endpoints(self, name: str, record_exp: float, broker: Optional[Path] = None) -> Path:
        config: Dict[str, Any] = {
            "action_endpoint": {"url": f"http://127.0.0.1:{self.action_port}/webhook"},
            "tracker_store": {
                "type": "rasa_persistent_tracker.PersistentTrackerStore",
                "url": self.redis_url, "sql_url": self.sql_url,
                "key_prefix": self.prefix, "record_exp": record_exp,
            },
        }
        if broker is not None:
            config["event_broker"] = {"type": "file", "path": str(broker)}
        path = self.dir / f"endpoints-{name}.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def bot(self, name: str, record_exp: float) -> BotProcess:
        """The Rasa server ``name``, started on first use and kept running."""
        if name not in self.bots:
            endpoints = self.endpoints(name, record_exp)
            self.bots[name] = rasa_server(name, free_port(), self.model, endpoints,
                                          self.credentials, self.dir)
        bot = self.bots[name]
        if not bot.alive():
            bot.start()
        return bot

    def client(self, bot: BotProcess) -> Client:
        return Client(bot.port)

    def ledger_state(self) -> Dict[str, Any]:
        path = self.ledger if self.ledger.exists() else BOT_DIR / "actions" / "ledger.json"
        return json.loads(path.read_text())

    def sql(self, query: str, **params: Any) -> List[Any]:
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'SET search_path TO "{self.schema}"'))
            return list(conn.execute(sa.text(query), params))

    def outbox_length(self, sender: str) -> int:
        return redis.Redis.from_url(self.redis_url).llen(f"{self.prefix}:o:{{{sender}}}")

    def close(self) -> None:
        try:
            for proc in [*self.bots.values(), self.actions]:
                if proc is not None:
                    proc.stop()
        finally:
            client = redis.Redis.from_url(self.redis_url)
            for key in client.scan_iter(match=f"{self.prefix}:*"):
                client.delete(key)
            with self.admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            self.admin.dispose()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The newest model of the demo bot, trained first if its sources are newer."""
    return trained_model(tmp_path_factory.mktemp("train") / "train.log")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    urls = real_urls()
    workdir = tmp_path_factory.mktemp("demo-processes")
    try:
        redis.Redis.from_url(urls["redis"], socket_timeout=5).ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"REDIS_URL is set but Redis is unreachable: {exc}")
    stack = Stack(workdir, urls, demo_model)
    try:
        with stack.admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{stack.schema}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"DATABASE_URL is set but PostgreSQL is unreachable: {exc}")
    try:
        stack.actions = action_server(stack.action_port, workdir, stack.ledger).start()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def bot(stack: Stack) -> BotProcess:
    """The main Rasa server (started if it is not running): records live an
    hour, so restarts resume."""
    return stack.bot("rasa", record_exp=3600)


# ------------------------------------------------------------------- helpers

class Talk:
    """One user's conversation; every text sent is journaled for the export test."""

    def __init__(self, stack: Stack, bot: BotProcess, sender: str, session_count: int = 1) -> None:
        self.stack, self.bot, self.sender = stack, bot, sender
        stack.journal[sender] = ([], session_count)

    def say(self, text: str) -> List[str]:
        self.stack.journal[self.sender][0].append(text)
        try:
            return self.stack.client(self.bot).say(self.sender, text)
        except (AssertionError, OSError) as exc:
            raise AssertionError(f"{exc}\n--- {self.bot.log}:\n{tail(self.bot.log)}") from None

    def expect(self, text: str, *replies: str) -> None:
        assert self.say(text) == list(replies), f"after {text!r}"

    def tracker(self) -> Dict[str, Any]:
        return self.stack.client(self.bot).tracker(self.sender)


def loop_and_slots(tracker: Dict[str, Any], *names: str) -> Tuple[Optional[str], Dict[str, Any]]:
    return (tracker["active_loop"] or {}).get("name"), {n: tracker["slots"][n] for n in names}


def user_texts(events: List[Dict[str, Any]]) -> List[str]:
    return [e["text"] for e in events if e["event"] == "user"]


def sessions(events: List[Dict[str, Any]]) -> int:
    return sum(e["event"] == "session_started" for e in events)


# --------------------------------------------------------------------- tests

def test_rasa_test_core_passes(demo_model: Path, tmp_path: Path) -> None:
    # `rasa test core` predicts on in-memory trackers (no tracker store, no
    # action server); the replay over HTTP below runs the same stories on ours.
    out = tmp_path / "core-results"
    result = subprocess.run(
        [RASA, "test", "core", "--stories", str(TEST_STORIES), "--out", str(out),
         "-m", str(demo_model), "--fail-on-prediction-errors", "--no-plot"],
        cwd=BOT_DIR, env=process_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "story_report.json").read_text())["conversation_accuracy"]
    stories = yaml.safe_load(TEST_STORIES.read_text())["stories"]
    assert report["correct"] == report["total"] == len(stories), report


def test_kill9_mid_login_and_mid_transfer_resumes(stack: Stack, bot: BotProcess) -> None:
    demo_state = DEMO_LEDGER_STATE.stat() if DEMO_LEDGER_STATE.exists() else None
    balance = Decimal(str(stack.ledger_state()["accounts"]["12345678"]["balance"]))
    bob = Decimal(str(stack.ledger_state()["accounts"]["23456789"]["balance"]))
    user = Talk(stack, bot, f"kill-{uuid.uuid4().hex[:8]}")

    user.expect("hi", utter("utter_greet"))
    user.expect("what's my balance?", utter("utter_ask_account_number"))
    user.expect("12345678", utter("utter_ask_pin"))

    bot.kill9()  # in the middle of auth_form: account number given, PIN not yet
    bot.start()
    assert loop_and_slots(user.tracker(), "account_number", "requested_slot", "authenticated",
                          "pending_task") == ("auth_form", {
        "account_number": "12345678", "requested_slot": "pin", "authenticated": False,
        "pending_task": "balance"})
    user.expect("1234", "Thanks Alice, you're verified.",
                f"The balance of account ••••5678 (Alice Martin) is {dollars(balance)}.")
    user.expect("I want to send money", utter("utter_ask_recipient"))
    user.expect("Bob", utter("utter_ask_amount", recipient="Bob Smith"))

    bot.kill9()  # in the middle of transfer_form: recipient given, amount not yet
    bot.start()
    assert loop_and_slots(user.tracker(), "recipient", "amount", "requested_slot",
                          "authenticated", "account_number") == ("transfer_form", {
        "recipient": "Bob Smith", "amount": None, "requested_slot": "amount",
        "authenticated": True, "account_number": "12345678"})
    user.expect("where were we?",
                "We're in the middle of a money transfer. So far: recipient Bob Smith. "
                "Next I need the amount.",
                utter("utter_ask_amount", recipient="Bob Smith"))
    user.expect("$50", utter("utter_ask_transfer_confirmed", amount="50.00",
                             recipient="Bob Smith"))
    user.expect("yes", f"Done! I sent $50.00 to Bob Smith. Your new balance is "
                       f"{dollars(balance - 50)}.")
    user.expect("what's my balance?",
                f"The balance of account ••••5678 (Alice Martin) is {dollars(balance - 50)}.")

    ledger = stack.ledger_state()
    assert Decimal(str(ledger["accounts"]["12345678"]["balance"])) == balance - 50
    assert Decimal(str(ledger["accounts"]["23456789"]["balance"])) == bob + 50
    mine = [t for t in ledger["transfers"] if t["conversation"] == user.sender]
    assert [(t["from"], t["to"], t["amount"]) for t in mine] == [("12345678", "Bob Smith", 50.0)]
    after = DEMO_LEDGER_STATE.stat() if DEMO_LEDGER_STATE.exists() else None
    assert (after and (after.st_mtime_ns, after.st_size)) == (
        demo_state and (demo_state.st_mtime_ns, demo_state.st_size)), "demo ledger touched"


def test_expired_conversation_starts_a_fresh_session(stack: Stack) -> None:
    short = stack.bot("rasa-short-exp", record_exp=SHORT_EXP)
    user = Talk(stack, short, f"expire-{uuid.uuid4().hex[:8]}", session_count=2)
    user.expect("what's my balance?", utter("utter_ask_account_number"))
    user.expect("12345678", utter("utter_ask_pin"))
    assert user.say("1234")[0] == "Thanks Alice, you're verified."
    user.expect("I want to send money", utter("utter_ask_recipient"))
    user.expect("Bob", utter("utter_ask_amount", recipient="Bob Smith"))
    idle_since = time.time()

    # The store keeps a SQL snapshot of the logged-in conversation ...
    deadline = time.monotonic() + 15
    while not stack.sql("SELECT 1 FROM rpt_snapshots WHERE conversation_id = :c", c=user.sender):
        assert time.monotonic() < deadline, "no SQL snapshot was written"
        time.sleep(0.2)
    time.sleep(max(0.0, idle_since + SHORT_EXP + 2 - time.time()))
    hot = redis.Redis.from_url(stack.redis_url).exists(f"{stack.prefix}:h:{{{user.sender}}}")
    assert hot == 0, "the hot record outlived record_exp"

    # ... but once the hot record expired through inactivity it must not be
    # resumed from that snapshot: a new session, log in again.
    user.expect("what's my balance?", utter("utter_ask_account_number"))
    tracker = user.tracker()
    assert loop_and_slots(tracker, "authenticated", "account_number", "recipient",
                          "requested_slot") == ("auth_form", {
        "authenticated": False, "account_number": None, "recipient": None,
        "requested_slot": "account_number"})
    assert sessions(tracker["events"]) == 2
    user.expect("12345678", utter("utter_ask_pin"))
    assert user.say("1234")[0] == "Thanks Alice, you're verified."


def story_turns(steps: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(slot events before the first user turn, turns).

    A turn has its ``message``, its ``actions`` and ``slots``: one dict per
    position (``slots[0]`` after the user message, ``slots[k]`` after the k-th
    action) of the slot values the story lists there.
    """
    prelude: List[Dict[str, Any]] = []
    turns: List[Dict[str, Any]] = []
    for step in steps:
        if "intent" in step:
            entities = {k: v for e in step.get("entities", []) for k, v in e.items()}
            message = f"/{step['intent']}" + (json.dumps(entities) if entities else "")
            turns.append({"message": message, "actions": [], "slots": [{}]})
        elif "action" in step:
            turns[-1]["actions"].append(step["action"])
            turns[-1]["slots"].append({})
        elif "slot_was_set" in step:
            for item in step["slot_was_set"]:
                for name, value in item.items():
                    if turns:
                        turns[-1]["slots"][-1][name] = value
                    else:
                        prelude.append({"event": "slot", "name": name, "value": value})
    return prelude, turns


def tracker_turns(events: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per user turn: actions run (without action_listen) and the slots they set,
    in the shape of ``story_turns`` (the last value set at each position)."""
    turns: List[Dict[str, Any]] = []
    for event in events:
        if event["event"] == "user":
            turns.append({"actions": [], "slots": [{}]})
        elif turns and event["event"] == "action" and event["name"] != "action_listen":
            turns[-1]["actions"].append(event["name"])
            turns[-1]["slots"].append({})
        elif turns and event["event"] == "slot":
            turns[-1]["slots"][-1][event["name"]] = event["value"]
    return turns


@pytest.mark.parametrize("index", range(len(yaml.safe_load(TEST_STORIES.read_text())["stories"])))
def test_test_stories_replayed_over_http(stack: Stack, bot: BotProcess, index: int) -> None:
    story = yaml.safe_load(TEST_STORIES.read_text())["stories"][index]
    prelude, expected = story_turns(story["steps"])
    user = Talk(stack, bot, f"story{index}-{uuid.uuid4().hex[:8]}")
    if prelude:
        stack.client(bot).append_events(user.sender, prelude)

    for number, turn in enumerate(expected):
        replies = user.say(turn["message"])
        wanted = [utter(a) for a in turn["actions"] if a.startswith("utter_")]
        found = iter(replies)
        assert all(text in found for text in wanted), (
            f"{story['story']!r}, turn {number} {turn['message']}: responses {replies} "
            f"do not include {wanted} in order")

    actual = tracker_turns(user.tracker()["events"])
    assert [t["actions"] for t in actual] == [t["actions"] for t in expected], story["story"]
    for number, (want, got) in enumerate(zip(expected, actual)):
        for position, (listed, done) in enumerate(zip(want["slots"], got["slots"])):
            mismatched = {k: (v, done.get(k, "<not set>"))
                          for k, v in listed.items() if done.get(k, "<not set>") != v}
            assert not mismatched, (f"{story['story']!r}, turn {number}, after "
                                    f"{(['user'] + want['actions'])[position]}: "
                                    f"(story, bot) {mismatched}")


def test_export_and_tracker_api_return_every_session(stack: Stack, bot: BotProcess) -> None:
    kinds = {sender.split("-")[0] for sender in stack.journal}
    if not {"kill", "expire"} <= kinds:
        pytest.skip("needs the conversations of the kill -9 and expiry tests of this module")

    # GET /conversations/<id>/tracker: every event of every session.
    client = stack.client(bot)
    from_api = {sender: client.tracker(sender)["events"] for sender in stack.journal}
    for sender, (texts, expected_sessions) in stack.journal.items():
        assert user_texts(from_api[sender]) == texts, sender
        assert sessions(from_api[sender]) == expected_sessions, sender

    # rasa export to a file broker: the same events, for exactly these conversations.
    exported_file = stack.dir / "export.jsonl"
    endpoints = stack.endpoints("export", 3600, broker=exported_file)
    result = subprocess.run([RASA, "export", "--endpoints", str(endpoints)], cwd=BOT_DIR,
                            env=process_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exported: Dict[str, List[Dict[str, Any]]] = {}
    for line in exported_file.read_text().splitlines():
        event = json.loads(line)
        exported.setdefault(event.pop("sender_id"), []).append(event)
    assert sorted(exported) == sorted(stack.journal)
    for sender, events in exported.items():
        # rasa export sorts each conversation's events by timestamp (Rasa PR #13019);
        # events posted to /tracker/events are stamped before the session start
        # that precedes them, so compare in that order.
        assert events == sorted(from_api[sender], key=lambda e: e["timestamp"]), sender

    # The SQL log itself holds every event of every conversation (as many rows
    # as the API returned events, the same user messages), soon after the last
    # turn: save() returns before the background delivery, which also moves the
    # rows a killed process left in the outbox.
    def logged() -> Dict[str, Tuple[List[str], int]]:
        rows = stack.sql("SELECT conversation_id, type_name, data FROM rpt_events "
                         "ORDER BY conversation_id, seq")
        found: Dict[str, Tuple[List[str], int]] = {}
        for conversation, type_name, data in rows:
            texts, count = found.get(conversation, ([], 0))
            if type_name == "user":
                texts.append(json.loads(data)["text"])
            found[conversation] = (texts, count + 1)
        return found

    wanted = {sender: (texts, len(from_api[sender]))
              for sender, (texts, _) in stack.journal.items()}
    deadline = time.monotonic() + LOG_CATCH_UP_S
    while (found := logged()) != wanted and time.monotonic() < deadline:
        time.sleep(0.25)
    behind = {sender: {"events": count, "in SQL": found.get(sender, ([], 0))[1],
                       "outbox entries in Redis": stack.outbox_length(sender)}
              for sender, (texts, count) in wanted.items() if found.get(sender) != (texts, count)}
    assert not behind, f"SQL log still behind after {LOG_CATCH_UP_S:.0f}s: {behind}"
