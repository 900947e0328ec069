"""Shared pieces of the benchmarks: servers, isolation, a realistic turn, stats.

Servers come from ``REDIS_URL`` / ``DATABASE_URL`` (defaults: the local
servers). Every run owns its Redis keys (a random prefix, deleted with SCAN at
the end) and one fresh PostgreSQL database ``bench_<random>`` (Rasa's
``SQLTrackerStore`` writes table ``events`` into its ``public`` schema, ours
uses the schema ``rpt``), dropped at the end. Nothing else is touched.
"""
import asyncio
import base64
import io
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
import uuid
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import quote, urlsplit

import redis
import sqlalchemy as sa

from rasa.shared.core.domain import Domain
from rasa.shared.core.events import (
    ActionExecuted,
    BotUttered,
    Event,
    SessionStarted,
    SlotSet,
    UserUttered,
)
from rasa.shared.core.trackers import DialogueStateTracker

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
REPO = os.path.dirname(HERE)
# Last, not first: a package on PYTHONPATH (compare_commits.py puts another
# commit's there) must win over this checkout's.
if REPO not in sys.path:
    sys.path.append(REPO)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get(
    "DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")

INTENTS = ["greet", "goodbye", "affirm", "deny", "order_pizza", "inform",
           "ask_price", "ask_hours", "chitchat", "out_of_scope"]
SIZES = ["small", "medium", "large", "family"]

DOMAIN_YAML = f"""
version: "3.1"
intents: {INTENTS}
entities: [size]
slots:
  size:
    type: text
    mappings: [{{type: from_entity, entity: size}}]
  name:
    type: text
    mappings: [{{type: custom}}]
  order_total:
    type: float
    mappings: [{{type: custom}}]
  vip:
    type: bool
    mappings: [{{type: custom}}]
responses:
  utter_x: [{{text: "Sure, one {{size}} pizza coming up."}}]
  utter_greet: [{{text: "Hello!"}}]
session_config:
  session_expiration_time: 60
  carry_over_slots_to_new_session: true
"""

# A session start (3 events) plus 5 events per turn.
SESSION_START_EVENTS = 3
EVENTS_PER_TURN = 5


def make_domain() -> Domain:
    return Domain.from_yaml(DOMAIN_YAML)


def session_start() -> List[Event]:
    return [ActionExecuted("action_session_start"), SessionStarted(),
            ActionExecuted("action_listen")]


def turn_events(i: int, rng: random.Random) -> List[Event]:
    """One realistic turn: NLU-parsed message, response, slot, back to listening."""
    size = SIZES[i % len(SIZES)]
    text = f"I'd like a {size} pizza with extra cheese please, order {i}"
    scores = sorted((rng.random() for _ in INTENTS), reverse=True)
    total = sum(scores)
    names = INTENTS[:]
    rng.shuffle(names)
    names.remove("order_pizza")
    names.insert(0, "order_pizza")
    ranking = [{"name": n, "confidence": s / total} for n, s in zip(names, scores)]
    start = text.index(size)
    entity = {"entity": "size", "start": start, "end": start + len(size), "value": size,
              "confidence_entity": 0.9981, "extractor": "DIETClassifier",
              "processors": ["EntitySynonymMapper"]}
    parse_data = {"intent": ranking[0], "entities": [entity], "intent_ranking": ranking,
                  "text": text, "message_id": uuid.uuid4().hex, "metadata": {},
                  "response_selector": {"all_retrieval_intents": [],
                                        "default": {"response": {}, "ranking": []}}}
    user = UserUttered(text, ranking[0], [entity], parse_data,
                       input_channel="rest", message_id=parse_data["message_id"])
    return [
        user,
        ActionExecuted("utter_x", policy="TEDPolicy", confidence=0.9731),
        BotUttered(f"Sure, one {size} pizza coming up.",
                   {"elements": None, "quick_replies": None, "buttons": None,
                    "attachment": None, "image": None, "custom": None},
                   {"utter_action": "utter_x"}),
        SlotSet("size", size),
        ActionExecuted("action_listen", policy="RulePolicy", confidence=1.0),
    ]


def turns_for(events: int) -> int:
    """Turns after a session start that give about ``events`` events."""
    return max(0, round((events - SESSION_START_EVENTS) / EVENTS_PER_TURN))


def history(events: int, rng: random.Random) -> List[Event]:
    out = session_start()
    for i in range(turns_for(events)):
        out.extend(turn_events(i, rng))
    return out


def apply_turn(tracker: DialogueStateTracker, i: int, rng: random.Random) -> None:
    for event in turn_events(i, rng):
        tracker.update(event)


# ------------------------------------------------------------------ servers


class Servers:
    """This run's private corner of the shared Redis and PostgreSQL."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.redis.ping()
        self.prefixes: List[str] = []
        admin_url = sa.engine.make_url(DATABASE_URL)
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT",
                                      poolclass=sa.pool.NullPool)
        self.db_name = f"bench_{tag}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.db_name}"'))
        self.db_url = admin_url.set(database=self.db_name)
        engine = sa.create_engine(self.db_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA rpt"))
            # The encrypted store has its own log: a log that holds ciphertext
            # refuses a process without keys (startup.check_encryption).
            conn.execute(sa.text("CREATE SCHEMA rpt_enc"))
        engine.dispose()

    def prefix(self, kind: str) -> str:
        """A fresh alphanumeric key prefix (Rasa's Redis store wants alphanumeric)."""
        name = f"bench{self.tag}{kind}"
        self.prefixes.append(name)
        return name

    @property
    def ours_sql_url(self) -> str:
        return self.sql_url_for_schema("rpt")

    @property
    def encrypted_sql_url(self) -> str:
        return self.sql_url_for_schema("rpt_enc")

    def sql_url_for_schema(self, schema: str) -> str:
        url = self.db_url.render_as_string(hide_password=False)
        return url + "?options=" + quote(f"-csearch_path={schema}", safe="")

    def new_schema(self, name: str) -> str:
        """Create schema ``name`` in this run's database; return a URL using it."""
        engine = sa.create_engine(self.db_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        engine.dispose()
        return self.sql_url_for_schema(name)

    def execute(self, statement: str, **params: Any) -> Any:
        """Run one statement in this run's database (autocommit)."""
        engine = sa.create_engine(self.db_url, poolclass=sa.pool.NullPool,
                                  isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                result = conn.execute(sa.text(statement), params)
                return result.fetchall() if result.returns_rows else result.rowcount
        finally:
            engine.dispose()

    def rasa_redis_kwargs(self) -> Dict[str, Any]:
        parts = urlsplit(REDIS_URL)
        db = int(parts.path.strip("/") or 0)
        return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 6379, "db": db,
                "username": parts.username, "password": parts.password,
                "use_ssl": parts.scheme == "rediss"}

    def rasa_sql_kwargs(self) -> Dict[str, Any]:
        # Rasa's SQLTrackerStore takes a complete URL in `host`.
        return {"dialect": "postgresql",
                "host": self.db_url.render_as_string(hide_password=False)}

    def memory_usage(self, key: str) -> Optional[int]:
        value = self.redis.memory_usage(key, samples=0)
        return int(value) if value is not None else None

    def conversation_usage(self, prefix: str, sender_id: str) -> Optional[int]:
        """MEMORY USAGE summed over every key one conversation holds under
        ``prefix`` (its keys carry the hash tag ``{sender_id}``); None if none."""
        sizes = [self.memory_usage(key) for key in self.redis.scan_iter(
            match=f"{prefix}:*{{{sender_id}}}*", count=1000)]
        sizes = [s for s in sizes if s is not None]
        return sum(sizes) if sizes else None

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        batch = []
        for key in self.redis.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += self.redis.delete(*batch)
                batch = []
        if batch:
            deleted += self.redis.delete(*batch)
        return deleted

    def cleanup(self) -> None:
        for prefix in self.prefixes:
            self.delete_prefix(prefix)
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()
        self.redis.close()


def encryption_environ() -> Dict[str, str]:
    key = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")
    return {"RPT_ENCRYPTION_KEYS": f"k1:{key}"}


def rasa_store(name: str, domain: Domain, servers: Servers, kind: str) -> Any:
    """One of Rasa's own stores on this run's keys and database.

    ``name`` is ``InMemoryTrackerStore``, ``RedisTrackerStore`` (key prefix made
    from ``kind``) or ``SQLTrackerStore`` (this run's database, ``public`` schema).
    """
    from rasa.core.tracker_store import (InMemoryTrackerStore, RedisTrackerStore,
                                         SQLTrackerStore)

    if name == "InMemoryTrackerStore":
        return InMemoryTrackerStore(domain)
    if name == "RedisTrackerStore":
        return RedisTrackerStore(domain, key_prefix=servers.prefix(kind),
                                 **servers.rasa_redis_kwargs())
    if name == "SQLTrackerStore":
        return SQLTrackerStore(domain, **servers.rasa_sql_kwargs())
    raise ValueError(f"not one of Rasa's stores: {name!r}")


def ours(domain: Domain, servers: Servers, kind: str, encrypted: bool = False,
         sql_url: Optional[str] = None, key_prefix_override: Optional[str] = None,
         **extra: Any):
    """A ``PersistentTrackerStore`` on this run's keys and schema (default config)."""
    from rasa_persistent_tracker import PersistentTrackerStore

    return PersistentTrackerStore(
        domain, host=REDIS_URL, key_prefix=key_prefix_override or servers.prefix(kind),
        sql_url=sql_url or (servers.encrypted_sql_url if encrypted else servers.ours_sql_url),
        record_exp=3600,
        environ=encryption_environ() if encrypted else {}, **extra)


async def flush_reporting_errors(store: Any, when: str, attempts: int = 5) -> List[str]:
    """``flush()``; a failure is recorded (with traceback) and retried, as documented
    (EventLogUnavailable: entries stay queued)."""
    notes = []
    for attempt in range(1, attempts + 1):
        try:
            await store.flush()
            return notes
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            notes.append(f"flush() during {when} failed (attempt {attempt}): "
                         + format_error(exc)[-1500:])
            print(f"  !! flush() during {when} raised {type(exc).__name__}: {exc}", flush=True)
            await asyncio.sleep(0.5)
    return notes


async def close_reporting_errors(store: Any, notes: List[str], timeout: float = 30.0) -> None:
    """``close()`` with a time limit; a hang or an error is recorded, not hidden."""
    try:
        await asyncio.wait_for(asyncio.shield(store.close()), timeout)
    except asyncio.TimeoutError:
        task = getattr(getattr(store, "_outbox", None), "_task", None)
        stack = io.StringIO()
        if task is not None:
            task.print_stack(file=stack)
        notes.append(f"close() did not return within {timeout:.0f}s; outbox task:\n"
                     f"{stack.getvalue()}")
        print(f"  !! close() hung for {timeout:.0f}s; outbox task:\n{stack.getvalue()}",
              flush=True)
        if task is not None:
            task.cancel()
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        notes.append("close() raised: " + format_error(exc)[-1500:])
        print(f"  !! close() raised {type(exc).__name__}: {exc}", flush=True)


async def close_store(store: Any, notes: List[str]) -> None:
    """Release any store of the benchmarks: ours through ``close_reporting_errors``,
    Rasa's Redis / SQL stores by closing their client / engine."""
    from rasa.core.tracker_store import RedisTrackerStore, SQLTrackerStore

    from rasa_persistent_tracker import PersistentTrackerStore

    if isinstance(store, PersistentTrackerStore):
        await close_reporting_errors(store, notes)
    elif isinstance(store, RedisTrackerStore):
        store.red.close()
    elif isinstance(store, SQLTrackerStore):
        store.engine.dispose()


def format_error(exc: BaseException) -> str:
    """The exception with its traceback, as printed for an uncaught one."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# ------------------------------------------------------------------ stats


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None or value != value:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


LOOPS = ("uvloop", "asyncio")


def add_loop_option(parser: Any) -> None:
    parser.add_argument(
        "--loop", choices=LOOPS, default="uvloop",
        help="event loop for every store (default uvloop: `rasa run` serves on Sanic, "
             "which uses uvloop when installed, as it is with Rasa 3.6 on Linux)")


def run(main: Any, loop: str) -> Any:
    """``asyncio.run(main)`` on the chosen event loop."""
    if loop == "uvloop":
        import uvloop

        uvloop.install()
    return asyncio.run(main)


def run_header(benchmark: str, quick: bool, started: float,
               load_at_start: Sequence[float]) -> Dict[str, Any]:
    """The fields every result file starts with: which run, when, how long, and
    on what machine (the load averages show competing work)."""
    import rasa_persistent_tracker

    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return {
        "benchmark": benchmark, "quick": quick,
        "package_file": rasa_persistent_tracker.__file__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "runtime_s": time.time() - started,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "event_loop": loop,
                    "loadavg_1_5_15_at_start": [round(x, 2) for x in load_at_start],
                    "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]},
    }


def write_results(result: Dict[str, Any], path: str) -> None:
    """Write a run's JSON and print where, how long, and on what machine."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
    m = result["machine"]
    print(f"\nResults written to {os.path.relpath(path)} ({result['runtime_s']:.0f}s).")
    print(f"Machine: {m['cpus']} CPUs, load average (1/5/15 min) "
          f"{m['loadavg_1_5_15_at_start']} at start, {m['loadavg_1_5_15_at_end']} at end; "
          f"event loop: {m['event_loop']}.")


def now() -> float:
    return time.perf_counter()
