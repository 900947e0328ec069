"""Metrics: scraped over HTTP from the exporter ``metrics_port`` starts, during
real turns on real Redis + PostgreSQL, with the events each metric counts
made to happen (a conflict, a corrupt record, pool exhaustion, a Redis
failure on save), and the Grafana dashboard plots only metrics that exist.
"""
import asyncio
import json
import os
import re
import urllib.request
from typing import Dict

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rasa.shared.core.events import ActionExecuted, SlotSet, UserUttered

from rasa_persistent_tracker import metrics
from rasa_persistent_tracker.errors import ConcurrentSaveError, ConfigError, HotStateUnavailable
from tests.conftest import Backend
from tests.servers import free_port

DASHBOARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "docs", "grafana-dashboard.json")
FAMILIES = {
    "rpt_retrieve_duration_seconds", "rpt_save_duration_seconds",
    "rpt_delivery_duration_seconds", "rpt_delivered_rows", "rpt_conflicts",
    "rpt_quarantines", "rpt_recoveries", "rpt_outbox_conversations",
    "rpt_outbox_oldest_entry_age_seconds", "rpt_pool_waits", "rpt_busy",
    "rpt_hot_state_outages", "rpt_direct_saves", "rpt_erasures", "rpt_purged_conversations",
    "rpt_erased_writes_refused", "rpt_dropped_partitions",
}


def scrape(port: int) -> Dict[str, Dict[tuple, float]]:
    """{family: {(sample name, sorted labels): value}} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: Dict[str, Dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("rpt_"):
            out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value
                                for s in family.samples}
    return out


def value(families: Dict, family: str, sample: str, **labels: str) -> float:
    return families[family].get((sample, tuple(sorted(labels.items()))), 0.0)


async def turn(store, cid: str, text: str) -> None:
    tracker = await store.retrieve(cid)
    if tracker is None:
        from rasa.shared.core.trackers import DialogueStateTracker
        tracker = DialogueStateTracker(cid, store.domain.slots)
        tracker.update(ActionExecuted("action_listen"))
    tracker.update(UserUttered(text, {"name": "greet", "confidence": 1.0}))
    tracker.update(ActionExecuted("utter_greet"))
    tracker.update(SlotSet("name", text))
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)


@pytest.mark.real
async def test_the_exporter_serves_every_family_during_real_turns(domain, tmp_path):
    backend = Backend("real", str(tmp_path))
    port = free_port()
    try:
        store = backend.make_store(domain, metrics_port=port, metrics_address="127.0.0.1",
                                   outbox_linger=0.05)
        before = scrape(port)
        assert FAMILIES <= set(before), sorted(FAMILIES - set(before))
        for i in range(20):
            await turn(store, f"m{i % 4}", f"hello {i}")
        # a conflict: two turns from the same read
        first, second = await store.retrieve("m0"), await store.retrieve("m0")
        for tracker in (first, second):
            tracker.update(UserUttered("again", {"name": "greet", "confidence": 1.0}))
        await store.save(first)
        with pytest.raises(ConcurrentSaveError):
            await store.save(second)
        # a corrupt hot record: quarantined, resumed from the snapshot
        await store.flush()
        client = backend.redis_client()
        key = next(k for k in client.scan_iter(match=f"{backend.prefix}:*")
                   if b"m1" in k and client.type(k) == b"hash")
        client.hset(key, "d", "not a record")
        client.close()
        assert (await store.retrieve("m1")).get_slot("name") == "hello 17"
        # Redis fails on a save: the turn goes straight to SQL
        commit = store._hot.commit

        async def down(*args, **kwargs):
            raise HotStateUnavailable("Redis at test is unreachable (simulated).")
        store._hot.commit = down
        await turn(store, "m2", "during the outage")
        store._hot.commit = commit
        # pool exhaustion: one connection, two conversations at once
        narrow = backend.make_store(domain, redis_max_connections=1)
        await asyncio.gather(*(turn(narrow, f"p{i}", "x") for i in range(6)))
        waiting = scrape(port)
        assert value(waiting, "rpt_outbox_conversations", "rpt_outbox_conversations") >= 1
        await store.flush()
        await narrow.flush()
        after = scrape(port)
        grew = lambda fam, sample, **labels: (value(after, fam, sample, **labels)  # noqa: E731
                                              - value(before, fam, sample, **labels))
        assert grew("rpt_save_duration_seconds", "rpt_save_duration_seconds_count") >= 22
        assert grew("rpt_retrieve_duration_seconds", "rpt_retrieve_duration_seconds_count") >= 23
        assert 0 < value(after, "rpt_save_duration_seconds", "rpt_save_duration_seconds_sum") < 60
        assert grew("rpt_delivered_rows", "rpt_delivered_rows_total") >= 80
        assert grew("rpt_delivery_duration_seconds", "rpt_delivery_duration_seconds_count") >= 1
        assert grew("rpt_conflicts", "rpt_conflicts_total") == 1
        assert grew("rpt_quarantines", "rpt_quarantines_total", reason="corrupt") == 1
        assert grew("rpt_recoveries", "rpt_recoveries_total", kind="snapshot") == 1
        assert grew("rpt_direct_saves", "rpt_direct_saves_total") == 1
        assert grew("rpt_hot_state_outages", "rpt_hot_state_outages_total") == 1
        assert grew("rpt_pool_waits", "rpt_pool_waits_total") >= 1
        assert value(after, "rpt_outbox_conversations", "rpt_outbox_conversations") == 0
        assert value(after, "rpt_outbox_oldest_entry_age_seconds",
                     "rpt_outbox_oldest_entry_age_seconds") == 0
    finally:
        await backend.cleanup()


async def test_outbox_gauges_show_what_waits(domain, tmp_path):
    backend = Backend("fake", str(tmp_path))
    try:
        store = backend.make_store(domain, outbox_linger=3600)  # delivery waits
        await turn(store, "g1", "hello")
        await asyncio.sleep(0.05)
        families = {f.name: f for f in text_string_to_metric_families(
            generate_latest().decode()) if f.name.startswith("rpt_outbox")}
        waiting = families["rpt_outbox_conversations"].samples[0].value
        age = families["rpt_outbox_oldest_entry_age_seconds"].samples[0].value
        assert waiting >= 1 and 0.04 <= age < 60
        await store.flush()
        families = {f.name: f for f in text_string_to_metric_families(
            generate_latest().decode()) if f.name.startswith("rpt_outbox")}
        assert families["rpt_outbox_conversations"].samples[0].value == 0
    finally:
        await backend.cleanup()


def test_a_taken_port_is_a_config_error_naming_the_key():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="metrics_port"):
            metrics.serve(taken.getsockname()[1], "127.0.0.1")


def test_the_dashboard_plots_only_metrics_that_exist():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum|total)$", "", name)
            for e in exprs for name in re.findall(r"rpt_[a-z_]+", e)}
    assert used <= FAMILIES, sorted(used - FAMILIES)
    assert used == FAMILIES, sorted(FAMILIES - used)  # and every family is on it
