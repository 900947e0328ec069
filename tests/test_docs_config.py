"""docs/configuration.md lists exactly the keys the store accepts, with their defaults.

The accepted keys are taken from the code itself: the "known keys" list that
``parse_config`` prints for an unknown key, and the fields of ``StoreConfig``.
A key added to the code without a row, or a row left for a key the code no
longer takes, fails here.
"""
import dataclasses
import os
import re

import pytest

from rasa_persistent_tracker.config import StoreConfig, parse_config
from rasa_persistent_tracker.errors import ConfigError

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "docs", "configuration.md")
ROW = re.compile(r"^\| `([a-z_]+)` \| ([^|]*) \|")


def documented() -> dict:
    """{key: default cell} of the table under ``## Keys``."""
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("\n## Keys\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            key = match.group(1)
            assert key not in rows, f"docs/configuration.md lists {key!r} twice"
            rows[key] = match.group(2).strip()
    return rows


def accepted() -> set:
    """The keys ``parse_config`` accepts, as its unknown-key error lists them."""
    with pytest.raises(ConfigError) as info:
        parse_config({"no_such_key_for_the_docs_test": 1}, environ={})
    listed = re.search(r"known keys: \[([^\]]*)\]", str(info.value))
    assert listed, f"the unknown-key message no longer lists the known keys: {info.value}"
    return set(re.findall(r"'([a-z_]+)'", listed.group(1)))


def test_the_table_lists_exactly_the_accepted_keys():
    keys, table = accepted(), set(documented())
    assert not keys - table, f"accepted but not in docs/configuration.md: {sorted(keys - table)}"
    assert not table - keys, f"in docs/configuration.md but not accepted: {sorted(table - keys)}"


def test_every_accepted_key_parses():
    # The Rasa-style parts combine into the hot-state URL (Rasa passes `url` as `host`).
    values = {"host": "redishost", "port": 6380, "db": 1, "username": "u", "password": "p",
              "use_ssl": True}
    config = parse_config(values, environ={})
    assert config.redis_url == "rediss://u:p@redishost:6380/1"
    fields = {f.name for f in dataclasses.fields(StoreConfig)} - {"redis_url"}
    assert fields <= accepted()


# Defaults the table can show as a literal; None / tuple defaults are described in words.
LITERAL_DEFAULTS = [f for f in dataclasses.fields(StoreConfig)
                    if f.name != "redis_url" and isinstance(f.default, (bool, int, float, str))]


@pytest.mark.parametrize("field", LITERAL_DEFAULTS, ids=lambda f: f.name)
def test_the_documented_default_is_the_code_default(field):
    cell = documented()[field.name]
    default = field.default
    if isinstance(default, bool):
        shown = "true" if default else "false"
    elif isinstance(default, (int, float)):
        shown = f"{int(default)}" if float(default).is_integer() else f"{default}"
    else:
        shown = default
    assert f"`{shown}`" in cell, (f"docs/configuration.md gives {field.name!r} the default "
                                  f"{cell!r}; the code's is {default!r}")
