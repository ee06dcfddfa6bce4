"""Small helpers shared by tests: building entries, and the oracle fold of sidecar lines."""

from __future__ import annotations

from typing import Any

from worker.records import Source, parse_line
from worker.staging import LineOutcome, line_digest


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
