"""The pipeline end to end: real SQLite, real git with a bare remote, real subprocess agents."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from engine.notifier import AlertKind
from engine.runtime import Engine
from engine.stages import Stage, Status
from tests.conftest import RecordingNotifier, settle, start


def git_remote(remote: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(remote), *args], capture_output=True, text=True, check=True
    ).stdout


def event_kinds(events) -> list[str]:
    return [event.kind for event in events]


async def runs_by_role(engine: Engine, task_id: int, role: str):
    return [run for run in await engine.store.agent_runs(task_id) if run.role == role]


async def test_happy_path_reaches_done_and_merges_into_main(
    engine: Engine, remote: Path, notifier: RecordingNotifier
) -> None:
    task = await settle(engine, (await start(engine)).id)

    assert (task.stage, task.status) == (Stage.DONE, Status.DONE)
    assert event_kinds(await engine.store.events(task.id)) == [
        "created",
        "brd_ready",
        "approved",
        "advanced",  # architecture -> development
        "advanced",  # development -> review
        "advanced",  # review -> testing
        "advanced",  # testing -> deploy-staging
        "advanced",  # deploy-staging -> deploy
        "done",
    ]
    runs = await engine.store.agent_runs(task.id)
    assert [r.role for r in runs] == [
        "analyst",
        "architect",
        "developer",
        "reviewer",
        "tester",
        "deployer",
    ]
    assert all(r.ok and r.cost_usd and r.full_input and r.model for r in runs)
    # what the remote's main now holds: the merge of the task branch and every agent's commit
    log = git_remote(remote, "log", "--format=%s", "main")
    assert f"Merge {task.branch}" in log
    for role, stage in [
        ("analyst", "analysis"),
        ("developer", "development"),
        ("deployer", "deploy"),
    ]:
        assert f"ORCH-001 {role}: {stage}" in log
    deploy_log = git_remote(remote, "show", "main:docs/work-items/ORCH-001/14-deploy-log.md")
    assert "status: SUCCESS" in deploy_log
    assert git_remote(remote, "rev-parse", "main").strip() == task.merge_sha
    assert notifier.kinds(task.id) == [AlertKind.BRD_READY]


async def test_review_bounce_embeds_the_findings_in_the_next_developer_prompt(
    engine: Engine, agent_env
) -> None:
    agent_env(reviewer="negative,ok")
    task = await settle(engine, (await start(engine)).id)

    assert task.status == Status.DONE
    assert task.developer_retries == 1
    events = await engine.store.events(task.id)
    rollback = next(e for e in events if e.kind == "rolled_back")
    assert (rollback.from_state, rollback.to_state) == ("review/active", "development/active")
    assert "P0:" in rollback.detail and "P2:" not in rollback.detail
    developer = await runs_by_role(engine, task.id, "developer")
    assert len(developer) == 2
    first, second = (Path(r.prompt_path).read_text() for r in developer)
    for line in rollback.detail.splitlines():
        assert line in second
        assert line not in first
    assert "12-review.md" in second  # the link to the full report


async def test_test_failure_bounce_embeds_the_failure_excerpt(engine: Engine, agent_env) -> None:
    agent_env(tester="negative,ok")
    task = await settle(engine, (await start(engine)).id)

    assert task.status == Status.DONE and task.developer_retries == 1
    developer = await runs_by_role(engine, task.id, "developer")
    second_prompt = Path(developer[1].prompt_path).read_text()
    assert "FAILED tests/" in second_prompt
    assert "13-test-report.md" in second_prompt


async def test_escalation_at_the_cap_stops_all_runs_until_a_person_retries(
    engine: Engine, agent_env, notifier: RecordingNotifier
) -> None:
    agent_env(reviewer="negative")
    task = await settle(engine, (await start(engine)).id)

    assert task.status == Status.ESCALATED and task.stage == Stage.DEVELOPMENT
    assert task.developer_retries == engine.settings.max_developer_retries
    assert len(await runs_by_role(engine, task.id, "developer")) == 3
    assert notifier.kinds(task.id)[-1] is AlertKind.ESCALATED
    runs_before = len(await engine.store.agent_runs(task.id))
    events_before = len(await engine.store.events(task.id))
    await asyncio.sleep(1.5)  # the worker keeps polling; nothing may move the task
    assert len(await engine.store.agent_runs(task.id)) == runs_before
    assert len(await engine.store.events(task.id)) == events_before
    assert not await engine.has_active_job(task.id)

    agent_env(reviewer="ok")
    outcome = await engine.pipeline.retry(task.id, actor="alice")
    assert outcome.changed
    retried = [e for e in await engine.store.events(task.id) if e.kind == "retried"]
    assert retried[0].actor == "alice" and "reset from 3 to 0" in retried[0].detail
    task = await settle(engine, task.id)
    assert task.status == Status.DONE and task.developer_retries == 0


async def test_agent_failure_is_retried_then_fails_the_task_and_retry_reruns_it(
    engine: Engine, agent_env, notifier: RecordingNotifier
) -> None:
    agent_env(architect="crash")
    task = await settle(engine, (await start(engine)).id)

    assert (task.stage, task.status) == (Stage.ARCHITECTURE, Status.FAILED)
    assert "exit code 1" in task.status_reason
    architect = await runs_by_role(engine, task.id, "architect")
    assert [r.exit_code for r in architect] == [1, 1]  # ORCH_AGENT_MAX_ATTEMPTS=2
    assert "agent_retry" in event_kinds(await engine.store.events(task.id))
    assert notifier.kinds(task.id)[-1] is AlertKind.AGENT_FAILED

    agent_env(architect="ok")
    assert (await engine.pipeline.retry(task.id, actor="alice")).changed
    task = await settle(engine, task.id)
    assert task.status == Status.DONE


async def test_garbage_output_records_null_usage(engine: Engine, agent_env) -> None:
    agent_env(analyst="garbage")
    task = await settle(engine, (await start(engine)).id)

    assert task.status == Status.FAILED
    assert "no result JSON" in task.status_reason
    runs = await engine.store.agent_runs(task.id)
    assert len(runs) == 2
    for run in runs:
        assert run.exit_code == 0 and not run.ok
        assert run.input_tokens is None and run.output_tokens is None
        assert run.cost_usd is None and run.model is None
        assert Path(run.log_path).read_text()  # the full output is kept


async def test_a_hanging_agent_is_killed_at_the_timeout(
    make_settings, notifier: RecordingNotifier, agent_env
) -> None:
    agent_env(analyst="hang")
    engine = Engine(make_settings(agent_timeout_s=1.0, agent_max_attempts=1), notifier)
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)
        assert task.status == Status.FAILED
        assert "timed out" in task.status_reason
        (run,) = await engine.store.agent_runs(task.id)
        assert run.timed_out == 1 and run.pid
        try:
            import os

            os.kill(run.pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive


async def test_reject_reruns_the_analyst_with_the_reason(
    engine: Engine, notifier: RecordingNotifier
) -> None:
    notifier.auto_approve = False
    task = await settle(engine, (await start(engine)).id)
    assert task.status == Status.AWAITING_APPROVAL

    outcome = await engine.pipeline.reject(task.id, "Scope misses the error page.", actor="bob")
    assert outcome.changed
    task = await settle(engine, task.id)
    assert task.status == Status.AWAITING_APPROVAL
    analyst = await runs_by_role(engine, task.id, "analyst")
    assert len(analyst) == 2
    assert "Scope misses the error page." in Path(analyst[1].prompt_path).read_text()


async def test_approve_twice_advances_once(engine: Engine, notifier: RecordingNotifier) -> None:
    notifier.auto_approve = False
    task = await settle(engine, (await start(engine)).id)

    results = await asyncio.gather(
        engine.pipeline.approve(task.id, actor="telegram:42"),
        engine.pipeline.approve(task.id, actor="plane"),
    )
    assert sorted(r.changed for r in results) == [False, True]
    task = await settle(engine, task.id)
    assert task.status == Status.DONE
    kinds = event_kinds(await engine.store.events(task.id))
    assert kinds.count("approved") == 1
    assert len(await runs_by_role(engine, task.id, "architect")) == 1


async def test_analyst_questions_wait_for_answers(
    engine: Engine, agent_env, notifier: RecordingNotifier
) -> None:
    agent_env(analyst="negative,ok")
    task = await settle(engine, (await start(engine)).id)
    assert task.status == Status.NEEDS_INPUT
    assert notifier.kinds(task.id) == [AlertKind.NEEDS_INPUT]

    assert (await engine.pipeline.answer(task.id, "Use port 8080.", actor="carol")).changed
    task = await settle(engine, task.id)
    assert task.status == Status.DONE
    analyst = await runs_by_role(engine, task.id, "analyst")
    assert "Use port 8080." in Path(analyst[1].prompt_path).read_text()


async def test_a_red_local_check_keeps_the_task_in_development(
    make_settings, notifier: RecordingNotifier, agent_env, tmp_path: Path
) -> None:
    import sys

    failing = [sys.executable, "-c", "import sys; print('lint: 2 problems'); sys.exit(1)"]
    projects = [{"key": "ORCH", "remote": str(tmp_path / "remote.git"), "check_command": failing}]
    engine = Engine(make_settings(projects=projects), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)
        assert (task.stage, task.status) == (Stage.DEVELOPMENT, Status.ACTIVE)
        last = (await engine.store.events(task.id))[-1]
        assert last.kind == "gate_red" and "exited with code 1" in (last.detail or "")
        assert len(await runs_by_role(engine, task.id, "developer")) == 1


def process_group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_hung_agent_is_retried_after_its_timeout_and_the_task_completes(
    make_settings, notifier: RecordingNotifier, agent_env
) -> None:
    agent_env(analyst="hang,ok")
    engine = Engine(make_settings(agent_timeout_s=5.0, agent_max_attempts=2), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)

        assert task.status == Status.DONE
        hung, rerun = await runs_by_role(engine, task.id, "analyst")
        assert (hung.timed_out, hung.ok, hung.error) == (1, 0, "timed out after 5s")
        assert hung.pid and process_group_gone(hung.pid)
        assert (rerun.timed_out, rerun.ok, rerun.attempt) == (0, 1, 2)
        retry = next(e for e in await engine.store.events(task.id) if e.kind == "agent_retry")
        assert retry.detail == "attempt 1 of 2 failed: timed out after 5s"
        assert event_kinds(await engine.store.events(task.id)).count("done") == 1


async def test_an_is_error_result_is_retried_then_fails_the_task_with_an_alert(
    engine: Engine, agent_env, notifier: RecordingNotifier
) -> None:
    agent_env(architect="is_error")
    task = await settle(engine, (await start(engine)).id)

    assert (task.stage, task.status) == (Stage.ARCHITECTURE, Status.FAILED)
    assert task.status_reason == "agent reported an error (error_during_execution)"
    architect = await runs_by_role(engine, task.id, "architect")
    assert [(r.exit_code, r.ok) for r in architect] == [(0, 0), (0, 0)]
    assert all(r.cost_usd and r.model for r in architect)  # what is known is recorded
    assert event_kinds(await engine.store.events(task.id))[-2:] == ["agent_retry", "failed"]
    assert notifier.alerts[-1] == (task.id, AlertKind.AGENT_FAILED, task.status_reason)
    assert not await engine.has_active_job(task.id)


async def test_a_crash_in_a_jobs_handling_fails_the_task_with_a_task_error_alert(
    engine: Engine, agent_env, notifier: RecordingNotifier
) -> None:
    """An agent that deletes its own worktree leaves nothing to commit: the handling raises."""
    agent_env(architect="vanish")
    task = await settle(engine, (await start(engine)).id)

    assert (task.stage, task.status) == (Stage.ARCHITECTURE, Status.FAILED)
    assert task.status_reason.startswith("internal error: GitError('no HEAD commit in")
    assert [r.ok for r in await runs_by_role(engine, task.id, "architect")] == [1, 1]
    events = await engine.store.events(task.id)
    assert event_kinds(events)[-2:] == ["agent_retry", "failed"]
    assert "attempt 1 of 2 failed: internal error" in events[-2].detail
    assert notifier.alerts[-1] == (task.id, AlertKind.TASK_ERROR, task.status_reason)
    (job,) = await engine.store.fetchall(
        "SELECT state, claims, failures FROM jobs WHERE task_id = ? AND stage = ?",
        (task.id, Stage.ARCHITECTURE),
    )
    assert tuple(job) == ("failed", 2, 1)


async def test_a_stage_this_version_does_not_know_fails_the_task_instead_of_looping(
    make_settings, notifier: RecordingNotifier, agent_env
) -> None:
    """A row written by a newer version (a stage added there) makes the handling raise."""
    engine = Engine(make_settings(job_lease_s=1.0), notifier)
    async with engine:
        task = await start(engine)
        async with engine.store.tx() as conn:
            await conn.execute(
                "UPDATE tasks SET stage = 'security-review' WHERE id = ?", (task.id,)
            )
            await conn.execute(
                "UPDATE jobs SET stage = 'security-review' WHERE task_id = ?", (task.id,)
            )
        engine.start_worker()
        task = await settle(engine, task.id)

        assert (task.stage, task.status) == ("security-review", Status.FAILED)
        assert "'security-review' is not a valid Stage" in task.status_reason
        assert notifier.kinds(task.id) == [AlertKind.TASK_ERROR]
        (job,) = await engine.store.fetchall(
            "SELECT state, claims FROM jobs WHERE task_id = ?", (task.id,)
        )
        assert tuple(job) == ("failed", 2)
        assert await engine.store.agent_runs(task.id) == []
