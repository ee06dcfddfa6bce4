"""Pure core: read the new complete lines of a tailed JSON Lines file, with a checkpoint.

No Redis and no clock in here: the caller opens the file, takes `os.fstat` of the open descriptor,
hands in the last stored `FileState`, and stores the returned state atomically with the lines.

What this guards against (each one a bug seen in real log shippers):

- A line still being written (no newline yet) is held, not consumed, so the checkpoint never
  points into the middle of a line; only `final=True` (the writer is done) flushes it.
- A file rewritten in place (truncate + write, same inode) or replaced (new inode, or an old inode
  reused) is caught by identity, by "size below offset", and by digests of the first and last
  consumed bytes; reading then restarts at 0 under a new generation.
- A line over the limit is reported once and skipped in bounded memory, keeping the offset exact.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, TypeVar

import orjson

HEAD_BYTES = 1024
TAIL_BYTES = 1024
# Size of one read. Memory held is at most about line_limit + READ_CHUNK, whatever max_bytes is.
READ_CHUNK = 64 * 1024

_T = TypeVar("_T")


def _digest(data: bytes | bytearray) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


_EMPTY_DIGEST = _digest(b"")


@dataclass(frozen=True)
class FileState:
    """Checkpoint of one tailed file; stored as JSON next to the entries it produced.

    `offset` is the count of consumed bytes: just past the last complete line handled, or past the
    skipped bytes of an over-long line. `line` is the count of consumed lines (the next line is
    `line + 1`). `head` and `tail` are blake2b-64 hex digests of the consumed bytes
    `[0, min(offset, HEAD_BYTES))` and `[max(0, offset - TAIL_BYTES), offset)`. `skipping` means
    the reader is inside an over-long line already reported. `generation` counts the rewrites or
    replacements detected so far.
    """

    dev: int
    inode: int
    offset: int
    line: int
    head: str
    tail: str
    skipping: bool = False
    generation: int = 0

    def to_json(self) -> str:
        """Compact JSON of every field."""
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> FileState:
        """Parse `to_json` output; raises ValueError when a field is missing or of the wrong type."""
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("file state must be a JSON object")
        return cls(
            dev=_field(data, "dev", int),
            inode=_field(data, "inode", int),
            offset=_field(data, "offset", int),
            line=_field(data, "line", int),
            head=_field(data, "head", str),
            tail=_field(data, "tail", str),
            skipping=_field(data, "skipping", bool, False),
            generation=_field(data, "generation", int, 0),
        )


def _field(data: dict[str, Any], name: str, kind: type[_T], default: _T | None = None) -> _T:
    value = data.get(name, default)
    # bool is a subclass of int; a JSON `true` is not a valid offset.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"file state field {name!r} must be {kind.__name__}, got {value!r}")
    return value


@dataclass(slots=True)  # not frozen: one is built per line read, and a frozen __init__ is 4x slower
class Line:
    """One line handed on.

    `data` has no trailing b"\\n" (nor the b"\\r" of a b"\\r\\n"); it is None for a line over the
    limit, which is reported once and skipped. `length` is the bytes the line occupies including
    its newline (for an over-long line: the bytes seen when it was reported).
    """

    number: int
    offset: int
    data: bytes | None
    length: int


@dataclass(frozen=True)
class ReadResult:
    """What one `read_new` call produced.

    `state` is the checkpoint to store atomically with `lines`. `rewritten`: a rewrite, truncation
    or replacement was detected and reading restarted at 0. `partial`: the call reached EOF and
    bytes after the consumed region remain (a held partial line). `at_eof`: the call reached the
    end of the file, so the caller can stop looping.
    """

    lines: list[Line]
    state: FileState
    rewritten: bool
    partial: bool
    at_eof: bool


def read_new(
    f: BinaryIO,
    st: os.stat_result,
    state: FileState | None,
    *,
    line_limit: int,
    final: bool = False,
    max_bytes: int = 4 * 1024 * 1024,
) -> ReadResult:
    """Read complete lines after `state.offset` (at most about `max_bytes` of new data per call).

    `f` is open in binary mode and `st` is `os.fstat(f.fileno())` taken by the caller. `state` None
    means a new file. Blank lines are counted but not returned. `max_bytes` is a soft batch size
    (a line longer than it but within `line_limit` is still returned whole); `line_limit` is the
    hard cap on a line's bytes. With `final=True` a trailing line without newline is emitted too.
    """
    if line_limit < 1 or max_bytes < 1:
        raise ValueError("line_limit and max_bytes must be positive")
    start, window, rewritten = _resume(f, st, state)
    reader = _Reader(f, start, window, line_limit, min(READ_CHUNK, max_bytes))
    reader.run(max_bytes, final)
    return ReadResult(
        lines=reader.lines,
        state=reader.state(start),
        rewritten=rewritten,
        partial=reader.at_eof and bool(reader.pending),
        at_eof=reader.at_eof,
    )


class _Window:
    """The first HEAD_BYTES and the last TAIL_BYTES of the consumed bytes, fed in file order."""

    def __init__(self, head: bytes = b"", tail: bytes = b"") -> None:
        self._head = bytearray(head)
        self._tail = bytearray(tail)

    def feed(self, data: bytes | bytearray) -> None:
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        self._tail += data[-TAIL_BYTES:]
        del self._tail[:-TAIL_BYTES]

    def digests(self) -> tuple[str, str]:
        return _digest(self._head), _digest(self._tail)


def _resume(f: BinaryIO, st: os.stat_result, state: FileState | None) -> tuple[FileState, _Window, bool]:
    """Where to start: the stored state if the file still holds its consumed bytes, else 0."""
    if state is None:
        return _fresh(st, 0), _Window(), False
    # Cheap checks first; the digest reads only happen for a file that still looks the same.
    if (st.st_dev, st.st_ino) == (state.dev, state.inode) and st.st_size >= state.offset:
        window = _verify(f, state)
        if window is not None:
            return state, window, False
    return _fresh(st, state.generation + 1), _Window(), True


def _fresh(st: os.stat_result, generation: int) -> FileState:
    return FileState(
        dev=st.st_dev,
        inode=st.st_ino,
        offset=0,
        line=0,
        head=_EMPTY_DIGEST,
        tail=_EMPTY_DIGEST,
        generation=generation,
    )


def _verify(f: BinaryIO, state: FileState) -> _Window | None:
    """Re-read the head and tail windows of the consumed bytes; None if they no longer match.

    `st` may be stale (the file truncated after the fstat), so a short read counts as a mismatch
    rather than trusting st.st_size.
    """
    offset = state.offset
    if offset <= HEAD_BYTES + TAIL_BYTES:
        # The windows overlap or touch: one small read covers both.
        consumed = _read_at(f, 0, offset)
        if len(consumed) < offset:
            return None
        head, tail = consumed[:HEAD_BYTES], consumed[-TAIL_BYTES:]
    else:
        head = _read_at(f, 0, HEAD_BYTES)
        tail = _read_at(f, offset - TAIL_BYTES, TAIL_BYTES)
        if len(head) < HEAD_BYTES or len(tail) < TAIL_BYTES:
            return None
    if _digest(head) != state.head or _digest(tail) != state.tail:
        return None
    return _Window(head, tail)


def _read_at(f: BinaryIO, position: int, size: int) -> bytes:
    """Up to `size` bytes at `position`; short only at EOF (a raw file may return short reads)."""
    f.seek(position)
    parts: list[bytes] = []
    while size > 0:
        part = f.read(size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


class _Reader:
    """One call's scan: consumes complete lines from `start.offset` on, holding a partial line.

    Invariant: `pending` holds the unconsumed bytes read so far and starts at file offset
    `self.offset`; while `skipping` it is empty, because skipped bytes are consumed as read.
    """

    def __init__(self, f: BinaryIO, start: FileState, window: _Window, line_limit: int, chunk: int) -> None:
        self._f = f
        self._window = window
        self._limit = line_limit
        self._chunk = chunk
        self.offset = start.offset
        self.line = start.line
        self.skipping = start.skipping
        self.pending = bytearray()
        self.lines: list[Line] = []
        self.at_eof = False

    def run(self, max_bytes: int, final: bool) -> None:
        """Read chunks until EOF, or until past `max_bytes` once something was consumed."""
        self._f.seek(self.offset)
        start, read = self.offset, 0
        # Keep reading past the budget while nothing was consumed: a line longer than max_bytes
        # must still come out whole (it is bounded by line_limit, after which it is skipped).
        while read < max_bytes or self.offset == start:
            # Read until the file says EOF, not until st.st_size: a writer may be appending.
            chunk = self._f.read(self._chunk)
            if not chunk:
                self.at_eof = True
                break
            read += len(chunk)
            self._take(chunk)
        if self.at_eof and final:
            self._flush()

    def state(self, start: FileState) -> FileState:
        """The checkpoint for the consumed region, with digests of exactly those bytes."""
        head, tail = self._window.digests()
        return FileState(
            dev=start.dev,
            inode=start.inode,
            offset=self.offset,
            line=self.line,
            head=head,
            tail=tail,
            skipping=self.skipping,
            generation=start.generation,
        )

    def _take(self, chunk: bytes) -> None:
        if self.skipping:
            chunk = self._skip(chunk)
            if not chunk:
                return
        scan_from = len(self.pending)  # bytes already in `pending` hold no newline
        self.pending += chunk
        self._split(scan_from)
        if self._pending_length() > self._limit:
            self._start_skipping()

    def _skip(self, chunk: bytes) -> bytes:
        """Consume the over-long line's bytes up to its newline; return what follows it."""
        newline = chunk.find(b"\n")
        if newline < 0:
            self._consume(chunk)
            return b""
        self._consume(chunk[: newline + 1])
        self.skipping = False
        return chunk[newline + 1 :]

    def _split(self, scan_from: int) -> None:
        """Hand on every complete line in `pending`, then consume them in one go."""
        pending, start = self.pending, 0
        while (newline := pending.find(b"\n", max(start, scan_from))) >= 0:
            raw = pending[start:newline]
            if raw.endswith(b"\r"):
                del raw[-1:]
            self._emit(raw, self.offset + start, newline + 1 - start)
            start = newline + 1
        if start:
            self._consume(pending[:start])
            del pending[:start]

    def _pending_length(self) -> int:
        # A trailing b"\r" may yet turn out to be part of a b"\r\n", which does not count.
        return len(self.pending) - self.pending.endswith(b"\r")

    def _start_skipping(self) -> None:
        """Report the over-long partial line now and drop its bytes, so memory stays bounded."""
        self._emit(None, self.offset, len(self.pending))
        self._consume(self.pending)
        self.pending.clear()
        self.skipping = True

    def _flush(self) -> None:
        """At EOF of a finished file: the line without newline is complete as it stands."""
        if self.skipping:
            # The over-long last line ends at EOF; anything appended later starts a new line.
            self.skipping = False
        elif self.pending:
            self._emit(self.pending, self.offset, len(self.pending))
            self._consume(self.pending)
            self.pending.clear()

    def _emit(self, raw: bytearray | None, offset: int, length: int) -> None:
        """Count one line; return it unless blank; report it as None if over the limit."""
        self.line += 1
        if raw is None or len(raw) > self._limit:
            self.lines.append(Line(self.line, offset, None, length))
        elif raw.strip():
            self.lines.append(Line(self.line, offset, bytes(raw), length))

    def _consume(self, data: bytes | bytearray) -> None:
        self._window.feed(data)
        self.offset += len(data)
