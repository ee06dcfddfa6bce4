"""Metrics: one /metrics under `sidecar up` shows every part's series; promtool accepts the text.

The e2e test runs a real `sidecar up` (its watcher, worker and API are separate processes), writes
N lines, completes their version through the webhook, and reads N from the API port: the
watcher's `sidecar_lines_ingested_total` and the worker's `sidecar_entries_applied_total`, each
one summed series, and the backlog gauges once. `promtool check metrics` (Debian's `prometheus`
package; .ci/run installs it) must pass on the output; locally a missing promtool skips that
test with the reason, in CI it fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.conftest import IN_CI
from tests.e2e_helpers import wait_until
from tests.test_e2e_up import Up
from worker import metrics
from worker.api import create_app
from worker.staging import Staging

N = 37
DEADLINE = 60.0


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "no promtool on PATH (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"promtool is required in CI: {message}")
        pytest.skip(message)
    return found


def _promtool_check(text: str) -> None:
    result = subprocess.run(
        [_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), f"promtool: {result.stdout}{result.stderr}"


def samples(text: str, name: str) -> dict[str, float]:
    """Every sample of the metric `name` (labels text -> value), from the Prometheus text format."""
    found: dict[str, float] = {}
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        found[match.group(1) or ""] = float(match.group(2))
    return found


# -- standalone: one process, its own registry --------------------------------------------------


@pytest.mark.redis
def test_a_standalone_server_shows_its_own_registry_and_promtool_accepts_it(
    engine: Engine, staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert metrics.scrape_registry() is prometheus_client.REGISTRY
    client = TestClient(create_app(engine, staging, lambda _key: None))
    text = client.get("/metrics").text
    assert samples(text, "sidecar_backlog_due_targets") == {"": 0.0}
    assert "process_cpu_seconds_total" in text  # the default registry's own collectors
    _promtool_check(text)


# -- `sidecar up`: every process's series on the API port -------------------------------------


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    stale = tmp_path / "data" / "metrics"
    stale.mkdir(parents=True)
    # A file left by an earlier run (not even a valid one): `up` must start from an empty folder.
    (stale / "counter_1.db").write_bytes(b"left over from an earlier run")
    server = Up(tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.redis
def test_sidecar_up_metrics_show_the_watcher_and_the_worker(up: Up, tmp_path: Path) -> None:
    assert not (tmp_path / "data" / "metrics" / "counter_1.db").exists()
    path = up.root / "exec-metrics" / "valohai.metadata.jsonl"
    path.parent.mkdir()
    uri = "dataset://metrics/v1"
    with open(path, "w") as f:
        for i in range(N):
            f.write(json.dumps({"dataset-version": uri, "metadata": {f"k{i}": i}}) + "\n")

    def scrape() -> str:
        response = up.http.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

    wait_until(
        lambda: samples(scrape(), "sidecar_lines_ingested_total") == {"": N},
        timeout=DEADLINE,
        what=f"{N} lines ingested, seen on the API port (log:\n{up.log()[-3000:]})",
    )
    assert up.version_created("metrics", "v1").status_code == 202
    wait_until(
        lambda: samples(scrape(), "sidecar_entries_applied_total") == {"": N},
        timeout=DEADLINE,
        what=f"{N} entries applied, seen on the API port (log:\n{up.log()[-3000:]})",
    )
    text = scrape()
    assert samples(text, "sidecar_entries_staged_total") == {"": N}
    assert samples(text, "sidecar_applies_total").get('{outcome="applied"}', 0) >= 1
    assert samples(text, "sidecar_apply_duration_seconds_count")[""] >= 1
    assert samples(text, "sidecar_webhook_requests_total") == {'{outcome="accepted"}': 1.0}
    # The backlog is read from Redis by the scraped process only: one series each, not one per part.
    for gauge in ("sidecar_backlog_due_targets", "sidecar_backlog_oldest_due_seconds"):
        assert len(samples(text, gauge)) == 1
    assert text.count("# TYPE sidecar_backlog_due_targets ") == 1
    _promtool_check(text)
