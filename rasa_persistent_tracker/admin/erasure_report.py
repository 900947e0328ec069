"""What ``erase`` and ``purge`` removed, or would remove: per conversation,
per month partition (purge on the partitioned log), and the summary line."""
import dataclasses
from typing import List, Optional, Sequence


@dataclasses.dataclass
class Places:
    """Counts per place a conversation is stored in."""

    records: int = 0
    outbox_entries: int = 0
    quarantined: int = 0
    log_rows: int = 0
    snapshots: int = 0

    def text(self) -> str:
        return (f"hot record {self.records}, outbox entries {self.outbox_entries}, "
                f"quarantined copies {self.quarantined}, log rows {self.log_rows}, "
                f"snapshot {self.snapshots}")

    def add(self, other: "Places") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass
class Erasure:
    """What was (or, in a dry run, would be) removed of one conversation."""

    conversation_id: str
    places: Places = dataclasses.field(default_factory=Places)
    skipped: Optional[str] = None  # why it was left alone (purge: active again)

    @property
    def found(self) -> bool:
        return any(dataclasses.astuple(self.places))

    def line(self, dry_run: bool) -> str:
        if self.skipped:
            return f"skipped '{self.conversation_id}': {self.skipped}"
        if not self.found:
            return f"'{self.conversation_id}': nothing found (no hot record, outbox entries, " \
                   f"quarantined copies, log rows or snapshot)"
        verb = "would erase" if dry_run else "erased"
        return f"{verb} '{self.conversation_id}': {self.places.text()}"


@dataclasses.dataclass(frozen=True)
class MonthDrop:
    """What purge did (or, in a dry run, would do) with one past month's partition."""

    name: str
    rows: int
    conversations: int
    dropped: bool  # dropped, or in a dry run: would be
    reason: str = ""  # why it stays ("" if dropped)

    def line(self, dry_run: bool) -> str:
        if not self.dropped:
            return f"kept partition {self.name}: {self.reason}"
        verb = "would drop" if dry_run else "dropped"
        return f"{verb} partition {self.name} ({self.rows:,} rows of " \
               f"{self.conversations:,} conversation(s), all inactive)"


@dataclasses.dataclass
class Totals:
    """Sums over many ``Erasure``s, for the summary line."""

    erased: int = 0
    missing: int = 0
    skipped: int = 0
    places: Places = dataclasses.field(default_factory=Places)
    months: List[MonthDrop] = dataclasses.field(default_factory=list)

    def add(self, erasures: Sequence[Erasure]) -> None:
        for erasure in erasures:
            if erasure.skipped:
                self.skipped += 1
            elif not erasure.found:
                self.missing += 1
            else:
                self.erased += 1
                self.places.add(erasure.places)

    def summary(self, what: str, dry_run: bool) -> str:
        verb = "would erase" if dry_run else "erased"
        line = f"{what}: {verb} {self.erased} conversation(s) ({self.places.text()})"
        if self.missing:
            line += f"; {self.missing} not found"
        if self.skipped:
            line += f"; {self.skipped} skipped (active again)"
        dropped = [m for m in self.months if m.dropped]
        if dropped:
            line += f"; {'would drop' if dry_run else 'dropped'} {len(dropped)} month " \
                    f"partition(s) (" + ", ".join(f"{m.name}: {m.rows:,} rows"
                                                  for m in dropped) + ")"
        return line + ("; dry run, nothing removed" if dry_run else "")

