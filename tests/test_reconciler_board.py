"""The tracker side: what the board says and the store does not reflect is replayed (a start,
a BRD verdict), nothing else is, and a webhook racing the reconciler makes one task."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from chaos.harness import Stack, plane_headers, state_change
from engine.stages import Status
from tests.test_reconciler_bounce import (
    awaiting_approval_on_the_board,
    lose_a_green_status,
    resting,
    running_stack,
    to_development_waiting_for_ci,
)

NEVER_REPLAYED = ("Backlog", "Todo", "In Review", "Needs Input", "Blocked", "Architecture", "Done")


async def move_losing_the_webhook(stack: Stack, issue_id: str, state: str) -> None:
    await stack.settle()
    stack.plane.drop_next(1)
    stack.move(issue_id, state)
    await stack.settle()


async def test_with_the_tracker_side_off_the_board_is_not_replayed_but_gates_are(
    tmp_path: Path, agent_env
) -> None:
    async with running_stack(tmp_path, ci_state=None, reconcile_plane_enabled=False) as (
        stack,
        _,
    ):
        _, task_id = await to_development_waiting_for_ci(stack)
        await lose_a_green_status(stack, task_id)
        lost = stack.issue("Add a farewell")
        await move_losing_the_webhook(stack, lost["id"], "In Progress")

        report = await stack.engine.reconciler.tick()

        assert (report.started, report.unblocked) == (0, 1)
        assert await stack.engine.store.task_by_tracker_issue("ORCH", lost["id"]) is None


async def test_a_lost_rejection_is_replayed_once_with_the_persons_reason(
    tmp_path: Path, agent_env
) -> None:
    async with running_stack(tmp_path, ci_state=None) as (stack, _):
        issue, task_id = await awaiting_approval_on_the_board(stack)
        stack.plane.add_comment(issue["id"], "<p>Call it /greeting.</p>", as_user=stack.human)
        await move_losing_the_webhook(stack, issue["id"], "Rejected")

        reports = [await stack.engine.reconciler.tick()]
        await resting(stack, task_id, Status.AWAITING_APPROVAL)
        await stack.settle()
        reports += [await stack.engine.reconciler.tick() for _ in range(5)]

        assert [r.verdicts for r in reports] == [1, 0, 0, 0, 0, 0]
        rejected = [e for e in await stack.engine.store.events(task_id) if e.kind == "rejected"]
        assert len(rejected) == 1 and rejected[0].actor == "reconciler"
        assert "/greeting" in rejected[0].detail
        runs = await stack.engine.store.agent_runs(task_id)
        assert [run.role for run in runs] == ["analyst", "analyst"]
        assert "/greeting" in Path(runs[1].prompt_path).read_text()
        assert stack.plane.state_name(issue["id"]) == "In Review"


async def test_board_states_other_than_in_progress_approved_rejected_are_never_replayed(
    tmp_path: Path, agent_env
) -> None:
    async with running_stack(tmp_path, ci_state=None) as (stack, _):
        issue, task_id = await awaiting_approval_on_the_board(stack)
        untouched = stack.issue("Add a farewell")
        events = len(await stack.engine.store.events(task_id))
        for state in NEVER_REPLAYED:
            for issue_id in (issue["id"], untouched["id"]):
                if stack.plane.state_name(issue_id) != state:
                    await move_losing_the_webhook(stack, issue_id, state)
            reports = [await stack.engine.reconciler.tick() for _ in range(3)]
            assert all(r.started == r.verdicts == r.unblocked == 0 for r in reports), state

        assert len(await stack.engine.store.list_tasks()) == 1
        task = await stack.engine.store.get_task(task_id)
        assert task.status == Status.AWAITING_APPROVAL
        assert len(await stack.engine.store.events(task_id)) == events


def remote_branches(remote: Path) -> list[str]:
    out = subprocess.run(
        [
            "git",
            "--git-dir",
            str(remote),
            "for-each-ref",
            "--format=%(refname:short)",
            "refs/heads",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.split()


async def test_a_webhook_and_the_reconciler_starting_the_same_issues_make_one_task_each(
    tmp_path: Path, agent_env
) -> None:
    async with running_stack(tmp_path, ci_state=None) as (stack, _):
        issues = [stack.issue(f"Feature {n}") for n in range(6)]
        await stack.settle()
        stack.plane.drop_rate(1.0)  # the sandbox's own deliveries are lost: the test sends them
        for issue in issues:
            stack.move(issue["id"], "In Progress")
        await stack.plane.drain()
        bodies = [state_change(stack.plane.issue(issue["id"])) for issue in issues]

        posted = (
            stack.engine.reconciler.tick(),
            *(stack.post("plane", body, plane_headers(body)) for body in bodies),
        )
        report, *answers = await asyncio.gather(*posted)
        assert all(status == 200 for status, _ in answers)
        await stack.settle()
        tasks = await stack.engine.store.list_tasks()
        for task in tasks:
            await resting(stack, task.id, Status.AWAITING_APPROVAL)

        assert sorted(t.tracker_issue_id for t in tasks) == sorted(i["id"] for i in issues)
        by_webhook = await stack.engine.store.fetchone(
            "SELECT COUNT(*) AS n FROM webhook_deliveries WHERE outcome = 'started'"
        )
        assert report.started + by_webhook["n"] == len(issues)
        for task in tasks:
            kinds = [e.kind for e in await stack.engine.store.events(task.id)]
            assert kinds.count("created") == 1
            jobs = await stack.engine.store.fetchone(
                "SELECT COUNT(*) AS n FROM jobs WHERE task_id = ? AND stage = 'analysis'",
                (task.id,),
            )
            assert jobs["n"] == 1
            runs = await stack.engine.store.agent_runs(task.id)
            assert [run.role for run in runs] == ["analyst"]
        worktrees = stack.root / "work" / "worktrees" / "ORCH"
        assert sorted(p.name for p in worktrees.iterdir()) == sorted(t.work_item for t in tasks)
        branches = remote_branches(stack.remote)
        assert sorted(b for b in branches if b != "main") == sorted(t.branch for t in tasks)
