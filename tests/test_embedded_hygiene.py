"""Embedded hot state: expired rows are purged, and ``pending`` reads the
outbox and the record as one snapshot even while another process commits."""
import sqlite3

from rasa_persistent_tracker.hot.embedded import PURGE_INTERVAL, SQLiteHotState
from rasa_persistent_tracker.log.entries import make_entry
from rasa_persistent_tracker.log.tables import LogRow


def entry(seq):
    return make_entry([LogRow(seq, "slot", 1.0, None, None, "{}")], 1.0)


def count(path, table):
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


async def test_expired_records_and_quarantine_rows_are_purged(tmp_path):
    now = [1000.0]
    path = str(tmp_path / "hot.sqlite3")
    hot = SQLiteHotState(path, outbox_ttl=50.0, clock=lambda: now[0])
    for i in range(20):
        await hot.commit(f"old{i}", None, "p", 10.0, None)
    await hot.quarantine("old0", 10.0)
    assert count(path, "rpt_hot") == 19 and count(path, "rpt_quarantine") == 1
    now[0] += PURGE_INTERVAL + 11
    await hot.commit("new", None, "p", 10.0, None)
    assert count(path, "rpt_hot") == 1 and count(path, "rpt_quarantine") == 0
    assert (await hot.load("new")).payload == "p"
    await hot.close()


class _CommitsBetweenReads:
    """The store's connection; another process commits a turn right after
    ``pending`` has read the outbox (the race of two bot processes)."""

    def __init__(self, conn, other_commit):
        self._conn, self._other = conn, other_commit

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def execute(self, sql, *args):
        cursor = self._conn.execute(sql, *args)
        if sql.startswith("SELECT entry FROM rpt_outbox"):
            rows = list(cursor)
            self._other()
            return rows
        return cursor


async def test_pending_pairs_entries_with_the_record_they_lead_to(tmp_path):
    path = str(tmp_path / "hot.sqlite3")
    hot = SQLiteHotState(path, outbox_ttl=3600.0)
    await hot.commit("u", None, "record-1", 3600.0, entry(1))

    def other_process_commits():
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE rpt_hot SET version=2, payload='record-2' WHERE conversation_id='u'")
        other.execute("INSERT INTO rpt_outbox (conversation_id, last_seq, entry, expires_at) "
                      "VALUES ('u', 2, ?, 1e12)", (entry(2),))
        other.execute("COMMIT")
        other.close()

    hot._conn = _CommitsBetweenReads(hot._conn, other_process_commits)
    pending = await hot.pending("u", 100)
    assert len(pending.entries) == 1
    assert (pending.version, pending.payload) == (1, "record-1")
    await hot.close()
