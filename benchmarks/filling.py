"""Bulk-filling a log with millions of realistic events, fast (PostgreSQL COPY).

One conversation's events are rendered once (common.py's turn shape, a
100-event conversation by default); every other conversation reuses the rows
with its own id and timestamps, so filling 10,000,000 events is bound by
PostgreSQL, not by building Rasa events. Conversations are spread evenly over
the ``days`` before now (the last event of conversation ``i`` of ``n`` is
``days * (1 - i / n)`` days ago), so time windows and a month's purge select a
predictable share.
"""
import io
import json
import random
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import common

DAY = 86400.0
TS = "\x00TS\x00"  # where a row's timestamp goes in its rendered data


class Template:
    """A conversation's rows, rendered once: (type, intent, action, data with TS)."""

    def __init__(self, events: int, seed: int = 42) -> None:
        rng = random.Random(seed)
        self.rows: List[Tuple[str, Optional[str], Optional[str], str]] = []
        for event in common.history(events, rng)[:events]:
            body = event.as_dict()
            body["timestamp"] = 0.0
            data = json.dumps(body).replace('"timestamp": 0.0', f'"timestamp": {TS}', 1)
            intent = (body.get("parse_data") or {}).get("intent", {}).get("name") \
                if body["event"] == "user" else None
            action = body.get("name") if body["event"] == "action" else None
            self.rows.append((body["event"], intent, action, data))

    def __len__(self) -> int:
        return len(self.rows)


def _field(value: Any) -> str:
    """One field of PostgreSQL's COPY text format."""
    if value is None:
        return "\\N"
    return (str(value).replace("\\", "\\\\").replace("\t", "\\t")
            .replace("\n", "\\n").replace("\r", "\\r"))


def conversation_lines(template: Template, sid: str, first_seq: int, start: float,
                       with_seq: bool) -> Iterator[str]:
    """COPY lines for one conversation: (sid, [seq], type, timestamp, intent,
    action, data), seq from ``first_seq`` (the log numbers from 1), timestamps
    one second apart from ``start``."""
    sid_field = _field(sid)
    for offset, (type_name, intent, action, data) in enumerate(template.rows):
        ts = start + offset
        fields = [sid_field]
        if with_seq:
            fields.append(str(first_seq + offset))
        fields += [type_name, repr(ts), _field(intent), _field(action),
                   _field(data.replace(TS, repr(ts)))]
        yield "\t".join(fields) + "\n"


def copy_conversations(raw: Any, targets: Sequence[Tuple[str, bool]], template: Template,
                       ids: Sequence[str], starts: Callable[[int], float],
                       batch: int = 500, progress: Optional[Callable[[int], None]] = None
                       ) -> int:
    """COPY the conversations ``ids`` (each ``template``, starting at
    ``starts(i)``) into every ``(COPY target, with_seq)`` of ``targets``;
    return the events written per target."""
    written = 0
    cursor = raw.cursor()
    for first in range(0, len(ids), batch):
        buffers = [io.StringIO() for _ in targets]
        for i in range(first, min(len(ids), first + batch)):
            for buf, (_, with_seq) in zip(buffers, targets):
                buf.writelines(conversation_lines(template, ids[i], 1, starts(i), with_seq))
            written += len(template)
        for buf, (target, _) in zip(buffers, targets):
            buf.seek(0)
            cursor.copy_expert(f"COPY {target} FROM STDIN", buf)
        raw.commit()
        if progress is not None:
            progress(written)
    return written


def spread(count: int, days: float, length: int, now: Optional[float] = None
           ) -> Callable[[int], float]:
    """``starts(i)`` for ``count`` conversations ending evenly over ``days``."""
    now = time.time() if now is None else now
    return lambda i: now - DAY * days * (1 - i / count) - length
