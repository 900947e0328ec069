"""Durable, fast, safe conversation memory for Rasa 3.6.

Use it from ``endpoints.yml``::

    tracker_store:
      type: rasa_persistent_tracker.PersistentTrackerStore
      url: redis://localhost:6379/0
      sql_url: postgresql+psycopg2://rasa@localhost/rasa
"""
import os
import warnings

# SQLAlchemy prints a banner about Rasa's own use of its 1.x API the first time
# Rasa's tracker stores are imported; it is not a Python warning that filters
# catch, and nobody using this package can act on it. (Only effective when
# SQLAlchemy is not imported yet, e.g. in the CLI; `rasa run` imports it first.)
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")

from rasa_persistent_tracker.config import StoreConfig, parse_config
from rasa_persistent_tracker.errors import (
    ConcurrentSaveError,
    ConfigError,
    CorruptRecordError,
    EncryptionKeyMissing,
    EventLogUnavailable,
    HotStateBusy,
    HotStateUnavailable,
    PersistentTrackerError,
    SlotValueError,
    StorageUnavailable,
)

with warnings.catch_warnings():
    # Importing Rasa's tracker stores makes SQLAlchemy warn about Rasa's own
    # code (MovedIn20Warning); our users, e.g. of the CLI, cannot act on it.
    warnings.simplefilter("ignore", DeprecationWarning)
    from rasa_persistent_tracker.store import PersistentTrackerStore

__version__ = "0.1.0"

__all__ = [
    "ConcurrentSaveError",
    "ConfigError",
    "CorruptRecordError",
    "EncryptionKeyMissing",
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
