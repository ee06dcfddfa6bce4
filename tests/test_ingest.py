"""Reading real files into a real Redis: appends, partial lines, rewrites, rejects, links."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

import pytest

from worker.ingest import Ingestor
from worker.records import LineOutcome
from worker.staging import Staging
from worker.uris import Target

pytestmark = pytest.mark.redis

V1 = Target("version", "press", "v1")
EXE = Target.for_execution("exec-1")


def vline(**meta: object) -> str:
    return json.dumps({"dataset-version": "dataset://press/v1", "metadata": meta}) + "\n"


def datum(path: str, **meta: object) -> str:
    meta = {"valohai.dataset-versions": ["dataset://press/v1"], **meta}
    return json.dumps({"file": path, "metadata": meta}) + "\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "exec-1").mkdir(parents=True)
    return tmp_path / "root"


@pytest.fixture
def ingestor(root: Path, staging: Staging) -> Ingestor:
    return Ingestor(root, staging, line_limit=4096)


def metas(staging: Staging, target: Target = V1) -> list[dict[str, object]]:
    return [e.metadata for _, e in staging.read_after(target, None)]


def test_appends_partial_lines_and_flush_at_completion(
    root: Path, ingestor: Ingestor, staging: Staging
) -> None:
    path = root / "exec-1" / "valohai.metadata.jsonl"
    path.write_text(vline(a=1))
    ingestor.ingest(path)
    with open(path, "a") as f:
        f.write(vline(b=2) + vline(c=3)[:10])  # the last line is still being written
    ingestor.ingest(path)
    assert metas(staging) == [{"a": 1}, {"b": 2}]
    with open(path, "a") as f:
        f.write(vline(c=3)[10:-1])  # finished, but the newline never comes
    ingestor.ingest(path)
    assert metas(staging) == [{"a": 1}, {"b": 2}]
    staging.complete_execution("exec-1")
    ingestor.ingest(path)
    assert metas(staging) == [{"a": 1}, {"b": 2}, {"c": 3}]
    entries = [e for _, e in staging.read_after(V1, None)]
    assert [(e.source.line, e.source.offset) for e in entries] == [
        (1, 0),
        (2, len(vline(a=1))),
        (3, len(vline(a=1) + vline(b=2))),
    ]


def test_whole_file_rewrite_stages_only_what_is_new(root: Path, ingestor: Ingestor, staging: Staging) -> None:
    path = root / "exec-1" / "valohai.metadata.jsonl"
    path.write_text(datum("a.png", k=1) + vline(x=1))
    ingestor.ingest(path)
    # valohai-utils rewrites the whole file in place, keeping datum lines and dropping version lines.
    path.write_text(datum("a.png", k=1) + datum("b.png", k=2))
    stats = ingestor.ingest(path)
    assert stats.rewrites == 1
    datums = [(e.path, e.metadata.get("k")) for _, e in staging.read_after(EXE, None)]
    assert datums == [("a.png", 1), ("b.png", 2)]
    assert metas(staging) == [{}, {"x": 1}, {}]  # member(a), the version line, member(b)


def test_truncation_and_replacement(root: Path, ingestor: Ingestor, staging: Staging) -> None:
    path = root / "exec-1" / "valohai.metadata.jsonl"
    path.write_text(vline(a=1) + vline(b=2))
    ingestor.ingest(path)
    path.write_text("")
    ingestor.ingest(path)
    path.write_text(vline(c=3))
    ingestor.ingest(path)
    tmp = root / "exec-1" / "tmp"
    tmp.write_text(vline(c=3) + vline(d=4))
    os.replace(tmp, path)  # a new inode with the same first line
    ingestor.ingest(path)
    assert metas(staging) == [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}]


def test_bad_lines_are_rejected_and_the_rest_lands(root: Path, ingestor: Ingestor, staging: Staging) -> None:
    path = root / "exec-1" / "valohai.metadata.jsonl"
    lines = [
        vline(a=1),
        "not json\n",
        '{"dataset": "dataset://a/b", "metadata": {}}\n',
        "x" * 5000 + "\n",
        vline(**{"valohai.last-used": "now"}),
        "\n",
        vline(b=2),
    ]
    path.write_text("".join(lines))
    stats = ingestor.ingest(path)
    assert stats.rejects == 4
    assert metas(staging) == [{"a": 1}, {"b": 2}]
    rejects = sorted(staging.rejects(), key=lambda r: r.line)
    offsets = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    assert [(r.line, r.offset) for r in rejects] == [
        (2, offsets[1]),
        (3, offsets[2]),
        (4, offsets[3]),
        (5, offsets[4]),
    ]
    assert "not JSON" in rejects[0].reason and "longer than the limit" in rejects[2].reason
    assert "valohai.last-used" in rejects[3].reason
    assert all(r.file == "exec-1/valohai.metadata.jsonl" for r in rejects)


def test_older_file_name_and_per_output_files(root: Path, ingestor: Ingestor, staging: Staging) -> None:
    (root / "exec-1" / "outputs.metadata.jsonl").write_text(vline(old=True))
    ingestor.ingest(root / "exec-1" / "outputs.metadata.jsonl")
    assert metas(staging) == [{"old": True}]
    out = root / "exec-1" / "images" / "cat.jpg.metadata.json"
    out.parent.mkdir()
    out.write_text('{\n  "label": "cat",\n  "valohai.dataset-versions": ["dataset://press/v1"]\n}\n')
    ingestor.ingest(out)
    ingestor.ingest(out)  # unchanged: nothing new
    assert [(e.path, e.metadata["label"]) for _, e in staging.read_after(EXE, None)] == [
        ("images/cat.jpg", "cat")
    ]
    half = root / "exec-1" / "dog.jpg.metadata.json"
    half.write_text('{"label": "do')  # still being written: held, not rejected
    ingestor.ingest(half)
    assert staging.rejects() == []
    staging.complete_execution("exec-1")
    ingestor.ingest(half)
    assert len(staging.rejects()) == 1


def test_links_leaving_the_root_are_never_read(
    root: Path, tmp_path: Path, ingestor: Ingestor, staging: Staging
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "valohai.metadata.jsonl").write_text(vline(secret=1))
    os.symlink(outside, root / "exec-2")
    (root / "exec-1" / "valohai.metadata.jsonl").symlink_to(outside / "valohai.metadata.jsonl")
    assert ingestor.ingest(root / "exec-2" / "valohai.metadata.jsonl").files == 0
    assert ingestor.ingest(root / "exec-1" / "valohai.metadata.jsonl").files == 0
    assert metas(staging) == []


def test_a_budget_or_a_stop_ends_reading_between_batches_and_the_next_call_goes_on(
    root: Path, staging: Staging
) -> None:
    path = root / "exec-1" / "valohai.metadata.jsonl"
    lines = [vline(n=n) for n in range(300)]
    path.write_text("".join(lines))
    ingestor = Ingestor(root, staging, line_limit=4096, batch_bytes=len(lines[0]) * 10)

    first = ingestor.ingest(path, budget=len(lines[0]) * 25)
    assert first.unread and 25 <= first.lines < 300
    assert metas(staging) == [{"n": n} for n in range(first.lines)]

    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return True  # asked after each staged batch: stop after one

    second = ingestor.ingest(path, stop=stop)
    assert second.unread and calls == 1 and 0 < second.lines <= 10

    rest = ingestor.ingest(path)
    assert not rest.unread and rest.pending_bytes == 0
    # Resumed from the checkpoints: every line once, in order.
    assert metas(staging) == [{"n": n} for n in range(300)]


def test_a_carried_batch_is_counted_by_the_next_call_and_never_staged_twice(
    root: Path, staging: Staging
) -> None:
    """`carry=True` leaves the last batch's reply for later: the next call (another file's, or
    the same file's, whose checkpoint must be in first) or `settle` waits for it."""
    (root / "exec-2").mkdir()
    one, two = root / "exec-1" / "valohai.metadata.jsonl", root / "exec-2" / "valohai.metadata.jsonl"
    one.write_text("".join(vline(n=n) for n in range(5)))
    two.write_text(datum("a.png", k=1))
    ingestor = Ingestor(root, staging, line_limit=4096)

    first = ingestor.ingest(one, carry=True)
    assert first.lines == 0 and first.read_bytes > 0  # its only batch is still in flight
    second = ingestor.ingest(two, carry=True)
    assert second.lines == 5 and second.due == {V1.key}  # the batch carried over from the first file
    # ... counted under its own file: the watcher enqueues each file's due targets on their own,
    # so that a late line is never batched with a bulk file read just before it.
    assert second.due_by_file == {"exec-1/valohai.metadata.jsonl": {V1.key}}
    with one.open("a") as f:
        f.write("".join(vline(n=n) for n in range(5, 8)))
    third = ingestor.ingest(one, carry=True)  # settles exec-2's batch, then reads on from 5
    assert third.lines == 1  # exec-2's datum line
    assert ingestor.settle().lines == 3 and ingestor.settle().lines == 0
    sets = [e.metadata for _, e in staging.read_after(V1, None) if e.op == "set"]
    assert sets == [{"n": n} for n in range(8)]  # each line once, in order
    datums = staging.read_after(Target.for_execution("exec-2"), None)
    assert [e.metadata["k"] for _, e in datums] == [1]


def test_reading_pauses_the_cycle_collector_and_leaves_no_cycles_behind(
    root: Path, ingestor: Ingestor, staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pause is only safe because parsing, staging and rejecting make no reference cycles:
    # with the collector off, a cycle per line would grow the watcher until the file ends.
    path = root / "exec-1" / "valohai.metadata.jsonl"
    lines = [vline(a=1), "not json\n", "x" * 5000 + "\n", datum("a.png", n=[1, {"b": 2}]), vline(b=2)]
    path.write_text("".join(lines * 50))
    gc.collect()
    gc.disable()
    try:
        assert ingestor.ingest(path).rejects == 100
        assert gc.collect() == 0
    finally:
        gc.enable()

    seen: list[bool] = []
    real_outcome = ingestor.outcome

    def outcome(*args: Any, **kwargs: Any) -> LineOutcome:
        seen.append(gc.isenabled())
        return real_outcome(*args, **kwargs)

    monkeypatch.setattr(ingestor, "outcome", outcome)
    path.write_text(vline(c=3))
    ingestor.ingest(path)
    assert seen == [False] and gc.isenabled()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(ingestor, "outcome", broken)
    with open(path, "a") as f:
        f.write(vline(d=4))
    with pytest.raises(OSError):
        ingestor.ingest(path)
    assert gc.isenabled()


def test_an_unreadable_file_is_one_reject_naming_it_and_reads_once_fixed(
    root: Path, ingestor: Ingestor, staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permission denied (simulated: the tests run as root, which reads anything), a directory and
    a link where the file was: each is a reject naming the file, recorded once, nothing staged;
    once the file reads again its lines are staged."""
    path = root / "exec-1" / "valohai.metadata.jsonl"
    path.write_text(vline(a=1))
    real_open = os.open

    def denied(file: Any, flags: int, *args: Any) -> int:
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    assert ingestor.ingest(path).lines == 0
    assert ingestor.ingest(path).lines == 0  # the next scan: no second reject
    monkeypatch.undo()
    rejects = staging.rejects()
    assert [(r.file, r.line, r.execution) for r in rejects] == [(str(path.relative_to(root)), 0, "exec-1")]
    assert "cannot be read: Permission denied" in rejects[0].reason
    assert ingestor.ingest(path).lines == 1  # readable again
    assert metas(staging) == [{"a": 1}]

    other = root / "exec-2" / "valohai.metadata.jsonl"
    other.mkdir(parents=True)  # a directory where the file was
    assert ingestor.ingest(other).lines == 0
    link = root / "exec-3" / "valohai.metadata.jsonl"
    link.parent.mkdir()
    link.symlink_to(path)
    assert ingestor.ingest(link).lines == 0
    assert ingestor.ingest(link).lines == 0
    newest = staging.rejects()[:2]
    assert [r.file for r in newest] == ["exec-3/valohai.metadata.jsonl", "exec-2/valohai.metadata.jsonl"]
    assert "symbolic link" in newest[0].reason and "Is a directory" in newest[1].reason
    assert len(staging.rejects()) == 3
