"""What the watcher, the webhook and the CLI send applies through.

`tasks.Enqueuer` is the real sender (Celery tasks). A plain callable of one target key also
works (an in-process harness, an embedding): `sender` wraps it so that a batch goes one target
at a time and a drain sends each target due for too long.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

Enqueue = Callable[[str], None]


@runtime_checkable
class Sender(Protocol):
    def __call__(self, target_key: str) -> None:
        """An apply of one target."""

    def many(self, target_keys: Iterable[str]) -> None:
        """Applies of many targets due at once."""

    def drain(self, older_than: float) -> None:
        """An apply of every target due for longer than `older_than` seconds (`Health.sweep`)."""

    def busy(self) -> bool:
        """Whether batched applies are still queued (then they, not a drain, apply their targets)."""


@runtime_checkable
class Delivers(Protocol):
    def deliver(self, staging: Any) -> bool:
        """A send of the due change notifications, unless one is on its way (`tasks.Enqueuer`)."""


class OneByOne:
    """A plain callable as a `Sender`: every target is sent alone."""

    def __init__(self, send: Enqueue, due: Callable[[float], list[str]] | None = None) -> None:
        self.send = send
        self.due = due

    def __call__(self, target_key: str) -> None:
        self.send(target_key)

    def many(self, target_keys: Iterable[str]) -> None:
        for key in sorted(set(target_keys)):
            self.send(key)

    def drain(self, older_than: float) -> None:
        for key in self.due(older_than) if self.due is not None else []:
            self.send(key)

    def busy(self) -> bool:
        return False  # every target is sent at once: nothing waits in a queue


def sender(enqueue: Enqueue | Sender, due: Callable[[float], list[str]] | None = None) -> Sender:
    """`enqueue` as a `Sender` (`due` lists the targets due for longer than its argument)."""
    return enqueue if isinstance(enqueue, Sender) else OneByOne(enqueue, due)
