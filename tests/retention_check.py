"""The fault suite's retention check: after retention runs, the oracle still holds.

Shared by the fault tests that end with `tests/oracle.py`: once everything completed and was
applied, a retention pass (SIDECAR_RETENTION_SECONDS=0) takes the executions' staging state out of
Redis; then the database must still equal the fold of the files, a rescan must stage nothing,
`sidecar replay` must stage only what is missing (nothing), and a late line for a completed
version must still be applied (after which the database equals the fold of the longer file).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tests.oracle import assert_matches_db, expected_state
from worker.applying import apply_target
from worker.ingest import Ingestor
from worker.replay import replay
from worker.retention import Retention
from worker.staging import Staging
from worker.store import finished
from worker.store.models import PropertyChange
from worker.uris import Target

LATE_KEY = "late-after-retention"


def apply_all(
    engine: Engine, staging: Staging, handed: set[str] | frozenset[str] = frozenset(), *, rounds: int = 20
) -> None:
    """The worker's part: apply what was handed out, then whatever is due, until nothing is
    (failing after `rounds` passes that still left something due)."""
    for key in sorted(handed):
        apply_target(engine, staging, Target.parse(key))
    for _ in range(rounds):
        due = staging.due_targets(older_than=-1)
        if not due:
            return
        for key in due:
            apply_target(engine, staging, Target.parse(key))
    raise AssertionError(f"still due after retention: {staging.due_targets(older_than=-1)}")


def _history(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(PropertyChange)) or 0)


def assert_retention_keeps_the_oracle(
    engine: Engine,
    staging: Staging,
    root: Path,
    paths: Sequence[Path],
    *,
    late: tuple[Path, Target],
    api_writes: Sequence[tuple[str, Mapping[str, Any]]] = (),
    completed: Sequence[str] = (),
) -> None:
    """Run retention and check the four promises (see the module docstring).

    `late`: the file to append a late line to, and the completed version it names."""
    apply_all(engine, staging)
    stats = Retention(staging, lambda: engine, retention_seconds=0).run()
    executions = {p.relative_to(root).parts[0] for p in paths}
    assert executions <= set(stats.forgotten), f"retention kept {sorted(executions - set(stats.forgotten))}"
    assert_matches_db(engine, expected_state(paths, root=root, api_writes=api_writes), completed=completed)

    ingestor = Ingestor(root, staging, line_limit=1 << 20, finished=lambda f: finished.find(engine, f))
    for path in paths:
        rescan = ingestor.ingest(path)
        assert (rescan.lines, rescan.due) == (0, set()), f"a rescan of {path} after retention: {rescan}"

    changes = _history(engine)
    dry = replay(engine, staging, ingestor, list(paths), dry_run=True)
    assert dry.changes == [], dry.changes
    summary = replay(engine, staging, ingestor, list(paths))
    apply_all(engine, staging)
    assert summary.applied == 0 and _history(engine) == changes, "replay after retention staged lines again"

    path, version = late
    with open(path, "ab") as f:
        f.write(
            json.dumps({"dataset-version": version.key, "metadata": {LATE_KEY: changes}}).encode() + b"\n"
        )
    apply_all(engine, staging, ingestor.ingest(path).due)
    # The fold puts API writes after every line; they never touch LATE_KEY, so the order is moot.
    expected = expected_state(paths, root=root, api_writes=api_writes)
    assert expected[version.key][LATE_KEY] == changes
    assert_matches_db(engine, expected, completed=completed)
