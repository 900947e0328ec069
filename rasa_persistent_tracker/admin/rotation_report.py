"""What a key rotation did and what it left: ``RotationReport`` and ``Progress``."""
import collections
import dataclasses
import logging
from typing import Dict

from rasa_persistent_tracker.security import rekey

# The logger of rotation.py, where these warnings come from.
logger = logging.getLogger("rasa_persistent_tracker.admin.rotation")

PHASES = ("hot records", "rpt_events", "rpt_snapshots", "quarantine")
_LISTED = 20  # unreadable values named one by one per phase; the rest are counted


@dataclasses.dataclass
class Progress:
    """One finished batch of ``rotate``: counts so far in ``phase``."""

    phase: str
    checked: int
    total: int
    rewritten: int


def _zeros() -> Dict[str, int]:
    return dict.fromkeys(PHASES, 0)


@dataclasses.dataclass
class RotationReport:
    """What ``rotate`` did, per phase; what each kind of stored value is under
    (``by_key``: key id, ``<id> (legacy)`` or ``plaintext`` -> count, as left
    by the run) and what still is not under the primary key (``old_key``)."""

    primary: str
    checked: Dict[str, int] = dataclasses.field(default_factory=_zeros)
    rewritten: Dict[str, int] = dataclasses.field(default_factory=_zeros)
    unreadable: Dict[str, int] = dataclasses.field(default_factory=_zeros)
    old_key: Dict[str, int] = dataclasses.field(default_factory=dict)
    by_key: Dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {p: collections.Counter() for p in (*PHASES, "outbox")})
    complete: bool = False
    quarantine_checked: bool = False

    @property
    def finished(self) -> bool:
        """True when the run was complete and nothing at all is left under
        another key, in a legacy format or in plaintext."""
        return self.complete and self.quarantine_checked and not any(self.old_key.values())

    def summary(self) -> str:
        lines = [f"  {p}: {self.checked[p]} checked, {self.rewritten[p]} re-encrypted"
                 + (f", {self.unreadable[p]} unreadable" if self.unreadable[p] else "")
                 for p in PHASES]
        lines += [f"  now in {p}: " + ", ".join(f"{n} under {k}" for k, n in sorted(c.items()))
                  for p, c in self.by_key.items() if c]
        if not self.complete:
            head = "Key rotation stopped before the end: run rotate-keys again to finish."
        elif not self.quarantine_checked:
            head = "Key rotation did not check the quarantine copies: keep the other keys."
        elif self.finished:
            head = (f"Key rotation complete: no record, row, snapshot, outbox entry or "
                    f"quarantine copy uses another key; every key except "
                    f"'{self.primary}' can be removed.")
        else:
            left = ", ".join(f"{n} in {p}" for p, n in self.old_key.items() if n)
            head = (f"Key rotation done, but some data is not under '{self.primary}' "
                    f"({left}): keep the other keys. Unreadable values are named in the "
                    f"warnings above (is a key missing from the keyring? plaintext needs "
                    f"accept_plaintext: true).")
        return "\n".join([head, *lines])

    def unreadable_value(self, phase: str, what: str, reason: object) -> None:
        """Count one value that cannot be decoded; name the first few in a warning."""
        self.unreadable[phase] += 1
        if self.unreadable[phase] <= _LISTED:
            logger.warning("%s cannot be decoded (%s); not re-encrypted.", what, reason)
        if self.unreadable[phase] == _LISTED:
            logger.warning("Further unreadable values in %s are counted, not listed.", phase)

    def count(self, phase: str, value: str) -> None:
        self.by_key[phase][rekey.label(value)] += 1
