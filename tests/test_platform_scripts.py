"""A script written against the platform, run as users run it, against a real `sidecar up`.

It is the incremental-update flow people run today (the platform's public dataset-update
example works this way; this is our own code of the same flow, not a copy): read the dataset's
`latest_version` through the API, compare each of its files (by `datum.name`, `size` and every
checksum the datum carries) with the local files, write the changed and new ones as outputs with
a per-output `<file>.metadata.json` naming the new version `from` the old one and `exclude`-ing
what changed or went away, upload a marker file when nothing changed, and let the execution
complete. Each new version must then hold exactly what the script meant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e_helpers import kill_group, wait_until
from tests.test_e2e_up import Up

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

DEADLINE = 45.0
MARKER = "dataset-marker.txt"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    server = Up(tmp_path_factory.mktemp("up"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        kill_group(server.proc)


def latest(http: httpx.Client, dataset_id: str) -> dict[str, Any] | None:
    dataset = http.get(f"/api/v0/datasets/{dataset_id}/")
    dataset.raise_for_status()
    info = dataset.json()["latest_version"]
    if info is None:
        return None
    version = http.get(f"/api/v0/dataset-versions/{info['id']}/")
    version.raise_for_status()
    answer: dict[str, Any] = version.json()
    return answer


def changed(local: Path, datum: dict[str, Any]) -> bool:
    if local.stat().st_size != datum["size"]:
        return True
    data = local.read_bytes()
    return any(
        datum.get(name) and getattr(hashlib, name)(data).hexdigest() != datum[name]
        for name in ("md5", "sha1", "sha256")
    )


def run_update(
    up: Up, dataset_id: str, execution: str, content: dict[str, str], new_name: str
) -> dict[str, Any]:
    """One execution of the update script; returns what it decided (for the assertions)."""
    http = up.http
    dataset_name = http.get(f"/api/v0/datasets/{dataset_id}/").json()["name"]
    base = latest(http, dataset_id)
    local_dir = up.root.parent / f"content-{execution}"
    local_dir.mkdir()
    for name, text in content.items():
        (local_dir / name).write_text(text)
    old = {f["datum"]["name"]: f["datum"] for f in (base["files"] if base else [])}
    upload = {n for n in content if n not in old}
    exclude = set()
    for name, datum in old.items():
        if name not in content:
            exclude.add(name)
        elif changed(local_dir / name, datum):
            upload.add(name)
            exclude.add(name)
    outputs = up.root / execution
    outputs.mkdir()
    item = {
        "uri": f"dataset://{dataset_name}/{new_name}",
        "from": f"dataset://{dataset_name}/{base['name']}" if base else None,
        "exclude": sorted(exclude),
    }
    if not upload:
        (local_dir / MARKER).write_text(new_name)
        upload.add(MARKER)
    for name in sorted(upload):
        target = outputs / name
        target.write_bytes((local_dir / name).read_bytes())
        # As the scripts do: the metadata file written whole, next to its output.
        target.with_suffix(f"{target.suffix}.metadata.json").write_text(
            json.dumps({"valohai.dataset-versions": [item]})
        )
    answer = up.post_event({"type": "execution_completed", "data": {"valohai.execution-id": execution}})
    assert answer.status_code == 202, answer.text
    return {"base": base, "upload": upload, "exclude": exclude}


def wait_latest(up: Up, dataset_id: str, name: str, files: int) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def ready() -> bool:
        version = latest(up.http, dataset_id)
        if version is None or version["name"] != name or version["files_count"] != files:
            return False
        if any(f["datum"]["sha256"] is None for f in version["files"]):
            return False  # checksums are read after the execution completed
        found.update(version)
        return True

    wait_until(ready, timeout=DEADLINE, interval=0.2, what=f"latest version {name} with {files} files")
    return found


def test_an_incremental_update_script_builds_each_version_as_it_meant(up: Up) -> None:
    created = up.http.post("/api/v0/datasets/", json={"name": "uds"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]

    first = {"file1.csv": "foofoo", "file2.csv": "barbar", "file3.csv": "foofoo"}
    decided = run_update(up, dataset_id, "uds-1", first, "20260101-000001")
    assert decided["base"] is None and decided["exclude"] == set()
    v1 = wait_latest(up, dataset_id, "20260101-000001", 3)
    assert v1["previous_version"] is None
    by_name = {f["datum"]["name"]: f["datum"] for f in v1["files"]}
    for name, text in first.items():
        datum = by_name[name]
        data = text.encode()
        assert (datum["size"], datum["md5"], datum["sha1"], datum["sha256"]) == (
            len(data),
            hashlib.md5(data).hexdigest(),
            hashlib.sha1(data).hexdigest(),
            hashlib.sha256(data).hexdigest(),
        )

    # file2 changes, file3 goes away, file4 is new: the script excludes 2 and 3 and uploads 2 and 4.
    second = {"file1.csv": "foofoo", "file2.csv": "bazbaz!", "file4.csv": "quxqux"}
    decided = run_update(up, dataset_id, "uds-2", second, "20260101-000002")
    assert decided["exclude"] == {"file2.csv", "file3.csv"} and decided["upload"] == {
        "file2.csv",
        "file4.csv",
    }
    v2 = wait_latest(up, dataset_id, "20260101-000002", 3)
    assert v2["previous_version"] == v1["id"]
    files = {f["datum"]["name"]: f for f in v2["files"]}
    assert sorted(files) == ["file1.csv", "file2.csv", "file4.csv"]
    assert files["file1.csv"]["datum"]["id"] == by_name["file1.csv"]["id"]  # carried over, not copied
    assert files["file2.csv"]["execution"] == "uds-2"
    assert files["file2.csv"]["datum"]["sha256"] == hashlib.sha256(b"bazbaz!").hexdigest()

    # Nothing changed: only a marker is uploaded, so the version exists, with every file carried.
    decided = run_update(up, dataset_id, "uds-3", second, "20260101-000003")
    assert decided["exclude"] == set() and decided["upload"] == {MARKER}
    v3 = wait_latest(up, dataset_id, "20260101-000003", 4)
    assert sorted(f["datum"]["name"] for f in v3["files"]) == [MARKER, "file1.csv", "file2.csv", "file4.csv"]
    assert v3["previous_version"] == v2["id"]

    # The execution's own files, as the platform's clients list them (and the parameters they send).
    listed = up.http.get(
        "/api/v0/data/",
        params={
            "output_execution": "uds-2",
            "ordering": "id",
            "limit": 100,
            "offset": 0,
            "exclude": "output_execution,project",
            "purged": "false",
        },
    )
    assert listed.status_code == 200, listed.text
    assert sorted(d["name"] for d in listed.json()["results"]) == ["file2.csv", "file4.csv"]
    # The old version is immutable: it still holds what it held.
    again = up.http.get(f"/api/v0/dataset-versions/{v1['id']}/").json()
    assert sorted(f["datum"]["name"] for f in again["files"]) == ["file1.csv", "file2.csv", "file3.csv"]
