"""`sidecar up` end to end: one command starts a private Redis, the watcher, a Celery worker and the
HTTP server; files written under the root show up in the API only once their version completes.

One server per module (starting it costs a few seconds); every scenario uses its own execution
folder and dataset names, so the tests do not depend on each other's order. The last test stops
the server and checks that it exits 0 and leaves no process behind; the fixture stops it anyway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e_helpers import (
    clean_env,
    descendants,
    free_port,
    kill_group,
    still_running,
    stop_group,
    wait_until,
)
from worker.keys import Keys
from worker.staging import Staging
from worker.up import BULK_NICE
from worker.uris import Target
from worker.webhooks import sign

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SECRET = "e2e-webhook-secret"
STARTUP_TIMEOUT = 90.0
DEADLINE = 30.0


class Up:
    """A running `sidecar up` and ways to talk to it."""

    def __init__(self, base: Path, env: dict[str, str] | None = None) -> None:
        self.root = base / "root"
        self.data_dir = base / "data"
        self.root.mkdir()
        self.port = free_port()
        self.log_path = base / "up.log"
        self.env = clean_env(
            {
                "SIDECAR_WEBHOOK_SECRET": SECRET,
                "SIDECAR_RESCAN_INTERVAL": "1",
                "SIDECAR_SWEEP_AFTER": "1",
                **(env or {}),
            }
        )
        self.prefix = self.env.get("SIDECAR_REDIS_PREFIX", "sidecar")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "up",
                "--root",
                str(self.root),
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
            ],
            env=self.env,
            cwd=base,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self.redis_url = ""
        self.returncode: int | None = None
        self.processes: dict[int, str] = {}

    def wait_ready(self) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"sidecar up exited with {self.proc.returncode}:\n{self.log()}"
            try:
                return bool(self.http.get("/healthz").json() == {"status": "ok"})
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=STARTUP_TIMEOUT, interval=0.2, what="GET /healthz")
        self.redis_url = (self.data_dir / "redis.url").read_text().strip()
        self.staging = Staging(redis.Redis.from_url(self.redis_url), Keys(self.prefix))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> int:
        """SIGTERM, wait (kill the group on timeout); remember what was running just before."""
        if self.returncode is None:
            self.processes = descendants(self.proc.pid)
            if hasattr(self, "staging"):
                self.staging.redis.close()
            self.http.close()
            self.returncode = stop_group(self.proc)
            self._log.close()
        return self.returncode

    # -- talking to it ---------------------------------------------------------------------

    def post_event(
        self,
        payload: Any = None,
        *,
        body: bytes | None = None,
        signed: bool = True,
        ts: int | None = None,
        signature: str | None = None,
    ) -> httpx.Response:
        data = body if body is not None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if signed:
            ts = int(time.time()) if ts is None else ts
            headers["X-Sidecar-Timestamp"] = str(ts)
            headers["X-Sidecar-Signature"] = signature or sign(SECRET, ts, data)
        return self.http.post("/webhooks/events", content=data, headers=headers)

    def version_created(self, dataset: str, version: str) -> httpx.Response:
        return self.post_event(
            {
                "type": "dataset_version_created",
                "data": {
                    "dataset": {"name": dataset},
                    "version": {"name": version, "uri": f"dataset://{dataset}/{version}"},
                },
            }
        )

    def versions(self, dataset: str, version: str) -> dict[str, Any]:
        response = self.http.get("/api/v0/dataset-versions/", params={"dataset": dataset, "name": version})
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        assert set(page) == {"count", "count_exact", "next", "previous", "results"}
        return page

    def version(self, dataset: str, version: str) -> dict[str, Any] | None:
        page = self.versions(dataset, version)
        return page["results"][0] if page["count"] else None

    def assert_nothing_visible(self, dataset: str, version: str) -> None:
        """Before completion no property of the version (nor of its dataset) may show. The version
        itself may be listed, as "building" and empty, once a first line for it was staged."""
        page = self.versions(dataset, version)
        if page["count"]:
            found = page["results"][0]
            assert (found["status"], found["properties"], found["files"]) == ("building", {}, []), found
        assert (self.dataset(dataset) or {}).get("properties", {}) == {}

    def dataset(self, name: str) -> dict[str, Any] | None:
        response = self.http.get("/api/v0/datasets/", params={"name": name})
        assert response.status_code == 200, response.text
        page = response.json()
        return page["results"][0] if page["count"] else None

    def staged(self, target: Target) -> int:
        """How many entries are staged (not yet applied and trimmed) for a target."""
        return int(self.staging.redis.xlen(self.staging.keys.stream(target)))

    def checkpoint_line(self, execution: str) -> int:
        """The number of lines the watcher has consumed from an execution's file (0 if none)."""
        raw = self.staging.load_state(f"{execution}/valohai.metadata.jsonl")
        return int(json.loads(raw)["line"]) if raw else 0

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def execution(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir()
        return folder / "valohai.metadata.jsonl"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    server = Up(tmp_path_factory.mktemp("up"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        kill_group(server.proc)  # a no-op after a clean stop; a backstop for leaked children


def without_datums(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A version's files as they were before each carried its datum object (checked elsewhere)."""
    for f in files:
        assert f["datum"]["name"] == f["path"] and f["datum"]["output_execution"] == {"id": f["execution"]}
    return [{k: v for k, v in f.items() if k != "datum"} for f in files]


def wait_version(up: Up, dataset: str, version: str, check: Any) -> dict[str, Any]:
    """Poll the API until the version exists and `check(version_json)` passes (it may assert)."""

    def ready() -> dict[str, Any] | None:
        found = up.version(dataset, version)
        if found is None:
            return None
        check(found)
        return found

    return wait_until(ready, timeout=DEADLINE, what=f"dataset://{dataset}/{version} as expected")


# -- 1 and 2: the reference example, completion by webhook, then a late append ---------------


def test_start_up_is_one_line_per_part_without_celery_banners(up: Up) -> None:
    """A person reads the log of `sidecar up`: no Celery banner, no root SecurityWarning (CI runs
    as root), one line per worker saying it is ready with its pool, concurrency and queues: one
    worker takes both queues, the other the apply queue alone (late lines never wait for a bulk
    load's batches)."""
    wait_until(lambda: up.log().count("ready: pool") == 2, what="the workers' ready lines")
    log = up.log()
    assert "SecurityWarning" not in log and "superuser privileges" not in log
    assert "-------------- [queues]" not in log and "[tasks]" not in log
    readies = [line for line in log.splitlines() if "ready: pool" in line]
    (both,) = [line for line in readies if "apply-bulk" in line]
    (alone,) = [line for line in readies if "apply-bulk" not in line]
    assert "pool threads, concurrency 2" in both and "broker redis" in both and "**" not in both
    assert re.search(r"queues \S+\.apply and \S+\.apply-bulk,", both)
    assert re.search(r"concurrency 1, queues \S+\.apply, broker redis", alone)
    # The bulk worker runs at a lower CPU priority than the rest (the watcher, the server, the
    # apply-queue worker), which a bulk load must not starve.
    nice = {
        cmd: os.getpriority(os.PRIO_PROCESS, pid)
        for pid, cmd in descendants(up.proc.pid).items()
        if "worker.cli" in cmd
    }
    workers = {cmd: n for cmd, n in nice.items() if "worker.cli worker" in cmd}
    assert sorted(workers.values()) == [0, BULK_NICE], nice
    assert [n for cmd, n in workers.items() if "--queues apply" in cmd] == [0], nice
    assert all(n == 0 for cmd, n in nice.items() if "worker.cli worker" not in cmd), nice


def test_reference_example_is_applied_on_completion_and_late_lines_follow(up: Up) -> None:
    dataset_metadata = {
        "dataset://e2e-ref": {
            "domain": "manufacturing",
            "machine": "press-04",
            "material": "stainless-steel-304",
            "project_owner": "alice@example.com",
        }
    }
    dataset_version_metadata = {
        "dataset://e2e-ref/v1": {
            "capture_date": "2026-01-15",
            "sample_count": 4700,
            "preprocessing_version": "3.2",
            "shift": "night",
            "defect_rate": 0.002,
        }
    }
    metadata_path = up.execution("exec-ref")
    # Exactly as the reference page writes it.
    with open(metadata_path, "w") as outfile:
        for dataset_name, ds_metadata in dataset_metadata.items():
            json.dump({"dataset": dataset_name, "metadata": ds_metadata}, outfile)
            outfile.write("\n")
        for dataset_version_name, dsv_metadata in dataset_version_metadata.items():
            json.dump({"dataset-version": dataset_version_name, "metadata": dsv_metadata}, outfile)
            outfile.write("\n")

    # Staged, but not visible: the version has not completed.
    v1 = Target("version", "e2e-ref", "v1")
    wait_until(lambda: up.staged(v1) == 1 and up.staged(v1.dataset_target) == 1, what="both lines staged")
    up.assert_nothing_visible("e2e-ref", "v1")

    response = up.version_created("e2e-ref", "v1")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"
    assert set(response.json()["due"]) == {"dataset://e2e-ref/v1", "dataset://e2e-ref"}

    expected = dataset_version_metadata["dataset://e2e-ref/v1"]

    def completed(v: dict[str, Any]) -> None:
        assert v["status"] == "completed" and v["properties"] == expected, v

    found = wait_version(up, "e2e-ref", "v1", completed)
    assert found["uri"] == "dataset://e2e-ref/v1" and found["files"] == []
    wait_until(
        lambda: (up.dataset("e2e-ref") or {}).get("properties") == dataset_metadata["dataset://e2e-ref"],
        timeout=DEADLINE,
        what="dataset properties",
    )

    # 2. A late append after completion: one key changed, one deleted with null.
    with open(metadata_path, "a") as outfile:
        late_meta = {"sample_count": 4800, "shift": None}
        json.dump({"dataset-version": "dataset://e2e-ref/v1", "metadata": late_meta}, outfile)
        outfile.write("\n")
    later = {k: v for k, v in expected.items() if k != "shift"} | {"sample_count": 4800}

    def late(v: dict[str, Any]) -> None:
        assert v["properties"] == later, v
        assert "shift" not in v["properties"]

    wait_version(up, "e2e-ref", "v1", late)

    # A late dataset line is applied once its execution completes (datasets never complete
    # themselves; a running execution may still be writing to them).
    with open(metadata_path, "a") as outfile:
        late_dataset = {"dataset": "dataset://e2e-ref", "metadata": {"machine": "press-05", "material": None}}
        json.dump(late_dataset, outfile)
        outfile.write("\n")
    wait_until(lambda: up.checkpoint_line("exec-ref") == 4, what="late dataset line staged")
    response = up.post_event({"type": "execution_completed", "data": {"valohai.execution-id": "exec-ref"}})
    assert response.status_code == 202, response.text
    dataset_after = {"domain": "manufacturing", "machine": "press-05", "project_owner": "alice@example.com"}
    wait_until(
        lambda: (up.dataset("e2e-ref") or {}).get("properties") == dataset_after,
        timeout=DEADLINE,
        what="late dataset line applied",
    )


# -- 3: valohai-utils style: datum lines, whole-file rewrite, last line without newline ---------


def test_rewritten_datum_file_and_execution_completed(up: Up) -> None:
    path = up.execution("exec-vu")
    uri = "dataset://e2e-vu/v1"
    first = {"quality": "raw", "valohai.tags": ["x"], "valohai.dataset-versions": [uri]}
    path.write_text(json.dumps({"file": "a.csv", "metadata": first}) + "\n")
    wait_until(lambda: up.checkpoint_line("exec-vu") == 1, what="first write staged")

    # valohai-utils rewrites the whole file with Path.write_text (truncate + write, same inode).
    inode = path.stat().st_ino
    a_meta = {"quality": "clean", "valohai.tags": ["x", "y"], "valohai.dataset-versions": [uri]}
    b_meta = {"rows": 10, "valohai.dataset-versions": [{"uri": uri}]}
    lines = [
        json.dumps({"file": "a.csv", "metadata": a_meta}),
        json.dumps({"file": "sub/b.csv", "metadata": b_meta}),
    ]
    path.write_text("\n".join(lines))  # the last line has no trailing newline
    assert path.stat().st_ino == inode
    up.assert_nothing_visible("e2e-vu", "v1")

    response = up.post_event(
        {
            "type": "execution_completed",
            "data": {"valohai.execution-id": "exec-vu", "valohai.execution-status": "complete"},
        }
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"

    expected_files = [
        {"execution": "exec-vu", "path": "a.csv", "properties": a_meta},
        {"execution": "exec-vu", "path": "sub/b.csv", "properties": b_meta},
    ]

    def complete(v: dict[str, Any]) -> None:
        assert v["status"] == "completed", v
        assert without_datums(v["files"]) == expected_files, v["files"]

    found = wait_version(up, "e2e-vu", "v1", complete)
    assert found["properties"] == {}
    # The newline-less last line was consumed too: the checkpoint covers both lines.
    wait_until(lambda: up.checkpoint_line("exec-vu") == 2, what="last line without newline flushed")


def test_lone_unterminated_datum_line_completes_its_version_on_execution_completed(up: Up) -> None:
    """The only line has no newline: it is held until the execution completes, then flushed; the
    version it names completes although nothing was staged for it when the event came."""
    path = up.execution("exec-lone")
    meta = {"score": 0.5, "valohai.dataset-versions": ["dataset://e2e-lone/v1"]}
    path.write_text(json.dumps({"file": "model.pkl", "metadata": meta}))
    wait_until(
        lambda: up.staging.load_state("exec-lone/valohai.metadata.jsonl") is not None,
        what="file seen by the watcher",
    )
    assert up.checkpoint_line("exec-lone") == 0  # held: no newline yet
    up.assert_nothing_visible("e2e-lone", "v1")
    response = up.post_event({"type": "execution_completed", "data": {"valohai.execution-id": "exec-lone"}})
    assert response.status_code == 202, response.text

    def complete(v: dict[str, Any]) -> None:
        assert v["status"] == "completed", v
        assert without_datums(v["files"]) == [
            {"execution": "exec-lone", "path": "model.pkl", "properties": meta}
        ], v

    wait_version(up, "e2e-lone", "v1", complete)


# -- 4: bad lines are rejected with line and byte offset; good lines around them still land ---


def test_bad_lines_are_listed_by_sidecar_rejects(up: Up) -> None:
    path = up.execution("exec-bad")
    rel = "exec-bad/valohai.metadata.jsonl"
    raw_lines = [
        json.dumps({"dataset-version": "dataset://e2e-bad/v1", "metadata": {"good": 1}}),
        "this is { not json",
        json.dumps({"dataset-version": "dataset://e2e-bad/v1", "metadata": ["a", "list"]}),
        json.dumps({"dataset-version": "dataset://e2e-bad/has space", "metadata": {"x": 1}}),
        json.dumps({"dataset-version": "dataset://e2e-bad/v1", "metadata": {"valohai.last-used": "now"}}),
        json.dumps({"dataset-version": "dataset://e2e-bad/v1", "metadata": {"good2": 2}}),
    ]
    data = "".join(line + "\n" for line in raw_lines).encode()
    path.write_bytes(data)
    offsets = [0]
    for line in raw_lines[:-1]:
        offsets.append(offsets[-1] + len(line.encode()) + 1)

    def listed() -> list[dict[str, Any]]:
        result = up.cli("rejects", "--json")
        assert result.returncode == 0, result.stderr
        mine = [r for r in json.loads(result.stdout) if r["file"] == rel]
        return mine if len(mine) >= 4 else []

    rejects = sorted(wait_until(listed, timeout=DEADLINE, what="four rejects"), key=lambda r: r["line"])
    assert [(r["line"], r["offset"]) for r in rejects] == [(n, offsets[n - 1]) for n in (2, 3, 4, 5)]
    assert all(r["reason"] and r["execution"] == "exec-bad" for r in rejects)
    assert "not JSON" in rejects[0]["reason"]
    assert "has space" in rejects[2]["reason"]
    assert "valohai." in rejects[3]["reason"]
    # A reject never carries the line's content.
    assert all("this is { not json" not in json.dumps(r) for r in rejects)

    v1 = Target("version", "e2e-bad", "v1")
    wait_until(lambda: up.staged(v1) == 2, what="both good lines staged")
    assert up.version_created("e2e-bad", "v1").status_code == 202

    def good(v: dict[str, Any]) -> None:
        assert v["status"] == "completed" and v["properties"] == {"good": 1, "good2": 2}, v

    wait_version(up, "e2e-bad", "v1", good)


# -- 5: webhook authentication and input checks ----------------------------------------------


def test_webhook_auth_and_bad_input(up: Up) -> None:
    payload = {
        "type": "dataset_version_created",
        "data": {"dataset": {"name": "e2e-auth"}, "version": {"name": "v1", "uri": "dataset://e2e-auth/v1"}},
    }
    body = json.dumps(payload).encode()
    now = int(time.time())

    unsigned = up.post_event(payload, signed=False)
    assert unsigned.status_code == 401, unsigned.text
    assert unsigned.json()["error"] == "unauthorized"
    wrong = up.post_event(payload, signature=sign("not-the-secret", now, body))
    assert wrong.status_code == 401, wrong.text
    tampered = up.post_event(body=body.replace(b"v1", b"v2"), signature=sign(SECRET, now, body), ts=now)
    assert tampered.status_code == 401, tampered.text
    stale_ts = now - 3600
    stale = up.post_event(payload, ts=stale_ts)  # correctly signed, but an hour old
    assert stale.status_code == 401, stale.text
    future = up.post_event(payload, ts=now + 3600)
    assert future.status_code == 401, future.text

    malformed = up.post_event(body=b'{"type": "dataset_version_created", ')
    assert malformed.status_code == 400, malformed.text
    assert malformed.json()["error"] == "bad_request"
    no_id = up.post_event({"type": "execution_completed", "data": {}})
    assert no_id.status_code == 400, no_id.text
    traversal = up.post_event({"type": "execution_completed", "data": {"valohai.execution-id": "../x"}})
    assert traversal.status_code == 400, traversal.text
    unknown = up.post_event({"type": "pipeline_completed", "data": {}})
    assert unknown.status_code == 202, unknown.text
    assert unknown.json() == {"status": "ignored", "type": "pipeline_completed"}

    # None of the refused requests completed anything.
    staging = up.staging
    assert not staging.is_done(Target("version", "e2e-auth", "v1"))
    assert not staging.is_done(Target("version", "e2e-auth", "v2"))


# -- 6: `sidecar complete` from the shell ----------------------------------------------------


def test_sidecar_complete_cli(up: Up) -> None:
    path = up.execution("exec-cli")
    line = {"dataset-version": "dataset://e2e-cli/v7", "metadata": {"source": "cli"}}
    path.write_text(json.dumps(line) + "\n")
    v7 = Target("version", "e2e-cli", "v7")
    wait_until(lambda: up.staged(v7) == 1, what="line staged")
    up.assert_nothing_visible("e2e-cli", "v7")

    result = up.cli("complete", "dataset://e2e-cli/v7")
    assert result.returncode == 0, result.stderr
    assert "dataset://e2e-cli/v7" in result.stdout

    def done(v: dict[str, Any]) -> None:
        assert v["status"] == "completed" and v["properties"] == {"source": "cli"}, v

    wait_version(up, "e2e-cli", "v7", done)

    bad = up.cli("complete", "dataset://e2e-cli")
    assert bad.returncode == 1 and "bad dataset URI" in bad.stderr


# -- membership: from, exclude, aliases, and a late line that may not change a version --------


def file_names(version: dict[str, Any]) -> dict[str, str]:
    """A version's files as {name: execution}, whichever shape the API gives its files."""
    out = {}
    for f in version["files"]:
        datum = f.get("datum", f)
        name = datum.get("name", datum.get("path"))
        execution = (
            datum.get("output_execution", {}).get("id") if "output_execution" in datum else f["execution"]
        )
        out[name] = execution
    return out


def completed(up: Up, execution: str) -> None:
    response = up.post_event({"type": "execution_completed", "data": {"valohai.execution-id": execution}})
    assert response.status_code == 202, response.text


def test_incremental_versions_with_aliases_through_sidecar_up(up: Up) -> None:
    # Run 1 writes per-output `<file>.metadata.json` next to its outputs, rewriting one whole.
    first = up.root / "exec-m1"
    first.mkdir()
    item = {"uri": "dataset://e2e-m/v1", "from": None, "targeting_aliases": ["production"]}
    for name in ("a.csv", "b.csv"):
        (first / name).write_text("x,y\n1,2\n")
        (first / f"{name}.metadata.json").write_text(
            json.dumps({"rows": 1, "valohai.dataset-versions": [item]})
        )
    wait_until(lambda: up.staging.load_state("exec-m1/b.csv.metadata.json"), what="outputs' metadata staged")
    (first / "a.csv.metadata.json").write_text(
        json.dumps({"rows": 2, "valohai.dataset-versions": [item]}, indent=2)
    )
    time.sleep(0.5)  # the rewrite is read (or not yet: then at the next scan, as a late line of a builder)
    completed(up, "exec-m1")
    wait_version(up, "e2e-m", "v1", lambda v: file_names(v) == {"a.csv": "exec-m1", "b.csv": "exec-m1"})

    # Run 2 builds on the alias, drops a.csv, adds c.csv and a marker, and takes the alias.
    item2 = {
        "uri": "dataset://e2e-m/v2",
        "from": "dataset://e2e-m/production",
        "exclude": ["a.csv"],
        "targeting_aliases": ["production"],
    }
    lines = [{"file": n, "metadata": {"valohai.dataset-versions": [item2]}} for n in ("c.csv", "_marker")]
    up.execution("exec-m2").write_text("".join(json.dumps(line) + "\n" for line in lines))
    wait_until(lambda: up.checkpoint_line("exec-m2") == 2, what="run 2 staged")
    completed(up, "exec-m2")
    expected = {"b.csv": "exec-m1", "c.csv": "exec-m2", "_marker": "exec-m2"}

    def built(v: dict[str, Any]) -> None:
        assert v["status"] == "completed" and file_names(v) == expected, v

    v2 = wait_version(up, "e2e-m", "v2", built)
    resolved = up.http.get("/api/v0/dataset-versions/resolve/", params={"uri": "dataset://e2e-m/production"})
    assert resolved.status_code == 200 and resolved.json()["id"] == v2["id"], resolved.text
    got = up.cli("props", "get", "dataset://e2e-m/production")
    assert got.returncode == 0 and "valohai.last-used" in json.loads(got.stdout), got.stderr

    # Run 3 had no file in v2 when it completed: its line naming v2 is refused, v2 stays as it was.
    late = {"file": "late.csv", "metadata": {"valohai.dataset-versions": ["dataset://e2e-m/v2"]}}
    up.execution("exec-m3").write_text(json.dumps(late) + "\n")

    def refused() -> list[dict[str, Any]]:
        result = up.cli("rejects", "--json")
        assert result.returncode == 0, result.stderr
        return [r for r in json.loads(result.stdout) if r["execution"] == "exec-m3"]

    (reject,) = wait_until(refused, timeout=DEADLINE, what="the late member refused")
    assert "cannot change" in reject["reason"] and reject["file"] == "exec-m3/valohai.metadata.jsonl"
    assert file_names(up.version("e2e-m", "v2") or {}) == expected


# -- last: a clean stop ------------------------------------------------------------------------


def test_stop_is_clean(up: Up) -> None:
    redis_url = up.redis_url
    code = up.stop()
    assert code == 0, up.log()
    parts = {cmd.split()[3] for cmd in up.processes.values() if "worker.cli" in cmd}
    assert {"worker", "watch", "serve"} <= parts, up.processes
    assert any("redis-server" in cmd for cmd in up.processes.values()), up.processes

    # Every process it started (Redis, the worker and its pool, the watcher, the server) is gone.
    def all_gone() -> bool:
        left = still_running(up.processes)
        assert not left, f"still running: {left}"
        return True

    wait_until(all_gone, timeout=10, what="no leftover processes")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    assert not (up.data_dir / "redis.url").exists()


def test_a_signal_to_the_whole_group_stops_redis_last(tmp_path: Path) -> None:
    """Ctrl-C or `timeout` signal every process of the group at once. The private Redis is in a
    session of its own, so it keeps serving the watcher and the worker while they finish, and
    `sidecar up` stops it after them."""
    up = Up(tmp_path)
    processes: dict[int, str] = {}
    try:
        up.wait_ready()
        processes = descendants(up.proc.pid)
        _signal_the_group(up, processes)
    finally:
        up.stop()
        kill_group(up.proc)
        for pid in still_running(processes):  # Redis is not in the group kill_group kills
            os.kill(pid, signal.SIGKILL)


def _signal_the_group(up: Up, processes: dict[int, str]) -> None:
    redis_pids = [pid for pid, cmd in processes.items() if "redis-server" in cmd]
    assert redis_pids, processes
    assert os.getpgid(redis_pids[0]) != os.getpgid(up.proc.pid)
    up.staging.redis.close()
    os.killpg(up.proc.pid, signal.SIGTERM)
    assert up.proc.wait(timeout=45) == 0, up.log()
    assert "Connection refused" not in up.log(), up.log()
    wait_until(lambda: not still_running(processes), timeout=10, what="no leftover processes")
