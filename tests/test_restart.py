"""At-least-once: a `conveyor run` process killed mid-run loses nothing and finishes once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from engine.runtime import Engine
from engine.stages import Status
from tests.conftest import HANG_GUARD_S, SANDBOX_AGENT


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_conveyor(tmp_path: Path, remote: Path, **extra_env: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SANDBOX_"))}
    env.update(
        ORCH_DB_PATH=str(tmp_path / "conveyor.db"),
        ORCH_WORKDIR=str(tmp_path / "work"),
        ORCH_HTTP_PORT=str(free_port()),
        ORCH_PROJECTS=json.dumps(
            [{"key": "ORCH", "remote": str(remote), "check_command": [sys.executable, "check.py"]}]
        ),
        ORCH_AGENT_COMMAND=SANDBOX_AGENT,
        ORCH_AGENT_RETRY_BACKOFF_S="0",
        ORCH_JOB_LEASE_S="1.5",
        SANDBOX_AGENT_STATE=str(tmp_path / "agent-state"),
        **extra_env,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "run"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def wait_for(predicate, what: str):
    async def loop():
        while not (result := await predicate()):
            await asyncio.sleep(0.1)
        return result

    try:
        return await asyncio.wait_for(loop(), HANG_GUARD_S)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_sigkill_mid_run_then_restart_completes_the_task_once(
    make_settings, remote: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    first = spawn_conveyor(tmp_path, remote, SANDBOX_AGENT_DELAY_S="30")
    second = None
    try:
        async with Engine(settings) as operator:  # the test's own view of the store, no worker
            task = (
                await operator.pipeline.start_task(
                    "ORCH", "Crash me", "Survive a crash.", tracker_issue_id="k1"
                )
            ).task

            async def analyst_running():
                runs = await operator.store.agent_runs(task.id)
                return runs and runs[0].pid and runs[0]

            orphan = await wait_for(analyst_running, "the analyst to start")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)

            second = spawn_conveyor(tmp_path, remote)

            async def awaiting_approval():
                t = await operator.store.get_task(task.id)
                return t.status == Status.AWAITING_APPROVAL and t

            await wait_for(awaiting_approval, "the analyst to run again after the restart")
            assert (await operator.pipeline.approve(task.id, actor="test")).changed

            async def finished():
                t = await operator.store.get_task(task.id)
                return t.status in {Status.DONE, Status.FAILED} and t

            done = await wait_for(finished, "the task to finish")
            assert done.status == Status.DONE

            runs = await operator.store.agent_runs(task.id)
            analyst = [r for r in runs if r.role == "analyst"]
            assert len(analyst) == 2
            assert not analyst[0].ok and "interrupted" in analyst[0].error
            assert analyst[1].ok
            # the first process's orphaned agent was stopped by the recovery
            assert not process_alive(orphan.pid), "the orphaned agent is still running"
            kinds = [e.kind for e in await operator.store.events(task.id)]
            assert kinds.count("done") == 1 and kinds.count("created") == 1
            merges = subprocess.run(
                ["git", "--git-dir", str(remote), "log", "--merges", "--format=%s", "main"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
            assert merges == [f"Merge {done.branch}: {done.work_item} {done.title}"]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
