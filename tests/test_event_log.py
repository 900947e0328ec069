"""The SQL event log's append path and the outbox entries that feed it.

Runs on SQLite (with fakeredis) and on PostgreSQL (with Redis): delivery
batches rows of many conversations into a constant number of statements, so
these pin what that must keep: a redelivered row is skipped, a row numbered
over someone else's is moved after them (in order, nothing dropped), key
lookups split into chunks still see every key, and a snapshot never moves
backwards. An outbox entry that does not parse is quarantined and delivery
goes on past it.
"""
import json
import logging
import threading

import pytest
import sqlalchemy as sa

from rasa_persistent_tracker.log import bulk
from rasa_persistent_tracker.log.entries import make_entry, parse_entry, parse_entry_dicts
from rasa_persistent_tracker.log.event_log import SQLEventLog
from rasa_persistent_tracker.log.tables import LogRow, Snapshot
from rasa.shared.core.events import UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

from rasa_persistent_tracker import PersistentTrackerError
from tests.dialogue import turn


@pytest.fixture
def log(backend):
    log = SQLEventLog(backend.engine())
    log.migrate()
    yield log
    log.engine.dispose()


def rows(first: int, last: int, tag: str = "a"):
    """Row dicts (the form delivery passes) for seqs first..last."""
    return [LogRow(seq, "slot", 1.0 + seq, None, None, json.dumps({"v": f"{tag}{seq}"})).as_dict()
            for seq in range(first, last + 1)]


def logged(log, cid):
    return [(r.seq, json.loads(r.data)["v"]) for r in log.read(cid)]


def test_a_redelivered_batch_writes_nothing_twice(log):
    batch = {"c1": rows(1, 3), "c2": rows(1, 2), "c3": rows(1, 1)}
    assert log.append(batch, {}) == 0
    # The same entries again, plus new rows for one conversation (an outbox
    # entry delivered, then delivered again with the next one after a crash).
    assert log.append({**batch, "c2": rows(1, 4)}, {}) == 0
    assert logged(log, "c1") == [(1, "a1"), (2, "a2"), (3, "a3")]
    assert logged(log, "c2") == [(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4")]
    assert logged(log, "c3") == [(1, "a1")]


def test_rows_numbered_over_other_rows_go_after_them_in_order(log, caplog):
    log.append({"c1": rows(1, 3), "c2": rows(1, 2)}, {})
    caplog.set_level(logging.WARNING, logger="rasa_persistent_tracker")
    # c1's rows 2..4 were numbered without knowing the log's end: 2 and 3 clash.
    moved = log.append({"c1": rows(2, 4, tag="b"), "c2": rows(3, 3)}, {})
    assert moved == 2
    assert logged(log, "c1") == [(1, "a1"), (2, "a2"), (3, "a3"),
                                 (4, "b2"), (5, "b3"), (6, "b4")]
    assert logged(log, "c2") == [(1, "a1"), (2, "a2"), (3, "a3")]
    assert any("re-sequenced" in r.getMessage() for r in caplog.records)


def test_a_batch_larger_than_one_key_lookup_is_checked_whole(log):
    per = bulk.KEYS_PER_LOOKUP // 2 + 7  # three conversations span two lookups
    batch = {f"c{i}": rows(1, per, tag=f"x{i}-") for i in range(3)}
    log.append(batch, {})
    # Redelivered, with one clash at the far end of the last chunk.
    again = dict(batch, c2=batch["c2"][:-1] + rows(per, per, tag="other"))
    assert log.append(again, {}) == 1
    for i in range(3):
        got = logged(log, f"c{i}")
        assert [s for s, _ in got] == list(range(1, per + 1 + (i == 2)))
    assert logged(log, "c2")[-2:] == [(per, f"x2-{per}"), (per + 1, f"other{per}")]


def test_a_concurrent_delivery_of_the_same_rows_is_retried_not_raised(log, monkeypatch):
    log.append({"c1": rows(1, 3)}, {})
    # Another process committed these rows after our lookup ran: the insert
    # hits the unique key, and the next attempt must find them and skip them.
    real = log._bulk.existing
    lookups = []

    def stale_then_real(conn, keys):
        lookups.append(len(keys))
        return {} if len(lookups) == 1 else real(conn, keys)

    monkeypatch.setattr(log._bulk, "existing", stale_then_real)
    assert log.append({"c1": rows(1, 4)}, {}) == 0
    assert len(lookups) == 2
    assert logged(log, "c1") == [(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4")]


@pytest.mark.parametrize("with_versions", [False, True], ids=["append", "deliver"])
def test_deliverers_of_one_conversation_take_turns_instead_of_colliding(
        backend, log, with_versions):
    # Several processes deliver the same outbox entries (a crashed deliverer's
    # batch picked up again while it is still running, or two stores in one
    # process). Each must find the rows the other committed, not race it to
    # the unique key: after five collisions in a row a batch used to fail
    # with a traceback (seen in a long run), and each collision costs a
    # rolled-back transaction.
    logs = [log] + [SQLEventLog(backend.engine()) for _ in range(3)]
    collisions = []
    for each in logs:
        real = each._append_once

        def counting(*args, _real=real):
            try:
                return _real(*args)
            except sa.exc.IntegrityError:
                collisions.append(1)
                raise
        each._append_once = counting
    conversations = [f"race{i}" for i in range(4)]
    steps = 25
    barrier = threading.Barrier(len(logs))
    failures = []

    def deliver(each):
        for step in range(1, steps + 1):
            # Every deliverer sends what is queued so far, rows 1..3*step.
            batch = {cid: rows(1, 3 * step, tag=cid) for cid in conversations}
            versions = {cid: step for cid in conversations} if with_versions else None
            barrier.wait()
            try:
                each.deliver(batch, {}, versions)
            except Exception as exc:  # the test reports it below
                failures.append(repr(exc))

    threads = [threading.Thread(target=deliver, args=(each,)) for each in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for each in logs[1:]:
        each.engine.dispose()
    assert failures == []
    assert collisions == []
    for cid in conversations:
        assert logged(log, cid) == [(s, f"{cid}{s}") for s in range(1, 3 * steps + 1)]


def test_a_failing_statement_does_not_carry_event_data_in_its_message(log):
    secret = json.dumps({"text": "my card is 4111 1111 1111 1111"})
    row = LogRow(1, "user", 1.0, None, None, secret).as_dict()
    with pytest.raises(sa.exc.DBAPIError) as caught:
        log.append({"c1": [row, row]}, {})  # the unique key refuses the second
    assert "4111" not in str(caught.value)


def test_values_reach_the_log_exactly_as_given(log):
    odd = LogRow(1, "user", None, None, "act%s", '{"t": "100% it\'s %(x)s"}').as_dict()
    log.append({"c%1": [odd]}, {"c%1": Snapshot(2, 1, 0.5, "p%s'")})
    assert log.read("c%1") == [LogRow(**odd)]
    assert log.snapshot("c%1") == Snapshot(2, 1, 0.5, "p%s'")


def test_snapshots_of_a_batch_are_upserted_and_never_go_backwards(log):
    log.append({"c1": rows(1, 2), "c2": rows(1, 2)},
               {"c1": Snapshot(3, 1, 10.0, "one"), "c2": Snapshot(3, 1, 10.0, "two")})
    log.append({"c1": rows(3, 3), "c2": rows(3, 3), "c3": rows(1, 1)},
               {"c1": Snapshot(2, 0, 5.0, "stale"),  # an older batch delivered late
                "c2": Snapshot(4, 2, 11.0, "two-b"), "c3": Snapshot(2, 1, 12.0, "three")})
    assert log.snapshot("c1") == Snapshot(3, 1, 10.0, "one")
    assert log.snapshot("c2") == Snapshot(4, 2, 11.0, "two-b")
    assert log.snapshot("c3") == Snapshot(2, 1, 12.0, "three")


def test_entries_round_trip_as_rows_and_as_dicts():
    original = [LogRow(**r) for r in rows(7, 9)]
    entry = make_entry(original, 123.5)
    assert parse_entry(entry) == (123.5, original)
    saved_at, dicts = parse_entry_dicts(entry)
    assert saved_at == 123.5 and dicts == [r.as_dict() for r in original]


@pytest.mark.parametrize("body, complaint", [
    ('[{"seq": 0, "bogus": 1}]', "1 unknown field"),
    ("[1, 2", "JSON"),
    ('[{"seq": 0, "type_name": "slot", "timestamp": 1.0, "intent_name": null, '
     '"action_name": null, "data": "{}"}]', "seq is out of range"),
    ('[{"seq": 9223372036854775808, "type_name": "slot", "timestamp": 1.0, "intent_name": '
     'null, "action_name": null, "data": "{}"}]', "seq is out of range"),
    ('[{"seq": 0, "type_name": "slot", "timestamp": 1.0, "intent_name": "' + "i" * 256 + '", '
     '"action_name": null, "data": "{}"}]', "too long"),
    ('[{"seq": 0, "type_name": "slot", "timestamp": 1.0, "intent_name": null, '
     '"action_name": null, "data": "a\\u0000b"}]', "NUL"),
    ("[]", "no rows"),
    ('{"seq": 0}', "no rows"),
    ('["row"]', "not an object"),
    ('[{"seq": "0", "type_name": "slot", "timestamp": 1.0, "intent_name": null, '
     '"action_name": null, "data": "{}"}]', "'seq' is a str"),
    ('[{"seq": 0, "type_name": "slot", "timestamp": 1.0, "intent_name": null, '
     '"action_name": null, "data": {"v": 1}}]', "'data' is a dict"),
])
def test_a_malformed_entry_is_refused_with_a_reason(body, complaint):
    with pytest.raises((ValueError, KeyError, TypeError)) as caught:
        parse_entry_dicts(f"0|1.0|{body}")
    assert complaint in str(caught.value) or complaint == "JSON"


def test_a_refused_entry_is_described_without_its_content():
    secret = "card 4111 1111 1111 1111"
    for entry in (f"{secret}|x|[]", f"0|1.0|[{{\"{secret}\": 1}}]", f"0|{secret}|[]"):
        with pytest.raises((ValueError, KeyError, TypeError)) as caught:
            parse_entry_dicts(entry)
        assert "4111" not in str(caught.value)


def log_seqs(backend, cid):
    with backend.engine().connect() as conn:
        return [s for (s,) in conn.execute(sa.text(
            "SELECT seq FROM rpt_events WHERE conversation_id=:c ORDER BY seq"), {"c": cid})]


class Held:
    """A store whose delivery waits for flush(), one turn saved, and the
    conversation's outbox and quarantine as a client sees them."""

    def __init__(self, store, backend, cid):
        self.store, self.cid = store, cid
        self.client = backend.redis_client()
        self.outbox = f"{backend.prefix}:o:{{{cid}}}"
        self._quarantine = f"{backend.prefix}:q:{{{cid}}}:*"

    @classmethod
    async def start(cls, make_store, backend, cid, **config):
        held = cls(make_store(outbox_linger=600, **config), backend, cid)
        await held.turn(1, tracker=await held.store.get_or_create_tracker(cid))
        return held

    async def turn(self, i, tracker=None):
        tracker = tracker or await self.store.retrieve(self.cid)
        turn(tracker, i)
        await self.store.save(tracker)

    def quarantined(self):
        return [self.client.get(k) for k in self.client.scan_iter(match=self._quarantine)]

    async def names(self):
        full = await self.store.retrieve_full_tracker(self.cid)
        return [e.value for e in full.events if getattr(e, "key", None) == "name"]


async def test_an_unreadable_outbox_entry_is_quarantined_and_delivery_goes_on(
        make_store, backend, caplog):
    # The bad entry sits between two good ones, with a header no
    # acknowledgement would pop, so only moving it out can.
    held = await Held.start(make_store, backend, "q1")
    bogus = '99|1.0|[{"seq": 99, "bogus": 1}]'
    held.client.rpush(held.outbox, bogus)
    caplog.set_level(logging.WARNING, logger="rasa_persistent_tracker")
    await held.turn(2)
    assert bogus in [e.decode() for e in held.client.lrange(held.outbox, 0, -1)][1:-1]
    await held.store.flush()
    assert held.quarantined() == [bogus.encode()]
    assert any("unreadable outbox entry" in r.getMessage() for r in caplog.records)
    assert held.client.llen(held.outbox) == 0
    seqs = log_seqs(backend, "q1")
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 5
    assert await held.names() == ["bob 1", "bob 2"]


async def test_an_entry_that_is_not_utf8_is_moved_out_byte_for_byte(make_store, backend):
    held = await Held.start(make_store, backend, "u1")
    bogus = b"\xff1|1.0|[]"
    held.client.rpush(held.outbox, bogus)  # at the tail: nothing after it would pop it
    for _ in range(3):
        await held.store.flush()
    assert held.quarantined() == [bogus]
    assert held.client.llen(held.outbox) == 0
    assert len(log_seqs(backend, "u1")) > 1


async def test_an_unreadable_entry_past_the_window_is_not_dropped_unseen(make_store, backend):
    held = await Held.start(make_store, backend, "w1", outbox_batch_size=1)
    # Right after an entry that is alone in its delivery window.
    held.client.rpush(held.outbox, "garbage, not an entry")
    await held.turn(2)
    await held.turn(3)
    await held.store.flush()
    assert held.quarantined() == [b"garbage, not an entry"]
    assert held.client.llen(held.outbox) == 0
    assert await held.names() == ["bob 1", "bob 2", "bob 3"]


async def test_a_copied_entry_is_logged_once_and_a_conflicting_one_is_quarantined(
        make_store, backend):
    held = await Held.start(make_store, backend, "d1")
    first = held.client.lindex(held.outbox, -1)
    held.client.rpush(held.outbox, first)  # the same entry twice
    saved_at, conflicting = parse_entry(first.decode())
    conflicting[-1].data = json.dumps({"event": "slot", "name": "name", "value": "forged"})
    held.client.rpush(held.outbox, make_entry(conflicting, saved_at))
    await held.store.flush()
    assert held.client.llen(held.outbox) == 0
    quarantined = held.quarantined()
    assert len(quarantined) == 1 and b"forged" in quarantined[0]
    seqs = log_seqs(backend, "d1")
    assert seqs == list(range(1, len(seqs) + 1))
    assert await held.names() == ["bob 1"]


def test_redelivering_re_sequenced_rows_moves_nothing_twice(log):
    log.append({"c1": rows(1, 3)}, {})
    assert log.append({"c1": rows(2, 4, tag="b")}, {}) == 2
    # The acknowledgement was lost: the same batch comes again.
    assert log.append({"c1": rows(2, 4, tag="b")}, {}) == 0
    assert logged(log, "c1") == [(1, "a1"), (2, "a2"), (3, "a3"),
                                 (4, "b2"), (5, "b3"), (6, "b4")]


async def test_a_conversation_id_the_log_cannot_hold_is_refused_with_nothing_saved(make_store):
    store = make_store()
    for bad in ("x" * 256, "nul\x00id"):
        tracker = DialogueStateTracker.from_events(bad, [], store.domain.slots)
        turn(tracker, 1)
        with pytest.raises(PersistentTrackerError, match="cannot be logged") as caught:
            await store.save(tracker)
        assert bad not in str(caught.value)
        assert await store.retrieve(bad) is None


async def test_a_user_typed_intent_name_too_long_for_its_column_is_cut_there_only(
        make_store, backend):
    store = make_store()
    tracker = await store.get_or_create_tracker("i1")
    long_intent = "i" * 300
    tracker.update(UserUttered(f"/{long_intent}", {"name": long_intent, "confidence": 1.0}))
    await store.save(tracker)
    await store.flush()
    with backend.engine().connect() as conn:
        intent, data = conn.execute(sa.text(
            "SELECT intent_name, data FROM rpt_events WHERE conversation_id='i1' "
            "AND type_name='user'")).one()
    assert intent == "i" * 255
    full = await store.retrieve_full_tracker("i1")
    assert [e.intent_name for e in full.events if isinstance(e, UserUttered)] == [long_intent]

