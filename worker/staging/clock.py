"""The staging area's clock: ISO-8601 times and milliseconds, both UTC, as Redis keeps them."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def now_ms() -> int:
    return int(time.time() * 1000)
