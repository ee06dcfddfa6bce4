"""Staging in Redis: entries per target in arrival order, file checkpoints, completion flags, the due set.

`area.Staging` is the one door to Redis: every other module reads and writes the staging area
through it. Its atomic steps are the Lua scripts in `lua/` (`scripts.py` reads them);
`health.py` holds heartbeats, the backlog and the sweep; `client.py` the client and the Redis
errors the rest of the package catches (nothing outside this package imports `redis`).
"""

from .area import READ_BATCH, REJECTS_KEPT, Held, Sent, Snapshot, Staging, after_watermark
from .client import REDIS_TRANSIENT, Client, RedisConnectionError, RedisError, Subscription, connect
from .clock import now_iso

__all__ = [
    "READ_BATCH",
    "REDIS_TRANSIENT",
    "REJECTS_KEPT",
    "Client",
    "Held",
    "RedisConnectionError",
    "RedisError",
    "Sent",
    "Snapshot",
    "Staging",
    "Subscription",
    "after_watermark",
    "connect",
    "now_iso",
]
