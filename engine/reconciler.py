"""The reconciler: replays transitions that a lost webhook never triggered, and nothing else.

Webhooks are hints (Plane retries only on connection errors, Gitea never
retries); this periodic, level-triggered pass is what guarantees that no task
stays stuck. It must not become the disease either: a task that a person or the
retry cap stopped is skipped silently, before any network call, and a red gate
changes nothing at all — no event, no notification, no card edit. A verdict column on
the board is replayed only once the board has been shown the BRD it judges, so a column
our sync could not move on never reruns the analyst again. Every move it makes goes
through the same engine methods the webhooks and buttons use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from engine.config import ProjectConfig, Settings
from engine.metrics import COUNTERS
from engine.pipeline import Pipeline, retries_exhausted
from engine.plane import PlaneClient, PlaneIssue
from engine.stages import Status
from engine.store import Store, Task, now
from engine.webhooks import WebhookIntake

log = logging.getLogger(__name__)

ACTOR = "reconciler"
TICK_SETTING = "reconciler_last_tick"
JOB_ID = "reconcile"
# board states in which a person holds the issue: the reconciler keeps its hands off
HELD_STATES = ("blocked", "needs_input")
# board states the tracker side replays, and what each replays
REPLAYED_STATES = ("in_progress", "approved", "rejected")

# active tasks with no queued or running job: a search of the tasks_status index, then of the
# partial one-active-job index per task; finished and person-held tasks are never read
IDLE_ACTIVE_TASKS = (
    "SELECT * FROM tasks WHERE status = ? AND NOT EXISTS"
    " (SELECT 1 FROM jobs WHERE jobs.task_id = tasks.id AND jobs.state IN ('queued', 'running'))"
)
# whether the outbound sync has shown the board the task's latest BRD (moved it to In Review):
# only then is an Approved or Rejected on the board a verdict on that BRD, not a stale one
BOARD_SAW_LATEST_BRD = (
    "SELECT COALESCE((SELECT event_id FROM tracker_sync WHERE task_id = ?), 0)"
    " >= COALESCE((SELECT MAX(id) FROM events WHERE task_id = ? AND kind = 'brd_ready'), 0)"
    " AS seen"
)


@dataclass
class TickReport:
    at: float
    duration_s: float = 0.0
    examined: int = 0
    unblocked: int = 0
    started: int = 0
    verdicts: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: int = 0

    def as_setting(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "duration_s": round(self.duration_s, 4),
            "examined": self.examined,
            "unblocked": self.unblocked,
            "started": self.started,
            "verdicts": self.verdicts,
            "skipped": dict(self.skipped),
            "errors": self.errors,
        }


@dataclass
class BoardView:
    """What the board says in this tick: the issues of each project, or that it could not say."""

    issues: dict[str, PlaneIssue] = field(default_factory=dict)  # issue id -> issue
    unreadable: set[str] = field(default_factory=set)  # project keys whose listing failed


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        pipeline: Pipeline,
        intake: WebhookIntake,
        plane: PlaneClient | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.intake = intake
        self.plane = plane
        self.scheduler: AsyncIOScheduler | None = None
        self._lock = asyncio.Lock()

    # --- scheduling ------------------------------------------------------------------------

    def start(self) -> None:
        """Schedule the tick (call inside the running loop)."""
        if not self.settings.reconcile_enabled:
            log.warning("the reconciler is off (ORCH_RECONCILE_ENABLED=false)")
            return
        interval = self.settings.reconcile_interval_s
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.scheduler.add_job(
            self.tick,
            "interval",
            seconds=interval,
            id=JOB_ID,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(interval)),
            next_run_time=datetime.now(UTC),  # what was lost while the process was down
        )
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.scheduler = None

    # --- one tick --------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        """One pass over the tracker and the idle tasks; never raises."""
        async with self._lock:
            report = TickReport(at=now())
            started = time.monotonic()
            try:
                board = await self._read_board(report)
                if self.settings.reconcile_plane_enabled:
                    await self._replay_board(board, report)
                await self._replay_gates(board, report)
            except Exception:
                log.exception("reconciler tick failed")
                report.errors += 1
            report.duration_s = time.monotonic() - started
            await self._record(report)
            return report

    async def _read_board(self, report: TickReport) -> BoardView:
        board = BoardView()
        if self.plane is None:
            return board
        wanted = (
            self.settings.reconcile_plane_enabled or self.settings.reconcile_skip_blocked_enabled
        )
        if not wanted:
            return board
        for project in self._plane_projects():
            listed = await self.plane.list_issues(project.plane_project_id)
            if not listed.ok:
                report.errors += 1
                board.unreadable.add(project.key)
                continue
            board.issues.update({issue.id: issue for issue in listed.value})
        return board

    def _plane_projects(self) -> list[ProjectConfig]:
        return [p for p in self.settings.projects if p.plane_project_id]

    # --- the tracker side ------------------------------------------------------------------

    async def _replay_board(self, board: BoardView, report: TickReport) -> None:
        """What the board says and the store does not reflect: a start or a BRD verdict."""
        for project in self._plane_projects():
            if project.key in board.unreadable:
                continue
            for issue in board.issues.values():
                if issue.project_id != project.plane_project_id:
                    continue
                logical = self.intake.logical_state(
                    {"name": issue.state_name, "group": issue.state_group}
                )
                if logical in REPLAYED_STATES:
                    await self._replay_issue(project, issue, logical, report)

    async def _replay_issue(
        self, project: ProjectConfig, issue: PlaneIssue, logical: str, report: TickReport
    ) -> None:
        task = await self.store.task_by_tracker_issue(project.key, issue.id)
        if logical == "in_progress":
            if task is not None or not issue.description_text.strip():
                return
            outcome = await self.pipeline.start_task(
                project.key,
                issue.name,
                issue.description_text,
                tracker_issue_id=issue.id,
                sequence_id=issue.sequence_id,
                actor=ACTOR,
            )
            if outcome.created:
                report.started += 1
                log.info("reconciler started %s for issue %s", outcome.task.work_item, issue.id)
            return
        if task is not None and task.status == Status.AWAITING_APPROVAL:
            await self._replay_verdict(project, issue, logical, task, report)

    async def _replay_verdict(
        self,
        project: ProjectConfig,
        issue: PlaneIssue,
        logical: str,
        task: Task,
        report: TickReport,
    ) -> None:
        """Approved or Rejected on a task awaiting approval, once the board has seen its BRD.

        Before that, the column is what the board said about an earlier BRD: applying it
        again would rerun the analyst each time it finishes while our sync cannot move
        the issue on.
        """
        if self._within_grace(task):
            report.skipped["grace"] += 1
            return
        if not await self._board_saw_latest_brd(task.id):
            report.skipped["stale_verdict"] += 1
            return
        data = {"id": issue.id}
        verdict = {"approved": self.intake.on_approved, "rejected": self.intake.on_rejected}
        outcome = await verdict[logical](project, data, ACTOR)
        if outcome in ("approved", "rejected"):
            report.verdicts += 1
            log.info("reconciler replayed %s on %s", outcome, task.work_item)

    async def _board_saw_latest_brd(self, task_id: int) -> bool:
        row = await self.store.fetchone(BOARD_SAW_LATEST_BRD, (task_id, task_id))
        return bool(row["seen"])

    # --- the gate side ---------------------------------------------------------------------

    async def _replay_gates(self, board: BoardView, report: TickReport) -> None:
        for row in await self.store.fetchall(IDLE_ACTIVE_TASKS, (Status.ACTIVE,)):
            task = Task(**dict(row))
            report.examined += 1
            guard = self._guard(task, board)
            if guard is not None:
                report.skipped[guard] += 1
                continue
            if self._within_grace(task):
                report.skipped["grace"] += 1
                continue
            try:
                moved = await self.pipeline.recheck(task.id, actor=ACTOR)
            except Exception:
                log.exception("reconciler recheck of %s failed", task.work_item)
                report.errors += 1
                continue
            if moved:
                report.unblocked += 1
                log.info("reconciler moved %s on from %s", task.work_item, task.stage)

    def _guard(self, task: Task, board: BoardView) -> str | None:
        """Why the reconciler must not touch the task, checked cheapest first; None: go on."""
        if retries_exhausted(task.developer_retries, self.settings):
            return "escalated"  # a cap lowered since the task last ran
        if not (self.settings.reconcile_skip_blocked_enabled and task.tracker_issue_id):
            return None
        project = self.settings.project(task.project)
        if self.plane is None or project is None or not project.plane_project_id:
            return None
        if project.key in board.unreadable:
            return "tracker_unreachable"
        issue = board.issues.get(task.tracker_issue_id)
        if issue is None:
            return "tracker_unreachable"
        held = self.intake.logical_state({"name": issue.state_name, "group": issue.state_group})
        return "held_by_person" if held in HELD_STATES else None

    def _within_grace(self, task: Task) -> bool:
        """Idle for less than its stage's grace: a webhook may still be on its way."""
        grace = self.settings.reconcile_stage_grace_s.get(
            task.stage, self.settings.reconcile_grace_s
        )
        return now() - task.updated_at < grace

    async def _record(self, report: TickReport) -> None:
        COUNTERS.inc("conveyor_reconciler_ticks_total")
        COUNTERS.inc("conveyor_reconciler_tick_seconds_total", report.duration_s)
        COUNTERS.inc("conveyor_reconciler_examined_total", report.examined)
        COUNTERS.inc("conveyor_reconciler_unblocked_total", report.unblocked)
        COUNTERS.inc("conveyor_reconciler_started_total", report.started)
        COUNTERS.inc("conveyor_reconciler_verdicts_total", report.verdicts)
        COUNTERS.inc("conveyor_reconciler_errors_total", report.errors)
        for guard, count in report.skipped.items():
            COUNTERS.inc("conveyor_reconciler_skipped_total", count, guard=guard)
        try:
            await self.store.set_setting(TICK_SETTING, report.as_setting())
        except Exception:
            log.exception("could not record the reconciler tick")
