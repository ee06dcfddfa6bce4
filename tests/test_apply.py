"""The apply transaction against real Redis and both databases."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.helpers import fold, outcome
from worker.applying import apply_target
from worker.staging import Staging
from worker.store.models import Dataset, DatasetVersion, Datum, PropertyChange, Watermark
from worker.uris import Target

pytestmark = pytest.mark.redis

V1 = Target("version", "press", "v1")
DS = Target("dataset", "press")
FILE = "exec-1/valohai.metadata.jsonl"


def vline(meta: str) -> bytes:
    return b'{"dataset-version": "dataset://press/v1", "metadata": %s}' % meta.encode()


def version_props(engine: Engine) -> dict[str, Any] | None:
    with Session(engine) as s:
        row = s.scalar(select(DatasetVersion).where(DatasetVersion.name == "v1"))
        return None if row is None else row.properties


def test_nothing_is_visible_before_completion(engine: Engine, staging: Staging) -> None:
    staging.stage_lines(FILE, "exec-1", [outcome(vline('{"a": 1}'))], "s")
    result = apply_target(engine, staging, V1)
    assert result.skipped == "version is still building" and result.applied == 0
    # The version is registered as building, with none of its staged properties.
    assert version_props(engine) == {}
    with Session(engine) as s:
        assert s.scalar(select(DatasetVersion.status)) == "building"


def test_apply_folds_in_order_and_is_idempotent(engine: Engine, staging: Staging) -> None:
    metas = ['{"a": 1, "b": "x"}', '{"a": 2, "c": [1, 2]}', '{"b": null, "d": {"e": true}}']
    staging.stage_lines(FILE, "exec-1", [outcome(vline(m), n) for n, m in enumerate(metas, 1)], "s")
    staging.complete_version(V1)
    first = apply_target(engine, staging, V1)
    assert first.applied == 3
    expected = fold([{"a": 1, "b": "x"}, {"a": 2, "c": [1, 2]}, {"b": None, "d": {"e": True}}])
    assert version_props(engine) == expected
    again = apply_target(engine, staging, V1)
    assert again.applied == 0 and again.watermark == first.watermark
    assert version_props(engine) == expected
    with Session(engine) as s:
        row = s.scalar(select(DatasetVersion))
        assert row is not None and row.status == "completed"
        history = s.scalars(select(PropertyChange).order_by(PropertyChange.id)).all()
        assert [(h.key, h.old, h.new) for h in history] == [
            ("a", None, 1),
            ("b", None, "x"),
            ("a", 1, 2),
            ("c", None, [1, 2]),
            ("b", "x", None),
            ("d", None, {"e": True}),
        ]
        assert history[0].source == {
            "origin": "sidecar",
            "execution": "exec-1",
            "file": FILE,
            "line": 1,
            "offset": 0,
        }


def test_late_entry_is_applied_after_completion(engine: Engine, staging: Staging) -> None:
    staging.complete_version(V1)
    apply_target(engine, staging, V1)
    due = staging.stage_lines(FILE, "exec-1", [outcome(vline('{"late": 1}'))], "s")
    assert V1.key in due
    assert apply_target(engine, staging, V1).applied == 1
    assert version_props(engine) == {"late": 1}
    assert V1.key not in staging.due_targets(older_than=-1)


def test_a_change_of_json_type_alone_is_written(engine: Engine, staging: Staging) -> None:
    """1 then true (and 1 then 1.0 inside an object): the stored set takes the new type.

    The ORM used to compare the old and new sets with Python's `==`, found them equal and skipped
    the UPDATE, while the history said the value had changed.
    """
    staging.stage_lines(FILE, "exec-1", [outcome(vline('{"a": 1, "n": {"x": 1}}'))], "s")
    staging.complete_version(V1)
    apply_target(engine, staging, V1)
    staging.stage_lines(FILE, "exec-1", [outcome(vline('{"a": true, "n": {"x": 1.5}}'), 2)], "s2")
    apply_target(engine, staging, V1)
    staging.stage_lines(FILE, "exec-1", [outcome(vline('{"n": {"x": 1}}'), 3)], "s3")
    apply_target(engine, staging, V1)
    staging.stage_lines(FILE, "exec-1", [outcome(vline('{"n": {"x": true}}'), 4)], "s4")
    apply_target(engine, staging, V1)
    props = version_props(engine)
    assert props is not None
    assert props["a"] is True and props["n"]["x"] is True


def test_completion_before_any_line_creates_an_empty_completed_version(
    engine: Engine, staging: Staging
) -> None:
    staging.complete_version(V1)
    apply_target(engine, staging, V1)
    assert version_props(engine) == {}


def test_datums_and_membership(engine: Engine, staging: Staging) -> None:
    datum = b'{"file": "img/a.png", "metadata": {"label": "ok", "valohai.dataset-versions": ["dataset://press/v1"]}}'
    dataset = b'{"dataset": "dataset://press", "metadata": {"domain": "manufacturing"}}'
    staging.stage_lines(FILE, "exec-1", [outcome(datum), outcome(dataset, 2)], "s")
    for key in staging.complete_execution("exec-1"):
        apply_target(engine, staging, Target.parse(key))
    with Session(engine) as s:
        version = s.scalar(select(DatasetVersion))
        assert version is not None and version.status == "completed"
        datum_row = s.scalar(select(Datum))
        assert datum_row is not None and datum_row.path == "img/a.png"
        assert datum_row.properties["label"] == "ok"
        ds = s.scalar(select(Dataset))
        assert ds is not None and ds.properties == {"domain": "manufacturing"}


def test_concurrent_applies_never_apply_twice(engine: Engine, staging: Staging) -> None:
    lines = [outcome(vline(f'{{"n{i}": {i}}}'), i) for i in range(1, 201)]
    staging.stage_lines(FILE, "exec-1", lines, "s")
    staging.complete_version(V1)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(apply_target(engine, staging, V1).applied)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [0, 0, 0, 200]
    with Session(engine) as s:
        assert s.scalar(select(Watermark.stream_id).where(Watermark.target == V1.key)) is not None
        assert len(s.scalars(select(PropertyChange)).all()) == 200


def test_last_used_is_a_column_out_of_the_history_yet_shown_searched_and_sorted(engine: Engine) -> None:
    from datetime import datetime

    from sqlalchemy import func

    from worker.store import queries
    from worker.store.last_used import touch_last_used
    from worker.store.models import DatasetVersion, PropertyChange
    from worker.uris import Target

    for name, stamp in (("v1", "2026-05-01T00:00:00+00:00"), ("v2", "2026-04-01T00:00:00+00:00")):
        touch_last_used(engine, Target("version", "lu", name), datetime.fromisoformat(stamp))
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(PropertyChange)) == 0
        row = session.scalars(select(DatasetVersion).where(DatasetVersion.name == "v1")).one()
        assert row.properties == {} and row.last_used == "2026-05-01T00:00:00+00:00"
        ask = queries.ListQuery(filter='`valohai.last-used` < "2026-04-15"')
        assert [v.name for v in queries.list_versions(session, ask)[1]] == ["v2"]
        ask = queries.ListQuery(ordering="`valohai.last-used`")
        assert [v.name for v in queries.list_versions(session, ask)[1]] == ["v2", "v1"]
