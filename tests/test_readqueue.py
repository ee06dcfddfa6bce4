"""Pure core: the watcher's read order (smallest last read first, overdue files in turn with it)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from worker.readqueue import ReadQueue

BUSY, QUIET, NEW = Path("r/busy/f"), Path("r/quiet/f"), Path("r/new/f")


def drain(queue: ReadQueue, now: float) -> list[Path]:
    out = []
    while (path := queue.pop(now)) is not None:
        out.append(path)
    return out


def test_a_file_with_little_to_read_goes_before_busy_ones() -> None:
    queue = ReadQueue(max_wait=1.0)
    queue.read(BUSY, 300_000)
    queue.read(QUIET, 300)
    queue.add(BUSY, now=0.0)
    queue.add(QUIET, now=0.1)
    queue.add(NEW, now=0.2)  # never read: counts as small
    assert drain(queue, now=0.3) == [NEW, QUIET, BUSY]


def test_a_file_that_waited_too_long_goes_first_whatever_its_size() -> None:
    queue = ReadQueue(max_wait=1.0)
    queue.read(BUSY, 300_000)
    queue.add(BUSY, now=0.0)
    queue.add(QUIET, now=0.5)
    assert queue.pop(now=1.0) == BUSY
    assert queue.pop(now=1.0) == QUIET


def test_overdue_files_and_the_smallest_take_turns() -> None:
    # The watcher fell behind: every busy file is overdue. A quiet file waits for one of them.
    queue = ReadQueue(max_wait=1.0)
    busy = [Path(f"r/busy{i}/f") for i in range(3)]
    for i, path in enumerate(busy):
        queue.read(path, 300_000)
        queue.add(path, now=i / 10)
    queue.read(QUIET, 300)
    queue.add(QUIET, now=0.5)
    assert drain(queue, now=2.0) == [busy[0], QUIET, busy[1], busy[2]]


def test_a_read_that_found_nothing_keeps_a_busy_file_big() -> None:
    queue = ReadQueue(max_wait=1.0)
    queue.read(BUSY, 300_000)
    queue.read(BUSY, 0)  # its event came after the last read had taken its lines
    queue.read(QUIET, 300)
    queue.add(BUSY, now=0.0)
    queue.add(QUIET, now=0.1)
    assert queue.smallest() == 300
    assert drain(queue, now=0.2) == [QUIET, BUSY]
    assert queue.smallest() is None


def test_a_queued_file_is_queued_once_and_keeps_its_age() -> None:
    queue = ReadQueue(max_wait=1.0)
    queue.read(BUSY, 300_000)
    queue.add(BUSY, now=0.0)
    queue.add(BUSY, now=0.9)  # marked again: still one entry, still queued since 0.0
    queue.add(QUIET, now=0.9)
    assert len(queue) == 2 and BUSY in queue
    assert drain(queue, now=1.0) == [BUSY, QUIET]
    assert len(queue) == 0 and queue.pop(now=2.0) is None


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 5), st.floats(0, 0.5)),
            st.tuples(st.just("read"), st.integers(0, 5), st.integers(0, 10_000)),
            st.tuples(st.just("pop"), st.just(0), st.floats(0, 0.5)),
        ),
        max_size=60,
    )
)
def test_every_queued_file_is_popped_exactly_once(ops: list[tuple[str, int, float]]) -> None:
    """However adds, re-adds, reads and pops interleave, nothing queued is lost or doubled."""
    queue = ReadQueue(max_wait=0.2)
    now, queued = 0.0, set()
    for op, n, value in ops:
        path = Path(f"r/e{n}/f")
        if op == "add":
            now += value
            queue.add(path, now)
            queued.add(path)
        elif op == "read":
            queue.read(path, int(value))
        else:
            now += value
            popped = queue.pop(now)
            assert (popped is None) == (not queued)
            if popped is not None:
                assert popped in queued
                queued.remove(popped)
        assert len(queue) == len(queued)
    assert sorted(drain(queue, now)) == sorted(queued)
