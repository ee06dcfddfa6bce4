"""Building the Redis client, the staging area and the database engine from settings."""

from __future__ import annotations

from sqlalchemy import Engine

from .keys import Keys
from .settings import Settings
from .staging import Client, Staging, connect
from .store.db import make_engine


def redis_client(settings: Settings) -> Client:
    """A client for the deployment's Redis (the private one of `sidecar up` if none is set)."""
    return connect(settings.effective_redis_url())


def staging(settings: Settings, client: Client | None = None) -> Staging:
    return Staging(client or redis_client(settings), Keys(settings.redis_prefix))


def engine(settings: Settings) -> Engine:
    return make_engine(settings.effective_database_url)
