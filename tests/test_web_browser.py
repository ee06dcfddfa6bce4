"""The web pages in a real browser: Debian's Chromium driven by Playwright, against `sidecar up`.

One `sidecar up` (with the API token on) and one browser per module. Executions write a sidecar
file; `sidecar complete` completes the versions; then the tests search, open, edit (as fields
and as JSON) and check every change through the API with httpx. Chromium is required when
CI=true, skipped otherwise.

Screenshots (the list, a version page, the editor, a phone) are taken on every run, into a temporary
folder; with SIDECAR_UPDATE_SCREENSHOTS=1 into docs/screenshots/ (they hold timestamps, so a plain
test run must not rewrite the committed ones).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e_helpers import clean_env, free_port, kill_group, stop_group, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOKEN = "browser-test-token"
DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DEADLINE = 45.0
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}

DATASET = {"domain": "manufacturing", "machine": "press-04", "material": "stainless-steel-304"}
VERSIONS = {  # name -> properties; sample_count is what the search thresholds
    "2026-01-13": {"capture_date": "2026-01-13", "sample_count": 3100, "shift": "day", "defect_rate": 0.004},
    "2026-01-14": {
        "capture_date": "2026-01-14",
        "sample_count": 4700,
        "shift": "night",
        "defect_rate": 0.002,
    },
    "2026-01-15": {
        "capture_date": "2026-01-15",
        "sample_count": 5200,
        "shift": "night",
        "defect_rate": 0.001,
        "preprocessing_version": "3.2",
        "camera": {"model": "XC-7", "fps": 30},
    },
    "2026-01-16": {"capture_date": "2026-01-16", "sample_count": 2900, "shift": "day", "defect_rate": 0.006},
}
BUILDING = "2026-01-17"  # staged, never completed
FILES = ["images/0001.png", "images/0002.png", "labels.csv"]


def _require_browser() -> None:
    """Skip locally, with the reason, when there is no browser; in CI that is a failure."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem is None and not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    if problem:
        if IN_CI:
            pytest.fail(f"browser tests are required in CI: {problem}")
        pytest.skip(problem)


class Server:
    """A running `sidecar up` with the API token on, and an httpx client that sends it."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.data_dir = base / "data"
        self.root.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "up.log"
        self.env = clean_env({"SIDECAR_API_TOKEN": TOKEN, "SIDECAR_RESCAN_INTERVAL": "1"})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = ["up", "--root", str(self.root), "--data-dir", str(self.data_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *command],
            env=self.env,
            cwd=base,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Token {TOKEN}"})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"sidecar up exited with {self.proc.returncode}:\n{self.log()}"
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=90, interval=0.2, what="GET /healthz")

    def stop(self) -> None:
        self.http.close()
        stop_group(self.proc)
        kill_group(self.proc)  # a no-op after a clean stop; a backstop for leaked children
        self._log.close()

    def complete(self, uri: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "complete", uri, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr

    def get(self, path: str, **params: Any) -> Any:
        answer = self.http.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def version(self, name: str) -> dict[str, Any]:
        (found,) = self.get("/api/v0/dataset-versions/", dataset="press-line", name=name)["results"]
        return dict(found)

    def properties(self, version: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v0/dataset-versions/{self.version(version)['id']}/metadata/"))


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _populate(server: Server) -> None:
    """The reference page's example: a dataset, versions with numeric sample_count, files, one
    version still building; completed with `sidecar complete` and an execution_completed event."""
    for n, (name, props) in enumerate(VERSIONS.items()):
        lines: list[dict[str, Any]] = [{"dataset-version": f"dataset://press-line/{name}", "metadata": props}]
        if n == 0:
            lines.insert(0, {"dataset": "dataset://press-line", "metadata": DATASET})
        if name == "2026-01-15":
            uri = f"dataset://press-line/{name}"
            lines += [
                {"file": f, "metadata": {"camera": "top", "valohai.dataset-versions": [uri]}} for f in FILES
            ]
        _write(server.root / f"exec-{name}" / "valohai.metadata.jsonl", lines)
    building = {"dataset-version": f"dataset://press-line/{BUILDING}", "metadata": {"sample_count": 4100}}
    _write(server.root / f"exec-{BUILDING}" / "valohai.metadata.jsonl", [building])
    _write(
        server.root / "exec-paint" / "valohai.metadata.jsonl",
        [
            {"dataset": "dataset://paint-shop", "metadata": {"domain": "manufacturing", "line": "paint-2"}},
            {"dataset-version": "dataset://paint-shop/v1", "metadata": {"sample_count": 800, "shift": "day"}},
        ],
    )

    for name in VERSIONS:
        server.complete(f"dataset://press-line/{name}")
    server.complete("dataset://paint-shop/v1")
    event = {"type": "execution_completed", "data": {"valohai.execution-id": "exec-2026-01-15"}}
    assert server.http.post("/webhooks/events", json=event).status_code == 202

    def ready() -> bool:
        versions = server.get("/api/v0/dataset-versions/", dataset="press-line")["results"]
        by_name = {v["name"]: v for v in versions}
        for name, props in VERSIONS.items():
            found = by_name.get(name)
            assert found and found["status"] == "completed" and found["properties"] == props, found
        assert len(by_name["2026-01-15"]["files"]) == len(FILES), by_name["2026-01-15"]
        assert by_name.get(BUILDING, {}).get("status") == "building", by_name.get(BUILDING)
        (dataset,) = server.get("/api/v0/datasets/", name="press-line")["results"]
        assert dataset["properties"] == DATASET, dataset
        (paint,) = server.get("/api/v0/dataset-versions/", dataset="paint-shop")["results"]
        assert paint["status"] == "completed" and paint["properties"], paint
        return True

    wait_until(ready, timeout=DEADLINE, interval=0.3, what="every version applied")
    # Resolving a version sets the platform-managed `valohai.last-used` on it and its dataset.
    server.get("/api/v0/dataset-versions/resolve/", uri="dataset://press-line/2026-01-15")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _require_browser()
    running = Server(tmp_path_factory.mktemp("web"))
    try:
        running.wait_healthy()
        _populate(running)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: docs/screenshots/ when asked to update them, else a temporary folder."""
    if os.environ.get("SIDECAR_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SHOTS
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    """A fresh tab (so a fresh sessionStorage: the token is asked for again) at 1280×800."""
    context = browser.new_context(viewport=WIDE, base_url=server.url, color_scheme="light")
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield tab
    context.close()
    # The browser logs every 4xx answer; the pages handle those (401 before the token is given,
    # 400 for a bad filter or a refused write). Any other error, or an exception, fails the test.
    handled = ("status of 400", "status of 401", "status of 404")
    assert [e for e in errors if not any(h in e for h in handled)] == []


def login(page: Any, path: str) -> None:
    """Open `path`; the page's first API call answers 401, so it asks for the token once."""
    from playwright.sync_api import expect

    page.goto(path)
    dialog = page.get_by_role("dialog", name="API token")
    expect(dialog).to_be_visible()
    page.get_by_label("Token", exact=True).fill(TOKEN)
    page.get_by_role("button", name="Continue").click()
    expect(dialog).to_be_hidden()


def posts_of(page: Any) -> list[dict[str, Any]]:
    """Every POST body the page sends from now on, parsed."""
    sent: list[dict[str, Any]] = []
    page.on(
        "request", lambda r: sent.append(json.loads(r.post_data or "null")) if r.method == "POST" else None
    )
    return sent


def test_search_versions_by_threshold(page: Any, server: Server) -> None:
    from playwright.sync_api import expect

    login(page, "/dataset-versions/")
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(len(VERSIONS) + 2)  # + the building one and paint-shop/v1

    # A wrong filter: the API's position is shown with a marker, and the input says it is invalid.
    search = page.get_by_label("Filter by properties")
    search.fill("sample_count >= ")
    page.get_by_role("button", name="Search").click()
    error = page.locator("#filter-error")
    expect(error).to_contain_text("filter error at position 15")
    expect(error.locator("pre")).to_have_text("sample_count >= \n               ^ expected a literal")
    expect(search).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#summary")).to_have_text("No results: fix the filter.")

    # A numeric threshold (the building version's staged 4100 is invisible until it completes).
    search.fill("sample_count >= 4000")
    search.press("Enter")
    expect(rows).to_have_count(2)
    assert sorted(rows.locator("th").all_inner_texts()) == ["2026-01-14", "2026-01-15"]
    expect(page.locator("#filter-error")).to_be_hidden()
    assert "filter=sample_count+%3E%3D+4000" in page.url

    # The datasets list takes the same language.
    page.get_by_role("link", name="Datasets", exact=True).click()
    page.get_by_label("Filter by properties").fill('line = "paint-2"')
    page.get_by_label("Filter by properties").press("Enter")
    expect(page.locator("#results tbody th")).to_have_text(["paint-shop"])


def test_facets_refine_the_filter_and_the_filter_box_suggests(page: Any, server: Server, shots: Path) -> None:
    from playwright.sync_api import expect

    login(page, "/dataset-versions/?dataset=press-line")
    shift = page.locator("#facet-list .facet").filter(has=page.locator("h3", has_text="shift"))
    expect(shift).to_be_visible()
    expect(shift.locator("li").filter(has_text="night")).to_contain_text("2")
    page.screenshot(path=str(shots / "versions-facets.png"))
    shift.get_by_role("button", name="night").click()
    expect(page.locator("#filter")).to_have_value('shift = "night"')
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(2)
    # Keys as a key is typed; values after `key =`.
    search = page.get_by_label("Filter by properties")
    search.fill("")
    search.press_sequentially("sam")
    options = page.locator("#suggestions [role=option]")
    expect(options).to_have_text(["sample_count"])
    search.press("ArrowDown")
    search.press("Enter")
    expect(search).to_have_value("sample_count ")
    search.fill("")
    search.press_sequentially("shift = ")
    expect(options.filter(has_text='"night"')).to_have_count(1)


def test_save_a_search_open_it_and_export(page: Any, server: Server, shots: Path) -> None:
    from playwright.sync_api import expect

    login(page, "/dataset-versions/?filter=sample_count+%3E%3D+4000&ordering=-sample_count&col=shift")
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(2)
    page.get_by_label("Save this search as").fill("big night runs")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator("#saved-status")).to_have_text("Saved as “big night runs”.")
    saved = server.http.get("/api/v0/saved-searches/?scope=dataset-versions").json()["results"]
    (made,) = [s for s in saved if s["name"] == "big night runs"]
    assert (made["filter"], made["ordering"], made["columns"]) == (
        "sample_count >= 4000",
        "-sample_count",
        ["shift"],
    )
    # Its own URL opens the list with its filter, ordering and columns.
    page.goto(made["url"])
    expect(rows).to_have_count(2)
    assert "filter=sample_count+%3E%3D+4000" in page.url and "col=shift" in page.url
    expect(page.get_by_role("link", name="big night runs")).to_have_attribute("aria-current", "page")
    page.screenshot(path=str(shots / "versions-saved-search.png"))
    # The export button downloads what the API exports for the same filter.
    with page.expect_download() as download:
        page.get_by_role("button", name="CSV").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert lines[0].endswith(",shift") and len(lines) == 3
    page.get_by_role("button", name="Delete the saved search big night runs").click()
    expect(page.get_by_role("link", name="big night runs")).to_have_count(0)


def test_list_columns_paging_and_screenshot(page: Any, server: Server, shots: Path) -> None:
    from playwright.sync_api import expect

    login(page, "/dataset-versions/?dataset=press-line&filter=sample_count+%3E%3D+3000")
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#summary")).to_have_text("1–3 of 3 versions matching")

    # Choose property columns; they are remembered in the URL and in localStorage.
    page.get_by_text("Columns", exact=True).click()
    for key in ("sample_count", "defect_rate", "shift"):
        page.get_by_label(key, exact=True).check()
    page.get_by_text("Columns", exact=True).click()
    header = page.locator("#results thead th")
    expect(header).to_have_text(
        ["Version", "Dataset", "Status", "sample_count", "defect_rate", "shift", "Completed"]
    )
    assert page.url.count("col=") == 3

    # Sort by sample_count: the header button cycles ascending, descending.
    page.get_by_role("button", name="Sort by sample_count").click()
    expect(page.locator("#results thead th[aria-sort=ascending]")).to_have_text("sample_count ▲")
    expect(rows.locator("th")).to_have_text(["2026-01-13", "2026-01-14", "2026-01-15"])
    page.get_by_role("button", name="Sort by sample_count, descending").click()
    expect(rows.locator("th")).to_have_text(["2026-01-15", "2026-01-14", "2026-01-13"])
    expect(rows.nth(0).locator("td.num").first).to_have_text("5200")
    page.screenshot(path=str(shots / "versions-list.png"))

    # The chosen columns come back from localStorage on a page without `col=`.
    page.goto("/dataset-versions/?dataset=press-line&limit=2")
    expect(header).to_have_count(7)
    expect(rows).to_have_count(2)
    expect(page.locator("#page-info")).to_have_text("Page 1 of 3")
    page.get_by_role("link", name="Next →").click()
    expect(page.locator("#page-info")).to_have_text("Page 2 of 3")
    page.get_by_role("link", name="Next →").click()
    expect(rows).to_have_count(1)
    expect(page.get_by_role("link", name="Next →")).to_be_hidden()


def test_edit_a_version_as_fields_and_as_json(page: Any, server: Server, shots: Path) -> None:
    from playwright.sync_api import expect

    name = "2026-01-15"
    before = server.properties(name)
    assert "valohai.last-used" in before
    login(page, "/dataset-versions/?dataset=press-line")
    page.get_by_role("link", name=name).click()
    expect(page.locator("h1")).to_have_text(name)
    expect(page.locator("#status")).to_have_text("completed")
    expect(page.locator("#staged")).to_have_text("none")
    expect(page.locator("#files-table tbody tr")).to_have_count(len(FILES))
    # Compared at once with the version created before it (none named a `from`; which one that is
    # depends on which apply registered it first), then with one named.
    summary = page.locator("#compare-summary")
    expect(summary).to_contain_text("against dataset://press-line/2026-01-1")
    expect(page.locator("#compare-table tbody tr").filter(has_text="sample_count")).to_contain_text("5200")
    page.get_by_label("Compare with").fill("dataset://press-line/2026-01-13")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(summary).to_contain_text("against dataset://press-line/2026-01-13: ")
    page.get_by_label("Compare with").fill("dataset://press-line/nope")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#compare-error")).to_contain_text("Could not compare")
    props = page.locator("#props-table tbody tr")
    expect(props.filter(has_text="sample_count")).to_contain_text("5200")
    expect(props.filter(has_text="valohai.last-used")).to_have_class("reserved")
    sent = posts_of(page)

    # As fields: change a number, remove a key, add a boolean with Enter.
    page.get_by_role("button", name="Edit properties").click()
    page.get_by_label("Value of sample_count").fill("5300")
    page.get_by_role("button", name="Remove shift").click()
    page.get_by_label("Key", exact=True).fill("reviewed")
    page.get_by_label("Type", exact=True).select_option("boolean")
    page.get_by_label("Value", exact=True).select_option("true")
    page.get_by_label("Key", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page.get_by_label("Value of reviewed")).to_have_value("true")
    expect(page.get_by_label("Key", exact=True)).to_be_focused()
    # The platform's key is listed read-only, with no input for it.
    expect(page.locator("#reserved")).to_contain_text("valohai.last-used")
    expect(page.get_by_label("Value of valohai.last-used")).to_have_count(0)
    page.screenshot(path=str(shots / "version-editor.png"))
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#props-status")).to_have_text("Saved: 2 keys set, 1 key removed.")
    assert sent == [{"sample_count": 5300, "shift": None, "reviewed": True}]
    expected = {k: v for k, v in before.items() if k != "shift"} | {"sample_count": 5300, "reviewed": True}
    assert server.properties(name) == expected
    expect(props.filter(has_text="reviewed")).to_contain_text("boolean")
    history = page.locator("#history-table tbody tr")
    expect(history.first).to_contain_text("API")
    expect(history.filter(has_text="capture_date")).to_contain_text(
        f"exec-{name}/valohai.metadata.jsonl line 1"
    )

    # As JSON: the whole set in one textarea (without valohai. keys); change one, add an object.
    page.get_by_role("button", name="Edit properties").click()
    page.get_by_role("button", name="JSON").click()
    editor = page.get_by_label("All properties as one JSON object")
    document = json.loads(editor.input_value())
    assert document == {k: v for k, v in expected.items() if not k.startswith("valohai.")}
    document["preprocessing_version"] = "3.3"
    document["camera"]["fps"] = 60
    del document["defect_rate"]
    editor.fill(json.dumps(document, indent=2))
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#props-status")).to_have_text("Saved: 2 keys set, 1 key removed.")
    assert sent[1] == {
        "preprocessing_version": "3.3",
        "camera": {"model": "XC-7", "fps": 60},
        "defect_rate": None,
    }
    expected = document | {"valohai.last-used": before["valohai.last-used"]}
    assert server.properties(name) == expected

    # Bad JSON is caught before sending; a reserved key is refused by the API, nothing saved.
    page.get_by_role("button", name="Edit properties").click()
    page.get_by_role("button", name="JSON").click()
    editor.fill('{"shift": "night",')
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#editor-error")).to_contain_text("Not valid JSON")
    expect(editor).to_have_attribute("aria-invalid", "true")
    editor.fill(json.dumps(document | {"valohai.reviewed": True}))
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#editor-error")).to_contain_text("valohai.reviewed")
    expect(page.locator("#editor-error")).to_contain_text("Nothing was changed")
    assert len(sent) == 3 and sent[2] == {"valohai.reviewed": True}
    assert server.properties(name) == expected
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("button", name="Edit properties")).to_be_focused()
    page.reload()
    expect(history.filter(has_text="defect_rate").first).to_contain_text("removed")
    page.screenshot(path=str(shots / "version-page.png"))


def test_a_write_on_a_building_version_is_staged(page: Any, server: Server) -> None:
    from playwright.sync_api import expect

    version = server.version(BUILDING)
    login(page, f"/dataset-versions/{version['id']}/")
    expect(page.locator("#status")).to_have_text("building")
    expect(page.locator("#staged")).to_have_text("1 entry (applied when the version completes)")
    expect(page.locator("#props-empty")).to_be_visible()
    page.get_by_role("button", name="Edit properties").click()
    page.get_by_label("Key", exact=True).fill("operator")
    page.get_by_label("Value", exact=True).fill("alice")
    page.get_by_label("Value", exact=True).press("Enter")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#props-status")).to_contain_text("Staged (1 key set)")
    expect(page.locator("#staged")).to_have_text("2 entries (applied when the version completes)")
    assert server.properties(BUILDING) == {}


def test_dataset_page(page: Any, server: Server) -> None:
    from playwright.sync_api import expect

    login(page, "/")
    page.get_by_role("link", name="press-line").click()
    expect(page.locator("h1")).to_have_text("press-line")
    expect(page.locator("#uri")).to_have_text("dataset://press-line")
    expect(page.locator("#version-count")).to_have_text(str(len(VERSIONS) + 1))
    expect(page.locator("#versions-table tbody tr")).to_have_count(len(VERSIONS) + 1)
    props = page.locator("#props-table tbody tr")
    expect(props.filter(has_text="machine")).to_contain_text("press-04")
    history = page.locator("#history-table tbody tr")
    expect(history.filter(has_text="domain")).to_contain_text("exec-2026-01-13")
    # Editing works the same on a dataset; Escape leaves the editor without saving.
    page.get_by_role("button", name="Edit properties").click()
    page.get_by_label("Value of machine").fill("press-05")
    page.keyboard.press("Escape")
    expect(page.locator("#editor")).to_be_hidden()
    page.get_by_role("button", name="Edit properties").click()
    page.get_by_label("Value of machine").fill("press-05")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#props-status")).to_have_text("Saved: 1 key set.")
    (dataset,) = server.get("/api/v0/datasets/", name="press-line")["results"]
    assert dataset["properties"]["machine"] == "press-05"


def test_no_horizontal_scroll_on_a_phone(browser: Any, server: Server, shots: Path) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport=NARROW, base_url=server.url, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        login(page, "/dataset-versions/?dataset=press-line&col=sample_count&col=capture_date&col=shift")
        expect(page.locator("#results tbody tr")).to_have_count(len(VERSIONS) + 1)
        widths = {"list": page.evaluate("document.documentElement.scrollWidth")}
        page.goto(f"/dataset-versions/{server.version('2026-01-15')['id']}/")
        expect(page.locator("#files-table tbody tr")).to_have_count(len(FILES))
        widths["version"] = page.evaluate("document.documentElement.scrollWidth")
        page.get_by_role("button", name="Edit properties").click()
        widths["editor"] = page.evaluate("document.documentElement.scrollWidth")
        page.get_by_role("button", name="JSON").click()
        widths["json"] = page.evaluate("document.documentElement.scrollWidth")
        page.screenshot(path=str(shots / "version-editor-phone.png"), full_page=False)
        assert all(w <= NARROW["width"] for w in widths.values()), widths
    finally:
        context.close()


def test_a_quarantined_version_says_so_and_how_to_put_it_back(page: Any, server: Server, shots: Path) -> None:
    import redis as redis_lib
    from playwright.sync_api import expect

    from worker.keys import Keys
    from worker.staging import Staging
    from worker.uris import Target

    client = redis_lib.Redis.from_url((server.data_dir / "redis.url").read_text().strip())
    staging = Staging(client, Keys("sidecar"))
    target = Target("version", "press-line", BUILDING)
    staging.quarantine(target, "IntegrityError: poisoned by the test", 6, "2026-12-02T10:00:00+00:00")
    try:
        login(page, f"/dataset-versions/{server.version(BUILDING)['id']}/")
        notice = page.locator("#quarantine")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text("Quarantined: its applies failed 6 times")
        expect(notice).to_contain_text("IntegrityError: poisoned by the test")
        expect(notice).to_contain_text(f"sidecar retry {target.key}")
        page.screenshot(path=str(shots / "version-quarantined.png"), full_page=True)
    finally:
        staging.release(target)
        client.close()


def test_datum_page(page: Any, server: Server) -> None:
    from playwright.sync_api import expect

    (datum,) = server.get("/api/v0/data/", output_execution="exec-2026-01-15", name="labels.csv")["results"]
    login(page, f"/data/{datum['id']}/")
    expect(page.locator("#title")).to_have_text("labels.csv")
    expect(page.locator("#execution")).to_have_text("exec-2026-01-15")
    keys = page.locator("#props-table tbody tr td:first-child")
    expect(keys).to_have_text(["camera", "valohai.dataset-versions"])
    expect(page.locator("#checksums-table tbody tr")).to_have_count(3)  # md5, sha1, sha256 (— when unread)
    expect(page.locator("#history-table tbody tr")).to_have_count(2)  # camera, valohai.dataset-versions


def test_edit_all_results_of_a_filter_after_a_preview(page: Any, server: Server, shots: Path) -> None:
    """The list's "edit all N results": a preview counts the results and shows what changes, then
    the edit runs in the worker (a Celery task) and the page follows it to the end."""
    from playwright.sync_api import expect

    login(page, "/dataset-versions/?filter=sample_count+%3E%3D+4000&col=reviewed")
    expect(page.locator("#results tbody tr")).to_have_count(2)
    panel = page.locator("#bulk")
    expect(panel.locator("summary")).to_have_text("Edit all 2 results")
    panel.locator("summary").click()
    editor = page.get_by_label("Keys to set on every result of this filter", exact=False)
    editor.fill("[1]")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#bulk-result")).to_contain_text("Write a JSON object")
    expect(page.get_by_role("button", name="Apply to all", exact=False)).to_be_disabled()
    editor.fill('{"reviewed": "qa"}')
    page.get_by_role("button", name="Preview").click()
    result = page.locator("#bulk-result")
    expect(result).to_contain_text("2 results would be edited")
    expect(result.locator("li")).to_have_count(2)
    expect(result.locator("li").first).to_contain_text("reviewed: – → qa")
    page.screenshot(path=str(shots / "versions-bulk-edit.png"), full_page=True)
    page.get_by_role("button", name="Apply to all 2").click()
    expect(result).to_contain_text("Done: 2 edited now", timeout=DEADLINE * 1000)
    versions = server.get("/api/v0/dataset-versions/", filter="sample_count >= 4000")["results"]
    assert [v["properties"].get("reviewed") for v in versions] == ["qa", "qa"]
    page.get_by_role("link", name="Reload the results").click()
    expect(page.locator("#results tbody td", has_text="qa")).to_have_count(2)
    # Undone through the API, so the test after this one sees the versions as they were.
    body = {"filter": "exists reviewed", "set": {"reviewed": None}}
    answer = server.http.post("/api/v0/dataset-versions/metadata/bulk/", json=body).json()
    wait_until(lambda: server.get(answer["url"])["state"] == "done", timeout=DEADLINE, what="the undo")


def test_definitions_name_the_keys_and_violations_are_marked(page: Any, server: Server, shots: Path) -> None:
    """Last in the module: the definitions it adds re-check every stored target. A display name
    and description label a key, a value breaking its definition is marked with the rule, a
    missing required key gets a row, and the editor offers a key's allowed values."""
    from playwright.sync_api import expect

    definitions: dict[str, dict[str, Any]] = {
        "shift": {
            "allowed_values": ["day"],
            "scopes": ["version"],
            "display_name": "Shift",
            "description": "crew",
        },
        "operator": {"type": "string", "scopes": ["version"], "required": True},
        "sample_count": {"type": "integer", "display_name": "Samples", "description": "images captured"},
    }
    try:
        for key, body in definitions.items():
            answer = server.http.put(f"/api/v0/property-definitions/{key}/", json={"key": key, **body})
            assert answer.status_code in (200, 201), answer.text
        # The background re-check (a worker task) marks the stored versions.
        wait_until(
            lambda: (
                {v["key"] for v in server.version("2026-01-14").get("violations", [])}
                == {"shift", "operator"}
            ),
            timeout=DEADLINE,
            what="the re-check's violations",
        )
        login(page, f"/dataset-versions/{server.version('2026-01-14')['id']}/")
        shift = page.locator('#props-table tbody tr[data-key="shift"]')
        expect(shift).to_have_class("violation")
        expect(shift).to_contain_text("Shift")
        expect(shift).to_contain_text("not an allowed value")
        expect(shift.locator("td").first).to_have_attribute("title", "crew")
        missing = page.locator('#props-table tbody tr[data-key="operator"]')
        expect(missing).to_contain_text("(missing)")
        expect(missing).to_contain_text("required, missing")
        samples = page.locator('#props-table tbody tr[data-key="sample_count"]')
        expect(samples).not_to_have_class("violation")
        expect(samples).to_contain_text("Samples")
        expect(samples).to_contain_text("integer")
        page.screenshot(path=str(shots / "version-violations.png"), full_page=True)
        page.get_by_role("button", name="Edit properties").click()
        page.locator("#new-key").fill("shift")
        expect(page.locator("#allowed-values option")).to_have_count(1)
        assert page.locator("#allowed-values option").first.get_attribute("value") == "day"
        assert page.locator("#new-value").get_attribute("list") == "allowed-values"
        # The list marks the rows with violations, and the cells of the keys that break a rule.
        page.goto("/dataset-versions/?col=shift&col=sample_count")
        row = page.locator("#results tbody tr", has_text="2026-01-14")
        expect(row).to_have_class("violation")
        mark = row.get_by_role("img")
        expect(mark).to_have_attribute("aria-label", re.compile("shift: not an allowed value"))
        expect(mark).to_have_attribute("aria-label", re.compile("operator: required, missing"))
        expect(row.locator("td").nth(2)).to_have_class(re.compile("violation"))  # shift
        expect(row.locator("td").nth(3)).not_to_have_class(re.compile("violation"))  # sample_count
        page.screenshot(path=str(shots / "versions-violations.png"), full_page=True)
    finally:
        for key in definitions:
            server.http.delete(f"/api/v0/property-definitions/{key}/")
