"""`sidecar definitions apply` and `export` in-process against both databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine

from tests.test_apply_definitions import define, stage
from worker.applying import apply_target
from worker.cli import main
from worker.settings import Settings
from worker.staging import Staging
from worker.store import definitions as stored
from worker.uris import Target

FILE = """
definitions:
  - key: shift
    type: string
    allowed_values: [day, {value: night, description: "22-06"}]
    enforcement: reject
  - key: sample_count
    type: integer
    scopes: [version]
    required: true
"""


def run(settings: Settings, *argv: str) -> int:
    return main([*argv, "--database-url", settings.effective_database_url])


def test_apply_is_an_idempotent_upsert_with_a_dry_run_and_export_round_trips(
    settings: Settings, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "defs.yaml"
    path.write_text(FILE)
    assert run(settings, "definitions", "apply", str(path), "--dry-run") == 0
    assert "2 added, 0 changed, 0 unchanged (would be)" in capsys.readouterr().out
    assert stored.listed(engine) == []
    assert run(settings, "definitions", "apply", str(path)) == 0
    assert "2 added" in capsys.readouterr().out
    first = stored.listed(engine)
    assert run(settings, "definitions", "apply", str(path)) == 0
    assert "0 added, 0 changed, 2 unchanged (were)" in capsys.readouterr().out
    assert stored.listed(engine) == first  # nothing rewritten: updated_at stays
    path.write_text(FILE.replace("required: true", "required: false"))
    assert run(settings, "definitions", "apply", str(path)) == 0
    assert "~ sample_count" in capsys.readouterr().out
    out = tmp_path / "out.yaml"
    assert run(settings, "definitions", "export", "-o", str(out)) == 0
    exported = yaml.safe_load(out.read_text())["definitions"]
    assert [d["key"] for d in exported] == ["sample_count", "shift"]
    assert exported[1]["allowed_values"][1] == {"value": "night", "description": "22-06"}
    assert run(settings, "definitions", "apply", str(out)) == 0  # export reads back as it was
    assert "2 unchanged" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("- {key: a, type: integer, allowed_values: [x]}", "definitions[0].allowed_values[0]"),
        ("- {key: a}\n- {key: b, scopes: [execution]}", "definitions[1].scopes"),
        ("- {key: a}\n- {key: a}", "definitions[1].key"),
        ("- {key: a, type: uuid}", "definitions[0].type"),
        ("key: [", "cannot read it"),
        ("just text", "expected a list"),
    ],
)
def test_a_bad_file_exits_non_zero_naming_the_field_and_changes_nothing(
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    named: str,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run(settings, "definitions", "apply", str(path)) == 1
    assert named in capsys.readouterr().err
    assert stored.listed(engine) == []


def test_check_lists_each_violation_and_exits_one_while_any_is_left(
    settings: Settings, engine: Engine, staging: Staging, capsys: pytest.CaptureFixture[str]
) -> None:
    define(
        engine,
        {"key": "sample_count", "type": "integer", "scopes": ["version"], "required": True},
        {"key": "camera", "allowed_values": ["top"], "scopes": ["datum"]},
    )
    stage(
        staging,
        b'{"dataset-version": "dataset://press/v1", "metadata": {"sample_count": "many"}}',
        b'{"dataset-version": "dataset://press/v2", "metadata": {"other": 1}}',
        b'{"file": "a.png", "metadata": {"camera": "side", "valohai.dataset-versions": ["dataset://press/v1"]}}',
    )
    for key in staging.complete_execution("exec-1"):
        apply_target(engine, staging, Target.parse(key))
    for version in ("v1", "v2"):
        for key in staging.complete_version(Target("version", "press", version)):
            apply_target(engine, staging, Target.parse(key))
    assert run(settings, "check") == 1
    out = capsys.readouterr().out.splitlines()
    assert 'dataset://press/v1  sample_count  type  "many"' in out
    assert "dataset://press/v2  sample_count  required  null" in out
    assert any(line.endswith('(exec-1:a.png)  camera  allowed_values  "side"') for line in out), out
    assert out[-1] == "3 with violations: 0 datasets, 2 versions, 1 datums"
    assert run(settings, "check", "camera", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"dataset": 0, "version": 0, "datum": 1}
    assert [v["key"] for r in report["results"] for v in r["violations"]] == ["camera"]
    assert run(settings, "check", "unknown_key") == 0
    assert capsys.readouterr().out.strip() == "no violations"
