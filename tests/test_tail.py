"""worker.tail: checkpointed line reading over plain files (no services)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.tail import HEAD_BYTES, TAIL_BYTES, FileState, Line, ReadResult, read_new

LIMIT = 1024
# Lines made of these bytes: plenty of newlines, blanks and stray carriage returns.
ALPHABET = b"ab {}\r\t\n\n\n"


def read(
    path: Path,
    state: FileState | None,
    *,
    line_limit: int = LIMIT,
    final: bool = False,
    max_bytes: int = 4 * 1024 * 1024,
) -> ReadResult:
    """One call, the way the watcher makes it: open, fstat the descriptor, read."""
    with path.open("rb") as f:
        return read_new(
            f, os.fstat(f.fileno()), state, line_limit=line_limit, final=final, max_bytes=max_bytes
        )


def drain(
    path: Path,
    state: FileState | None,
    *,
    line_limit: int = LIMIT,
    final: bool = False,
    max_bytes: int = 4 * 1024 * 1024,
) -> tuple[list[Line], FileState, list[ReadResult]]:
    """Call until at_eof; round-trip the state through JSON between calls like the store does."""
    lines: list[Line] = []
    results: list[ReadResult] = []
    for _ in range(100_000):
        result = read(path, state, line_limit=line_limit, final=final, max_bytes=max_bytes)
        results.append(result)
        lines.extend(result.lines)
        state = FileState.from_json(result.state.to_json())
        if result.at_eof:
            return lines, state, results
    raise AssertionError("never reached EOF")


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Truncate and write on the same inode, like Path.write_bytes."""
    ino = path.stat().st_ino
    path.write_bytes(data)
    assert path.stat().st_ino == ino


def triples(lines: list[Line]) -> list[tuple[int, int, bytes | None]]:
    return [(line.number, line.offset, line.data) for line in lines]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "valohai.metadata.jsonl"
    p.write_bytes(b"")
    return p


def test_empty_file(path: Path) -> None:
    result = read(path, None)
    assert result.lines == []
    assert result.at_eof and not result.partial and not result.rewritten
    assert (result.state.offset, result.state.line, result.state.generation) == (0, 0, 0)
    st = path.stat()
    assert (result.state.dev, result.state.inode) == (st.st_dev, st.st_ino)


def test_appends_line_by_line_across_calls(path: Path) -> None:
    append(path, b'{"a":1}\n')
    first = read(path, None)
    assert triples(first.lines) == [(1, 0, b'{"a":1}')]
    assert first.lines[0].length == 8
    assert first.state.offset == 8 and first.state.line == 1

    again = read(path, first.state)
    assert again.lines == [] and again.state == first.state and again.at_eof

    append(path, b'{"b":2}\n{"c":3}\n')
    second = read(path, first.state)
    assert triples(second.lines) == [(2, 8, b'{"b":2}'), (3, 16, b'{"c":3}')]
    assert second.state.offset == 24 and second.state.line == 3
    assert not second.rewritten and not second.partial and second.at_eof


def test_partial_line_held_then_completed(path: Path) -> None:
    append(path, b'{"a":1}\n{"b":')
    first = read(path, None)
    assert triples(first.lines) == [(1, 0, b'{"a":1}')]
    assert first.partial and first.at_eof
    assert first.state.offset == 8  # the partial line is not consumed

    append(path, b"2}\n")
    second = read(path, first.state)
    assert triples(second.lines) == [(2, 8, b'{"b":2}')]
    assert second.lines[0].length == 8
    assert not second.partial and second.state.offset == 16


def test_final_flushes_partial_line(path: Path) -> None:
    append(path, b'{"a":1}\n{"b":2}')
    held = read(path, None)
    assert held.partial and held.state.offset == 8

    flushed = read(path, held.state, final=True)
    assert triples(flushed.lines) == [(2, 8, b'{"b":2}')]
    assert flushed.lines[0].length == 7
    assert not flushed.partial and flushed.at_eof
    assert flushed.state.offset == path.stat().st_size and flushed.state.line == 2

    # Nothing is read twice afterwards.
    assert read(path, flushed.state, final=True).lines == []


def test_final_blank_partial_is_consumed_not_returned(path: Path) -> None:
    append(path, b"x\n  ")
    result = read(path, None, final=True)
    assert triples(result.lines) == [(1, 0, b"x")]
    assert result.state.offset == 4 and result.state.line == 2 and not result.partial


def test_crlf(path: Path) -> None:
    append(path, b'{"a":1}\r\n{"b":2}\r\n{"c":3}\r')
    result = read(path, None)
    assert triples(result.lines) == [(1, 0, b'{"a":1}'), (2, 9, b'{"b":2}')]
    assert [line.length for line in result.lines] == [9, 9]
    assert result.partial and result.state.offset == 18

    append(path, b"\n")
    done = read(path, result.state)
    assert triples(done.lines) == [(3, 18, b'{"c":3}')]
    assert done.lines[0].length == 9


def test_only_trailing_cr_is_stripped(path: Path) -> None:
    append(path, b"a\rb\r\r\n")
    assert triples(read(path, None).lines) == [(1, 0, b"a\rb\r")]


def test_blank_lines_counted_not_returned(path: Path) -> None:
    append(path, b'\n  \n{"a":1}\n\t\r\n\r\n{"b":2}\n\n')
    result = read(path, None)
    assert triples(result.lines) == [(3, 4, b'{"a":1}'), (6, 17, b'{"b":2}')]
    assert result.state.line == 7 and result.state.offset == path.stat().st_size


def test_truncation_rereads_from_zero(path: Path) -> None:
    append(path, b'{"a":1}\n{"b":2}\n')
    first = read(path, None)
    rewrite_in_place(path, b'{"z":9}\n')  # size below offset
    second = read(path, first.state)
    assert second.rewritten
    assert triples(second.lines) == [(1, 0, b'{"z":9}')]
    assert second.state.generation == 1 and second.state.offset == 8 and second.state.line == 1


def test_truncated_to_empty(path: Path) -> None:
    append(path, b"a\n")
    first = read(path, None)
    rewrite_in_place(path, b"")
    second = read(path, first.state)
    assert second.rewritten and second.lines == [] and second.state.offset == 0
    assert second.state.generation == 1
    # An empty file matches the empty checkpoint: no second rewrite.
    third = read(path, second.state)
    assert not third.rewritten and third.state.generation == 1


def test_in_place_rewrite_same_size_head_differs(path: Path) -> None:
    append(path, b'{"a":1}\n{"b":2}\n')
    first = read(path, None)
    rewrite_in_place(path, b'{"x":1}\n{"b":2}\n')
    second = read(path, first.state)
    assert second.rewritten and second.state.generation == 1
    assert triples(second.lines) == [(1, 0, b'{"x":1}'), (2, 8, b'{"b":2}')]


def test_in_place_rewrite_larger_only_tail_differs(path: Path) -> None:
    # Long enough that the head and tail windows are disjoint; only the tail window changes.
    body = b"".join(b'{"i":%04d}\n' % i for i in range(400))
    assert len(body) > HEAD_BYTES + TAIL_BYTES
    append(path, body)
    first = read(path, None)
    changed = body[:-3] + b"8}\n" + b'{"more":1}\n'
    rewrite_in_place(path, changed)
    second = read(path, first.state)
    assert second.rewritten and second.state.generation == 1
    assert len(second.lines) == 401
    assert second.lines[399].data == b'{"i":0398}'


def test_in_place_rewrite_same_prefix_is_not_a_rewrite(path: Path) -> None:
    body = b"".join(b'{"i":%04d}\n' % i for i in range(400))
    append(path, body)
    first = read(path, None)
    rewrite_in_place(path, body + b'{"new":1}\n')  # whole-file rewrite that only appends
    second = read(path, first.state)
    assert not second.rewritten and second.state.generation == 0
    assert triples(second.lines) == [(401, len(body), b'{"new":1}')]


def test_replacement_with_new_inode(tmp_path: Path, path: Path) -> None:
    append(path, b'{"a":1}\n')
    first = read(path, None)
    fresh = tmp_path / "new.jsonl"
    fresh.write_bytes(b'{"a":1}\n{"b":2}\n')  # same prefix, but a different file
    os.replace(fresh, path)
    assert path.stat().st_ino != first.state.inode
    second = read(path, first.state)
    assert second.rewritten and second.state.generation == 1
    assert second.state.inode == path.stat().st_ino
    assert triples(second.lines) == [(1, 0, b'{"a":1}'), (2, 8, b'{"b":2}')]


def test_reused_inode_caught_by_digest(path: Path) -> None:
    append(path, b'{"a":1}\n')
    first = read(path, None)
    # Same (dev, inode), size at least the offset, different consumed bytes: a reused inode.
    rewrite_in_place(path, b'{"q":7}\n{"r":8}\n')
    assert read(path, first.state).rewritten


def test_stale_stat_after_truncation(path: Path) -> None:
    append(path, b'{"a":1}\n{"b":2}\n')
    first = read(path, None)
    with path.open("rb") as f:
        stale = os.fstat(f.fileno())  # taken before the truncation: st_size still >= offset
        rewrite_in_place(path, b"x\n")
        result = read_new(f, stale, first.state, line_limit=LIMIT)
    assert result.rewritten and triples(result.lines) == [(1, 0, b"x")]


def test_generation_keeps_counting(path: Path) -> None:
    append(path, b"a\n")
    state = read(path, None).state
    for generation in (1, 2, 3):
        rewrite_in_place(path, b"b%d\n" % generation)
        result = read(path, state)
        assert result.rewritten and result.state.generation == generation
        state = result.state


def test_over_long_line_skipped_in_bounded_memory(path: Path) -> None:
    limit, max_bytes, huge = 1024 * 1024, 64 * 1024, 5 * 1024 * 1024
    append(path, b'{"a":1}\n' + b"x" * huge + b'\n{"b":2}\n')

    tracemalloc.start()
    try:
        lines, state, results = drain(path, None, line_limit=limit, max_bytes=max_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < limit + 16 * max_bytes, peak  # far below the 5 MiB line
    assert triples(lines) == [(1, 0, b'{"a":1}'), (2, 8, None), (3, 8 + huge + 1, b'{"b":2}')]
    assert lines[1].length > limit
    assert state.offset == path.stat().st_size and state.line == 3 and not state.skipping

    # Reported once, then skipped over several calls, each consuming about max_bytes.
    offsets = [r.state.offset for r in results]
    assert offsets == sorted(offsets)
    skipping = [r for r in results if r.state.skipping]
    assert len(skipping) > 10
    steps = [b.state.offset - a.state.offset for a, b in zip(results, results[1:], strict=False)]
    assert max(steps[1:]) <= 2 * max_bytes
    assert sum(line.data is None for line in lines) == 1


def test_over_long_line_within_one_chunk(path: Path) -> None:
    append(path, b"a\n" + b"y" * 50 + b"\nb\n")
    result = read(path, None, line_limit=10)
    assert triples(result.lines) == [(1, 0, b"a"), (2, 2, None), (3, 53, b"b")]
    assert result.lines[1].length == 51 and not result.state.skipping


def test_over_long_partial_line_then_newline_later(path: Path) -> None:
    append(path, b"a\n" + b"y" * 50)
    first = read(path, None, line_limit=10)
    assert triples(first.lines) == [(1, 0, b"a"), (2, 2, None)]
    assert first.state.skipping and first.state.offset == 52 and not first.partial

    append(path, b"y" * 20)
    second = read(path, first.state, line_limit=10)
    assert second.lines == [] and second.state.skipping and second.state.offset == 72

    append(path, b"yy\nb\n")
    third = read(path, second.state, line_limit=10)
    assert triples(third.lines) == [(3, 75, b"b")]
    assert not third.state.skipping and third.state.line == 3


def test_over_long_last_line_with_final(path: Path) -> None:
    append(path, b"a\n" + b"z" * 100)
    first = read(path, None, line_limit=10, final=True)
    assert triples(first.lines) == [(1, 0, b"a"), (2, 2, None)]
    assert first.state.offset == 102 and not first.state.skipping and not first.partial


def test_over_long_last_line_with_final_after_skipping(path: Path) -> None:
    append(path, b"a\n" + b"z" * 100)
    first = read(path, None, line_limit=10)
    assert first.state.skipping
    append(path, b"z" * 100)
    done = read(path, first.state, line_limit=10, final=True)
    assert done.lines == [] and not done.state.skipping
    assert done.state.offset == 202 and done.state.line == 2 and done.at_eof


def test_final_partial_over_limit_short_enough_to_not_skip(path: Path) -> None:
    # 11 bytes without newline and limit 10: held (not yet over), flagged only at final.
    append(path, b"q" * 10 + b"\r")
    held = read(path, None, line_limit=10)
    assert held.lines == [] and held.partial and not held.state.skipping
    flushed = read(path, held.state, line_limit=10, final=True)
    assert triples(flushed.lines) == [(1, 0, None)]


def test_crlf_line_exactly_at_limit(path: Path) -> None:
    append(path, b"q" * 10 + b"\r")
    held = read(path, None, line_limit=10)
    append(path, b"\n")
    assert triples(read(path, held.state, line_limit=10).lines) == [(1, 0, b"q" * 10)]


def test_max_bytes_batching(path: Path) -> None:
    body = [b'{"i":%d}' % i for i in range(1000)]
    append(path, b"".join(line + b"\n" for line in body))
    lines, state, results = drain(path, None, max_bytes=500)
    assert len(results) > 10
    assert all(not r.at_eof for r in results[:-1])
    expected, offset = [], 0
    for number, data in enumerate(body, 1):
        expected.append((number, offset, data))
        offset += len(data) + 1
    assert triples(lines) == expected
    assert state.offset == offset and state.line == 1000


def test_line_longer_than_max_bytes_but_within_limit(path: Path) -> None:
    big = b'{"v":"' + b"w" * 200_000 + b'"}'
    append(path, b"a\n" + big + b"\nb\n")
    lines, state, _ = drain(path, None, line_limit=1024 * 1024, max_bytes=1000)
    assert triples(lines) == [(1, 0, b"a"), (2, 2, big), (3, 2 + len(big) + 1, b"b")]
    assert state.offset == path.stat().st_size


def test_state_json_round_trip() -> None:
    state = FileState(
        dev=5,
        inode=123,
        offset=77,
        line=4,
        head="ab" * 8,
        tail="cd" * 8,
        skipping=True,
        generation=3,
    )
    raw = state.to_json()
    assert " " not in raw
    assert FileState.from_json(raw) == state
    assert FileState.from_json(raw.encode()) == state


def test_state_json_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        FileState.from_json("[]")
    with pytest.raises(ValueError):
        FileState.from_json('{"dev":1,"inode":2,"offset":true,"line":0,"head":"","tail":""}')
    with pytest.raises(ValueError):
        FileState.from_json('{"dev":1,"inode":2,"offset":0,"line":0,"head":""}')


def test_bad_arguments(path: Path) -> None:
    with pytest.raises(ValueError):
        read(path, None, line_limit=0)
    with pytest.raises(ValueError):
        read(path, None, max_bytes=0)


def test_state_digests_describe_consumed_bytes(path: Path) -> None:
    import hashlib

    body = b"".join(b"line %d\n" % i for i in range(500))
    append(path, body + b"partial")
    state = read(path, None, max_bytes=700).state
    consumed = body[: state.offset]

    def digest(data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=8).hexdigest()

    assert state.head == digest(consumed[:HEAD_BYTES])
    assert state.tail == digest(consumed[-TAIL_BYTES:])


def reference(content: bytes, limit: int) -> list[tuple[int, int, bytes | None]]:
    """Split the finished file directly: what the tailer must have produced, in total."""
    out: list[tuple[int, int, bytes | None]] = []
    pieces = content.split(b"\n")
    offset = 0
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if last and not piece:
            break
        data = piece[:-1] if not last and piece.endswith(b"\r") else piece
        if len(data) > limit:
            out.append((i + 1, offset, None))
        elif data.strip():
            out.append((i + 1, offset, data))
        offset += len(piece) + 1
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.binary(max_size=400).map(lambda raw: bytes(ALPHABET[byte % len(ALPHABET)] for byte in raw)),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    max_bytes=st.integers(min_value=1, max_value=64),
    line_limit=st.integers(min_value=1, max_value=40),
)
def test_random_appends_match_direct_split(
    tmp_path_factory: pytest.TempPathFactory,
    content: bytes,
    cuts: list[int],
    max_bytes: int,
    line_limit: int,
) -> None:
    path = tmp_path_factory.mktemp("tail") / "valohai.metadata.jsonl"
    path.write_bytes(b"")
    bounds = sorted({0, len(content), *(c for c in cuts if c < len(content))})
    state: FileState | None = None
    lines: list[Line] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        append(path, content[start:end])
        got, state, results = drain(path, state, line_limit=line_limit, max_bytes=max_bytes)
        lines.extend(got)
        assert not any(r.rewritten for r in results)
    got, state, results = drain(path, state, line_limit=line_limit, max_bytes=max_bytes, final=True)
    lines.extend(got)
    assert not results[-1].partial
    assert triples(lines) == reference(content, line_limit)
    assert state.offset == len(content)
    assert state.line == len(content.split(b"\n")) - (content.endswith(b"\n") or not content)
