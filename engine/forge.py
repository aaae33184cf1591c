"""The forge as the pipeline sees it: CI on a head, the task's pull request, merging it.

Only projects with a `repo` (owner/name) are on the forge; the others keep the
local check command and the local merge of the foundation.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from engine.config import ProjectConfig, Settings
from engine.gates import GateResult, GateVerdict, report_relpath
from engine.gitea import GiteaClient, PullRequest
from engine.links import forge_file_url, tracker_issue_url
from engine.outcome import Result
from engine.store import Task


@dataclass(frozen=True)
class ForgeMerge:
    ok: bool
    sha: str | None = None
    conflict: bool = False
    head_moved: bool = False
    transient: bool = False  # the forge did not answer as it should: try again later
    error: str | None = None


class Forge:
    def __init__(self, client: GiteaClient, settings: Settings, env: jinja2.Environment) -> None:
        self.client = client
        self.settings = settings
        self.env = env

    @staticmethod
    def covers(project: ProjectConfig) -> bool:
        return bool(project.repo)

    async def ci_gate(self, project: ProjectConfig, sha: str | None) -> GateResult | None:
        """`ci_green` from the forge's combined status.

        A head with no status yet waits for CI to report, unless the project says it has no
        forge CI (`forge_ci: false`); then None hands the gate to the local check.
        """
        assert project.repo is not None
        if not sha:
            return GateResult(GateVerdict.FAIL, "the branch has no pushed head yet")
        status = await self.client.combined_status(project.repo, sha)
        if not status.ok:
            return GateResult(GateVerdict.FAIL, f"forge unreachable: {status.error}")
        combined = status.value
        if combined.state == "none":
            if project.forge_ci:
                return GateResult(GateVerdict.FAIL, f"waiting for CI to report on {sha[:10]}")
            return None
        if combined.state == "success":
            return GateResult(GateVerdict.PASS, f"CI green on {sha[:10]}")
        contexts = ", ".join(
            f"{name}: {state}" for name, state in sorted(combined.contexts.items())
        )
        return GateResult(GateVerdict.FAIL, f"CI {combined.state} on {sha[:10]} ({contexts})")

    def pr_body(self, task: Task) -> str:
        return self.env.get_template("tracker/pr_body.md.j2").render(
            task=task,
            brd_url=forge_file_url(
                self.settings, task, report_relpath(task.work_item, "brd_ready")
            ),
            issue_url=tracker_issue_url(self.settings, task),
        )

    async def ensure_pr(self, project: ProjectConfig, task: Task) -> Result[PullRequest]:
        """Open the task's PR, or find the one already open for its branch."""
        assert project.repo is not None
        return await self.client.ensure_pull_request(
            project.repo,
            task.branch,
            project.main_branch,
            f"{task.work_item}: {task.title}",
            self.pr_body(task),
        )

    async def task_pr(self, project: ProjectConfig, task: Task) -> Result[PullRequest]:
        """The task's recorded PR while it is open or once merged; else open (or find) one.

        A merge that happened just before the process stopped must be found, not repeated
        through a second PR for the same branch."""
        assert project.repo is not None
        if task.pr_number is not None:
            recorded = await self.client.get_pull_request(project.repo, task.pr_number)
            if not recorded.ok or recorded.value.merged or recorded.value.state == "open":
                return recorded
        return await self.ensure_pr(project, task)

    async def merge(self, project: ProjectConfig, task: Task) -> ForgeMerge:
        """Merge the task's PR, but only at the head that was tested (`task.head_sha`)."""
        assert project.repo is not None and task.head_sha is not None
        pr = await self.task_pr(project, task)
        if not pr.ok:
            return ForgeMerge(False, transient=True, error=pr.error)
        if pr.value.merged:
            return ForgeMerge(True, sha=pr.value.merge_commit_sha)
        number = pr.value.number
        outcome = await self.client.merge_pull_request(
            project.repo,
            number,
            task.head_sha,
            title=f"Merge {task.branch}: {task.work_item} {task.title}",
        )
        if not outcome.ok:
            return ForgeMerge(False, transient=True, error=outcome.error)
        result = outcome.value
        if result.conflict or result.head_moved:
            reason = "merge conflict" if result.conflict else "the branch moved after it was tested"
            return ForgeMerge(
                False, conflict=result.conflict, head_moved=result.head_moved, error=reason
            )
        merged = await self.client.get_pull_request(project.repo, number)
        sha = merged.value.merge_commit_sha if merged.ok else None
        return ForgeMerge(True, sha=sha)
