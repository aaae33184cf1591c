"""The pipeline: start, run a stage, read its gate, and advance, roll back, escalate or wait.

Every change of a task is a conditional UPDATE on the stage and status the
caller saw, written together with its `events` row (and, for a job, the job's
own terminal write) in one transaction. A second caller that saw the same state
finds no row to update and changes nothing, which makes verdicts idempotent:
Approve from Telegram and the tracker's Approved webhook advance the task once.
Webhooks, the reconciler and the bot's buttons all call these methods.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2

from engine import jobs
from engine.agents import AgentInvocation, AgentOutcome, run_agent
from engine.config import ProjectConfig, Settings
from engine.deploy import run_staging
from engine.forge import Forge
from engine.gates import (
    ARTIFACTS_ROOT,
    REPORT_FILES,
    GateResult,
    GateVerdict,
    artifacts_dir,
    ci_green_local,
    evaluate_file_gate,
    evaluate_report_text,
    report_relpath,
)
from engine.git import GitError, GitWorkspace, MergeResult, branch_name
from engine.merge_gate import MergeGate, release_held
from engine.notifier import AlertKind, Notifier
from engine.prompts import Feedback, render_prompt
from engine.stages import (
    GATES,
    ROLLBACK_TARGET,
    SPECS,
    STAGE_TRANSITIONS,
    OnRed,
    Stage,
    Status,
)
from engine.store import Job, Store, Task, is_unique_violation, now

log = logging.getLogger(__name__)

PROMPT_FILE = ".task.md"


def retries_exhausted(developer_retries: int, settings: Settings) -> bool:
    """The one place that decides escalation: the retry count has reached the cap."""
    return developer_retries >= settings.max_developer_retries


def work_item_id(key: str, number: int) -> str:
    return f"{key}-{number:03d}"


@dataclass(frozen=True)
class StartOutcome:
    task: Task | None
    created: bool
    reason: str | None = None


@dataclass(frozen=True)
class ActionOutcome:
    changed: bool
    task: Task | None
    reason: str | None = None


@dataclass(frozen=True)
class Change:
    """What a transition writes onto the task row, besides stage and status."""

    kind: str
    stage: Stage | str  # a str only when failing a row at a stage this version does not know
    status: Status
    detail: str | None = None
    actor: str | None = None
    reason: str | None = None
    developer_retries: int | None = None
    feedback: Feedback | None = None
    finished: bool = False
    merge_sha: str | None = None
    tested_sha: str | None = None
    enqueue: bool = False


# The stages during which a task may hold its repository's merge lease.
LEASE_STAGES = frozenset({Stage.DEPLOY_STAGING, Stage.DEPLOY})
MAX_LEASE_DEFERRALS = 720
# A merge the forge or the remote could not take is tried again, with backoff, this often.
MAX_MERGE_DEFERRALS = 12
MERGE_DEFERRED = "merge_deferred"
MERGING = "merging"  # the deploy job's checkpoint once its merge began


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        git: GitWorkspace,
        notifier: Notifier,
        prompts: jinja2.Environment,
    ) -> None:
        self.settings = settings
        self.store = store
        self.git = git
        self.notifier = notifier
        self.prompts = prompts
        self.forge: Forge | None = None
        self.merge_gate = MergeGate(settings, store, git)
        self.wake_worker = lambda: None

    def on_forge(self, project: ProjectConfig) -> bool:
        return self.forge is not None and self.forge.covers(project)

    # --- starting ----------------------------------------------------------------------------

    async def start_task(
        self,
        project_key: str,
        title: str,
        description: str,
        tracker_issue_id: str | None = None,
        sequence_id: int | None = None,
        actor: str | None = None,
    ) -> StartOutcome:
        """Create the task and queue its analyst, once per tracker issue.

        QG-0: a task needs a non-empty description; without one it is not started
        and the refusal is recorded as an event.
        """
        project = self.settings.project(project_key)
        if project is None:
            log.info("ignoring a start for unknown project %r", project_key)
            return StartOutcome(None, False, f"unknown project {project_key}")
        if tracker_issue_id is not None:
            existing = await self.store.task_by_tracker_issue(project.key, tracker_issue_id)
            if existing is not None:
                return StartOutcome(existing, False, "a task exists for this issue")
        title = title.strip() or "untitled"
        if not description.strip():
            reason = "the description is empty: nothing for the analyst to work from"
            async with self.store.tx() as conn:
                await Store.add_event(
                    conn,
                    None,
                    "start_rejected",
                    detail=f"{project.key} issue {tracker_issue_id or '-'}: {reason}",
                    actor=actor,
                )
            return StartOutcome(None, False, reason)

        async with self.store.tx() as conn:
            task_id = await self._insert_task(
                conn, project, title, description, tracker_issue_id, sequence_id
            )
            if task_id is None:
                created = False
            else:
                created = True
                await Store.add_event(
                    conn, task_id, "created", None, f"{Stage.ANALYSIS}/{Status.ACTIVE}", actor=actor
                )
                await jobs.enqueue(conn, task_id, Stage.ANALYSIS)
        if not created:
            assert tracker_issue_id is not None
            task = await self.store.task_by_tracker_issue(project.key, tracker_issue_id)
            return StartOutcome(task, False, "a task exists for this issue")
        await self._after_change(task_id)
        return StartOutcome(await self.store.get_task(task_id), True)

    async def _insert_task(
        self,
        conn,
        project: ProjectConfig,
        title: str,
        description: str,
        tracker_issue_id: str | None,
        sequence_id: int | None,
    ) -> int | None:
        """Insert with the first free work item id and branch; None when the issue has a task."""
        if sequence_id is None:
            cursor = await conn.execute(
                "SELECT COALESCE(MAX(sequence_id), 0) + 1 FROM tasks WHERE project = ?",
                (project.key,),
            )
            (sequence_id,) = await cursor.fetchone()
        number, branch_suffix = sequence_id, 1
        while True:
            work_item = work_item_id(project.key, number)
            branch = branch_name(work_item, title)
            if branch_suffix > 1:
                branch = f"{branch}-{branch_suffix}"
            try:
                cursor = await conn.execute(
                    "INSERT INTO tasks (project, tracker_issue_id, sequence_id, work_item, title,"
                    " description, stage, status, branch, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (project, tracker_issue_id) DO NOTHING RETURNING id",
                    (
                        project.key,
                        tracker_issue_id,
                        number,
                        work_item,
                        title,
                        description,
                        Stage.ANALYSIS,
                        Status.ACTIVE,
                        branch,
                        now(),
                        now(),
                    ),
                )
            except sqlite3.IntegrityError as error:
                if not (
                    is_unique_violation(error, "project", "work_item")
                    or is_unique_violation(error, "project", "branch")
                ):
                    raise
                # SQLite names one violated constraint; ask which is taken (we hold the write lock)
                taken = await conn.execute(
                    "SELECT 1 FROM tasks WHERE project = ? AND work_item = ?",
                    (project.key, work_item),
                )
                if await taken.fetchone():
                    number, branch_suffix = number + 1, 1
                else:
                    branch_suffix += 1
                continue
            row = await cursor.fetchone()
            return None if row is None else int(row[0])

    # --- running a stage ---------------------------------------------------------------------

    async def run_job(self, job: Job) -> None:
        """The worker's handler: run the stage the job names and act on its gate."""
        task = await self.store.get_task(job.task_id)
        if task is None or task.status != Status.ACTIVE or task.stage != job.stage:
            async with self.store.tx() as conn:
                await jobs.finish(conn, job, "cancelled", "the task moved on before the job ran")
            return
        project = self.settings.project(task.project)
        if project is None:
            await self._fail_task(job, task, f"project {task.project} is no longer configured")
            return
        try:
            worktree = await self.git.ensure_worktree(
                project.key, project.remote, project.main_branch, task.branch, task.work_item
            )
        except GitError as error:
            await self._agent_failed(job, task, f"git: {error}")
            return
        spec = SPECS[Stage(task.stage)]
        if spec.stage is Stage.DEPLOY_STAGING:
            await self._deploy_staging(job, task, project, worktree)
            return
        resuming_merge = job.checkpoint == MERGING
        if (
            spec.stage is Stage.DEPLOY
            and not resuming_merge
            and not await self._still_validated(project, task)
        ):
            await self._transition(
                job,
                task,
                Change(
                    "revalidate",
                    Stage.DEPLOY_STAGING,
                    Status.ACTIVE,
                    "the merge lease or the tested head was lost; validating against main again",
                    enqueue=True,
                ),
            )
            return
        if spec.role is not None and not resuming_merge:  # the deployer's verdict stands
            outcome = await self._run_agent(job, task, project, worktree)
            if not outcome.ok:
                await self._agent_failed(job, task, outcome.error or "agent failed")
                return
            task = await self._commit_and_push(task, worktree, spec.role)
        result = await self.evaluate_gate(task, project, worktree)
        await self._apply_gate(job, task, project, worktree, result)

    async def _deploy_staging(
        self, job: Job, task: Task, project: ProjectConfig, worktree: Path
    ) -> None:
        """The merge gate (lease, rebase, re-test), then the staging hook and health check."""
        tested = task.head_sha or await self.git.head_sha(worktree)
        details = []
        if self.merge_gate.applies(project):
            lease = await self.merge_gate.acquire(project, task)
            if not lease.acquired:
                await self._defer(
                    job, task, f"waiting for the merge lease (held by task {lease.holder})"
                )
                return
            validated = await self.merge_gate.validate(project, task, worktree)
            if validated.verdict is GateVerdict.WAIT:
                await self._defer(job, task, f"merge gate waits: {validated.reason}")
                return
            if not validated.passed:
                await self._rollback(job, task, validated)
                return
            tested = validated.report or tested
            details.append(validated.reason)
        staging = await run_staging(self.settings, worktree, tested)
        if not staging.passed:
            await self._rollback(job, task, staging)
            return
        details.append(staging.reason)
        await self._transition(
            job,
            task,
            Change(
                "advanced",
                STAGE_TRANSITIONS[Stage.DEPLOY_STAGING],
                Status.ACTIVE,
                "; ".join(details),
                tested_sha=tested,
                enqueue=True,
            ),
        )

    async def _still_validated(self, project: ProjectConfig, task: Task) -> bool:
        """Deploy may merge only what the merge gate tested while it still holds the lease
        (a failed deployer's retry, or a lease reclaimed as stale, sends it back)."""
        return not self.merge_gate.applies(project) or await self.merge_gate.holds(project, task)

    async def _defer(self, job: Job, task: Task, reason: str) -> None:
        """The lease is busy or the remote did not answer: come back later without holding
        a worker slot."""
        if job.claims >= MAX_LEASE_DEFERRALS:
            await self._fail_task(job, task, f"{reason} for too long")
            return
        async with self.store.tx() as conn:
            await jobs.requeue(conn, job, self.settings.merge_defer_s, reason, count_failure=False)
        log.info("%s: %s", task.work_item, reason)

    async def _run_agent(
        self, job: Job, task: Task, project: ProjectConfig, worktree: Path
    ) -> AgentOutcome:
        spec = SPECS[Stage(task.stage)]
        assert spec.role is not None
        stage_runs = [r for r in await self.store.agent_runs(task.id) if r.stage == task.stage]
        attempt = len(stage_runs) + 1
        gate = GATES[spec.stage]
        if spec.fresh_report and gate in REPORT_FILES:
            (worktree / report_relpath(task.work_item, gate)).unlink(missing_ok=True)
        prompt = render_prompt(
            self.prompts,
            role=spec.role,
            task=task,
            project=project,
            attempt=attempt,
            report_file=REPORT_FILES.get(gate) if spec.role != "developer" else None,
            feedback=Feedback.of(task),
        )
        prompt_file = worktree / PROMPT_FILE
        prompt_file.write_text(prompt, encoding="utf-8")
        run_dir = self.settings.workdir / "runs" / task.work_item
        run_dir.mkdir(parents=True, exist_ok=True)
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "INSERT INTO agent_runs (task_id, job_id, stage, role, attempt, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (task.id, job.id, task.stage, spec.role, attempt, now()),
            )
            run_id = int(cursor.lastrowid)
        stem = run_dir / f"{run_id:05d}-{task.stage}-{attempt}"
        saved_prompt = stem.with_suffix(".prompt.md")
        saved_prompt.write_text(prompt, encoding="utf-8")

        async def record_pid(pid: int) -> None:
            async with self.store.tx() as conn:
                await conn.execute("UPDATE agent_runs SET pid = ? WHERE id = ?", (pid, run_id))

        outcome = await run_agent(
            AgentInvocation(
                command_template=self.settings.agent_command,
                role=spec.role,
                stage=task.stage,
                workdir=worktree,
                prompt_file=prompt_file,
                work_item=task.work_item,
                attempt=attempt,
                artifacts_dir=artifacts_dir(worktree, task.work_item),
                timeout_s=self.settings.agent_timeout_s,
                log_path=stem.with_suffix(".log"),
            ),
            on_start=record_pid,
        )
        usage = outcome.usage
        async with self.store.tx() as conn:
            await conn.execute(
                "UPDATE agent_runs SET finished_at = ?, duration_s = ?, exit_code = ?,"
                " timed_out = ?, ok = ?, error = ?, input_tokens = ?, output_tokens = ?,"
                " cache_read_tokens = ?, cache_creation_tokens = ?, cost_usd = ?, model = ?,"
                " model_usage = ?, log_path = ?, prompt_path = ? WHERE id = ?",
                (
                    now(),
                    outcome.duration_s,
                    outcome.exit_code,
                    int(outcome.timed_out),
                    int(outcome.ok),
                    outcome.error,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_read_tokens,
                    usage.cache_creation_tokens,
                    usage.cost_usd,
                    usage.model,
                    json_or_none(usage.model_usage),
                    str(outcome.log_path),
                    str(saved_prompt),
                    run_id,
                ),
            )
        return outcome

    async def _commit_and_push(self, task: Task, worktree: Path, role: str) -> Task:
        sha = await self.git.commit_all(worktree, f"{task.work_item} {role}: {task.stage}")
        head = sha or await self.git.head_sha(worktree)
        pushed = await self.git.push_branch(worktree, task.branch)
        if not pushed.ok:
            log.warning("push of %s failed: %s", task.branch, pushed.err.strip()[-500:])
        if head != task.head_sha:
            async with self.store.tx() as conn:
                await conn.execute("UPDATE tasks SET head_sha = ? WHERE id = ?", (head, task.id))
            task = replace(task, head_sha=head)
        return task

    async def evaluate_gate(self, task: Task, project: ProjectConfig, worktree: Path) -> GateResult:
        """Read the stage's exit gate without changing anything."""
        gate = GATES[Stage(task.stage)]
        if gate == "ci_green":
            if self.on_forge(project):
                forge_result = await self.forge.ci_gate(project, task.head_sha)
                if forge_result is not None:
                    return forge_result
            return await ci_green_local(worktree, project.check_command)
        if gate == "staging_ready":
            return GateResult(GateVerdict.FAIL, "the merge gate and staging run in their job")
        result = evaluate_file_gate(gate, worktree, task.work_item)
        if gate == "deploy_succeeded" and result.report is None:
            # deployers may land the log on main through a change of their own
            relpath = report_relpath(task.work_item, gate)
            text = await self.git.file_on_main(worktree, project.main_branch, relpath)
            if text is not None:
                result = evaluate_report_text(gate, text, task.work_item)
                result = replace(
                    result, reason=f"{result.reason} (on origin/{project.main_branch})"
                )
        return result

    async def _apply_gate(
        self,
        job: Job | None,
        task: Task,
        project: ProjectConfig,
        worktree: Path,
        result: GateResult,
        actor: str | None = None,
    ) -> None:
        stage = Stage(task.stage)
        spec = SPECS[stage]
        if result.verdict is GateVerdict.PASS:
            if stage is Stage.ANALYSIS:
                await self._transition(
                    job,
                    task,
                    Change(
                        "brd_ready", stage, Status.AWAITING_APPROVAL, result.reason, actor=actor
                    ),
                    alert=(AlertKind.BRD_READY, self.report_link(task, "brd_ready")),
                )
            elif STAGE_TRANSITIONS[stage] is Stage.DONE:
                await self._finish(job, task, worktree, result, actor)
            else:
                await self._advance(job, task, result.reason, actor)
            return
        if result.verdict is GateVerdict.NEEDS_INPUT:
            await self._transition(
                job,
                task,
                Change(
                    "needs_input", stage, Status.NEEDS_INPUT, result.must_fix, reason=result.reason
                ),
                alert=(AlertKind.NEEDS_INPUT, result.must_fix),
            )
            return
        policy = spec.on_red
        if policy is OnRed.ROLLBACK:
            await self._rollback(job, task, result)
        elif policy is OnRed.STAY:
            await self._transition(
                job,
                task,
                Change("gate_red", stage, Status.ACTIVE, result.reason, reason=result.reason),
            )
        else:
            await self._agent_failed(job, task, f"gate {GATES[stage]}: {result.reason}")

    async def _advance(
        self, job: Job | None, task: Task, detail: str | None, actor: str | None = None
    ) -> bool:
        target = STAGE_TRANSITIONS[Stage(task.stage)]
        return await self._transition(
            job, task, Change("advanced", target, Status.ACTIVE, detail, actor, enqueue=True)
        )

    async def _merge(self, project: ProjectConfig, task: Task, worktree: Path) -> MergeResult:
        """Merge the tested head into main: through the forge's PR, or locally.

        Only the commit the merge gate tested may be merged; the deployer's own report
        commits on top of it are the one change allowed since.
        """
        head = task.head_sha or await self.git.head_sha(worktree)
        if task.tested_sha and head != task.tested_sha:
            changed = await self.git.changed_between(worktree, task.tested_sha, head)
            own = f"{ARTIFACTS_ROOT}/{task.work_item}/"
            if changed is None or any(not name.startswith(own) for name in changed):
                return MergeResult(False, error=f"the branch changed after the test: {changed}")
        if self.on_forge(project):
            merged = await self.forge.merge(project, replace(task, head_sha=head))
            return MergeResult(merged.ok, merged.sha, (), merged.error, merged.transient)
        return await self.git.merge_to_main(
            worktree,
            task.branch,
            project.main_branch,
            f"Merge {task.branch}: {task.work_item} {task.title}",
            tested_head=head,
        )

    async def _finish(
        self,
        job: Job | None,
        task: Task,
        worktree: Path,
        result: GateResult,
        actor: str | None = None,
    ) -> None:
        project = self.settings.project(task.project)
        assert project is not None
        if job is not None and job.checkpoint != MERGING:
            job = await jobs.set_checkpoint(self.store, job, MERGING)
        merge = await self._merge(project, task, worktree)
        if merge.transient:
            await self._defer_merge(job, task, merge.error or "no answer")
            return
        if not merge.ok:
            files = "\n".join(merge.conflict_files)
            must_fix = f"Merging into {project.main_branch} failed: {merge.error or 'conflict'}" + (
                f"\nConflicting files:\n{files}" if files else ""
            )
            await self._rollback(job, task, GateResult(GateVerdict.FAIL, "merge failed", must_fix))
            return
        await self._transition(
            job,
            task,
            Change(
                "done",
                Stage.DONE,
                Status.DONE,
                f"{result.reason}; merged into {project.main_branch} as {merge.sha}",
                actor=actor,
                finished=True,
                merge_sha=merge.sha,
            ),
        )

    async def _defer_merge(self, job: Job | None, task: Task, error: str) -> None:
        """The forge or the remote did not answer: merge again later, without running the
        deployer again (its verdict stands), and without holding a worker meanwhile."""
        deferrals = await self._trailing_events(task.id, MERGE_DEFERRED)
        if deferrals >= MAX_MERGE_DEFERRALS:
            reason = f"merging failed {deferrals + 1} times: {error}"
            if job is not None:
                await self._fail_task(job, task, reason, AlertKind.DEPLOY_FAILED)
            return
        delay = jobs.backoff_delay(self.settings.merge_retry_s, deferrals + 1)
        detail = f"merge deferred {delay:g}s: {error}"
        async with self.store.tx() as conn:
            if job is None:
                await jobs.enqueue(conn, task.id, task.stage, delay)
            else:
                await jobs.requeue(conn, job, delay, detail, count_failure=False)
            await Store.add_event(conn, task.id, MERGE_DEFERRED, task.state, task.state, detail)
        log.warning("%s: %s", task.work_item, detail)
        await self._after_change(task.id)

    async def _trailing_events(self, task_id: int, kind: str) -> int:
        """How many of the task's latest events, counting back, are of `kind`."""
        count = 0
        for event in reversed(await self.store.events(task_id)):
            if event.kind != kind:
                break
            count += 1
        return count

    async def _rollback(self, job: Job | None, task: Task, result: GateResult) -> bool:
        source = Stage(task.stage)
        target = ROLLBACK_TARGET[source]
        retries = task.developer_retries + 1
        gate = GATES[source]
        feedback = Feedback(
            stage=target,
            kind="rollback",
            source=source.value,
            text=result.must_fix or result.reason,
            report=self.report_link(task, gate) if gate in REPORT_FILES else None,
        )
        alert = (AlertKind.DEPLOY_FAILED, feedback.text) if source is Stage.DEPLOY else None
        if retries_exhausted(retries, self.settings):
            reason = (
                f"developer retries reached {self.settings.max_developer_retries}:"
                f" {source.value} is still red ({result.reason})"
            )
            change = Change(
                "escalated",
                target,
                Status.ESCALATED,
                feedback.text,
                reason=reason,
                developer_retries=retries,
                feedback=feedback,
            )
            alert = (AlertKind.ESCALATED, feedback.text)
        else:
            change = Change(
                "rolled_back",
                target,
                Status.ACTIVE,
                feedback.text,
                reason=result.reason,
                developer_retries=retries,
                feedback=feedback,
                enqueue=True,
            )
        return await self._transition(job, task, change, alert=alert)

    async def recheck(self, task_id: int, actor: str | None = None) -> bool:
        """Evaluate an idle task's exit gate now; advance exactly as the stage's run would on green.

        The gate is read in the task's existing worktree, which nothing creates or changes
        before a green verdict: a task whose worktree is missing is skipped. Red changes
        nothing at all. Webhooks (a CI status) and the reconciler call this.
        """
        task = await self.store.get_task(task_id)
        if task is None or task.status != Status.ACTIVE or await self.store.has_active_job(task_id):
            return False
        project = self.settings.project(task.project)
        if project is None:
            return False
        try:
            worktree = self.git.worktree_dir(project.key, task.work_item)
            if not (worktree / ".git").exists():
                log.info("recheck of %s skipped: no worktree at %s", task.work_item, worktree)
                return False
            result = await self.evaluate_gate(task, project, worktree)
            if not result.passed:
                return False
            # a worktree left detached by a crash goes back to its branch before the move
            await self.git.ensure_worktree(
                project.key, project.remote, project.main_branch, task.branch, task.work_item
            )
        except GitError as error:
            log.warning("recheck of %s skipped: %s", task.work_item, error)
            return False
        before = await self.store.latest_event_id(task_id)
        await self._apply_gate(None, task, project, worktree, result, actor)
        return await self.store.latest_event_id(task_id) != before

    async def merged_in_forge(self, task_id: int, merge_sha: str | None, actor: str) -> bool:
        """The task's PR was merged in the forge. At the deploy stage the deployer's verdict
        decides instead; anywhere else the task is done."""
        task = await self.store.get_task(task_id)
        if task is None or task.stage == Stage.DONE:
            return False
        if task.stage == Stage.DEPLOY:
            await self.merge_gate.release(task, "the pull request was merged", actor)
            return False
        if task.status in (Status.DONE, Status.CANCELLED):
            return False
        return await self._transition(
            None,
            task,
            Change(
                "done",
                Stage.DONE,
                Status.DONE,
                f"merged in the forge as {merge_sha or '?'}",
                actor=actor,
                finished=True,
                merge_sha=merge_sha,
            ),
        )

    # --- failures ----------------------------------------------------------------------------

    async def _agent_failed(
        self, job: Job, task: Task, error: str, alert: AlertKind = AlertKind.AGENT_FAILED
    ) -> None:
        """Retry the stage with backoff, or fail the task once the attempts are spent."""
        failures = job.failures + 1
        if failures < self.settings.agent_max_attempts:
            delay = jobs.backoff_delay(self.settings.agent_retry_backoff_s, failures)
            async with self.store.tx() as conn:
                await jobs.requeue(conn, job, delay, error, count_failure=True)
                await Store.add_event(
                    conn,
                    task.id,
                    "agent_retry",
                    task.state,
                    task.state,
                    f"attempt {failures} of {self.settings.agent_max_attempts} failed: {error}",
                )
            await self._after_change(task.id)
            return
        await self._fail_task(job, task, error, alert)

    async def _fail_task(
        self, job: Job, task: Task, error: str, alert: AlertKind = AlertKind.AGENT_FAILED
    ) -> None:
        """Stop the task where it is, even at a stage only another version knows."""
        await self._transition(
            job,
            task,
            Change("failed", task.stage, Status.FAILED, error, reason=error),
            alert=(alert, error),
            job_state="failed",
        )

    async def on_job_crash(self, job: Job, error: BaseException) -> None:
        """A bug in a job's handling counts as a failed attempt, so it cannot loop forever."""
        task = await self.store.get_task(job.task_id)
        if task is None:
            async with self.store.tx() as conn:
                await jobs.finish(conn, job, "failed", repr(error))
            return
        await self._agent_failed(job, task, f"internal error: {error!r}", AlertKind.TASK_ERROR)

    # --- people ------------------------------------------------------------------------------

    async def approve(self, task_id: int, actor: str) -> ActionOutcome:
        """The BRD is approved: architecture starts. A second approval changes nothing."""
        return await self._human(
            task_id,
            {Status.AWAITING_APPROVAL},
            lambda t: Change(
                "approved", Stage.ARCHITECTURE, Status.ACTIVE, actor=actor, enqueue=True
            ),
        )

    async def reject(self, task_id: int, reason: str, actor: str) -> ActionOutcome:
        """The BRD is rejected: the analyst runs again with the reason."""
        reason = reason.strip() or "The BRD was rejected without a reason."
        return await self._human(
            task_id,
            {Status.AWAITING_APPROVAL},
            lambda t: Change(
                "rejected",
                Stage.ANALYSIS,
                Status.ACTIVE,
                reason,
                actor=actor,
                feedback=Feedback(Stage.ANALYSIS, "rejection", "human", reason, None),
                enqueue=True,
            ),
        )

    async def answer(self, task_id: int, answers: str, actor: str) -> ActionOutcome:
        """Answers to the analyst's questions: the analyst runs again with them."""
        return await self._human(
            task_id,
            {Status.NEEDS_INPUT},
            lambda t: Change(
                "answered",
                Stage.ANALYSIS,
                Status.ACTIVE,
                answers,
                actor=actor,
                feedback=Feedback(Stage.ANALYSIS, "answers", "human", answers, None),
                enqueue=True,
            ),
        )

    async def retry(self, task_id: int, actor: str) -> ActionOutcome:
        """Escalated: reset the retry count and rerun development. Failed: rerun the stage."""

        def change(task: Task) -> Change:
            if task.status == Status.ESCALATED:
                return Change(
                    "retried",
                    Stage.DEVELOPMENT,
                    Status.ACTIVE,
                    f"developer retries reset from {task.developer_retries} to 0",
                    actor=actor,
                    developer_retries=0,
                    enqueue=True,
                )
            return Change(
                "retried",
                Stage(task.stage),
                Status.ACTIVE,
                "rerun the failed stage",
                actor=actor,
                enqueue=True,
            )

        return await self._human(task_id, {Status.ESCALATED, Status.FAILED}, change)

    async def _human(self, task_id: int, allowed: set[Status], make_change) -> ActionOutcome:
        task = await self.store.get_task(task_id)
        if task is None:
            return ActionOutcome(False, None, "no such task")
        if task.status not in allowed:
            return ActionOutcome(False, task, f"the task is {task.status}, not {'/'.join(allowed)}")
        changed = await self._transition(None, task, make_change(task))
        reason = None if changed else "the task changed meanwhile"
        return ActionOutcome(changed, await self.store.get_task(task_id), reason)

    # --- the one way a task changes ----------------------------------------------------------

    async def _transition(
        self,
        job: Job | None,
        task: Task,
        change: Change,
        alert: tuple[AlertKind, str] | None = None,
        job_state: str = "succeeded",
    ) -> bool:
        """Apply a change if the task is still as `task` shows it; one event row per change."""
        to_state = f"{change.stage}/{change.status}"
        feedback = change.feedback
        keeps_lease = change.stage in LEASE_STAGES and change.status == Status.ACTIVE
        async with self.store.tx() as conn:
            if job is not None:
                await jobs.finish(conn, job, job_state, None)
            cursor = await conn.execute(
                "UPDATE tasks SET stage = ?, status = ?, status_reason = ?,"
                " developer_retries = COALESCE(?, developer_retries),"
                " feedback_stage = COALESCE(?, feedback_stage),"
                " feedback_kind = COALESCE(?, feedback_kind),"
                " feedback_source = COALESCE(?, feedback_source),"
                " feedback_text = COALESCE(?, feedback_text),"
                " feedback_report = CASE WHEN ? THEN ? ELSE feedback_report END,"
                " finished_at = CASE WHEN ? THEN ? ELSE finished_at END,"
                " merge_sha = COALESCE(?, merge_sha),"
                " tested_sha = CASE WHEN ? THEN COALESCE(?, tested_sha) ELSE NULL END,"
                " updated_at = ? WHERE id = ? AND stage = ? AND status = ?",
                (
                    change.stage,
                    change.status,
                    change.reason,
                    change.developer_retries,
                    feedback and feedback.stage,
                    feedback and feedback.kind,
                    feedback and feedback.source,
                    feedback and feedback.text,
                    feedback is not None,
                    feedback and feedback.report,
                    change.finished,
                    now(),
                    change.merge_sha,
                    keeps_lease or change.stage is Stage.DONE,
                    change.tested_sha,
                    now(),
                    task.id,
                    task.stage,
                    task.status,
                ),
            )
            if cursor.rowcount != 1:
                return False
            await Store.add_event(
                conn, task.id, change.kind, task.state, to_state, change.detail, change.actor
            )
            if not keeps_lease:
                await release_held(conn, task.id)
            if change.enqueue:
                await jobs.enqueue(conn, task.id, change.stage)
        await self._after_change(task.id, alert)
        return True

    async def _after_change(self, task_id: int, alert: tuple[AlertKind, str] | None = None) -> None:
        self.wake_worker()
        try:
            await self.notifier.task_changed(task_id)
            if alert is not None:
                await self.notifier.alert(task_id, *alert)
        except Exception:
            log.exception("notifier failed for task %s", task_id)

    # --- links -------------------------------------------------------------------------------

    def report_link(self, task: Task, gate: str) -> str:
        """Where the next agent finds the full report: its path in the worktree, at a commit."""
        relpath = report_relpath(task.work_item, gate)
        sha = f" at {task.head_sha[:10]}" if task.head_sha else ""
        return f"{relpath} (branch {task.branch}{sha})"


def json_or_none(value: dict) -> str | None:
    return json.dumps(value, sort_keys=True) if value else None
