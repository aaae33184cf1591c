"""How the engine tells the outside world what happened.

The bot implements this protocol (cards and alerts in Telegram); the headless
demo prints. Implementations render from the store: the engine passes only ids
and the kind of alert, never user-visible text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol

log = logging.getLogger(__name__)


class AlertKind(StrEnum):
    """The only things worth a separate, notifying message: each needs a person."""

    BRD_READY = "brd_ready"
    NEEDS_INPUT = "needs_input"
    ESCALATED = "escalated"
    AGENT_FAILED = "agent_failed"
    DEPLOY_FAILED = "deploy_failed"
    TASK_ERROR = "task_error"


class Notifier(Protocol):
    async def task_changed(self, task_id: int) -> None: ...

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None: ...


class NullNotifier:
    async def task_changed(self, task_id: int) -> None:
        return None

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        return None


class FanoutNotifier:
    """Passes each call to several notifiers; one failing never stops the others or the engine."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self.notifiers = list(notifiers)

    async def task_changed(self, task_id: int) -> None:
        for notifier in self.notifiers:
            try:
                await notifier.task_changed(task_id)
            except Exception:
                log.exception("notifier %r failed on task %s", notifier, task_id)

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        for notifier in self.notifiers:
            try:
                await notifier.alert(task_id, kind, detail)
            except Exception:
                log.exception("notifier %r failed on alert %s for task %s", notifier, kind, task_id)
