"""Durable, fast, safe conversation memory for Rasa 3.6.

Use it from ``endpoints.yml``::

    tracker_store:
      type: rasa_persistent_tracker.PersistentTrackerStore
      url: redis://localhost:6379/0
      sql_url: postgresql+psycopg2://rasa@localhost/rasa
"""
from rasa_persistent_tracker.config import StoreConfig, parse_config
from rasa_persistent_tracker.errors import (
    ConcurrentSaveError,
    ConfigError,
    CorruptRecordError,
    EventLogUnavailable,
    HotStateBusy,
    HotStateUnavailable,
    PersistentTrackerError,
    SlotValueError,
    StorageUnavailable,
)
from rasa_persistent_tracker.store import PersistentTrackerStore

__version__ = "0.1.0"

__all__ = [
    "ConcurrentSaveError",
    "ConfigError",
    "CorruptRecordError",
    "EventLogUnavailable",
    "HotStateBusy",
    "HotStateUnavailable",
    "PersistentTrackerError",
    "PersistentTrackerStore",
    "SlotValueError",
    "StorageUnavailable",
    "StoreConfig",
    "parse_config",
]
