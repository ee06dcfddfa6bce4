"""`sidecar replay`: replaying what was applied changes nothing; what Redis lost comes back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.helpers import fold
from worker.applying import apply_target
from worker.cli import main
from worker.ingest import Ingestor
from worker.replay import replay, sidecar_files
from worker.settings import Settings
from worker.staging import Staging
from worker.store.models import DatasetVersion, PropertyChange
from worker.uris import Target

pytestmark = pytest.mark.redis

V1 = Target("version", "press", "v1")


def vline(**meta: object) -> str:
    return json.dumps({"dataset-version": "dataset://press/v1", "metadata": meta}) + "\n"


def snapshot(engine: Engine) -> tuple[dict[str, object], int]:
    with Session(engine) as s:
        row = s.scalar(select(DatasetVersion).where(DatasetVersion.name == "v1"))
        changes = len(s.scalars(select(PropertyChange)).all())
        return (row.properties if row else {}), changes


@pytest.fixture
def applied(settings: Settings, engine: Engine, staging: Staging) -> tuple[Path, list[dict[str, object]]]:
    root = settings.require_root()
    metas: list[dict[str, object]] = [{"a": 1, "b": 2}, {"a": 3}, {"b": None, "c": "x"}]
    path = root / "exec-1" / "valohai.metadata.jsonl"
    path.parent.mkdir()
    path.write_text("".join(vline(**m) for m in metas) + "not json\n")
    Ingestor(root, staging, line_limit=1 << 20).ingest(path)
    for key in staging.complete_version(V1):
        apply_target(engine, staging, Target.parse(key))
    return path, metas


def test_replaying_what_was_applied_changes_nothing(
    settings: Settings, engine: Engine, staging: Staging, applied: tuple[Path, list[dict[str, object]]]
) -> None:
    path, metas = applied
    before = snapshot(engine)
    assert before[0] == fold(metas)
    ingestor = Ingestor(settings.require_root(), staging, line_limit=1 << 20)
    dry = replay(engine, staging, ingestor, [path], dry_run=True)
    assert dry.changes == [] and dry.lines == 4 and dry.rejects == 1
    summary = replay(engine, staging, ingestor, [path])
    assert summary.applied == 0 and summary.rejects == 1
    assert snapshot(engine) == before


def test_replay_restores_what_redis_lost(
    settings: Settings, engine: Engine, staging: Staging, applied: tuple[Path, list[dict[str, object]]]
) -> None:
    path, metas = applied
    with open(path, "a") as f:
        f.write(vline(d=4))
    # Redis lost the new line and the checkpoint (say, a crash before its AOF fsync).
    ingestor = Ingestor(settings.require_root(), staging, line_limit=1 << 20)
    dry = replay(engine, staging, ingestor, [path], dry_run=True)
    assert dry.changes == ["dataset://press/v1: d: None -> 4"]
    assert snapshot(engine)[0] == fold(metas)  # a dry run changes nothing
    summary = replay(engine, staging, ingestor, [path])
    assert summary.applied == 1 and V1.key in summary.targets
    assert snapshot(engine)[0] == fold([*metas, {"d": 4}])


def test_file_selection(settings: Settings, applied: tuple[Path, list[dict[str, object]]]) -> None:
    root = settings.require_root().resolve()
    (root / "exec-2").mkdir()
    (root / "exec-2" / "valohai.metadata.jsonl").write_text(vline(z=1))
    (root / "exec-2" / "out").mkdir()
    (root / "exec-2" / "out" / "a.png.metadata.json").write_text("{}")
    assert [p.relative_to(root).as_posix() for p in sidecar_files(root, [root], None)] == [
        "exec-1/valohai.metadata.jsonl",
        "exec-2/out/a.png.metadata.json",
        "exec-2/valohai.metadata.jsonl",
    ]
    assert len(sidecar_files(root, [root], "exec-2")) == 2


def test_replay_command(
    settings: Settings,
    applied: tuple[Path, list[dict[str, object]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    root = str(settings.require_root())
    flags = [
        "--root",
        root,
        "--database-url",
        settings.effective_database_url,
        "--redis-url",
        settings.effective_redis_url(),
    ]
    # The file holds a line that is not JSON: replay says so and exits non-zero.
    assert main(["replay", *flags, root, "--dry-run"]) == 1
    assert "1 files, 4 lines, 1 rejects; would touch 0 versions" in capsys.readouterr().out  # all applied
    assert main(["replay", *flags, "/etc"]) == 1
    assert "not inside the root" in capsys.readouterr().err
