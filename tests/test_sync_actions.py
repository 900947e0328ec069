"""``sync_actions``: a turn that runs a listed action is in SQL before save
returns; other turns stay write-behind (no SQL commit of their own)."""
import pytest
import sqlalchemy as sa
from rasa.shared.core.events import ActionExecuted, BotUttered

from rasa_persistent_tracker import ConfigError
from rasa_persistent_tracker.config import parse_config
from tests.dialogue import run_turns, user


def logged(store, conversation_id):
    with store._log.sync.engine.connect() as conn:
        return conn.execute(sa.text("SELECT COUNT(*) FROM rpt_events WHERE conversation_id=:c"),
                            {"c": conversation_id}).scalar()


async def test_a_turn_running_a_listed_action_is_written_through(make_store):
    # A long linger: without write-through nothing would reach SQL in this test.
    store = make_store(outbox_linger=600.0, outbox_scan_interval=600.0,
                       sync_actions=["action_execute_transfer"])
    await run_turns(store, "payer", 2)
    assert logged(store, "payer") == 0  # ordinary turns: write-behind
    tracker = await store.retrieve("payer")
    tracker.update(user("yes, send it"))
    tracker.update(ActionExecuted("action_execute_transfer"))
    tracker.update(BotUttered("Done! I sent $11.00 to Bob Smith."))
    tracker.update(ActionExecuted("action_listen"))
    await store.save(tracker)
    total = len((await store.retrieve_full_tracker("payer")).events)
    assert logged(store, "payer") == total  # this turn and every one before it


def test_sync_actions_must_be_a_list_of_names():
    assert parse_config({"sync_actions": ["a", "b"]}, environ={}).sync_actions == ("a", "b")
    for bad in ("action_x", 5, [1]):
        with pytest.raises(ConfigError, match="sync_actions"):
            parse_config({"sync_actions": bad}, environ={})


def test_the_demo_bank_writes_its_transfers_through():
    import os
    from rasa.core.utils import read_endpoints_from_path
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    endpoint = read_endpoints_from_path(os.path.join(here, "example_bot", "endpoints.yml"))
    assert endpoint.tracker_store.kwargs["sync_actions"] == ["action_execute_transfer"]
