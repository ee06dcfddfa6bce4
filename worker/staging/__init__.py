"""Staging in Redis: entries per target in arrival order, file checkpoints, completion flags, the due set.

`area.Staging` is the one door to Redis: every other module reads and writes the staging area
through it. Its atomic steps are the Lua scripts in `lua/` (`scripts.py` reads them);
`health.py` holds heartbeats, the backlog and the sweep.
"""

from .area import READ_BATCH, REJECTS_KEPT, Held, Sent, Snapshot, Staging
from .clock import now_iso

__all__ = ["READ_BATCH", "REJECTS_KEPT", "Held", "Sent", "Snapshot", "Staging", "now_iso"]
