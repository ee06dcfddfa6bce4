"""The Redis client and the Redis errors, as the rest of the package sees them.

Everything outside `worker/staging/` catches these names instead of importing `redis`, so the
staging package stays the one door to Redis (`tests/test_layers.py` checks it).
"""

from __future__ import annotations

import redis
from redis.client import PubSub

RedisError = redis.RedisError  # anything Redis or the client raised
RedisConnectionError = redis.ConnectionError  # Redis is not reachable (down, restarting, refused)
# Errors worth a retry: Redis is down or slow for now.
REDIS_TRANSIENT: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
Subscription = PubSub  # a pub/sub subscription (`Staging.completions`)
Client = redis.Redis


def connect(url: str, *, timeout: float | None = 5, health_check_interval: int = 30) -> redis.Redis:
    """A client for the Redis at `url` (connections are made on first use)."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout, health_check_interval=health_check_interval
    )
