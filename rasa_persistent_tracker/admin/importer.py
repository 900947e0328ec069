"""Copy conversations from any tracker store Rasa can build into this one.

Switching ``type: redis`` (or ``sql``, ``mongod``, ``dynamo``) to this store
is one line in ``endpoints.yml``, but the old store's history stays where it
was. ``import_all`` reads every conversation through Rasa's own API
(``keys()`` and ``retrieve_full_tracker()``, so any store Rasa supports
works), writes its whole history into the SQL log in order and builds the hot
record of its current session (a form in progress resumes where it was),
then reads the conversation back and checks that the full tracker equals the
source's.

Idempotent and resumable: a conversation already imported is skipped; one
imported in part (an interrupted run) gets the rest of its events; one whose
history here differs from the source's is reported and left alone.
"""
import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Optional

from rasa.core.tracker_store import RedisTrackerStore, TrackerStore
from rasa.shared.core.events import Event
from rasa.shared.core.trackers import DialogueStateTracker


@dataclasses.dataclass
class ImportReport:
    """What an import did, per outcome."""

    imported: int = 0
    resumed: int = 0
    already_here: int = 0
    empty: int = 0
    conflicts: List[str] = dataclasses.field(default_factory=list)
    mismatched: List[str] = dataclasses.field(default_factory=list)
    events: int = 0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.conflicts and not self.mismatched

    def summary(self) -> str:
        verb = "would import" if self.dry_run else "imported"
        text = (f"{verb} {self.imported} conversation(s) ({self.events} events), resumed "
                f"{self.resumed}, {self.already_here} already here, {self.empty} empty")
        if self.conflicts:
            text += (f"; {len(self.conflicts)} differ from what this store holds and were left "
                     f"alone: {', '.join(self.conflicts[:10])}")
        if self.mismatched:
            text += (f"; {len(self.mismatched)} did not read back equal to the source: "
                     f"{', '.join(self.mismatched[:10])}")
        return text + "."


def _dicts(events: List[Event]) -> List[Dict[str, Any]]:
    return [e.as_dict() for e in events]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def import_all(source: TrackerStore, target: Any, dry_run: bool = False,
                     progress: Callable[[int, int], None] = lambda done, total: None
                     ) -> ImportReport:
    """Copy every conversation of ``source`` into ``target`` (a
    ``PersistentTrackerStore``). See the module docstring."""
    report = ImportReport(dry_run=dry_run)
    ids = sorted(conversation_ids(source, await _maybe_await(source.keys())))
    for done, conversation_id in enumerate(ids, 1):
        await import_one(source, target, conversation_id, report, dry_run)
        progress(done, len(ids))
    if not dry_run:
        await target.flush()
    return report


def conversation_ids(source: TrackerStore, keys: Any) -> List[str]:
    """The conversation ids behind ``source.keys()``.

    Rasa 3.6's ``RedisTrackerStore.keys()`` returns its Redis keys, prefix
    included and as bytes, which its own ``retrieve_full_tracker`` does not
    accept; the prefix is taken off here.
    """
    prefix = getattr(source, "key_prefix", None) if isinstance(source, RedisTrackerStore) \
        else None
    ids = []
    for key in keys:
        text = key.decode("utf-8") if isinstance(key, bytes) else str(key)
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
        ids.append(text)
    return ids


async def import_one(source: TrackerStore, target: Any, conversation_id: str,
                     report: ImportReport, dry_run: bool) -> None:
    """Import one conversation, updating ``report``."""
    full: Optional[DialogueStateTracker] = await _maybe_await(
        source.retrieve_full_tracker(conversation_id))
    if full is None or not full.events:
        report.empty += 1
        return
    wanted = _dicts(list(full.events))
    here = await target.retrieve_full_tracker(conversation_id)
    held = _dicts(list(here.events)) if here is not None else []
    if held == wanted:
        report.already_here += 1
        return
    if held != wanted[:len(held)]:
        report.conflicts.append(conversation_id)
        return
    if dry_run:
        if held:
            report.resumed += 1
        else:
            report.imported += 1
        report.events += len(wanted) - len(held)
        return
    # A tracker that did not come from this store: save() merges it after the
    # last event the log holds, so an interrupted import gets only the rest.
    tracker = DialogueStateTracker.from_events(conversation_id, list(full.events),
                                               target.domain.slots)
    await target.save(tracker)
    await target.flush()
    back = await target.retrieve_full_tracker(conversation_id)
    if back is None or _dicts(list(back.events)) != wanted:
        report.mismatched.append(conversation_id)
        return
    if held:
        report.resumed += 1
    else:
        report.imported += 1
    report.events += len(wanted) - len(held)
