"""The schema is declared once (``tables.py``); the migrations must build it.

A database migrated from empty is compared, column by column (type,
nullability), key by key and index by index, with one created straight from
the declared tables, on SQLite and on PostgreSQL. On PostgreSQL
``rpt_events`` is partitioned: the comparison also covers the partition key,
the default partition and the trigger that keeps (conversation_id, seq)
unique across partitions.
"""
import uuid
from typing import Any, Dict, Iterator

import pytest
import sqlalchemy as sa

from rasa_persistent_tracker.log.migrations import VERSION_TABLE, migrate
from rasa_persistent_tracker.log.tables import metadata_for
from tests.conftest import real_urls


def shape(engine: sa.engine.Engine) -> Dict[str, Any]:
    """Every declared table as the database reports it."""
    inspector = sa.inspect(engine)
    found: Dict[str, Any] = {}
    for table in metadata_for(engine.dialect.name).sorted_tables:
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
    if engine.dialect.name == "postgresql":
        found["partitioning"] = partitioning(engine)
    return found


def partitioning(engine: sa.engine.Engine) -> Dict[str, Any]:
    """How PostgreSQL partitions rpt_events: key, default partition, triggers."""
    with engine.connect() as conn:
        return {
            "key": conn.execute(sa.text(
                "SELECT pg_get_partkeydef(to_regclass('rpt_events'))")).scalar(),
            "default partition": conn.execute(sa.text(
                "SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c "
                "ON c.oid = p.partdefid WHERE p.partrelid = to_regclass('rpt_events')")).scalar(),
            "triggers": sorted(r[0] for r in conn.execute(sa.text(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass('rpt_events') "
                "AND NOT tgisinternal"))),
            "id default": conn.execute(sa.text(
                "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = "
                "to_regclass('rpt_events') AND adnum = (SELECT attnum FROM pg_attribute "
                "WHERE attrelid = to_regclass('rpt_events') AND attname = 'id')")).scalar(),
        }


def same_shape(migrated: sa.engine.Engine, declared: sa.engine.Engine) -> None:
    migrate(migrated)
    metadata_for(declared.dialect.name).create_all(declared)
    built = shape(migrated)
    assert built["rpt_events"]["columns"] and built["rpt_events"]["indexes"]
    if migrated.dialect.name == "postgresql":
        assert built["partitioning"] == {
            "key": "RANGE (log_month)", "default partition": "rpt_events_default",
            "triggers": ["rpt_events_unique_seq"],
            "id default": "nextval('rpt_events_id_seq'::regclass)"}
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
    events = metadata_for(migrated.dialect.name).tables["rpt_events"]
    monkeypatch.setattr(events.c.data, "nullable", True)
    with pytest.raises(AssertionError):
        same_shape(migrated, declared)
