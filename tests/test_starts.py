"""Starting tasks: one task per tracker issue, work item ids, branches, QG-0."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from engine.config import Settings
from engine.git import branch_name
from engine.runtime import Engine
from engine.stages import Status
from tests.conftest import RecordingNotifier, settle


async def test_fifty_concurrent_starts_create_one_task_and_one_job(make_settings) -> None:
    async with Engine(make_settings()) as engine:
        outcomes = await asyncio.gather(
            *(
                engine.pipeline.start_task(
                    "ORCH", "Same issue", "Fix it.", tracker_issue_id="uuid-1", sequence_id=7
                )
                for _ in range(50)
            )
        )
        assert sum(o.created for o in outcomes) == 1
        assert {o.task.id for o in outcomes} == {outcomes[0].task.id}
        assert len(await engine.store.list_tasks()) == 1
        jobs = await engine.store.fetchall("SELECT stage, state FROM jobs")
        assert [tuple(row) for row in jobs] == [("analysis", "queued")]
        created = await engine.store.fetchall("SELECT * FROM events WHERE kind = 'created'")
        assert len(created) == 1


async def test_starts_from_two_processes_worth_of_connections_create_one_task(
    make_settings,
) -> None:
    settings: Settings = make_settings()
    first, second = Engine(settings), Engine(settings)
    async with first, second:
        outcomes = await asyncio.gather(
            *(
                engine.pipeline.start_task("ORCH", "Race", "Body.", tracker_issue_id="uuid-9")
                for engine in (first, second) * 10
            )
        )
        assert sum(o.created for o in outcomes) == 1
        assert len(await first.store.list_tasks()) == 1


async def test_work_item_walks_forward_and_branches_are_safe(make_settings) -> None:
    async with Engine(make_settings()) as engine:
        start = engine.pipeline.start_task
        a = (await start("ORCH", "; rm -rf / ёжик", "x", tracker_issue_id="a", sequence_id=5)).task
        b = (await start("ORCH", "; rm -rf / ёжик", "x", tracker_issue_id="b", sequence_id=5)).task
        c = (await start("ORCH", "ёжик", "x", tracker_issue_id="c", sequence_id=12)).task
        assert (a.work_item, b.work_item, c.work_item) == ("ORCH-005", "ORCH-006", "ORCH-012")
        assert a.branch == "feature/orch-005-rm-rf"
        assert b.branch == "feature/orch-006-rm-rf"
        assert c.branch == "feature/orch-012-untitled"
        telegram = (await start("ORCH", "From chat", "Body.")).task
        assert telegram.work_item == "ORCH-013" and telegram.tracker_issue_id is None


async def test_an_empty_description_starts_nothing_and_says_why(make_settings) -> None:
    async with Engine(make_settings()) as engine:
        outcome = await engine.pipeline.start_task(
            "ORCH", "No body", "   \n", tracker_issue_id="empty"
        )
        assert not outcome.created and outcome.task is None
        assert "description is empty" in outcome.reason
        assert await engine.store.list_tasks() == []
        (row,) = await engine.store.fetchall("SELECT kind, detail FROM events")
        assert row["kind"] == "start_rejected" and "empty" in row["detail"]


async def test_an_unknown_project_is_ignored(make_settings) -> None:
    async with Engine(make_settings()) as engine:
        outcome = await engine.pipeline.start_task("NOPE", "t", "d", tracker_issue_id="x")
        assert not outcome.created and "unknown project" in outcome.reason
        assert await engine.store.list_tasks() == []


def remote_log(remote: Path, ref: str) -> list[str]:
    return subprocess.run(
        ["git", "--git-dir", str(remote), "log", "--format=%s", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()


async def test_a_branch_another_task_owns_gets_a_suffix_and_both_tasks_finish(
    make_settings, notifier: RecordingNotifier, agent_env, remote: Path
) -> None:
    """Branches carry the work item, so only a row named otherwise (an older naming, a hand
    edit) can own the branch a new task derives; the new task then takes a suffixed one."""
    title = "Same title"
    engine = Engine(make_settings(), notifier)
    notifier.engine = engine
    async with engine:
        start = engine.pipeline.start_task
        first = (await start("ORCH", title, "One.", tracker_issue_id="a", sequence_id=1)).task
        taken = branch_name("ORCH-002", title)
        async with engine.store.tx() as conn:
            await conn.execute("UPDATE tasks SET branch = ? WHERE id = ?", (taken, first.id))
        second = (await start("ORCH", title, "Two.", tracker_issue_id="b", sequence_id=2)).task
        assert second.work_item == "ORCH-002"
        assert second.branch == f"{taken}-2"

        engine.start_worker()
        finished = [await settle(engine, task.id) for task in (first, second)]

    assert [task.status for task in finished] == [Status.DONE, Status.DONE]
    merges = remote_log(remote, "main")
    for task in finished:
        on_branch = remote_log(remote, task.branch)
        assert on_branch[0] == f"{task.work_item} deployer: deploy"
        assert f"{task.work_item} developer: development" in on_branch
        assert f"Merge {task.branch}: {task.work_item} {title}" in merges
