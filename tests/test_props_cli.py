"""`sidecar props`, `query`, `history`, `stale` in-process against real Redis and both databases."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine

from tests.helpers import outcome
from worker.applying import apply_target
from worker.cli import main
from worker.props_cli import parse_assignment, parse_duration
from worker.settings import Settings
from worker.staging import Staging
from worker.uris import Target

pytestmark = pytest.mark.redis


def test_parse_assignment() -> None:
    assert parse_assignment("n=4700") == ("n", 4700)
    assert parse_assignment('s="x"') == ("s", "x")
    assert parse_assignment("s=night") == ("s", "night")
    assert parse_assignment('o={"a": [1]}') == ("o", {"a": [1]})
    assert parse_assignment("e=") == ("e", "")
    assert parse_duration("30d").days == 30 and parse_duration("12h").seconds == 12 * 3600


def run(settings: Settings, *argv: str) -> int:
    """`sidecar <argv>` with the test's database and Redis (flags go after the (sub)command)."""
    flags = ["--database-url", settings.effective_database_url, "--redis-url", settings.effective_redis_url()]
    split = 2 if argv[0] == "props" else 1
    return main([*argv[:split], *flags, *argv[split:]])


@pytest.fixture
def ready(settings: Settings, engine: Engine, staging: Staging, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    raw = b'{"dataset-version": "dataset://press/v1", "metadata": {"sample_count": 4700, "shift": "night"}}'
    staging.stage_lines("e/valohai.metadata.jsonl", "e", [outcome(raw)], "s")
    for key in staging.complete_version(Target("version", "press", "v1")):
        apply_target(engine, staging, Target.parse(key))
    return settings


def test_props_set_get_unset_history(ready: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ready, "props", "set", "dataset://press/v1", "defect_rate=0.002", "note=checked by hand") == 0
    assert json.loads(capsys.readouterr().out) == {
        "sample_count": 4700,
        "shift": "night",
        "defect_rate": 0.002,
        "note": "checked by hand",
    }
    assert run(ready, "props", "unset", "dataset://press/v1", "shift") == 0
    capsys.readouterr()
    assert run(ready, "props", "get", "dataset://press/latest") == 0
    assert "shift" not in json.loads(capsys.readouterr().out)
    assert run(ready, "history", "dataset://press/v1") == 0
    out = capsys.readouterr().out
    assert 'shift: "night" -> -  [api]' in out and "exec-1/valohai.metadata.jsonl:1" in out


def test_query_and_errors(ready: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ready, "query", "--versions", "sample_count > 4000", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 1 and result["results"][0]["uri"] == "dataset://press/v1"
    assert run(ready, "query", "--versions", "sample_count >") == 1
    assert "position 14" in capsys.readouterr().err
    assert run(ready, "props", "set", "dataset://press/v1", "valohai.last-used=now") == 1
    assert "reserved" in capsys.readouterr().err
    assert run(ready, "props", "get", "dataset://nope") == 1
    assert "not found" in capsys.readouterr().err
    assert run(ready, "props", "get", "s3://bucket") == 1
    assert "bad dataset URI" in capsys.readouterr().err


def test_stale(ready: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ready, "stale", "--unused-for", "30d", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []  # everything was created just now
    assert run(ready, "stale", "--unused-for", "0s", "--json") == 0
    stale = json.loads(capsys.readouterr().out)
    assert {r["uri"] for r in stale} == {"dataset://press", "dataset://press/v1"}
    assert run(ready, "stale", "--unused-for", "soon") == 1


def test_props_on_a_datum_alias(
    settings: Settings,
    engine: Engine,
    staging: Staging,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    raw = b'{"file": "model.pt", "metadata": {"acc": 0.9, "valohai.alias": "prod-model"}}'
    staging.stage_lines("e/valohai.metadata.jsonl", "e", [outcome(raw, execution="e")], "s")
    for key in staging.complete_execution("e"):
        apply_target(engine, staging, Target.parse(key))
    assert run(settings, "props", "get", "datum://prod-model") == 0
    assert json.loads(capsys.readouterr().out) == {"acc": 0.9, "valohai.alias": "prod-model"}
    assert run(settings, "props", "set", "datum://prod-model", "acc=0.95", "stage=prod") == 0
    assert json.loads(capsys.readouterr().out) == {
        "acc": 0.95,
        "valohai.alias": "prod-model",
        "stage": "prod",
    }
    assert run(settings, "props", "unset", "datum://prod-model", "stage") == 0
    assert "stage" not in json.loads(capsys.readouterr().out)
    assert run(settings, "history", "datum://prod-model") == 0
    assert "acc: 0.9 -> 0.95" in capsys.readouterr().out
    assert run(settings, "props", "get", "datum://nope") != 0
