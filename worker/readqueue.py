"""Pure core: which file the watcher reads next.

The file with the least to read goes first, so one line appended to a quiet file is staged
after one slice of a busy file's backlog, not after a whole pass over every busy file (under
8 busy writers that pass took ~15 ms, and it was every appended line's wait). How much a file
has to read is guessed from what its last read took: a `stat` per candidate would cost more
than it saves. A file that has waited `max_wait` seconds goes first whatever its size, so busy
files are never starved by a stream of small ones; but overdue files and the smallest take turns,
so a quiet file waits for one overdue file at most, not for all of them (when the watcher falls
behind, every busy file is overdue at once).

Both orders are heaps with lazy deletion: an entry is live while its token is the path's
current one, so adding, re-adding and popping stay O(log n) with thousands of queued files.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from pathlib import Path

# Paths whose last read size is remembered; past this many (executions come and go), forget all.
MEMORY = 100_000


class ReadQueue:
    """Queued paths, each once, popped smallest-last-read first, or oldest first once overdue."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait
        self._token: dict[Path, int] = {}  # queued path -> the token of its live entries
        self._by_size: list[tuple[int, int, Path]] = []  # (last read bytes, token, path)
        self._by_age: deque[tuple[float, int, Path]] = deque()  # (queued at, token, path), in order
        self._last_read: dict[Path, int] = {}
        self._tokens = itertools.count()
        self._overdue_last = False  # the last pop was an overdue file: the smallest goes next

    def __len__(self) -> int:
        return len(self._token)

    def __contains__(self, path: Path) -> bool:
        return path in self._token

    def add(self, path: Path, now: float) -> None:
        """Queue `path` (a path already queued keeps its place and its age)."""
        if path in self._token:
            return
        token = self._token[path] = next(self._tokens)
        # A file never read yet counts as small: it is usually a new execution's first lines.
        heapq.heappush(self._by_size, (self._last_read.get(path, 0), token, path))
        self._by_age.append((now, token, path))

    def pop(self, now: float) -> Path | None:
        """The next path to read, or None when nothing is queued."""
        by_age = self._by_age
        while by_age and self._token.get(by_age[0][2]) != by_age[0][1]:
            by_age.popleft()  # popped already, through the other order
        if by_age and now - by_age[0][0] >= self.max_wait and not self._overdue_last:
            _, _, path = by_age.popleft()
            del self._token[path]
            self._overdue_last = True
            return path
        self._overdue_last = False
        while self._by_size:
            _, token, path = heapq.heappop(self._by_size)
            if self._token.get(path) == token:
                del self._token[path]
                return path
        return None

    def smallest(self) -> int | None:
        """The last read size of the smallest queued file (None when nothing is queued)."""
        by_size = self._by_size
        while by_size and self._token.get(by_size[0][2]) != by_size[0][1]:
            heapq.heappop(by_size)  # popped already, through the other order
        return by_size[0][0] if by_size else None

    def read(self, path: Path, size: int) -> None:
        """Remember how many bytes the last read of `path` took.

        A read that found nothing says nothing of the file's pace (its event came after an
        earlier read had taken its lines): a busy file would pass for the smallest next time, and
        a quiet file queued behind it would wait for its next, large turn.
        """
        if not size:
            return
        if len(self._last_read) >= MEMORY:
            self._last_read.clear()
        self._last_read[path] = size
