"""Staging against a real Redis: atomic batches, completion flags, the due set, and the races."""

from __future__ import annotations

import time

import pytest
import redis

from tests.helpers import outcome
from worker.records import LineOutcome
from worker.staging import Staging
from worker.staging.area import _stream_order
from worker.uris import Target

pytestmark = pytest.mark.redis

V1 = Target("version", "press", "v1")
DS = Target("dataset", "press")
EXE = Target.for_execution("exec-1")
FILE = "exec-1/valohai.metadata.jsonl"


def version_line(meta: str, version: str = "v1") -> bytes:
    return b'{"dataset-version": "dataset://press/%s", "metadata": %s}' % (version.encode(), meta.encode())


def test_batch_and_checkpoint_are_staged_together(staging: Staging) -> None:
    due = staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"a": 1}'))], '{"offset": 10}')
    # A version seen for the first time is handed out (an apply registers it as building) ...
    assert due == [V1.key]
    # ... but it is not due: nothing is applied before completion.
    assert staging.due_targets(older_than=-1) == []
    again = staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"b": 1}'), 2)], "{}")
    assert again == []
    assert staging.load_state(FILE) == "{}"
    entries = list(staging.read_after(V1, None))
    assert [e.metadata for _, e in entries] == [{"a": 1}, {"b": 1}]
    assert entries[0][1].source.file == FILE and entries[0][1].source.line == 1


def test_same_line_read_again_after_a_rewrite_is_staged_once(staging: Staging) -> None:
    line = outcome(version_line('{"a": 1}'))
    staging.stage_lines(FILE, "exec-1", [line], "s1")
    staging.stage_lines(FILE, "exec-1", [line, outcome(version_line('{"b": 2}'), 2)], "s2")
    assert [e.metadata for _, e in staging.read_after(V1, None)] == [{"a": 1}, {"b": 2}]
    # A different line at the same number is new content and is staged.
    staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"a": 3}'))], "s3")
    assert len(list(staging.read_after(V1, None))) == 3


def test_entry_staged_before_completion_is_read_by_the_completion_apply(staging: Staging) -> None:
    staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"a": 1}'))], "s")
    assert staging.due_targets(older_than=-1) == []
    assert set(staging.complete_version(V1)) == {V1.key, DS.key}
    assert set(staging.due_targets(older_than=-1)) == {V1.key, DS.key}


def test_entry_staged_after_completion_makes_the_version_due_by_itself(staging: Staging) -> None:
    staging.complete_version(V1)
    staging.finish(V1, None)
    assert V1.key not in staging.due_targets(older_than=-1)
    due = staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"late": true}'))], "s")
    assert due == [V1.key]
    assert V1.key in staging.due_targets(older_than=-1)


def test_finish_keeps_the_target_due_when_a_newer_entry_arrived(staging: Staging) -> None:
    staging.complete_version(V1)
    staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"a": 1}'))], "s")
    ((first_id, _),) = staging.read_after(V1, None)
    staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"b": 2}'), 2)], "s")
    assert staging.finish(V1, first_id) is False
    assert V1.key in staging.due_targets(older_than=-1)
    last_id = [i for i, _ in staging.read_after(V1, None)][-1]
    assert staging.finish(V1, last_id) is True
    assert V1.key not in staging.due_targets(older_than=-1)
    # Applied entries are trimmed, the last one is kept as the anchor.
    assert [i for i, _ in staging.read_after(V1, None)] == [last_id]


def lines(first: int, count: int) -> list[LineOutcome]:
    return [outcome(version_line(f'{{"n": {n}}}'), n) for n in range(first, first + count)]


def test_a_snapshot_read_before_the_lock_gives_what_read_after_gives(staging: Staging) -> None:
    staging.stage_lines(FILE, "exec-1", lines(1, 3), "s")
    staging.complete_version(V1)
    snapshot = staging.snapshot(V1)
    assert snapshot.done and snapshot.whole
    # Another apply commits entry 1 and trims before ours takes the lock; a line comes later.
    first_id = snapshot.entries[0][0]
    staging.finish(V1, first_id)
    staging.stage_lines(FILE, "exec-1", lines(4, 1), "s")
    got = [e.metadata["n"] for _, e in staging.read_after(V1, first_id, snapshot)]
    # Entry 4 came after the snapshot reached the end: it is the next apply's (the target stays due).
    assert got == [2, 3]
    assert staging.finish(V1, snapshot.entries[-1][0]) is False


def test_a_snapshot_of_a_long_stream_is_continued_from_redis(
    staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.staging.area.READ_BATCH", 2)
    staging.stage_lines(FILE, "exec-1", lines(1, 5), "s")
    snapshot = staging.snapshot(V1)
    assert not snapshot.done and not snapshot.whole and len(snapshot.entries) == 2
    ids = [i for i, _ in staging.read_after(V1, None)]
    assert [e.metadata["n"] for _, e in staging.read_after(V1, None, snapshot)] == [1, 2, 3, 4, 5]
    # A watermark inside the snapshot, and one past it (another apply went further).
    assert [e.metadata["n"] for _, e in staging.read_after(V1, ids[0], snapshot)] == [2, 3, 4, 5]
    assert [e.metadata["n"] for _, e in staging.read_after(V1, ids[3], snapshot)] == [5]


def test_stream_ids_are_compared_as_numbers() -> None:
    assert _stream_order("10-0") > _stream_order("9-5")
    assert _stream_order("9-10") > _stream_order("9-9")


def test_execution_completion_completes_the_versions_its_datums_feed(staging: Staging) -> None:
    datum = b'{"file": "a.png", "metadata": {"valohai.dataset-versions": ["dataset://press/v2"]}}'
    dataset = b'{"dataset": "dataset://press", "metadata": {"domain": "x"}}'
    staging.stage_lines(FILE, "exec-1", [outcome(datum), outcome(dataset, 2)], "s")
    due = staging.complete_execution("exec-1")
    v2 = Target("version", "press", "v2")
    assert set(due) == {EXE.key, v2.key, DS.key}
    assert staging.is_done(v2) and staging.is_done(EXE)


def test_late_datum_line_after_execution_completion_completes_its_version(staging: Staging) -> None:
    staging.complete_execution("exec-1")
    datum = b'{"file": "b.png", "metadata": {"valohai.dataset-versions": ["dataset://press/v3"]}}'
    due = staging.stage_lines(FILE, "exec-1", [outcome(datum)], "s")
    v3 = Target("version", "press", "v3")
    assert set(due) == {EXE.key, v3.key, DS.key}
    assert staging.is_done(v3)


def test_dataset_lines_wait_for_a_trigger(staging: Staging) -> None:
    dataset = b'{"dataset": "dataset://press", "metadata": {"domain": "x"}}'
    assert staging.stage_lines(FILE, "exec-1", [outcome(dataset)], "s") == []
    assert staging.due_targets(older_than=-1) == []


def test_rejects_are_recorded_with_where_and_why(staging: Staging) -> None:
    from worker.records import LineOutcome, Reject

    bad = LineOutcome(3, b"12345678", reject=Reject(FILE, 3, 120, "not JSON", "exec-1", "now"))
    staging.stage_lines(FILE, "exec-1", [bad], "s")
    staging.stage_lines(FILE, "exec-1", [bad], "s")  # read again after a rewrite: recorded once
    (reject,) = staging.rejects()
    assert (reject.file, reject.line, reject.offset, reject.reason) == (FILE, 3, 120, "not JSON")


def test_sweep_sends_one_drain_for_targets_due_too_long(staging: Staging) -> None:
    staging.complete_version(V1)
    sent: list[float] = []
    assert staging.sweep(sent.append, older_than=0.2) is False  # not due for long enough yet
    time.sleep(0.3)
    assert staging.sweep(sent.append, older_than=0.2) is True
    assert sent == [0.2]
    # However many targets wait and however often it runs: no second drain while one is out.
    staging.complete_version(Target("version", "press", "v2"))
    assert staging.sweep(sent.append, older_than=0.0) is False
    assert sent == [0.2]
    staging.drain_alive(0.2)  # the drain, working, keeps it so
    assert staging.sweep(sent.append, older_than=0.0) is False
    staging.drain_done()  # it ended: the next sweep sends again, as the targets are still due
    assert staging.sweep(sent.append, older_than=0.0) is True
    assert sent == [0.2, 0.0]
    count, age = staging.backlog()
    assert count == 3 and age >= 0.3  # the due score keeps the time it first became due


def test_a_drain_that_could_not_be_sent_leaves_the_next_sweep_free(staging: Staging) -> None:
    staging.complete_version(V1)

    def broker_down(older_than: float) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        staging.sweep(broker_down, older_than=0.0)
    sent: list[float] = []
    assert staging.sweep(sent.append, older_than=0.0) is True


def test_a_changed_line_restages_every_line_after_it(staging: Staging) -> None:
    # Written "w" twice: line 1 changed, line 2 byte-identical. The fold of what was read, in
    # order, must end on line 2's value, so line 2 is staged again after the new line 1.
    first = [outcome(version_line('{"k": "x"}')), outcome(version_line('{"k": "y"}'), 2)]
    staging.stage_lines(FILE, "exec-1", first, "s1")
    again = [outcome(version_line('{"k": "z"}')), outcome(version_line('{"k": "y"}'), 2)]
    staging.stage_lines(FILE, "exec-1", again, "s2")
    assert [e.metadata["k"] for _, e in staging.read_after(V1, None)] == ["x", "y", "z", "y"]
    # The same change read once more stages nothing.
    staging.stage_lines(FILE, "exec-1", again, "s3")
    assert len(list(staging.read_after(V1, None))) == 4


def test_a_change_in_a_later_batch_keeps_the_unchanged_start(staging: Staging) -> None:
    lines = [outcome(version_line(f'{{"n": {i}}}'), i) for i in range(1, 5)]
    staging.stage_lines(FILE, "exec-1", lines[:2], "s")
    staging.stage_lines(FILE, "exec-1", lines[2:], "s")
    changed = [*lines[:2], outcome(version_line('{"n": 30}'), 3), lines[3]]
    staging.stage_lines(FILE, "exec-1", changed[:3], "s")  # a rewrite read in two batches
    staging.stage_lines(FILE, "exec-1", changed[3:], "s")
    assert [e.metadata["n"] for _, e in staging.read_after(V1, None)] == [1, 2, 3, 4, 30, 4]


def test_first_apply_keeps_the_target_due_if_entries_arrived_meanwhile(staging: Staging) -> None:
    staging.complete_version(V1)
    staging.stage_lines(FILE, "exec-1", [outcome(version_line('{"a": 1}'))], "s")
    # An apply that read nothing (it ran before the line) must not drop the target.
    assert staging.finish(V1, None) is False
    assert V1.key in staging.due_targets(older_than=-1)


def test_a_sent_batch_is_staged_once_its_reply_is_read(staging: Staging) -> None:
    """`send_lines` + `wait` is `stage_lines` (the ingest overlaps the two with parsing)."""
    sent = staging.send_lines(FILE, "exec-1", [outcome(version_line('{"a": 1}'))], '{"offset": 10}')
    assert sent.wait() == [V1.key]
    second = staging.send_lines(FILE, "exec-1", [outcome(version_line('{"b": 1}'), 2)], '{"offset": 20}')
    assert second.wait() == []
    assert staging.load_state(FILE) == '{"offset": 20}'
    assert [e.metadata for _, e in staging.read_after(V1, None)] == [{"a": 1}, {"b": 1}]
    # The connection went back to the pool in a clean state: plain calls work on it.
    assert staging.redis.ping()


def test_a_sent_batch_survives_redis_losing_its_scripts(staging: Staging) -> None:
    staging.redis.script_flush()
    sent = staging.send_lines(FILE, "exec-1", [outcome(version_line('{"a": 1}'))], '{"offset": 10}')
    assert sent.wait() == [V1.key]
    assert [e.metadata for _, e in staging.read_after(V1, None)] == [{"a": 1}]


def test_a_batch_sent_again_after_a_lost_reply_is_staged_once(staging: Staging) -> None:
    """A reply lost with its connection: the batch is run again (`Sent.wait`), and the digest
    check keeps its lines from being staged twice."""
    lines = [outcome(version_line('{"a": 1}')), outcome(version_line('{"b": 2}'), 2)]
    sent = staging.send_lines(FILE, "exec-1", lines, '{"offset": 20}')
    conn = sent.conn
    conn.read_response()  # the script ran and replied ...

    def lost() -> None:
        del conn.read_response  # the connection reads again once it has reconnected
        raise redis.ConnectionError("Connection closed by server.")

    conn.read_response = lost  # ... but the reply never reached the reader
    # The second run finds the lines staged; the first run's news (a new version) went with its
    # reply, as it would with any retried call. The version is registered at completion anyway.
    assert sent.wait() == []
    assert [e.metadata for _, e in staging.read_after(V1, None)] == [{"a": 1}, {"b": 2}]


def test_an_abandoned_batch_leaves_a_usable_pool(staging: Staging) -> None:
    sent = staging.send_lines(FILE, "exec-1", [outcome(version_line('{"a": 1}'))], '{"offset": 10}')
    sent.abandon()
    assert staging.redis.ping()
    # It ran or not, as a whole: here it ran, with its checkpoint.
    time.sleep(0.05)
    assert staging.load_state(FILE) in (None, '{"offset": 10}')
    assert len(list(staging.read_after(V1, None))) == (0 if staging.load_state(FILE) is None else 1)
