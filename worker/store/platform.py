"""What a `dataset_version_created` event says of the objects: the platform's ids and tags."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import sqlalchemy.exc
from sqlalchemy import Engine, update

from ..uris import Target
from ..webhooks import PlatformIds
from .apply import Applier
from .db import writer
from .models import Dataset, DatasetVersion

log = logging.getLogger(__name__)


def record_platform_ids(engine: Engine, target: Target, ids: PlatformIds) -> None:
    """Keep the platform's ids (once given, never changed) and tags on the version and its
    dataset, creating them as building if no line named them yet.

    The rows are created the way an apply creates them (`ON CONFLICT DO NOTHING`), so this races
    safely with an apply of the same version; the id is set only where none is, so a repeated or
    reordered event changes nothing. An id another object already holds is logged and left out:
    the completion stands without it."""
    now = datetime.now(UTC)
    with writer(engine).begin() as conn:
        applier = Applier(conn, now)
        version_id = applier.version(target).id
        dataset_id = applier.dataset(target.dataset).id
    for model, row_id, platform_id, tags in (
        (Dataset, dataset_id, ids.dataset_id, ids.dataset_tags),
        (DatasetVersion, version_id, ids.version_id, ids.version_tags),
    ):
        try:
            with writer(engine).begin() as conn:
                if platform_id is not None:
                    conn.execute(
                        update(model)
                        .where(model.id == row_id, model.platform_id.is_(None))
                        .values(platform_id=platform_id)
                    )
                if tags:
                    conn.execute(update(model).where(model.id == row_id).values(tags=list(tags)))
        except sqlalchemy.exc.IntegrityError:
            log.warning("platform id %r of %s is already another object's; not kept", platform_id, target.key)
