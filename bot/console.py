"""A Notifier that prints each transition and alert to a stream, rendered from the store."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import jinja2

from engine.notifier import AlertKind
from engine.store import Store


class ConsoleNotifier:
    def __init__(self, store: Store, env: jinja2.Environment, stream: TextIO = sys.stdout) -> None:
        self.store = store
        self.env = env
        self.stream = stream
        self._last_event: dict[int, int] = {}

    async def task_changed(self, task_id: int) -> None:
        task = await self.store.get_task(task_id)
        if task is None:
            return
        template = self.env.get_template("console/event.txt.j2")
        seen = self._last_event.get(task_id, 0)
        for event in await self.store.events(task_id):
            if event.id <= seen:
                continue
            self._last_event[task_id] = event.id
            self.stream.write(
                template.render(
                    at=time.strftime("%H:%M:%S", time.localtime(event.at)),
                    work_item=task.work_item,
                    event=event,
                    show_detail=event.kind in {"rolled_back", "escalated", "rejected", "failed"},
                )
            )
        self.stream.flush()

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        task = await self.store.get_task(task_id)
        self.stream.write(
            self.env.get_template("console/alert.txt.j2").render(
                work_item=task.work_item if task else "?", kind=kind.value, detail=detail
            )
        )
        self.stream.flush()
