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
import logging
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from rasa_persistent_tracker.errors import ConfigError

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
OUTBOX_ENTRIES = Gauge(
    "rpt_outbox_entries",
    "Undelivered outbox entries this process saw at its last outbox scan.")
OUTBOX_OLDEST_AGE = Gauge(
    "rpt_outbox_oldest_entry_age_seconds",
    "Age of the oldest undelivered outbox entry at this process's last outbox scan "
    "(0 when none).")
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

QUARANTINE_REASONS = ("stale", "unusable", "entry", "corrupt")
RECOVERY_KINDS = ("snapshot", "log_replay", "fresh")
for _label in QUARANTINE_REASONS:  # every series exists from the start, at 0
    QUARANTINES.labels(_label)
for _label in RECOVERY_KINDS:
    RECOVERIES.labels(_label)


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
