"""Operating it: /readyz, /metrics, `sidecar status`, JSON logs, the deployment files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.helpers import outcome
from worker.api import create_app
from worker.cli import JsonFormatter, main
from worker.settings import Settings
from worker.staging import Staging
from worker.status import collect
from worker.uris import Target

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.redis
def test_readyz_names_what_fails(engine: Engine, staging: Staging) -> None:
    with TestClient(create_app(engine, staging, lambda key: None, watcher_max_age=60)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"] == {
            "redis": "ok",
            "database": "ok",
            "watcher": "failing: no watcher has reported",
        }
        staging.beat("watcher", "host:1", {"last_scan_age": 500.0}, ttl=30)
        assert "last full scan 500 s ago" in client.get("/readyz").json()["checks"]["watcher"]
        staging.beat("watcher", "host:1", {"last_scan_age": 1.0}, ttl=30)
        assert client.get("/readyz").status_code == 200


@pytest.mark.redis
def test_metrics_endpoint(engine: Engine, staging: Staging) -> None:
    with TestClient(create_app(engine, staging, lambda key: None)) as client:
        client.post("/webhooks/events", content=b"{not json", headers={"Content-Type": "application/json"})
        staging.complete_version(Target("version", "press", "v1"))
        text = client.get("/metrics").text
    assert 'sidecar_webhook_requests_total{outcome="bad_request"}' in text
    assert "sidecar_backlog_due_targets 2.0" in text
    assert "sidecar_apply_duration_seconds_bucket" in text


@pytest.mark.redis
def test_status_reports_backlog_and_stuck_applies(staging: Staging) -> None:
    raw = b'{"dataset-version": "dataset://press/v2", "metadata": {"a": 1}}'
    staging.stage_lines("e/valohai.metadata.jsonl", "e", [outcome(raw)], "s")
    staging.complete_version(Target("version", "press", "v1"))
    report = collect(staging, stuck_after=300)
    assert report["building"] == [{"uri": "dataset://press/v2", "staged": 1}]
    assert report["completed_unapplied"] == ["dataset://press/v1"]
    assert report["problems"] == ["entries wait for an apply and no worker is alive"]
    staging.beat("worker", "w1", {}, ttl=30)
    assert collect(staging, stuck_after=300)["problems"] == []
    assert "waited" in collect(staging, stuck_after=-1)["problems"][0]


@pytest.mark.redis
def test_status_command_exit_code(
    settings: Settings, staging: Staging, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    argv = ["status", "--redis-url", settings.effective_redis_url(), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["due_targets"] == 0
    staging.complete_version(Target("version", "press", "v1"))
    assert main(argv) == 1  # due, and no worker alive
    assert "no worker is alive" in capsys.readouterr().out


def test_json_log_lines() -> None:
    record = logging.LogRecord(
        "worker.ingest", logging.WARNING, __file__, 1, "rejected %s: %s", ("f:3", "bad"), None
    )
    line = json.loads(JsonFormatter().format(record))
    assert (
        line["level"] == "WARNING"
        and line["message"] == "rejected f:3: bad"
        and line["logger"] == "worker.ingest"
    )


def test_compose_file_follows_the_compose_specification() -> None:
    import importlib.resources

    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, schema)
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    # The same commands as the Procfile (compose adds the container's host and port).
    assert compose["services"]["worker"]["command"][:2] == procfile["worker"].split()[1:3]
    assert compose["services"]["api"]["command"][:2] == procfile["web"].split()[1:3]
    assert compose["services"]["watcher"]["command"][0] == procfile["watcher"].split()[1]
    redis_command = compose["services"]["redis"]["command"]
    assert "--appendonly" in redis_command and "noeviction" in redis_command
    assert "/readyz" in json.dumps(compose["services"]["api"]["healthcheck"])
