"""Small conversation builders shared by the store test modules."""
from rasa.shared.core.events import ActionExecuted, BotUttered, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker


def user(text: str, intent: str = "inform") -> UserUttered:
    return UserUttered(text, {"name": intent, "confidence": 1.0})


def turn(tracker: DialogueStateTracker, i: int) -> None:
    """One ordinary user turn: message, bot answer, a slot, back to listening."""
    tracker.update(user(f"my name is bob {i}"))
    tracker.update(ActionExecuted("utter_greet"))
    tracker.update(BotUttered(f"hi bob {i}"))
    tracker.update(SlotSet("name", f"bob {i}"))
    tracker.update(ActionExecuted("action_listen"))


async def run_turns(store, sender: str, count: int) -> DialogueStateTracker:
    """``count`` turns, each retrieved and saved as Rasa's processor does."""
    tracker = await store.get_or_create_tracker(sender)
    for i in range(count):
        tracker = await store.retrieve(sender)
        turn(tracker, i)
        await store.save(tracker)
    return tracker
