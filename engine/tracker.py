"""Outbound sync: the tracker and the forge are told what happened to each task.

It is level-triggered and durable: a marker per task (`tracker_sync`) records how
far Plane and Gitea have been told (the newest event whose column was set, the
newest agent run that was commented, whether the cost summary is posted). A pass
brings a task from its marker to the store's present; a failing service leaves
the marker where it was and the pass is retried with backoff
(`ORCH_TRACKER_RETRY_BASE_S` doubling up to `ORCH_TRACKER_RETRY_MAX_S`), so an outage
delays the board and never the pipeline. Comments carry an external id, so a comment
whose answer was lost is not posted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import jinja2

from engine.config import ProjectConfig, Settings
from engine.forge import Forge
from engine.gates import REPORT_FILES, report_relpath
from engine.links import forge_branch_url, forge_file_url, pull_request_url
from engine.notifier import AlertKind
from engine.plane import PlaneClient
from engine.stages import GATES, SPECS, Stage, Status
from engine.store import AgentRun, Store, Task, now
from engine.summary import task_figures

log = logging.getLogger(__name__)

# the board column (a logical state of ORCH_PLANE_STATE_NAMES) for a task
STATUS_COLUMN: dict[str, str] = {
    Status.AWAITING_APPROVAL: "in_review",
    Status.NEEDS_INPUT: "needs_input",
    Status.ESCALATED: "blocked",
    Status.FAILED: "blocked",
    Status.BLOCKED: "blocked",
    Status.DONE: "done",
}
STAGE_COLUMN: dict[str, str] = {
    Stage.ANALYSIS: "in_progress",
    Stage.ARCHITECTURE: "architecture",
    Stage.DEVELOPMENT: "development",
    Stage.REVIEW: "review",
    Stage.TESTING: "testing",
    Stage.DEPLOY_STAGING: "deploy",
    Stage.DEPLOY: "deploy",
    Stage.DONE: "done",
}


# roles whose finish comment links the change itself (the PR, or the branch before it)
CHANGE_ROLES = frozenset({"developer"})


def column_for(task: Task) -> str:
    return STATUS_COLUMN.get(task.status) or STAGE_COLUMN[task.stage]


def role_report(role: str) -> str | None:
    """The report file a role writes, for links under its comment."""
    stage = next(spec.stage for spec in SPECS.values() if spec.role == role)
    gate = GATES.get(stage)
    return gate if gate in REPORT_FILES else None


@dataclass
class Marker:
    event_id: int = 0
    run_id: int = 0
    summary_posted: bool = False
    failures: int = 0


class TrackerSync:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        plane: PlaneClient | None,
        forge: Forge | None,
        env: jinja2.Environment,
    ) -> None:
        self.settings = settings
        self.store = store
        self.plane = plane
        self.forge = forge
        self.env = env
        self._due: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    # --- Notifier --------------------------------------------------------------------------

    async def task_changed(self, task_id: int) -> None:
        self._due[task_id] = 0.0
        self._wake.set()

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        return None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="tracker-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def idle(self) -> None:
        """Wait until no pass is due now (retries scheduled later do not count)."""
        while self._busy or any(at <= time.monotonic() for at in self._due.values()):
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        await self._resume()
        while True:
            await self._wait_for_due()
            task_id = min(self._due, key=self._due.__getitem__)
            del self._due[task_id]
            self._busy = True
            try:
                await self.sync(task_id)
            except Exception:
                log.exception("sync of task %s failed", task_id)
            finally:
                self._busy = False

    async def _resume(self) -> None:
        """After a restart, every task the tracker has not fully heard about is due."""
        rows = await self.store.fetchall(
            "SELECT tasks.id FROM tasks LEFT JOIN tracker_sync s ON s.task_id = tasks.id"
            " WHERE s.task_id IS NULL OR s.event_id < (SELECT COALESCE(MAX(id), 0) FROM events"
            " WHERE events.task_id = tasks.id)"
        )
        for row in rows:
            self._due[row["id"]] = 0.0

    async def _wait_for_due(self) -> None:
        while True:
            delay = None
            if self._due:
                delay = min(self._due.values()) - time.monotonic()
                if delay <= 0:
                    return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    # --- one pass --------------------------------------------------------------------------

    async def sync(self, task_id: int) -> bool:
        """Bring the tracker and the forge up to the task's present; False when a call failed."""
        task = await self.store.get_task(task_id)
        project = self.settings.project(task.project) if task else None
        if task is None or project is None:
            return True
        marker = await self._marker(task_id)
        error = await self._sync_pr(project, task)
        if error is None and self._on_plane(project, task):
            error = await self._sync_plane(project, task, marker)
        marker.failures = 0 if error is None else marker.failures + 1
        next_at = 0.0
        if error is not None:
            delay = self._backoff_s(marker.failures)
            self._due[task_id] = time.monotonic() + delay
            next_at = now() + delay
            log.warning(
                "sync of %s failed (%d in a row), next try in %.1fs: %s",
                task.work_item,
                marker.failures,
                delay,
                error,
            )
        await self._save(task_id, marker, next_at, error)
        return error is None

    def _backoff_s(self, failures: int) -> float:
        base, cap = self.settings.tracker_retry_base_s, self.settings.tracker_retry_max_s
        return min(base * 2 ** min(failures - 1, 32), cap)

    def _on_plane(self, project: ProjectConfig, task: Task) -> bool:
        return bool(self.plane and project.plane_project_id and task.tracker_issue_id)

    async def _sync_pr(self, project: ProjectConfig, task: Task) -> str | None:
        """Open the task's PR once its branch is on the forge; the error when that failed."""
        if self.forge is None or not self.forge.covers(project):
            return None
        if task.pr_number is not None or not task.head_sha:
            return None
        pr = await self.forge.ensure_pr(project, task)
        if not pr.ok:
            return pr.error or "the forge refused the pull request"
        async with self.store.tx() as conn:
            await conn.execute(
                "UPDATE tasks SET pr_number = ?, pr_url = ? WHERE id = ?",
                (pr.value.number, pr.value.html_url, task.id),
            )
        return None

    async def _sync_plane(self, project: ProjectConfig, task: Task, marker: Marker) -> str | None:
        """Comments, the column, the summary; the first error stops the pass."""
        assert self.plane is not None and project.plane_project_id and task.tracker_issue_id
        for run in await self.store.agent_runs(task.id):
            if run.id <= marker.run_id or run.finished_at is None:
                continue
            if run.ok and (error := await self._comment_run(project, task, run)):
                return error
            marker.run_id = run.id
        latest = await self.store.latest_event_id(task.id)
        if latest > marker.event_id:
            if error := await self._move(project, task):
                return error
            marker.event_id = latest
        if task.status == Status.DONE and not marker.summary_posted:
            summary = await self._summary(task)
            if error := await self._comment(project, task, summary, None, "summary"):
                return error
            marker.summary_posted = True
        return None

    async def _move(self, project: ProjectConfig, task: Task) -> str | None:
        """Move the issue to the state that means the task's column, when the board has one."""
        names = self.settings.plane_state_names
        state = await self.plane.state_for(project.plane_project_id, column_for(task), names)
        if not state.ok:
            return state.error
        if state.value is None:
            return None
        moved = await self.plane.move_issue(
            project.plane_project_id, task.tracker_issue_id, state.value.id
        )
        return moved.error if not moved.ok else None

    async def _comment_run(self, project: ProjectConfig, task: Task, run: AgentRun) -> str | None:
        gate = role_report(run.role)
        relpath = report_relpath(task.work_item, gate) if gate else None
        html = self.env.get_template("tracker/agent_comment.html.j2").render(
            task=task,
            run=run,
            report=relpath.rsplit("/", 1)[-1] if relpath else None,
            report_url=forge_file_url(self.settings, task, relpath) if relpath else None,
            **self._change_links(task, run.role),
        )
        return await self._comment(project, task, html, run.role, f"run-{run.id}")

    def _change_links(self, task: Task, role: str) -> dict[str, str | None]:
        """The developer's change on the forge: its PR once open, else its branch."""
        if role not in CHANGE_ROLES:
            return {"pr_url": None, "branch_url": None}
        pr_url = pull_request_url(self.settings, task)
        branch_url = None if pr_url else forge_branch_url(self.settings, task)
        return {"pr_url": pr_url, "branch_url": branch_url}

    async def _summary(self, task: Task) -> str:
        figures = await task_figures(self.store, task, now())
        by_role: dict[str, dict] = {}
        for run in await self.store.agent_runs(task.id):
            row = by_role.setdefault(run.role, {"runs": 0, "input": 0, "output": 0, "cost": 0.0})
            row["runs"] += 1
            row["input"] += run.full_input or 0
            row["output"] += run.output_tokens or 0
            row["cost"] += run.cost_usd or 0.0
        return self.env.get_template("tracker/summary.html.j2").render(
            task=task, roles=by_role, figures=figures, pr_url=pull_request_url(self.settings, task)
        )

    async def _comment(
        self, project: ProjectConfig, task: Task, html: str, role: str | None, what: str
    ) -> str | None:
        """Post once as the role's bot (or the shared account); the error when it failed."""
        token = getattr(self.settings, f"plane_bot_{role}", None) if role else None
        posted = await self.plane.add_comment(
            project.plane_project_id,
            task.tracker_issue_id,
            html,
            token=token.get_secret_value() if token else None,
            external_id=f"{task.work_item}:{task.id}:{what}",
        )
        return None if posted.ok else posted.error

    # --- the marker --------------------------------------------------------------------------

    async def _marker(self, task_id: int) -> Marker:
        row = await self.store.fetchone(
            "SELECT event_id, run_id, summary_posted, failures FROM tracker_sync WHERE task_id = ?",
            (task_id,),
        )
        if row is None:
            return Marker()
        return Marker(row["event_id"], row["run_id"], bool(row["summary_posted"]), row["failures"])

    async def _save(self, task_id: int, marker: Marker, next_at: float, error: str | None) -> None:
        async with self.store.tx() as conn:
            await conn.execute(
                "INSERT INTO tracker_sync (task_id, event_id, run_id, summary_posted, failures,"
                " next_at, last_error, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (task_id) DO UPDATE SET event_id = excluded.event_id,"
                " run_id = excluded.run_id, summary_posted = excluded.summary_posted,"
                " failures = excluded.failures, next_at = excluded.next_at,"
                " last_error = excluded.last_error, updated_at = excluded.updated_at",
                (
                    task_id,
                    marker.event_id,
                    marker.run_id,
                    int(marker.summary_posted),
                    marker.failures,
                    next_at,
                    error,
                    now(),
                ),
            )
