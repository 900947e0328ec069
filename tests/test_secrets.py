"""Secrets and local files: masked URLs, quoted passwords, key variable and key
file checks, private embedded files."""
import logging
import os
import stat

import pytest

from rasa_persistent_tracker import ConfigError, PersistentTrackerStore, StorageUnavailable
from rasa_persistent_tracker.config import mask_url, parse_config
from rasa_persistent_tracker.security.keys import load_keyring, new_key_entry

SECRET = "hunter2"


@pytest.mark.parametrize("url", [
    f"postgresql://rasa@db/rasa?password={SECRET}",
    f"postgresql://rasa@db/rasa?sslmode=require&sslpassword={SECRET}#x",
    f"redis://h:6379/0?password={SECRET}",
    f"postgresql://rasa:{SECRET}@db/rasa",
    f"redis+sentinel://:{SECRET}@s1:26379,s2:26379/mymaster",
    f"postgresql://rasa:a@b{SECRET}@db/rasa",  # an unquoted '@' in the password
])
def test_secrets_in_urls_are_masked_in_repr(url):
    config = parse_config({"host": "redis://h:1/0", "sql_url": url}, environ={})
    shown = repr(config) + str(config) + mask_url(url)
    assert SECRET not in shown and "***" in shown
    redis = parse_config({"host": url if url.startswith("redis") else "h"}, environ={})
    assert SECRET not in repr(redis)


@pytest.mark.parametrize("kwargs", [
    {"sql_url": f"rasa:{SECRET}@db/rasa"},  # no scheme
    {"sql_url": f"rasa:{SECRET}"},
    {"host": f"rasa:{SECRET}@redis.local"},  # a Redis URL without its scheme
])
def test_a_url_without_scheme_is_never_echoed(kwargs):
    with pytest.raises(ConfigError) as info:
        parse_config(kwargs, environ={})
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({}, environ={"DATABASE_URL": f"u:{SECRET}@db"})
    assert SECRET not in str(info.value)


def test_start_up_errors_mask_query_passwords(tmp_path):
    with pytest.raises(StorageUnavailable) as info:
        PersistentTrackerStore(None, host="embedded", embedded_path=str(tmp_path / "hot"),
                               sql_url=f"postgresql+psycopg2://rasa@127.0.0.1:1/x?"
                                       f"password={SECRET}&connect_timeout=1")
    assert SECRET not in str(info.value) and "password=***" in str(info.value)
    with pytest.raises(ConfigError) as info:  # a URL SQLAlchemy cannot parse: a config error
        PersistentTrackerStore(None, host="embedded", embedded_path=str(tmp_path / "hot"),
                               sql_url=f"postgresql://rasa:{SECRET}@db:port/x")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("password", ["p@ss/w#rd?x", "a:b@c", "100%"])
def test_rasa_style_password_keys_are_quoted_into_the_url(password):
    from redis.connection import parse_url

    config = parse_config({"host": "cache.local", "port": 6380, "username": "u@x",
                           "password": password}, environ={})
    parsed = parse_url(config.redis_url)
    assert (parsed["host"], parsed["port"]) == ("cache.local", 6380)
    assert (parsed["username"], parsed["password"]) == ("u@x", password)
    assert password not in repr(config)


def test_an_empty_key_variable_is_a_start_up_error():
    config = parse_config({}, environ={})
    for empty in ("", "  ", "\n"):
        with pytest.raises(ConfigError, match="RPT_ENCRYPTION_KEYS is set but empty"):
            load_keyring(config, {"RPT_ENCRYPTION_KEYS": empty})
    assert load_keyring(config, {}) is None  # unset: no encryption, as before


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o700 | 0o070])
def test_a_key_file_others_can_read_is_refused(tmp_path, mode):
    key_file = tmp_path / "keys"
    entry = new_key_entry("k1")
    key_file.write_text(entry + "\n")
    config = parse_config({"encryption_key_file": str(key_file)}, environ={})
    key_file.chmod(mode)
    with pytest.raises(ConfigError, match="accessible by group or others") as info:
        load_keyring(config, {})
    assert "chmod 600" in str(info.value) and entry.split(":")[1][:12] not in str(info.value)
    key_file.chmod(0o600)
    assert load_keyring(config, {}).primary == "k1"
    key_file.chmod(0o400)
    assert load_keyring(config, {}).primary == "k1"


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
async def test_embedded_files_are_private(tmp_path, monkeypatch, domain, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "umask", os.umask)  # restored: the test sets a lax one
    old = os.umask(0o022)
    try:
        store = PersistentTrackerStore(domain, environ={})  # the embedded default
        tracker = await store.get_or_create_tracker("p1")
        await store.save(tracker)
        await store.flush()
        await store.close()
    finally:
        os.umask(old)
    folder = tmp_path / ".rasa_tracker"
    assert mode_of(folder) == 0o700
    files = sorted(p.name for p in folder.iterdir())
    assert "hot.sqlite3" in files and "events.sqlite3" in files
    assert {name: mode_of(folder / name) for name in files} == dict.fromkeys(files, 0o600)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
async def test_an_older_wide_default_folder_is_tightened(tmp_path, monkeypatch, domain):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / ".rasa_tracker"
    folder.mkdir(mode=0o755)
    (folder / "hot.sqlite3").touch(mode=0o644)
    store = PersistentTrackerStore(domain, environ={})
    await store.close()
    assert mode_of(folder) == 0o700 and mode_of(folder / "hot.sqlite3") == 0o600
