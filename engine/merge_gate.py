"""The merge gate: deploy-staging's first sub-gate, so two green branches never break main.

Deterministic, no agent. Merges are serialised per repository by a lease in the
store: taken atomically (inside a write transaction), naming its holder and its
time, released only by its holder's transitions (done, a rollback, a merged PR),
and reclaimed when older than ORCH_MERGE_LEASE_TTL_S. While it holds the lease, a
task's branch is rebased onto the remote's current main in its own worktree,
pushed with --force-with-lease (the task branch only, never main), and the
project's check runs on the combined tree. What is later merged is exactly the
commit tested here (`tasks.tested_sha`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from engine.config import ProjectConfig, Settings
from engine.gates import GateResult, GateVerdict, ci_green_local
from engine.git import GitWorkspace
from engine.store import Store, Task, now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    acquired: bool
    holder: int  # the task that holds it now
    reclaimed_from: int | None = None  # the task whose stale lease was taken over


def lease_key(project: ProjectConfig) -> str:
    return project.repo or f"local:{project.key}"


async def release_held(conn: aiosqlite.Connection, task_id: int) -> None:
    """Inside a transition's transaction: the task lets go of any lease it holds."""
    await conn.execute("DELETE FROM merge_leases WHERE task_id = ?", (task_id,))


class MergeGate:
    def __init__(self, settings: Settings, store: Store, git: GitWorkspace) -> None:
        self.settings = settings
        self.store = store
        self.git = git

    def applies(self, project: ProjectConfig) -> bool:
        repos = self.settings.merge_gate_repos
        enabled = self.settings.merge_gate_enabled
        return enabled and (not repos or lease_key(project) in repos or project.key in repos)

    async def acquire(self, project: ProjectConfig, task: Task) -> Lease:
        """Take (or renew) the repository's lease, unless a live holder has it."""
        key = lease_key(project)
        stale_before = now() - self.settings.merge_lease_ttl_s
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "SELECT task_id, acquired_at FROM merge_leases WHERE repo = ?", (key,)
            )
            row = await cursor.fetchone()
            if row is not None and row[0] != task.id and row[1] >= stale_before:
                return Lease(False, int(row[0]))
            await conn.execute(
                "INSERT INTO merge_leases (repo, task_id, acquired_at, fence) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (repo) DO UPDATE SET task_id = excluded.task_id,"
                " acquired_at = excluded.acquired_at, fence = merge_leases.fence + 1",
                (key, task.id, now()),
            )
            reclaimed = int(row[0]) if row is not None and row[0] != task.id else None
            if reclaimed is not None:
                await Store.add_event(
                    conn,
                    task.id,
                    "lease_reclaimed",
                    task.state,
                    task.state,
                    f"merge lease of {key} reclaimed from task {reclaimed} (older than"
                    f" {self.settings.merge_lease_ttl_s:g}s)",
                )
        return Lease(True, task.id, reclaimed)

    async def release(self, task: Task, why: str, actor: str | None = None) -> bool:
        """Let go of any lease the task holds, outside a transition; an event if it held one."""
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "DELETE FROM merge_leases WHERE task_id = ? RETURNING repo", (task.id,)
            )
            released = [row[0] for row in await cursor.fetchall()]
            if released:
                await Store.add_event(
                    conn,
                    task.id,
                    "lease_released",
                    task.state,
                    task.state,
                    f"merge lease of {', '.join(released)} released: {why}",
                    actor,
                )
        return bool(released)

    async def holds(self, project: ProjectConfig, task: Task) -> bool:
        """The task still holds its repository's lease and the commit it validated."""
        return task.tested_sha is not None and await self.holder(project) == task.id

    async def holder(self, project: ProjectConfig) -> int | None:
        row = await self.store.fetchone(
            "SELECT task_id FROM merge_leases WHERE repo = ?", (lease_key(project),)
        )
        return None if row is None else int(row[0])

    async def validate(self, project: ProjectConfig, task: Task, worktree: Path) -> GateResult:
        """Rebase onto the current main, push the task branch, run the check on the result."""
        rebase = await self.git.rebase_onto_main(worktree, task.branch, project.main_branch)
        if rebase.transient:
            return GateResult(GateVerdict.WAIT, rebase.error or "the remote did not answer")
        if not rebase.ok:
            files = "\n".join(rebase.conflict_files)
            must_fix = (
                f"The branch no longer applies on top of {project.main_branch}: {rebase.error}."
                + (f"\nConflicting files:\n{files}" if files else "")
                + f"\nUpdate the branch so that it merges cleanly with {project.main_branch}."
            )
            return GateResult(GateVerdict.FAIL, rebase.error or "rebase failed", must_fix)
        # Push whenever the remote lacks the head to test, not only after a rebase: a run cut
        # off between its rebase and its push finds the branch "up to date" when it reruns.
        remote_head = await self.git.remote_head(worktree, task.branch)
        if remote_head != rebase.head:
            pushed = await self.git.force_push_branch(worktree, task.branch, remote_head)
            if not pushed.ok:
                reason = f"push of the rebased {task.branch} refused: {pushed.err.strip()[-300:]}"
                return GateResult(GateVerdict.FAIL, reason, reason)
        check = await ci_green_local(worktree, project.check_command)
        if not check.passed:
            must_fix = (
                f"The check fails on the branch combined with {project.main_branch}"
                f" ({(rebase.main or '')[:10]}):\n{check.must_fix or check.reason}"
            )
            return GateResult(GateVerdict.FAIL, check.reason, must_fix)
        how = "rebased onto" if rebase.rebased else "up to date with"
        return GateResult(
            GateVerdict.PASS,
            f"{how} {project.main_branch} {(rebase.main or '')[:10]}; {check.reason};"
            f" tested {(rebase.head or '')[:10]}",
            report=rebase.head,
        )
