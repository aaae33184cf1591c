"""Merging under faults: a forge that fails for a while, a merge that already happened,
and a merge-gate run cut off between its rebase and its push."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import aiohttp

from chaos.crashes import Sandboxes, as_env, end_agents
from chaos.harness import Conveyor, conveyor_env, free_port, merge_commits
from chaos.harness import wait_until as poll_until
from engine.gates import GateVerdict
from engine.runtime import Engine
from engine.stages import Stage, Status
from engine.store import Store, Task
from tests.conftest import HANG_GUARD_S, RecordingNotifier
from tests.test_console_run import wait_until
from tests.test_webhooks import open_board


def merges_on_main(remote: Path) -> list[str]:
    out = subprocess.run(
        ["git", "--git-dir", str(remote), "log", "--merges", "--format=%s", "main"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


async def test_a_forge_failing_merges_for_a_while_defers_the_merge_without_a_rollback(
    tmp_path, make_settings, agent_env
) -> None:
    board, close = await open_board(
        tmp_path, make_settings, RecordingNotifier(), ci_state="success", merge_retry_s=0.05
    )
    try:
        board.gitea.api_fault(500, path_contains="/merge")  # until cleared
        issue, task = await board.awaiting_approval()
        board.move(issue["id"], "Approved")

        async def deferred() -> bool:
            return any(e.kind == "merge_deferred" for e in await board.engine.store.events(task.id))

        await wait_until(deferred, "a deferred merge")
        board.gitea.api_fault(None)
        done = await board.until(task.id, Status.DONE)

        events = await board.engine.store.events(task.id)
        assert not [e for e in events if e.kind == "rolled_back"]
        assert done.developer_retries == 0
        assert "HTTP 500" in next(e for e in events if e.kind == "merge_deferred").detail
        deployers = [
            r for r in await board.engine.store.agent_runs(task.id) if r.role == "deployer"
        ]
        assert len(deployers) == 1  # the deployer's verdict stood while the merge waited
        remote = board.gitea.repo_path("team", "app")
        assert len([s for s in merges_on_main(remote) if done.branch in s]) == 1
        assert len(await board.gitea.list_pulls("team", "app", "all")) == 1
    finally:
        await close()


async def test_a_pr_merged_before_the_task_finished_is_found_not_merged_again(
    tmp_path, make_settings, agent_env
) -> None:
    agent_env(deployer="crash,ok")
    board, close = await open_board(
        tmp_path, make_settings, RecordingNotifier(), ci_state="success", agent_max_attempts=1
    )
    try:
        issue, task = await board.awaiting_approval()
        board.move(issue["id"], "Approved")
        failed = await board.until(task.id, Status.FAILED)
        assert failed.stage == Stage.DEPLOY and failed.pr_number is not None
        # merged in the forge, and the webhook saying so is lost (like a crash right after
        # Conveyor's own merge call)
        board.gitea.drop_next(2)
        await board.gitea.merge_pull("team", "app", failed.pr_number, {"Do": "merge"})

        await board.engine.pipeline.retry(task.id, actor="@alice (42)")
        done = await board.until(task.id, Status.DONE)

        remote = board.gitea.repo_path("team", "app")
        assert len([s for s in merges_on_main(remote) if done.branch in s]) == 1
        assert len(await board.gitea.list_pulls("team", "app", "all")) == 1
        pull = await board.gitea.get_pull("team", "app", failed.pr_number)
        assert done.merge_sha == pull["merge_commit_sha"]
    finally:
        await close()


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@localhost", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


async def branch_behind_main(engine: Engine, remote: Path, tmp_path: Path) -> tuple[Task, Path]:
    """A task whose pushed branch has one commit while main moved on by another."""
    task = (await engine.pipeline.start_task("ORCH", "Gate", "Rebase me.", "g", 1)).task
    worktree = await engine.git.ensure_worktree(
        "ORCH", str(remote), "main", task.branch, task.work_item
    )
    (worktree / "feature.txt").write_text("feature\n")
    await engine.git.commit_all(worktree, "feature")
    assert (await engine.git.push_branch(worktree, task.branch)).ok
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(remote), str(other))
    (other / "other.txt").write_text("other\n")
    git(other, "add", "other.txt")
    git(other, "commit", "-q", "-m", "other")
    git(other, "push", "-q", "origin", "HEAD:main")
    git(worktree, "fetch", "-q", "origin")
    return task, worktree


async def test_a_merge_gate_cut_off_after_its_rebase_pushes_on_the_rerun(
    make_settings, agent_env, remote: Path, tmp_path: Path
) -> None:
    engine = Engine(make_settings(), RecordingNotifier())
    async with engine:
        task, worktree = await branch_behind_main(engine, remote, tmp_path)
        project = engine.settings.project("ORCH")
        pushed = git(worktree, "rev-parse", "HEAD")
        # the first run rebased the worktree and was cut off before it pushed
        git(worktree, "rebase", "-q", "origin/main")
        rebased = git(worktree, "rev-parse", "HEAD")
        assert rebased != pushed

        result = await engine.pipeline.merge_gate.validate(project, task, worktree)

        assert result.passed, result.reason
        assert result.report == rebased
        on_remote = git(remote, "rev-parse", f"refs/heads/{task.branch}")
        assert on_remote == rebased  # the forge now has the head that was tested


async def test_conveyor_killed_right_after_its_merge_resumes_at_the_merge(tmp_path) -> None:
    """SIGKILL between the forge's merge and the `done` transition, with the PR-closed
    webhook lost too: the restarted process finds the merge, runs no deployer again,
    validates nothing again and merges nothing twice."""
    boxes = await Sandboxes.open(tmp_path)
    port = free_port()
    settings = boxes.settings(job_lease_s=2)
    conveyor = Conveyor(tmp_path, conveyor_env(tmp_path, port, **as_env(settings)), port)
    boxes.hook(conveyor.url)
    merge_pull = boxes.gitea.merge_pull
    killed: list[int] = []

    async def merge_then_die(owner: str, name: str, number: int, body: dict) -> None:
        if not killed:
            boxes.gitea.drop_next(3)  # the PR-closed, push and branch webhooks are lost too
        await merge_pull(owner, name, number, body)
        if not killed:
            killed.append(number)
            conveyor.process.send_signal(signal.SIGKILL)  # before the answer reaches it

    boxes.gitea.merge_pull = merge_then_die
    store = None
    person = None
    try:
        async with aiohttp.ClientSession() as session:
            conveyor.spawn()
            await conveyor.healthy(session)
            store = await Store(tmp_path / "conveyor.db").open()
            issues = boxes.start_issues(1)
            person = asyncio.create_task(boxes.approve_reviews(issues, set()))
            await poll_until(lambda: asyncio.sleep(0, bool(killed)), "the merge", HANG_GUARD_S)
            await asyncio.to_thread(conveyor.process.wait, 30)
            conveyor.spawn()
            await conveyor.healthy(session)

            async def done() -> bool:
                return (await store.fetchone("SELECT status FROM tasks"))["status"] == "done"

            await poll_until(done, "the task to finish", HANG_GUARD_S)
            await conveyor.stop()
            (task,) = await store.list_tasks()
            kinds = [(e.kind, e.from_state) for e in await store.events(task.id)]
            assert ("revalidate", "deploy/active") not in kinds
            assert kinds.count(("advanced", "deploy-staging/active")) == 1
            assert kinds.count(("done", "deploy/active")) == 1
            deployers = [r for r in await store.agent_runs(task.id) if r.role == "deployer"]
            assert len(deployers) == 1
            assert len([s for s in merge_commits(boxes.remote) if task.branch in s]) == 1
            pulls = await boxes.gitea.list_pulls("team", "app", "all")
            assert [p["number"] for p in pulls] == killed
            assert task.merge_sha == pulls[0]["merge_commit_sha"]
    finally:
        if person is not None:
            person.cancel()
        await conveyor.stop()
        await end_agents(store, tmp_path)
        if store is not None:
            await store.close()
        await boxes.close()


async def test_a_remote_that_does_not_answer_makes_the_merge_gate_wait_not_fail(
    make_settings, agent_env, remote: Path, tmp_path: Path
) -> None:
    engine = Engine(make_settings(), RecordingNotifier())
    async with engine:
        task = (await engine.pipeline.start_task("ORCH", "Gate", "Wait.", "w", 1)).task
        project = engine.settings.project("ORCH")
        worktree = await engine.git.ensure_worktree(
            "ORCH", str(remote), "main", task.branch, task.work_item
        )
        away = remote.with_name("away.git")
        remote.rename(away)  # the remote is down for a while
        try:
            waiting = await engine.pipeline.merge_gate.validate(project, task, worktree)
        finally:
            away.rename(remote)
        assert waiting.verdict is GateVerdict.WAIT and "fetch failed" in waiting.reason
        assert (await engine.pipeline.merge_gate.validate(project, task, worktree)).passed


async def test_a_merge_gate_cut_off_mid_rebase_starts_the_rebase_over(
    make_settings, agent_env, remote: Path, tmp_path: Path
) -> None:
    engine = Engine(make_settings(), RecordingNotifier())
    async with engine:
        task, worktree = await branch_behind_main(engine, remote, tmp_path)
        project = engine.settings.project("ORCH")
        # the process died in the middle of the rebase: it stopped after its first step
        stopped = subprocess.run(
            ["git", "rebase", "-q", "--exec", "false", "origin/main"],
            cwd=worktree,
            capture_output=True,
        )
        assert stopped.returncode != 0 and (worktree / "feature.txt").exists()

        worktree = await engine.git.ensure_worktree(
            "ORCH", str(remote), "main", task.branch, task.work_item
        )
        result = await engine.pipeline.merge_gate.validate(project, task, worktree)

        assert result.passed, result.reason
        assert "rebased onto main" in result.reason
        assert git(worktree, "symbolic-ref", "--short", "HEAD") == task.branch
        assert git(remote, "rev-parse", f"refs/heads/{task.branch}") == result.report
