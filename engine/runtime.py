"""The engine assembled: store, git workspace, pipeline, job queue and worker, and the
integrations its settings name (Plane, Gitea, the webhooks and the outbound sync).

`conveyor run`, `conveyor demo` and the tests build the same object; the bot
adds its notifier and the HTTP server around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engine.config import Settings
from engine.forge import Forge
from engine.git import GitWorkspace
from engine.gitea import GiteaClient
from engine.jobs import JobQueue, Worker
from engine.notifier import FanoutNotifier, Notifier
from engine.pipeline import Pipeline
from engine.plane import PlaneClient
from engine.reconciler import Reconciler
from engine.stages import HUMAN_HOLD, Status
from engine.store import Store, Task
from engine.templating import prompt_environment, text_environment
from engine.tracker import TrackerSync
from engine.webhooks import WebhookIntake

log = logging.getLogger(__name__)

SETTLED: frozenset[str] = frozenset({Status.DONE, Status.CANCELLED, Status.FAILED, *HUMAN_HOLD})


def plane_client(settings: Settings) -> PlaneClient | None:
    if not (settings.plane_api_url and settings.plane_api_token and settings.plane_workspace):
        return None
    return PlaneClient(
        settings.plane_api_url,
        settings.plane_api_token.get_secret_value(),
        settings.plane_workspace,
        timeout_s=settings.plane_timeout_s,
    )


def gitea_client(settings: Settings) -> GiteaClient | None:
    if not (settings.gitea_url and settings.gitea_token):
        return None
    return GiteaClient(settings.gitea_url, settings.gitea_token.get_secret_value())


class Engine:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.db_path)
        self.git = GitWorkspace(settings.workdir)
        self.queue = JobQueue(self.store, settings.job_lease_s)
        text = text_environment(settings.locale)
        self.plane = plane_client(settings)
        self.gitea = gitea_client(settings)
        self.forge = Forge(self.gitea, settings, text) if self.gitea else None
        self.tracker = TrackerSync(settings, self.store, self.plane, self.forge, text)
        self.pipeline = Pipeline(settings, self.store, self.git, self.tracker, prompt_environment())
        self.pipeline.forge = self.forge
        self.intake = WebhookIntake(settings, self.store, self.pipeline, self.plane, text)
        self.worker = Worker(
            self.queue,
            self.pipeline.run_job,
            self.pipeline.on_job_crash,
            settings.max_concurrency,
        )
        self.pipeline.wake_worker = self.worker.wake
        self.reconciler = Reconciler(settings, self.store, self.pipeline, self.intake, self.plane)
        if notifier is not None:
            self.use_notifier(notifier)
        self._worker_task: asyncio.Task[None] | None = None

    def use_notifier(self, notifier: Notifier) -> None:
        """Tell `notifier` (console, Telegram) about every change, besides the tracker."""
        self.pipeline.notifier = FanoutNotifier([self.tracker, notifier])

    async def open(self) -> Engine:
        await self.store.open()
        return self

    def start_worker(self) -> None:
        """Start the background parts: the worker, the outbound sync, pending deliveries.

        The reconciler is started separately (`start_reconciler`), by `conveyor run`.
        """
        self._worker_task = asyncio.create_task(self._run(), name="worker")
        self.tracker.start()

    async def start_reconciler(self) -> None:
        """Recover expired leases, then schedule the reconciler, whose first tick runs at once
        (it must see those jobs queued again, not held by a process that is gone)."""
        await self.queue.recover_expired()
        self.reconciler.start()

    async def _run(self) -> None:
        await self.intake.process_pending()
        await self.worker.run()

    async def close(self) -> None:
        self.reconciler.stop()
        if self._worker_task is not None:
            await self.worker.stop()
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
            self._worker_task = None
        await self.tracker.stop()
        await self.intake.idle()
        for client in (self.plane, self.gitea):
            if client is not None:
                await client.aclose()
        await self.store.close()

    async def __aenter__(self) -> Engine:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_settled(
        self, task_id: int, statuses: frozenset[str] = SETTLED, *, idle_active: bool = True
    ) -> Task:
        """Wait until the task reaches one of `statuses` with no job left to run.

        With `idle_active`, an active task with no job (a red gate that waits for a
        webhook or the reconciler) is settled too: nothing inside the engine moves it.
        """
        while True:
            task = await self.store.resting_task(task_id)
            if task is not None and (
                task.status in statuses or (idle_active and task.status == Status.ACTIVE)
            ):
                return task
            await asyncio.sleep(0.05)

    def worker_alive(self) -> bool:
        return self._worker_task is not None and not self._worker_task.done()

    async def has_active_job(self, task_id: int) -> bool:
        return await self.store.has_active_job(task_id)
