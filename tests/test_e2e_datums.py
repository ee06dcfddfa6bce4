"""Datums end to end through `sidecar up`: files and their metadata written as real scripts write
them, an `execution_completed` event, then `/api/v0/data/` with sizes and checksums read from the
files by the real worker, the alias, and `sidecar props get datum://<alias>`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_helpers import kill_group, wait_until
from tests.test_e2e_up import Up

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    server = Up(tmp_path_factory.mktemp("up-datums"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        kill_group(server.proc)


def test_datums_with_checksums_and_alias(up: Up, tmp_path: Path) -> None:
    folder = up.root / "exec-d1"
    (folder / "data").mkdir(parents=True)
    model = os.urandom(2 * 1024 * 1024 + 4321)  # more than two read chunks
    rows = b"a,b\n1,2\n3,4\n"
    (folder / "model.bin").write_bytes(model)
    (folder / "data" / "rows.csv").write_bytes(rows)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not for the sidecar")
    (folder / "leak.txt").symlink_to(outside)
    # The per-output file, written whole, then rewritten whole (Path.write_text: truncate, write).
    sidecar = folder / "model.bin.metadata.json"
    sidecar.write_text(json.dumps({"stage": "draft"}))
    sidecar.write_text(json.dumps({"stage": "final", "valohai.alias": "e2e-model", "valohai.tags": ["best"]}))
    lines = [
        {"file": "data/rows.csv", "metadata": {"rows": 2, "valohai.tags": ["csv"]}},
        {"file": "leak.txt", "metadata": {"note": "a link out of the root"}},
    ]
    (folder / "valohai.metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    wait_until(lambda: up.checkpoint_line("exec-d1") == 2, timeout=30, what="the lines staged")
    answer = up.post_event({"type": "execution_completed", "data": {"valohai.execution-id": "exec-d1"}})
    assert answer.status_code == 202, answer.text

    def checked() -> dict[str, Any] | None:
        page = up.http.get("/api/v0/data/", params={"output_execution": "exec-d1", "ordering": "name"}).json()
        found = {d["name"]: d for d in page["results"]}
        ready = set(found) == {"data/rows.csv", "leak.txt", "model.bin"} and all(
            found[name]["sha256"] for name in ("data/rows.csv", "model.bin")
        )
        return found if ready else None

    found = wait_until(checked, timeout=60, interval=0.3, what="datums with checksums")
    for name, data in (("model.bin", model), ("data/rows.csv", rows)):
        datum = found[name]
        assert datum["size"] == len(data)
        assert datum["md5"] == hashlib.md5(data).hexdigest()
        assert datum["sha1"] == hashlib.sha1(data).hexdigest()
        assert datum["sha256"] == hashlib.sha256(data).hexdigest()
    leak = found["leak.txt"]
    assert (leak["size"], leak["md5"], leak["sha256"]) == (None, None, None)
    assert found["model.bin"]["properties"] == {"stage": "final"}
    assert found["model.bin"]["tags"] == ["best"] and found["model.bin"]["alias"] == "e2e-model"
    assert found["data/rows.csv"]["tags"] == ["csv"]

    resolved = up.http.get("/api/v0/datum-aliases/resolve/", params={"name": "e2e-model"})
    assert resolved.status_code == 200 and resolved.json()["datum"]["id"] == found["model.bin"]["id"]
    got = up.cli("props", "get", "datum://e2e-model")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["stage"] == "final"
    page = up.http.get("/data/" + found["model.bin"]["id"] + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
