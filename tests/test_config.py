"""Configuration: parsed once, unknown/invalid keys fail naming key and value."""
import os

import pytest

from rasa_persistent_tracker import ConfigError
from rasa_persistent_tracker.config import EMBEDDED, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_embedded_without_servers():
    config = parse_config({}, environ={})
    assert config.redis_url == EMBEDDED and config.embedded
    assert config.sql_url.startswith("sqlite:///")
    assert config.record_exp == 86400 and config.max_history == 10


def test_rasa_redis_keys_have_the_same_meaning():
    config = parse_config({"host": "cache.local", "port": 6380, "db": 2, "password": "s3cret",
                           "use_ssl": True, "record_exp": 1800, "key_prefix": "mybot"},
                          environ={})
    assert config.redis_url == "rediss://:s3cret@cache.local:6380/2"
    assert config.record_exp == 1800.0 and config.key_prefix == "mybot"


def test_environment_supplies_defaults_explicit_keys_win():
    env = {"REDIS_URL": "redis://envhost:6379/0", "DATABASE_URL": "postgres://u:pw@db/rasa"}
    config = parse_config({}, environ=env)
    assert config.redis_url == "redis://envhost:6379/0"
    assert config.sql_url == "postgresql://u:pw@db/rasa"
    explicit = parse_config({"host": "redis://other:1/0", "sql_url": "sqlite:///x.db"}, environ=env)
    assert explicit.redis_url == "redis://other:1/0" and explicit.sql_url == "sqlite:///x.db"


def test_passwords_are_masked_in_repr():
    config = parse_config({"host": "redis://:topsecret@h:6379/0",
                           "sql_url": "postgresql://rasa:hunter2@db/rasa"}, environ={})
    assert "topsecret" not in repr(config) and "hunter2" not in str(config)
    assert "***" in repr(config)


@pytest.mark.parametrize("kwargs, named", [
    ({"max_histroy": 5}, "max_histroy"),
    ({"record_exp": "soon"}, "record_exp"),
    ({"record_exp": 0}, "record_exp"),
    ({"max_history": -1}, "max_history"),
    ({"key_prefix": "has space"}, "key_prefix"),
    ({"use_ssl": "maybe", "host": "h"}, "use_ssl"),
    ({"port": "abc", "host": "h"}, "port"),
    ({"port": 1}, "url"),
    ({"sensitive_slots": "pin"}, "sensitive_slots"),
    ({"sql_url": "not a url"}, "sql_url"),
    ({"encryption_keys": "k:AAAA"}, "encryption_keys"),
])
def test_invalid_keys_fail_naming_key_and_value(kwargs, named):
    with pytest.raises(ConfigError) as info:
        parse_config(kwargs, environ={})
    assert f"'{named}'" in str(info.value)
    assert "AAAA" not in str(info.value)


def test_unsupported_redis_scheme_is_named(tmp_path):
    from rasa_persistent_tracker.connect import redis_client_factory

    config = parse_config({"host": "memcached://h:1"}, environ={})
    with pytest.raises(ConfigError, match="memcached"):
        redis_client_factory(config)


def test_the_example_endpoints_file_parses(monkeypatch):
    from rasa.core.utils import read_endpoints_from_path

    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://rasa:pw@db/rasa")
    endpoint = read_endpoints_from_path(os.path.join(ROOT, "endpoints.yml")).tracker_store
    assert endpoint.type == "rasa_persistent_tracker.PersistentTrackerStore"
    config = parse_config({"host": endpoint.url, **endpoint.kwargs}, environ={})
    assert config.redis_url == "redis://cache:6379/0" and config.key_prefix == "mybot"
    assert config.record_exp == 3600 and config.max_history == 10


def test_the_configuration_page_documents_every_key():
    import dataclasses

    from rasa_persistent_tracker.config import StoreConfig

    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as handle:
        page = handle.read()
    documented = {f.name for f in dataclasses.fields(StoreConfig)} - {"redis_url"}
    documented |= {"url", "port", "db", "username", "password", "use_ssl"}
    missing = [key for key in sorted(documented) if f"| `{key}`" not in page]
    assert not missing, f"keys missing from docs/configuration.md's table: {missing}"
