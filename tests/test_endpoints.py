"""Creation the way Rasa does it: TrackerStore.create(EndpointConfig), no warnings."""
import os
import warnings

import pytest
from rasa.core.tracker_store import TrackerStore
from rasa.utils.endpoints import EndpointConfig

from rasa_persistent_tracker import PersistentTrackerStore
from rasa_persistent_tracker.errors import HotStateUnavailable
from tests.conftest import Backend, real_urls

TYPE = "rasa_persistent_tracker.PersistentTrackerStore"


def create(url, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Rasa's "not asynchronous" warning would fail here
        return TrackerStore.create(EndpointConfig(url=url, type=TYPE, **kwargs))


async def test_created_from_endpoint_on_embedded_default(tmp_path, domain, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    store = create(None, record_exp=60, key_prefix="bot")
    assert isinstance(store, PersistentTrackerStore) and store.config.embedded
    store.domain = domain  # what rasa run does after creating the store
    tracker = await store.get_or_create_tracker("u1")
    assert (await store.retrieve("u1")).events[-1] == tracker.events[-1]
    await store.close()
    assert os.path.exists(tmp_path / ".rasa_tracker" / "hot.sqlite3")


@pytest.mark.real
async def test_created_from_endpoint_on_real_servers(domain, tmp_path):
    real_urls()
    pair = Backend("real", str(tmp_path))  # own key prefix and PostgreSQL schema
    store = create(pair.redis_url, sql_url=pair.sql_url, key_prefix=pair.prefix, record_exp=60)
    pair.stores.append(store)
    store.domain = domain
    try:
        await store.get_or_create_tracker("endpoint-user")
        assert await store.exists("endpoint-user")
        await store.flush()
        assert len((await store.retrieve_full_tracker("endpoint-user")).events) == 1
    finally:
        await pair.cleanup()


def test_unreachable_redis_fails_fast_naming_the_url(tmp_path):
    with pytest.raises(Exception) as info:
        create("redis://:pw@127.0.0.1:1/0", sql_url=f"sqlite:///{tmp_path}/e.db",
               redis_socket_timeout=0.5)
    assert "127.0.0.1:1" in str(info.value) and "pw@" not in str(info.value)
    assert isinstance(info.value.__cause__, HotStateUnavailable) or isinstance(
        info.value, HotStateUnavailable) or "hot state" in str(info.value)


def test_unreachable_sql_fails_fast_naming_the_url(tmp_path):
    with pytest.raises(Exception) as info:
        create(None, embedded_path=str(tmp_path / "hot.db"),
               sql_url="postgresql+psycopg2://rasa:pw@127.0.0.1:1/rasa")
    assert "127.0.0.1:1" in str(info.value) and ":pw@" not in str(info.value)
