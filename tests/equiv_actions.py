"""The custom actions of ``tests/equiv_bot``, served in-process.

Rasa 3.6 runs custom actions only through an action server (``RemoteAction``
POSTs the tracker to ``action_endpoint``). Instead of a separate ``rasa run
actions`` process, ``ActionServer`` runs rasa_sdk's own ``ActionExecutor``
behind a small aiohttp app on a loopback port, in the test's event loop: the
bot sees a real action server (HTTP, rasa_sdk's event validation and
serialisation), and the test needs no subprocess, fixed port or start-up wait.

The actions return the events the store must get right: ``AllSlotsReset``,
``ReminderScheduled`` (one that survives user messages, one that a user
message cancels) and ``ActionReverted``. Reminders are scheduled an hour
ahead so that they never fire by themselves; the test fires them.
"""
import datetime
from typing import Any, Dict, List, Optional, Text

from aiohttp import web
from rasa_sdk import Action, Tracker
from rasa_sdk.events import (
    ActionReverted,
    AllSlotsReset,
    EventType,
    FollowupAction,
    ReminderScheduled,
)
from rasa_sdk.executor import ActionExecutor, CollectingDispatcher

# Names of the reminders (Rasa names a reminder's scheduler job after it).
OVEN_REMINDER = "oven_check"
NUDGE_REMINDER = "nudge"
REMINDER_INTENT = "EXTERNAL_reminder"


def _in_an_hour() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)


class ActionForgetMe(Action):
    def name(self) -> Text:
        return "action_forget_me"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: Dict[Text, Any]) -> List[EventType]:
        dispatcher.utter_message(text="I forgot everything about you.")
        return [AllSlotsReset()]


class ActionRemindMe(Action):
    def name(self) -> Text:
        return "action_remind_me"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: Dict[Text, Any]) -> List[EventType]:
        dispatcher.utter_message(text="I will remind you about the oven.")
        return [ReminderScheduled(REMINDER_INTENT, _in_an_hour(), name=OVEN_REMINDER,
                                  kill_on_user_message=False)]


class ActionNudgeMe(Action):
    def name(self) -> Text:
        return "action_nudge_me"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: Dict[Text, Any]) -> List[EventType]:
        dispatcher.utter_message(text="I will nudge you unless you write first.")
        return [ReminderScheduled(REMINDER_INTENT, _in_an_hour(), name=NUDGE_REMINDER,
                                  kill_on_user_message=True)]


class ActionUndo(Action):
    """Reverts itself (``ActionReverted`` undoes the latest action, which is
    this one), then listens: without the follow-up, the unchanged state would
    predict this action again."""

    def name(self) -> Text:
        return "action_undo"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: Dict[Text, Any]) -> List[EventType]:
        dispatcher.utter_message(text="Undone.")
        return [ActionReverted(), FollowupAction("action_listen")]


ACTIONS = (ActionForgetMe, ActionRemindMe, ActionNudgeMe, ActionUndo)


class ActionServer:
    """rasa_sdk's executor behind ``POST /webhook`` on 127.0.0.1 (any free port).

    ``calls`` lists the actions run, in order (to check the bot used it).
    """

    def __init__(self) -> None:
        self.executor = ActionExecutor()
        for action in ACTIONS:
            self.executor.register_action(action)
        self.calls: List[str] = []
        self._runner: Optional[web.AppRunner] = None
        self.url = ""

    async def _webhook(self, request: web.Request) -> web.Response:
        action_call = await request.json()
        self.calls.append(action_call.get("next_action"))
        result = await self.executor.run(action_call)
        return web.json_response(result or {"events": [], "responses": []})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/webhook", self._webhook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/webhook"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
