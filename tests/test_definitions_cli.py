"""`sidecar definitions apply` and `export` in-process against both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine

from worker.cli import main
from worker.settings import Settings
from worker.store import definitions as stored

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
