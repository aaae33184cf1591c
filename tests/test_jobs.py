"""The durable job queue under a real worker: leases, concurrency, backoff, crash handling."""

from __future__ import annotations

import asyncio

import pytest

from engine.jobs import Worker, backoff_delay
from engine.runtime import Engine
from engine.stages import Stage, Status
from engine.store import AgentRun, Job
from tests.conftest import RecordingNotifier, settle, start
from tests.test_restart import wait_for


async def job_row(engine: Engine, job_id: int):
    return await engine.store.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))


async def analyst_runs(engine: Engine, task_id: int) -> list[AgentRun]:
    return [run for run in await engine.store.agent_runs(task_id) if run.role == "analyst"]


async def leases_while_running(engine: Engine, run_id: int) -> list[float]:
    """Every lease_until the run's job showed while its agent was still running."""
    leases: list[float] = []

    async def finished() -> bool:
        run = await engine.store.fetchone(
            "SELECT job_id, finished_at FROM agent_runs WHERE id = ?", (run_id,)
        )
        if run["finished_at"] is not None:
            return True
        job = await job_row(engine, run["job_id"])
        if job["lease_until"] is not None and job["lease_until"] not in leases:
            leases.append(job["lease_until"])
        return False

    await wait_for(finished, "the slow agent to finish")
    return leases


def most_at_once(runs: list[AgentRun]) -> int:
    """The largest number of runs whose [started_at, finished_at] intervals overlap."""
    edges = sorted([(run.finished_at, -1) for run in runs] + [(run.started_at, 1) for run in runs])
    busy = peak = 0
    for _, step in edges:
        busy += step
        peak = max(peak, busy)
    return peak


# ----------------------------------------------------------------------------- lease


async def test_a_run_longer_than_the_lease_keeps_it_and_runs_once(
    make_settings, notifier: RecordingNotifier, agent_env, monkeypatch
) -> None:
    lease_s = 1.0
    monkeypatch.setenv("SANDBOX_AGENT_DELAY_S", "3")
    notifier.auto_approve = False
    engine = Engine(make_settings(job_lease_s=lease_s), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await start(engine)

        async def analyst_started() -> AgentRun | None:
            runs = await analyst_runs(engine, task.id)
            return runs[0] if runs and runs[0].pid else None

        started = await wait_for(analyst_started, "the analyst to start")
        leases = await leases_while_running(engine, started.id)
        assert (await settle(engine, task.id)).status == Status.AWAITING_APPROVAL

        monkeypatch.delenv("SANDBOX_AGENT_DELAY_S")
        assert (await engine.pipeline.approve(task.id, actor="test")).changed
        done = await settle(engine, task.id)

        (analyst,) = await analyst_runs(engine, task.id)
        assert analyst.ok and analyst.error is None
        assert analyst.finished_at - analyst.started_at > lease_s  # it outlived one lease
        assert leases == sorted(leases) and len(leases) >= 2
        assert max(leases) > analyst.started_at + lease_s  # renewed after the claim's lease
        job = await job_row(engine, analyst.job_id)
        assert (job["claims"], job["state"]) == (1, "succeeded")
        assert done.status == Status.DONE
        kinds = [event.kind for event in await engine.store.events(task.id)]
        assert kinds.count("done") == 1 and kinds.count("brd_ready") == 1


# ----------------------------------------------------------------------------- concurrency


async def analysts_of_three_tasks(engine: Engine) -> list[AgentRun]:
    """Queue three analysts before the worker starts, then let it drain them."""
    tasks = [await start(engine, f"Task {n}", issue=f"issue-{n}") for n in range(3)]
    engine.start_worker()
    runs = []
    for task in tasks:
        assert (await settle(engine, task.id)).status == Status.AWAITING_APPROVAL
        runs += await analyst_runs(engine, task.id)
    assert len(runs) == 3 and all(run.ok for run in runs)
    return runs


async def test_the_default_concurrency_runs_one_agent_at_a_time(
    make_settings, notifier: RecordingNotifier, agent_env, monkeypatch
) -> None:
    monkeypatch.setenv("SANDBOX_AGENT_DELAY_S", "1")
    notifier.auto_approve = False
    settings = make_settings()
    assert settings.max_concurrency == 1
    async with Engine(settings, notifier) as engine:
        assert most_at_once(await analysts_of_three_tasks(engine)) == 1


async def test_a_concurrency_of_two_overlaps_two_runs_and_never_three(
    make_settings, notifier: RecordingNotifier, agent_env, monkeypatch
) -> None:
    monkeypatch.setenv("SANDBOX_AGENT_DELAY_S", "2")
    notifier.auto_approve = False
    async with Engine(make_settings(max_concurrency=2), notifier) as engine:
        assert most_at_once(await analysts_of_three_tasks(engine)) == 2


# ----------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    "base, failures, delay",
    [
        (5.0, 0, 5.0),
        (5.0, 1, 5.0),
        (5.0, 2, 10.0),
        (5.0, 3, 20.0),
        (5.0, 4, 40.0),
        (0.5, 3, 2.0),
        (0.0, 5, 0.0),
        (5.0, 20, 3600.0),
        (7200.0, 1, 3600.0),
    ],
)
def test_backoff_doubles_per_failure_up_to_an_hour(base, failures, delay) -> None:
    assert backoff_delay(base, failures) == delay


async def test_each_failed_attempt_waits_out_a_growing_backoff(
    make_settings, notifier: RecordingNotifier, agent_env
) -> None:
    base = 0.5
    agent_env(analyst="crash,crash,ok")
    notifier.auto_approve = False
    engine = Engine(make_settings(agent_retry_backoff_s=base, agent_max_attempts=3), notifier)
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)

        assert task.status == Status.AWAITING_APPROVAL
        first, second, third = await analyst_runs(engine, task.id)
        assert [run.exit_code for run in (first, second, third)] == [1, 1, 0]
        retries = [e for e in await engine.store.events(task.id) if e.kind == "agent_retry"]
        assert [e.detail for e in retries] == [
            "attempt 1 of 3 failed: exit code 1",
            "attempt 2 of 3 failed: exit code 1",
        ]
        # a run can only start once its job is due again
        assert second.started_at >= first.finished_at + base
        assert third.started_at >= second.finished_at + 2 * base
        job = await job_row(engine, third.job_id)
        assert (job["failures"], job["claims"], job["state"]) == (2, 3, "succeeded")
        # the last requeue, written between the failed run and its event, is `2 × base` out
        assert second.finished_at + 2 * base <= job["available_at"] <= retries[1].at + 2 * base


# ----------------------------------------------------------------------------- crashes


async def test_a_crash_handler_that_fails_too_closes_the_job_instead_of_looping(
    make_settings,
) -> None:
    async with Engine(make_settings(job_lease_s=0.5)) as engine:
        task = await start(engine)

        async def handler(job: Job) -> None:
            raise RuntimeError("a bug in the handler")

        async def on_crash(job: Job, error: BaseException) -> None:
            raise RuntimeError("a bug in the crash handler")

        async def closed():
            rows = await engine.store.fetchall(
                "SELECT * FROM jobs WHERE task_id = ? AND state NOT IN ('queued', 'running')",
                (task.id,),
            )
            return rows[0] if rows else None

        worker = Worker(engine.queue, handler, on_crash, concurrency=1, poll_s=0.1)
        running = asyncio.create_task(worker.run())
        try:
            job = await wait_for(closed, "the crashed job to be closed")
        finally:
            await worker.stop()
            await asyncio.gather(running, return_exceptions=True)
        assert (job["state"], job["claims"], job["stage"]) == ("failed", 1, Stage.ANALYSIS)
        assert "a bug in the handler" in job["last_error"]
