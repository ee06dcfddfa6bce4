"""Small helpers shared by tests: building entries, and the oracle fold of sidecar lines."""

from __future__ import annotations

import json
from typing import Any

from worker.records import LineOutcome, Source, line_digest, parse_line


def src(execution: str = "exec-1", line: int = 1, offset: int = 0) -> Source:
    return Source("sidecar", execution, f"{execution}/valohai.metadata.jsonl", line, offset)


def outcome(raw: bytes, number: int = 1, execution: str = "exec-1") -> LineOutcome:
    out = LineOutcome(number, line_digest(raw))
    out.entries = parse_line(raw, src(execution, number))
    return out


def fold(changes: list[dict[str, Any]]) -> dict[str, Any]:
    """The oracle: shallow set, null deletes, in order. Independent of worker.merge on purpose."""
    state: dict[str, Any] = {}
    for change in changes:
        for key, value in change.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
    return state


def forget_broker_state(client: Any, *queues: str) -> None:
    """Drop what kombu keeps for a test's queues outside the keys conftest cleans.

    A SIGKILLed worker leaves its message in kombu's `unacked` hash (shared by the whole Redis
    database), to be restored to our (by then deleted) queue after the 900 s visibility timeout;
    kombu 5.7 also keeps `_kombu.binding_permanent.<exchange>`, which conftest's pattern misses.
    """
    for queue in queues:
        client.delete(f"_kombu.binding_permanent.{queue}", f"_kombu.binding.{queue}")
    for tag, raw in client.hscan_iter("unacked"):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if routing_key in queues:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
