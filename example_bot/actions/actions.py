"""Custom actions for the Pennywise Bank demo assistant.

Run them with the rasa_sdk action server from ``example_bot/``::

    rasa run actions --actions actions

The fake bank lives in ``actions/ledger.json`` (shipped, never modified).  On
first use it is copied to ``example_bot/.ledger_state.json`` (git-ignored) and
every transfer is written there, so balances survive restarts of the action
server while the shipped file stays pristine.  ``LEDGER_STATE_PATH`` overrides
the location of the working copy.
"""

import hmac
import json
import os
import re
import shutil
import tempfile
import threading
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Dict, List, Optional, Text

from rasa_sdk import Action, FormValidationAction, Tracker
from rasa_sdk.events import EventType, SlotSet
from rasa_sdk.executor import CollectingDispatcher
from rasa_sdk.types import DomainDict

ACTIONS_DIR = Path(__file__).resolve().parent
BOT_DIR = ACTIONS_DIR.parent
LEDGER_PATH = ACTIONS_DIR / "ledger.json"
MAX_PIN_ATTEMPTS = 3
CENT = Decimal("0.01")

_ledger_lock = threading.Lock()


# --------------------------------------------------------------------------- #
# Ledger helpers
# --------------------------------------------------------------------------- #
def ledger_state_path() -> Path:
    return Path(os.environ.get("LEDGER_STATE_PATH", BOT_DIR / ".ledger_state.json"))


def load_ledger() -> Dict[Text, Any]:
    """Returns the working copy of the ledger, creating it on first use."""
    state = ledger_state_path()
    with _ledger_lock:
        if not state.exists():
            state.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(LEDGER_PATH, state)
        with state.open(encoding="utf-8") as f:
            return json.load(f)


def save_ledger(ledger: Dict[Text, Any]) -> None:
    """Atomically replaces the working copy of the ledger."""
    state = ledger_state_path()
    with _ledger_lock:
        fd, tmp = tempfile.mkstemp(dir=str(state.parent), prefix=".ledger_", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(ledger, f, indent=2)
                f.write("\n")
            os.replace(tmp, state)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def get_account(ledger: Dict[Text, Any], number: Optional[Text]) -> Optional[Dict[Text, Any]]:
    if not number:
        return None
    return ledger.get("accounts", {}).get(str(number))


def account_of_holder(ledger: Dict[Text, Any], holder: Text) -> Optional[Text]:
    for number, account in ledger.get("accounts", {}).items():
        if account["holder"].lower() == holder.lower():
            return number
    return None


def money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(CENT, rounding=ROUND_HALF_UP)


def fmt_money(value: Any) -> Text:
    return f"${money(value):,.2f}"


def mask(number: Optional[Text]) -> Text:
    return f"••••{str(number)[-4:]}" if number else "(not given yet)"


# --------------------------------------------------------------------------- #
# Parsing helpers
# --------------------------------------------------------------------------- #
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}


def _words_to_number(text: Text) -> Optional[int]:
    """Tiny parser for 'fifty', 'twenty five', 'two hundred', 'one thousand'."""
    words = re.findall(r"[a-z]+", text.lower())
    total, current, seen = 0, 0, False
    for word in words:
        if word in _NUMBER_WORDS:
            current += _NUMBER_WORDS[word]
            seen = True
        elif word == "hundred" and seen:
            current = max(current, 1) * 100
        elif word == "thousand" and seen:
            total += max(current, 1) * 1000
            current = 0
        elif word in ("a", "and") or not seen:
            continue
        else:
            break
    return total + current if seen else None


def parse_amount(value: Any) -> Optional[Decimal]:
    """'50', '$50', '50.25', '$1,200', '50 dollars', 'fifty' -> Decimal."""
    if value is None:
        return None
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return Decimal(str(value))
    text = str(value)
    match = re.search(r"(-\s*)?\$?\s*(\d[\d,]*(?:\.\d+)?)", text)
    if match:
        try:
            number = Decimal(match.group(2).replace(",", ""))
        except InvalidOperation:
            return None
        return -number if match.group(1) else number
    number = _words_to_number(text)
    return Decimal(number) if number is not None else None


def extract_digits(value: Any, length: int) -> Optional[Text]:
    """Finds a number of exactly `length` digits in free text ('1234 5678' ok)."""
    if value is None:
        return None
    text = str(value)
    match = re.search(rf"(?<!\d)\d{{{length}}}(?!\d)", text)
    if match:
        return match.group(0)
    # digits typed in groups: "1234 5678", "1234-5678"
    for group in re.findall(r"(?<!\d)\d[\d \-.]*\d(?!\d)", text):
        squashed = re.sub(r"[ \-.]", "", group)
        if len(squashed) == length:
            return squashed
    return None


def match_recipient(value: Any, known: List[Text]) -> Optional[Text]:
    """Matches 'bob', 'Bob Smith', 'to bob please' against known full names."""
    if not value:
        return None
    text = str(value).strip().lower()
    for name in known:
        if text == name.lower():
            return name
    words = set(re.findall(r"[a-z]+", text))
    hits = [name for name in known if name.split()[0].lower() in words]
    return hits[0] if len(hits) == 1 else None


# --------------------------------------------------------------------------- #
# Authentication
# --------------------------------------------------------------------------- #
class ValidateAuthForm(FormValidationAction):
    def name(self) -> Text:
        return "validate_auth_form"

    async def required_slots(
        self,
        domain_slots: List[Text],
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[Text]:
        # Nothing left to ask once the user is in, or once the session is
        # locked: the form then ends at once.
        if tracker.get_slot("authenticated") or tracker.get_slot("locked"):
            return []
        return domain_slots

    def validate_account_number(
        self,
        slot_value: Any,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> Dict[Text, Any]:
        number = extract_digits(slot_value, 8)
        if not number:
            dispatcher.utter_message(
                text="That doesn't look like an account number: it should have 8 digits."
            )
            return {"account_number": None}
        if not get_account(load_ledger(), number):
            dispatcher.utter_message(
                text=f"I can't find an account {mask(number)}. Please check the number."
            )
            return {"account_number": None}
        return {"account_number": number}

    def validate_pin(
        self,
        slot_value: Any,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> Dict[Text, Any]:
        # Whatever happens, the PIN never stays in the tracker's slots.
        account_number = tracker.get_slot("account_number")
        account = get_account(load_ledger(), account_number)
        if not account:
            return {"pin": None}

        pin = extract_digits(slot_value, 4)
        if not pin:
            dispatcher.utter_message(text="A PIN has exactly 4 digits.")
            return {"pin": None}

        if hmac.compare_digest(pin.encode(), str(account["pin"]).encode()):
            first_name = account["holder"].split()[0]
            dispatcher.utter_message(text=f"Thanks {first_name}, you're verified.")
            return {
                "pin": None,
                "authenticated": True,
                "pin_attempts": 0,
                "account_holder": account["holder"],
            }

        attempts = int(tracker.get_slot("pin_attempts") or 0) + 1
        if attempts >= MAX_PIN_ATTEMPTS:
            dispatcher.utter_message(text="That PIN is not correct either.")
            return {"pin": None, "pin_attempts": attempts, "locked": True}
        left = MAX_PIN_ATTEMPTS - attempts
        dispatcher.utter_message(
            text=f"That PIN is not correct. You have {left} attempt{'s' if left > 1 else ''} left."
        )
        return {"pin": None, "pin_attempts": attempts}


class ActionShowBalance(Action):
    def name(self) -> Text:
        return "action_show_balance"

    def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict
    ) -> List[EventType]:
        if tracker.get_slot("locked"):
            dispatcher.utter_message(response="utter_session_locked")
            return []
        if not tracker.get_slot("authenticated"):
            dispatcher.utter_message(text="I need to verify who you are before I can show a balance.")
            return []
        number = tracker.get_slot("account_number")
        account = get_account(load_ledger(), number)
        if not account:
            dispatcher.utter_message(text="Sorry, I can't find your account any more.")
            return []
        dispatcher.utter_message(
            text=f"The balance of account {mask(number)} ({account['holder']}) is "
            f"{fmt_money(account['balance'])}."
        )
        # NB: no SlotSet here: the "login done -> show the balance" rule still
        # expects `pending_task: balance` when it predicts action_listen next.
        return []


# --------------------------------------------------------------------------- #
# Transfers
# --------------------------------------------------------------------------- #
class ValidateTransferForm(FormValidationAction):
    def name(self) -> Text:
        return "validate_transfer_form"

    async def required_slots(
        self,
        domain_slots: List[Text],
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[Text]:
        if not tracker.get_slot("authenticated") or tracker.get_slot("locked"):
            return []  # never collect a transfer for an unauthenticated session
        return domain_slots

    def validate_recipient(
        self,
        slot_value: Any,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> Dict[Text, Any]:
        account = get_account(load_ledger(), tracker.get_slot("account_number"))
        known = account["recipients"] if account else []
        name = match_recipient(slot_value, known)
        if not name:
            dispatcher.utter_message(
                text=f"'{slot_value}' is not one of your known recipients. "
                f"You can send money to: {', '.join(known)}."
            )
            return {"recipient": None}
        return {"recipient": name}

    def validate_amount(
        self,
        slot_value: Any,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> Dict[Text, Any]:
        amount = parse_amount(slot_value)
        if amount is None:
            dispatcher.utter_message(text="Please give the amount in digits, for example 50 or $50.25.")
            return {"amount": None}
        if amount <= 0:
            dispatcher.utter_message(text="The amount has to be more than zero.")
            return {"amount": None}
        if amount != amount.quantize(CENT):
            dispatcher.utter_message(text="Amounts can have at most two decimals (cents).")
            return {"amount": None}
        account = get_account(load_ledger(), tracker.get_slot("account_number"))
        balance = money(account["balance"]) if account else Decimal("0")
        if amount > balance:
            dispatcher.utter_message(
                text=f"That is more than your balance of {fmt_money(balance)}. "
                "Please choose a smaller amount."
            )
            return {"amount": None}
        return {"amount": f"{money(amount):.2f}"}

    def validate_transfer_confirmed(
        self,
        slot_value: Any,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> Dict[Text, Any]:
        return {"transfer_confirmed": bool(slot_value)}


TRANSFER_RESET = ["recipient", "amount", "transfer_confirmed", "pending_task"]


class ActionExecuteTransfer(Action):
    def name(self) -> Text:
        return "action_execute_transfer"

    def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict
    ) -> List[EventType]:
        reset = [SlotSet(slot, None) for slot in TRANSFER_RESET]
        if not tracker.get_slot("authenticated") or tracker.get_slot("locked"):
            dispatcher.utter_message(text="I can only make transfers once you are logged in.")
            return reset
        if tracker.get_slot("transfer_confirmed") is not True:
            dispatcher.utter_message(text="Okay, I haven't sent anything.")
            return reset

        number = tracker.get_slot("account_number")
        recipient = tracker.get_slot("recipient")
        amount = parse_amount(tracker.get_slot("amount"))
        ledger = load_ledger()
        account = get_account(ledger, number)
        if not account or not recipient or amount is None or amount <= 0:
            dispatcher.utter_message(text="Sorry, something is missing, so I did not send anything.")
            return reset
        balance = money(account["balance"])
        if amount > balance:
            dispatcher.utter_message(
                text=f"Your balance ({fmt_money(balance)}) is too low now, so I did not send anything."
            )
            return reset

        account["balance"] = float(balance - amount)
        target = account_of_holder(ledger, recipient)
        if target and target != number:
            other = ledger["accounts"][target]
            other["balance"] = float(money(other["balance"]) + amount)
        ledger.setdefault("transfers", []).append(
            {
                "from": number,
                "to": recipient,
                "to_account": target,
                "amount": float(amount),
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "conversation": tracker.sender_id,
            }
        )
        save_ledger(ledger)

        summary = f"{fmt_money(amount)} to {recipient}"
        dispatcher.utter_message(
            text=f"Done! I sent {summary}. Your new balance is {fmt_money(account['balance'])}."
        )
        return reset + [SlotSet("last_transfer", summary)]


# --------------------------------------------------------------------------- #
# Cancel / where were we
# --------------------------------------------------------------------------- #
class ActionClearTask(Action):
    """Forgets the half-finished task after the user cancelled a form."""

    def name(self) -> Text:
        return "action_clear_task"

    def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict
    ) -> List[EventType]:
        events = [SlotSet(slot, None) for slot in TRANSFER_RESET]
        events.append(SlotSet("pin", None))
        if not tracker.get_slot("authenticated"):
            events.append(SlotSet("account_number", None))
        return events


class ActionLogOut(Action):
    """Ends the login: the next balance or transfer asks for the account again.

    A locked session stays locked: logging out must not reset the PIN attempts.
    """

    def name(self) -> Text:
        return "action_log_out"

    def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict
    ) -> List[EventType]:
        events = [SlotSet(slot, None) for slot in TRANSFER_RESET]
        events += [SlotSet("pin", None), SlotSet("account_number", None),
                   SlotSet("account_holder", None), SlotSet("authenticated", False)]
        return events


_SLOT_LABELS = {
    "account_number": "your account number",
    "pin": "your PIN",
    "recipient": "who to send the money to",
    "amount": "the amount",
    "transfer_confirmed": "your confirmation",
}


class ActionWhereWereWe(Action):
    def name(self) -> Text:
        return "action_where_were_we"

    def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: DomainDict
    ) -> List[EventType]:
        loop = tracker.active_loop_name
        requested = tracker.get_slot("requested_slot")
        need = _SLOT_LABELS.get(requested, requested)

        if loop == "transfer_form":
            recipient = tracker.get_slot("recipient")
            amount = tracker.get_slot("amount")
            if requested == "transfer_confirmed":
                text = (
                    f"We're in the middle of a money transfer: {fmt_money(amount)} to "
                    f"{recipient}. I'm waiting for you to confirm it."
                )
            else:
                done = []
                if recipient:
                    done.append(f"recipient {recipient}")
                if amount:
                    done.append(f"amount {fmt_money(amount)}")
                so_far = f" So far: {', '.join(done)}." if done else ""
                text = f"We're in the middle of a money transfer.{so_far} Next I need {need}."
        elif loop == "auth_form":
            purpose = {
                "balance": " so I can show your balance",
                "transfer": " before your transfer",
            }.get(tracker.get_slot("pending_task") or "", "")
            account = tracker.get_slot("account_number")
            got = f" Account: {mask(account)}." if account else ""
            text = f"We're checking who you are{purpose}.{got} Next I need {need}."
        elif loop:
            text = f"We're in the middle of {loop}."
        else:
            text = "Nothing is in progress right now."
            if tracker.get_slot("locked"):
                text += " This session is locked after three wrong PINs."
            elif tracker.get_slot("authenticated"):
                holder = tracker.get_slot("account_holder") or "you"
                text += (
                    f" You're logged in as {holder} "
                    f"(account {mask(tracker.get_slot('account_number'))})."
                )
            last = tracker.get_slot("last_transfer")
            if last:
                text += f" The last thing we did was send {last}."
            if not tracker.get_slot("locked"):
                text += " You can check your balance or make a transfer."
        dispatcher.utter_message(text=text)
        return []
