"""The schema is declared once (``tables.py``); the migrations must build it.

A database migrated from empty is compared, column by column (type,
nullability), key by key and index by index, with one created straight from
the declared tables, on SQLite and on PostgreSQL.
"""
import uuid
from typing import Any, Dict, Iterator

import pytest
import sqlalchemy as sa

from rasa_persistent_tracker.log.migrations import VERSION_TABLE, migrate
from rasa_persistent_tracker.log.tables import METADATA
from tests.conftest import real_urls


def shape(engine: sa.engine.Engine) -> Dict[str, Any]:
    """Every declared table as the database reports it."""
    inspector = sa.inspect(engine)
    found: Dict[str, Any] = {}
    for table in METADATA.sorted_tables:
        name = table.name
        found[name] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"])
                        for c in inspector.get_columns(name)],
            "primary key": inspector.get_pk_constraint(name)["constrained_columns"],
            "unique": sorted((u["name"], tuple(u["column_names"]))
                             for u in inspector.get_unique_constraints(name)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(name)
                              if not i["name"].startswith("sqlite_autoindex")),
        }
    return found


def same_shape(migrated: sa.engine.Engine, declared: sa.engine.Engine) -> None:
    migrate(migrated)
    METADATA.create_all(declared)
    built = shape(migrated)
    assert built["rpt_events"]["columns"] and built["rpt_events"]["indexes"]
    assert built == shape(declared)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.real)])
def two_databases(request, tmp_path) -> Iterator[tuple]:
    """Two empty databases of one kind: one to migrate, one to create."""
    if request.param == "sqlite":
        engines = [sa.create_engine(f"sqlite:///{tmp_path}/{n}.sqlite3") for n in "ab"]
        yield tuple(engines)
        for engine in engines:
            engine.dispose()
        return
    url = real_urls()["sql"]
    admin = sa.create_engine(url)
    schemas = [f"schema_{uuid.uuid4().hex[:10]}" for _ in "ab"]
    with admin.begin() as conn:
        for schema in schemas:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    engines = [sa.create_engine(f"{url}{sep}options=-csearch_path%3D{s}") for s in schemas]
    try:
        yield tuple(engines)
    finally:
        for engine in engines:
            engine.dispose()
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_migrations_build_the_declared_tables(two_databases):
    migrated, declared = two_databases
    same_shape(migrated, declared)
    assert sa.inspect(migrated).has_table(VERSION_TABLE)


def test_the_comparison_sees_a_difference(two_databases, monkeypatch):
    """Control: a declared column that the migrations do not build fails."""
    migrated, declared = two_databases
    events = METADATA.tables["rpt_events"]
    monkeypatch.setattr(events.c.data, "nullable", True)
    with pytest.raises(AssertionError):
        same_shape(migrated, declared)
