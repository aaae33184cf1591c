"""The merge gate and staged deploy, with real git repositories: main never breaks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from engine.notifier import AlertKind
from engine.runtime import Engine
from engine.sandbox.repo import SAMPLE_FILES, create_sample_remote
from engine.stages import Stage, Status
from engine.store import now
from tests.conftest import HANG_GUARD_S, RecordingNotifier, settle

SHARED = "src/shared.txt"
CHECK = [sys.executable, "check.py"]


def git(remote: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(remote), *args], capture_output=True, text=True, check=True
    ).stdout


def check_passes_at(remote: Path, ref: str) -> bool:
    """Run the project's check on the tree of `ref`, in a fresh checkout."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["git", "clone", "-q", str(remote), scratch], check=True)
        subprocess.run(["git", "-C", scratch, "checkout", "-q", ref], check=True)
        return subprocess.run(CHECK, cwd=scratch, capture_output=True).returncode == 0


async def shared_remote(tmp_path: Path, shared_text: str) -> Path:
    files = {**SAMPLE_FILES, SHARED: shared_text}
    return await create_sample_remote(tmp_path / "shared.git", files)


def engine_for(make_settings, remote: Path, notifier: RecordingNotifier, **overrides) -> Engine:
    projects = [{"key": "ORCH", "remote": str(remote), "check_command": CHECK}]
    values = dict(projects=projects, max_concurrency=2, merge_defer_s=0.2)
    values.update(overrides)
    engine = Engine(make_settings(**values), notifier)
    notifier.engine = engine
    return engine


async def start_two(engine: Engine) -> list[int]:
    ids = []
    for n in (1, 2):
        outcome = await engine.pipeline.start_task(
            "ORCH", f"Change {n}", "Edit the shared file.", tracker_issue_id=f"i{n}", sequence_id=n
        )
        ids.append(outcome.task.id)
    return ids


async def test_two_green_branches_touching_one_file_merge_one_after_the_other(
    make_settings, agent_env, monkeypatch, tmp_path
) -> None:
    remote = await shared_remote(tmp_path, "TODO ORCH-001\n" + "filler\n" * 10 + "TODO ORCH-002\n")
    monkeypatch.setenv("SANDBOX_AGENT_DEV_FILE", SHARED)
    engine = engine_for(make_settings, remote, RecordingNotifier())
    async with engine:
        engine.start_worker()
        ids = await start_two(engine)
        tasks = [await settle(engine, task_id) for task_id in ids]
        assert [t.status for t in tasks] == [Status.DONE, Status.DONE]

        merges = git(remote, "log", "--merges", "--format=%H %s", "main").splitlines()
        assert len(merges) == 2
        for line in merges:
            assert check_passes_at(remote, line.split()[0])
        final = git(remote, "show", f"main:{SHARED}")
        assert "ORCH-001 change" in final and "ORCH-002 change" in final and "TODO" not in final
        staged = [
            e
            for t in tasks
            for e in await engine.store.events(t.id)
            if e.from_state == "deploy-staging/active" and e.kind == "advanced"
        ]
        assert len(staged) == 2
        assert any("rebased onto main" in e.detail for e in staged)  # the second one
        assert all("check command" in e.detail or "passed" in e.detail for e in staged)
        assert await engine.store.fetchall("SELECT * FROM merge_leases") == []


async def test_a_real_conflict_rolls_back_with_the_file_names_in_the_next_prompt(
    make_settings, agent_env, monkeypatch, tmp_path
) -> None:
    remote = await shared_remote(tmp_path, "shared\n")
    monkeypatch.setenv("SANDBOX_AGENT_DEV_FILE", SHARED)  # both append: a real conflict
    engine = engine_for(make_settings, remote, RecordingNotifier())
    async with engine:
        engine.start_worker()
        ids = await start_two(engine)
        tasks = [await settle(engine, task_id) for task_id in ids]
        assert [t.status for t in tasks] == [Status.DONE, Status.DONE]

        rolled = [
            (t, e)
            for t in tasks
            for e in await engine.store.events(t.id)
            if e.kind == "rolled_back" and e.from_state.startswith("deploy-staging")
        ]
        assert len(rolled) == 1
        task, event = rolled[0]
        assert "Conflicting files:" in event.detail and SHARED in event.detail
        developer = [r for r in await engine.store.agent_runs(task.id) if r.role == "developer"]
        prompt = Path(developer[1].prompt_path).read_text()
        assert SHARED in prompt and "git merge --no-commit origin/main" in prompt
        assert (await engine.store.get_task(task.id)).developer_retries == 1
        assert check_passes_at(remote, "main")
        assert len(git(remote, "log", "--merges", "--format=%H", "main").split()) >= 2


async def test_a_busy_lease_defers_without_holding_the_only_worker(
    make_settings, agent_env, monkeypatch, tmp_path
) -> None:
    remote = await shared_remote(tmp_path, "TODO ORCH-001\n" + "filler\n" * 10 + "TODO ORCH-002\n")
    monkeypatch.setenv("SANDBOX_AGENT_DEV_FILE", SHARED)
    engine = engine_for(make_settings, remote, RecordingNotifier(), max_concurrency=1)
    async with engine:
        engine.start_worker()
        ids = await start_two(engine)
        tasks = [await settle(engine, task_id) for task_id in ids]
        assert [t.status for t in tasks] == [Status.DONE, Status.DONE]
        deferred = await engine.store.fetchall(
            "SELECT claims, last_error FROM jobs WHERE stage = 'deploy-staging' AND claims > 1"
        )
        assert deferred and "waiting for the merge lease" in deferred[0]["last_error"]
        assert len(git(remote, "log", "--merges", "--format=%H", "main").split()) == 2


async def test_a_stale_lease_is_reclaimed_with_an_event_naming_its_holder(
    make_settings, agent_env, remote, tmp_path
) -> None:
    notifier = RecordingNotifier()
    engine = engine_for(make_settings, remote, notifier, merge_lease_ttl_s=60)
    async with engine:
        ghost = await engine.pipeline.start_task(
            "ORCH", "Ghost", "Abandoned.", tracker_issue_id="g"
        )
        async with engine.store.tx() as conn:  # a holder that died long ago
            await conn.execute(
                "INSERT INTO merge_leases (repo, task_id, acquired_at, fence) VALUES (?, ?, ?, 1)",
                ("local:ORCH", ghost.task.id, now() - 3600),
            )
            await conn.execute(
                "UPDATE jobs SET state = 'cancelled' WHERE task_id = ?", (ghost.task.id,)
            )
        engine.start_worker()
        outcome = await engine.pipeline.start_task("ORCH", "Real", "Do it.", tracker_issue_id="r")
        task = await settle(engine, outcome.task.id)
        assert task.status == Status.DONE
        (event,) = [e for e in await engine.store.events(task.id) if e.kind == "lease_reclaimed"]
        assert f"from task {ghost.task.id}" in event.detail


async def serve_health(status: list[int]) -> tuple[web.AppRunner, str]:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=status[0], text="ok" if status[0] == 200 else "down")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/health"


HOOK = """
import os, subprocess, sys
head = subprocess.run(["git", "-C", os.environ["BUILD_CONTEXT"], "rev-parse", "HEAD"],
                      capture_output=True, text=True).stdout.strip()
print("staging", os.environ["GIT_SHA"], "from", os.environ["BUILD_CONTEXT"])
with open(sys.argv[1], "a") as log:
    log.write(os.environ["GIT_SHA"] + "\\n")
sys.exit(0 if head == os.environ["GIT_SHA"] else 3)
"""


async def test_the_staging_hook_gets_the_validated_sha_and_a_red_health_check_rolls_back(
    make_settings, agent_env, remote, tmp_path
) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    shas = tmp_path / "staged.txt"
    status = [500]
    runner, url = await serve_health(status)
    notifier = RecordingNotifier()
    engine = engine_for(
        make_settings,
        remote,
        notifier,
        deploy_staging_hook=f"{sys.executable} {hook} {shas}",
        healthcheck_url=url,
        healthcheck_tries=2,
        healthcheck_interval_s=0,
    )
    try:
        async with engine:
            engine.start_worker()
            outcome = await engine.pipeline.start_task(
                "ORCH", "Ship", "Ship it.", tracker_issue_id="s"
            )
            task_id = outcome.task.id

            async def rolled_back() -> None:
                while not any(e.kind == "rolled_back" for e in await engine.store.events(task_id)):
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(rolled_back(), HANG_GUARD_S)
            event = next(e for e in await engine.store.events(task_id) if e.kind == "rolled_back")
            assert event.from_state == "deploy-staging/active"
            assert "health check failed 2 times" in event.detail and "staging" in event.detail
            status[0] = 200  # staging is healthy again
            task = await settle(engine, task_id)
            assert task.status == Status.DONE
            staged = shas.read_text().split()
            assert len(staged) == 2 and staged[-1] == task.tested_sha
    finally:
        await runner.cleanup()


async def test_a_failed_deploy_is_fixed_and_redeploys_to_done(
    make_settings, agent_env, remote
) -> None:
    agent_env(deployer="negative,ok")
    notifier = RecordingNotifier()
    engine = engine_for(make_settings, remote, notifier)
    async with engine:
        engine.start_worker()
        outcome = await engine.pipeline.start_task(
            "ORCH", "Deploy", "Deploy it.", tracker_issue_id="d"
        )
        task = await settle(engine, outcome.task.id)
        assert task.status == Status.DONE
        events = await engine.store.events(task.id)
        rollback = next(e for e in events if e.kind == "rolled_back")
        assert rollback.from_state == "deploy/active" and rollback.to_state == "development/active"
        assert AlertKind.DEPLOY_FAILED in notifier.kinds(task.id)
        kinds = [e.kind for e in events]
        assert kinds.count("done") == 1
        deployers = [r for r in await engine.store.agent_runs(task.id) if r.role == "deployer"]
        assert len(deployers) == 2
        assert "status: SUCCESS" in git(
            remote, "show", "main:docs/work-items/ORCH-001/14-deploy-log.md"
        )


async def test_a_deploy_log_that_is_only_on_main_is_found(
    make_settings, agent_env, remote, monkeypatch
) -> None:
    monkeypatch.setenv("SANDBOX_AGENT_DEPLOY_LOG_ON_MAIN", "1")
    engine = engine_for(make_settings, remote, RecordingNotifier())
    async with engine:
        engine.start_worker()
        outcome = await engine.pipeline.start_task(
            "ORCH", "Log", "Log on main.", tracker_issue_id="m"
        )
        task = await settle(engine, outcome.task.id)
        assert task.status == Status.DONE and task.stage == Stage.DONE
        done = next(e for e in await engine.store.events(task.id) if e.kind == "done")
        assert "(on origin/main)" in done.detail


async def test_a_retried_deploy_is_validated_against_main_again_before_it_merges(
    make_settings, agent_env, remote
) -> None:
    agent_env(deployer="crash,ok")
    engine = engine_for(make_settings, remote, RecordingNotifier(), agent_max_attempts=1)
    async with engine:
        engine.start_worker()
        outcome = await engine.pipeline.start_task(
            "ORCH", "Retry deploy", "Deploy it twice.", tracker_issue_id="rd"
        )
        failed = await settle(engine, outcome.task.id)
        assert (failed.stage, failed.status) == (Stage.DEPLOY, Status.FAILED)
        assert failed.tested_sha is None  # the failure let go of the lease and the tested head
        assert await engine.store.fetchall("SELECT * FROM merge_leases") == []

        await engine.pipeline.retry(failed.id, actor="@alice (42)")
        task = await settle(engine, failed.id)
        assert task.status == Status.DONE
        kinds = [(e.kind, e.from_state, e.to_state) for e in await engine.store.events(task.id)]
        revalidate = kinds.index(("revalidate", "deploy/active", "deploy-staging/active"))
        assert ("advanced", "deploy-staging/active", "deploy/active") in kinds[revalidate:]
        assert len(git(remote, "log", "--merges", "--format=%H", "main").split()) == 1


async def test_a_pr_merged_at_the_deploy_stage_releases_the_lease_but_does_not_finish(
    make_settings, agent_env, remote
) -> None:
    agent_env(deployer="hang")
    engine = engine_for(make_settings, remote, RecordingNotifier(), agent_timeout_s=60)
    async with engine:
        engine.start_worker()
        outcome = await engine.pipeline.start_task(
            "ORCH", "Merged by hand", "Merge it in the forge.", tracker_issue_id="h"
        )
        task_id = outcome.task.id

        async def deploying() -> None:
            while not (await engine.store.agent_runs(task_id))[-1:] or (
                (await engine.store.agent_runs(task_id))[-1].role != "deployer"
            ):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(deploying(), HANG_GUARD_S)
        assert await engine.store.fetchall("SELECT task_id FROM merge_leases") != []
        finished = await engine.pipeline.merged_in_forge(task_id, "f" * 40, actor="gitea:bob")
        assert finished is False
        task = await engine.store.get_task(task_id)
        assert (task.stage, task.status) == (Stage.DEPLOY, Status.ACTIVE)
        assert await engine.store.fetchall("SELECT task_id FROM merge_leases") == []
        (event,) = [e for e in await engine.store.events(task_id) if e.kind == "lease_released"]
        assert event.actor == "gitea:bob" and "pull request was merged" in event.detail
