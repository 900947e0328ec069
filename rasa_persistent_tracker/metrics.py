"""Prometheus metrics of the store, and the optional exporter.

The metrics live in prometheus_client's default registry, so a process that
already exposes one (a Sanic/Rasa add-on, a multiprocess set-up) serves them
too; ``metrics_port`` starts a plain exporter in the Rasa process. Every store
of the process adds to the same metrics (one conversation space per process).

Names follow Prometheus conventions: ``rpt_`` prefix, seconds for durations
(histograms), ``_total`` counters, low-cardinality labels only (never a
conversation id). ``docs/operations.md`` lists them; the Grafana dashboard in
``docs/grafana-dashboard.json`` plots them.
"""
import functools
import logging
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from rasa_persistent_tracker.errors import ConcurrentSaveError, ConfigError, HotStateBusy

logger = logging.getLogger(__name__)

# One turn's store calls take about a millisecond; outages make them seconds.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0)

RETRIEVE_SECONDS = Histogram(
    "rpt_retrieve_duration_seconds", "Time of PersistentTrackerStore.retrieve.",
    buckets=_BUCKETS)
SAVE_SECONDS = Histogram(
    "rpt_save_duration_seconds", "Time of PersistentTrackerStore.save.", buckets=_BUCKETS)
DELIVERY_SECONDS = Histogram(
    "rpt_delivery_duration_seconds",
    "Time to write one batch of outbox entries to the SQL log.", buckets=_BUCKETS)
DELIVERED_ROWS = Counter(
    "rpt_delivered_rows_total", "Event rows written to the SQL log by outbox delivery.")
CONFLICTS = Counter(
    "rpt_conflicts_total",
    "Saves refused because the conversation changed since its tracker was read "
    "(ConcurrentSaveError).")
QUARANTINES = Counter(
    "rpt_quarantines_total", "Stored values moved aside as unreadable, by reason.",
    ["reason"])
RECOVERIES = Counter(
    "rpt_recoveries_total",
    "Conversations resumed without their hot record, by kind: snapshot, log_replay "
    "(the log past the snapshot), fresh (nothing readable: a new session).", ["kind"])
OUTBOX_CONVERSATIONS = Gauge(
    "rpt_outbox_conversations",
    "Conversations with outbox entries this process knows to be undelivered.")
OUTBOX_OLDEST_AGE = Gauge(
    "rpt_outbox_oldest_entry_age_seconds",
    "Age of the oldest outbox entry this process knows to be undelivered (0: none).")
POOL_WAITS = Counter(
    "rpt_pool_waits_total",
    "Redis calls that found every pooled connection in use and waited for one.")
BUSY = Counter(
    "rpt_busy_total", "Calls that gave up waiting for a pooled Redis connection "
    "(HotStateBusy).")
HOT_STATE_OUTAGES = Counter(
    "rpt_hot_state_outages_total",
    "Times the hot state was found unreachable (the store then serves from SQL).")
DIRECT_SAVES = Counter(
    "rpt_direct_saves_total",
    "Turns saved straight to the SQL log because the hot state was unreachable.")
ERASURES = Counter(
    "rpt_erasures_total",
    "Conversations erased by the erase and purge commands (counted in the process "
    "that ran them), by command.", ["command"])
PURGED = Counter(
    "rpt_purged_conversations_total",
    "Conversations erased by purge for inactivity (counted in the process that ran it).")
DROPPED_PARTITIONS = Counter(
    "rpt_dropped_partitions_total",
    "Month partitions of the PostgreSQL log dropped by purge, every conversation in them "
    "erased (counted in the process that ran it).")
ERASED_WRITES = Counter(
    "rpt_erased_writes_refused_total",
    "Late writes of erased conversations refused by their tombstone, by kind: save "
    "(a turn from a tracker read before the erasure), delivery (outbox rows queued "
    "before it).", ["kind"])

_OUTBOXES: "weakref.WeakSet[Any]" = weakref.WeakSet()


def track_outbox(outbox: Any) -> None:
    """Count ``outbox`` (anything with ``pending_since() -> Dict[str, float]``)
    in the outbox gauges while it lives."""
    _OUTBOXES.add(outbox)


def _pending_since() -> Dict[str, float]:
    since: Dict[str, float] = {}
    for outbox in list(_OUTBOXES):
        for cid, when in outbox.pending_since().items():
            since[cid] = min(when, since.get(cid, when))
    return since


OUTBOX_CONVERSATIONS.set_function(lambda: len(_pending_since()))
OUTBOX_OLDEST_AGE.set_function(
    lambda: max(0.0, time.time() - min(_pending_since().values(), default=time.time())))

QUARANTINE_REASONS = ("stale", "unusable", "entry", "corrupt")
RECOVERY_KINDS = ("snapshot", "log_replay", "fresh")
for _label in QUARANTINE_REASONS:  # every series exists from the start, at 0
    QUARANTINES.labels(_label)
for _label in RECOVERY_KINDS:
    RECOVERIES.labels(_label)
for _label in ("erase", "purge"):
    ERASURES.labels(_label)
for _label in ("save", "delivery"):
    ERASED_WRITES.labels(_label)


def quarantine_reason(detail: str) -> str:
    """A label for a quarantine's free-text reason (bounded cardinality)."""
    lowered = detail.lower()
    if "stale" in lowered:
        return "stale"
    if "wrong type" in lowered or "unusable" in lowered:
        return "unusable"
    if "outbox" in lowered or "entry" in lowered:
        return "entry"
    return "corrupt"


def measured(histogram: Histogram) -> Callable[[Any], Any]:
    """Decorate a store coroutine: its duration goes to ``histogram``, and a
    ``ConcurrentSaveError`` / ``HotStateBusy`` it raises to the counters.
    The undecorated function stays reachable as ``.unmeasured`` (for calls
    from within that must not count twice)."""
    def decorate(function: Any) -> Any:
        @functools.wraps(function)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            except ConcurrentSaveError:
                CONFLICTS.inc()
                raise
            except HotStateBusy:
                BUSY.inc()
                raise
            finally:
                histogram.observe(time.perf_counter() - started)
        wrapper.unmeasured = function  # type: ignore[attr-defined]
        return wrapper
    return decorate


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    """Observe the duration of the block, whether it returns or raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - started)


_servers: Dict[int, object] = {}
_servers_lock = threading.Lock()


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Start the exporter on ``address:port`` once per process.

    Raises:
        ConfigError: the port cannot be bound (in use, or not permitted).
    """
    with _servers_lock:
        if port in _servers:
            return
        try:
            _servers[port] = start_http_server(port, addr=address)
        except OSError as exc:
            raise ConfigError(f"Config key 'metrics_port': cannot serve metrics on port "
                              f"{port} ({exc.strerror or exc}).") from None
    logger.info("Serving Prometheus metrics on %s:%d (/metrics).", address, port)
