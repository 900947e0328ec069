"""The operator commands on Redis Cluster and Sentinel, as a runbook runs them.

Each command reads an endpoints file whose ``url`` is a ``redis+cluster://``
or ``redis+sentinel://`` URL (the throwaway servers of tests/servers/), with a
SQLite log beside it, after a store wrote real conversations there: the
commands must find every conversation whatever node its keys live on.
"""
import asyncio
import json
import os
import uuid
from typing import Any, List

import pytest
import yaml
from rasa.shared.core.events import ActionExecuted
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import PersistentTrackerStore, cli
from tests.servers import redis_cluster, redis_sentinel  # noqa: F401
from tests.test_import import conversation

pytestmark = pytest.mark.servers
IDS = [f"topo-{i}" for i in range(12)]  # enough to land on every cluster node


class Topology:
    def __init__(self, servers: Any, tmp_path: Any, domain: Any) -> None:
        self.servers, self.domain, self.tmp_path = servers, domain, tmp_path
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.block = {"type": "rasa_persistent_tracker.PersistentTrackerStore",
                      "url": servers.url, "key_prefix": self.prefix,
                      "sql_url": f"sqlite:///{tmp_path}/log.sqlite3"}
        self.endpoints = os.path.join(str(tmp_path), "endpoints.yml")
        with open(self.endpoints, "w") as f:
            yaml.safe_dump({"tracker_store": self.block}, f)
        (tmp_path / "domain.yml").write_text(domain.as_yaml())

    def store(self) -> PersistentTrackerStore:
        block = {k: v for k, v in self.block.items() if k not in ("type", "url")}
        return PersistentTrackerStore(self.domain, host=self.servers.url, environ={}, **block)

    def cleanup(self) -> None:
        client = self.servers.client()
        for key in client.scan_iter(match=f"{self.prefix}:*"):
            client.delete(key)
        client.close()


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request, tmp_path, domain, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    made = Topology(request.getfixturevalue(f"redis_{request.param}"), tmp_path, domain)
    yield made
    made.cleanup()


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def written(topology: Topology) -> List[DialogueStateTracker]:
    """Conversations saved through the store as Rasa would, delivered."""
    import random
    rng = random.Random(5)
    store = topology.store()
    fulls = []
    try:
        for cid in IDS:
            full = conversation(topology.domain, cid, rng)
            await store.save(full)
            fulls.append(full)
        await store.flush()
    finally:
        await store.close()
    return fulls


async def test_doctor_export_and_inspect(topology, capsys):
    fulls = await written(topology)
    assert await run_cli("doctor", "--endpoints", topology.endpoints) == 0, \
        capsys.readouterr().out
    assert capsys.readouterr().out.strip().endswith("healthy")
    out = str(topology.tmp_path / "export.jsonl")
    assert await run_cli("export", "--endpoints", topology.endpoints, "--output", out) == 0
    with open(out) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == sum(len(f.events) for f in fulls)
    for full in fulls:
        mine = [{k: v for k, v in line.items() if k not in ("sender_id", "seq")}
                for line in lines if line["sender_id"] == full.sender_id]
        assert mine == [e.as_dict() for e in full.events]
    capsys.readouterr()
    for cid in (IDS[0], IDS[-1]):
        assert await run_cli("inspect", "--endpoints", topology.endpoints, cid) == 0
        assert cid in capsys.readouterr().out


async def test_import_into_cluster_and_sentinel(topology, domain, tmp_path, capsys):
    """``import --from`` an in-memory-free source: Rasa's SQLTrackerStore on SQLite."""
    import random

    from rasa.core.tracker_store import SQLTrackerStore

    source_db = tmp_path / "rasa.sqlite3"
    source = SQLTrackerStore(domain, dialect="sqlite", db=str(source_db))
    rng = random.Random(9)
    fulls = [conversation(domain, f"old-{i}", rng) for i in range(6)]
    for full in fulls:
        await source.save(full)
    old = tmp_path / "old-endpoints.yml"
    old.write_text(yaml.safe_dump({"tracker_store": {
        "type": "SQL", "dialect": "sqlite", "db": str(source_db)}}))
    assert await run_cli("import", "--endpoints", topology.endpoints, "--from", str(old)) == 0, \
        capsys.readouterr()
    store = topology.store()
    try:
        for full in fulls:
            got = await store.retrieve_full_tracker(full.sender_id)
            assert [e.as_dict() for e in got.events] == [e.as_dict() for e in full.events]
            assert (await store.retrieve(full.sender_id)).current_slot_values() == \
                full.current_slot_values()
    finally:
        await store.close()


async def test_erase_on_cluster_and_sentinel(topology, capsys):
    """``erase`` finds a conversation's keys on whatever node holds them, and
    its tombstone shares the record's slot (the commit script reads both)."""
    await written(topology)
    gone = [IDS[0], IDS[-1]]
    assert await run_cli("erase", "--endpoints", topology.endpoints, *gone) == 0
    out = capsys.readouterr().out
    assert "erase: erased 2 conversation(s)" in out, out
    client = topology.servers.client()
    try:
        names = list(client.scan_iter(match=f"{topology.prefix}:*"))
    finally:
        client.close()
    assert not [n for n in names for cid in gone if f"{{{cid}}}".encode() in n]
    assert len([n for n in names if n.startswith(f"{topology.prefix}:e:".encode())]) == 2
    store = topology.store()
    try:
        assert await store.retrieve(gone[0]) is None
        assert await store.retrieve(IDS[1]) is not None
        fresh = DialogueStateTracker(gone[0], store.domain.slots)
        fresh.update(ActionExecuted("action_listen"))
        await store.save(fresh)  # the next message starts a new conversation
        assert len((await store.retrieve(gone[0])).events) == 1
    finally:
        await store.close()
