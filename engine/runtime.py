"""The engine assembled: store, git workspace, pipeline, job queue and worker.

`conveyor run`, `conveyor demo` and the tests build the same object; the bot
adds its notifier and the HTTP server around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engine.config import Settings
from engine.git import GitWorkspace
from engine.jobs import JobQueue, Worker
from engine.notifier import Notifier, NullNotifier
from engine.pipeline import Pipeline
from engine.stages import HUMAN_HOLD, Status
from engine.store import Store, Task
from engine.templating import prompt_environment

log = logging.getLogger(__name__)

SETTLED: frozenset[str] = frozenset({Status.DONE, Status.CANCELLED, Status.FAILED, *HUMAN_HOLD})


class Engine:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.db_path)
        self.git = GitWorkspace(settings.workdir)
        self.queue = JobQueue(self.store, settings.job_lease_s)
        self.pipeline = Pipeline(
            settings, self.store, self.git, notifier or NullNotifier(), prompt_environment()
        )
        self.worker = Worker(
            self.queue,
            self.pipeline.run_job,
            self.pipeline.on_job_crash,
            settings.max_concurrency,
        )
        self.pipeline.wake_worker = self.worker.wake
        self._worker_task: asyncio.Task[None] | None = None

    async def open(self) -> Engine:
        await self.store.open()
        return self

    def start_worker(self) -> None:
        self._worker_task = asyncio.create_task(self.worker.run(), name="worker")

    async def close(self) -> None:
        if self._worker_task is not None:
            await self.worker.stop()
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
            self._worker_task = None
        await self.store.close()

    async def __aenter__(self) -> Engine:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_settled(self, task_id: int, statuses: frozenset[str] = SETTLED) -> Task:
        """Wait until the task reaches one of `statuses` with no job left to run.

        An active task with no job (a red gate that waits for the reconciler) is
        settled too: nothing will move it from inside the engine.
        """
        while True:
            task = await self.store.get_task(task_id)
            assert task is not None
            waiting = task.status in statuses or task.status == Status.ACTIVE
            if waiting and not await self.has_active_job(task_id):
                return task
            await asyncio.sleep(0.05)

    async def has_active_job(self, task_id: int) -> bool:
        row = await self.store.fetchone(
            "SELECT 1 FROM jobs WHERE task_id = ? AND state IN ('queued', 'running')", (task_id,)
        )
        return row is not None
