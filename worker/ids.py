"""Public ids: strings in UUID form that sort by creation time, as the platform's do.

The layout is UUIDv7's (RFC 9562): the first 48 bits are the creation time in milliseconds, then
the version nibble 7, 12 bits of a per-process sequence (so ids made in one millisecond by one
process still sort in the order they were made), the variant bits and 62 random bits. Rows keep
their integer primary keys inside the database (the index and history tables refer to them);
this id is what the API, the pages and the CLI show, and it never changes once given.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_lock = threading.Lock()
_last_ms = 0
_sequence = 0


def new_id(ms: int | None = None) -> str:
    """A time-ordered id for an object created now (or at `ms`, milliseconds since the epoch)."""
    global _last_ms, _sequence
    if ms is None:
        ms = time.time_ns() // 1_000_000
    with _lock:
        if ms == _last_ms:
            _sequence = (_sequence + 1) & 0xFFF
        else:
            _last_ms, _sequence = ms, int.from_bytes(os.urandom(2), "big") & 0x7FF
        sequence = _sequence
    tail = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | sequence << 64 | 0b10 << 62 | tail
    return str(uuid.UUID(int=value))


def looks_like_id(text: str) -> bool:
    """Whether `text` is a UUID in its canonical lowercase form (what clients test before asking
    for an object by id rather than by name)."""
    return bool(_PATTERN.fullmatch(text.lower()))


def created_ms(public_id: str) -> int:
    """The creation time (ms) a time-ordered id carries."""
    return uuid.UUID(public_id).int >> 80
