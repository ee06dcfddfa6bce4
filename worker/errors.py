"""The one exception tree. Every error is picklable (plain args) so it survives Celery."""

from __future__ import annotations


class SidecarError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(SidecarError):
    """Raised when a setting is missing or malformed; names the setting."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


class BadURI(SidecarError):
    """Raised when a dataset URI is malformed; carries the URI and why."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(uri, problem)
        self.uri = uri
        self.problem = problem

    def __str__(self) -> str:
        # Capped: a reject's reason is kept in Redis and listed; a hostile line's URI may be 1 MiB.
        uri = self.uri if len(self.uri) <= 200 else self.uri[:200] + "..."
        return f"bad dataset URI {uri!r}: {self.problem}"


class InvalidEntry(SidecarError):
    """Raised when a line or an API write breaks the schema or the rules; carries the reason."""

    def __init__(self, reason: str, key: str | None = None) -> None:
        super().__init__(reason, key)
        self.reason = reason
        self.key = key

    def __str__(self) -> str:
        return self.reason


class ReservedKey(InvalidEntry):
    """Raised when a user write sets a platform-managed `valohai.` key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} uses the reserved 'valohai.' prefix", key)

    def __reduce__(self) -> tuple[type[ReservedKey], tuple[str]]:
        return (ReservedKey, (self.key or "",))


class NotFound(SidecarError):
    """Raised when a dataset, version or other object does not exist; carries what was asked."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what

    def __str__(self) -> str:
        return f"not found: {self.what}"


class ServiceUnavailable(SidecarError):
    """Raised when Redis or the database cannot be reached; names which and where."""

    def __init__(self, service: str, detail: str) -> None:
        super().__init__(service, detail)
        self.service = service
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.service} unavailable: {self.detail}"


class BadDefinition(InvalidEntry):
    """Raised when a property definition does not parse or contradicts itself; names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field)
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[BadDefinition], tuple[str, str]]:
        return (BadDefinition, (self.field, self.problem))
