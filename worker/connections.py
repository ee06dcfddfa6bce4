"""Building the Redis client, the staging area and the database engine from settings."""

from __future__ import annotations

import redis
from sqlalchemy import Engine

from .keys import Keys
from .settings import Settings
from .staging import Staging
from .store.db import make_engine


def redis_client(settings: Settings) -> redis.Redis:
    """A client for the deployment's Redis (the private one of `sidecar up` if none is set)."""
    return redis.Redis.from_url(
        settings.effective_redis_url(), socket_connect_timeout=5, health_check_interval=30
    )


def staging(settings: Settings, client: redis.Redis | None = None) -> Staging:
    return Staging(client or redis_client(settings), Keys(settings.redis_prefix))


def engine(settings: Settings) -> Engine:
    return make_engine(settings.effective_database_url)
