"""Shared fixtures: a bare git remote, settings on tmp paths, the engine with a real worker."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from engine.config import Settings
from engine.notifier import AlertKind
from engine.runtime import SETTLED, Engine
from engine.sandbox.repo import create_sample_remote
from engine.stages import Status
from engine.store import Task

SANDBOX_AGENT = f"{sys.executable} -m engine.sandbox.agent"
HANG_GUARD_S = 90.0  # a broken pipeline fails the test instead of hanging the suite


class RecordingNotifier:
    """Records what the engine announced; approves BRDs when asked to, like a person would."""

    def __init__(self) -> None:
        self.changed: list[int] = []
        self.alerts: list[tuple[int, AlertKind, str]] = []
        self.engine: Engine | None = None
        self.auto_approve = True

    async def task_changed(self, task_id: int) -> None:
        self.changed.append(task_id)

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        self.alerts.append((task_id, kind, detail))
        if kind is AlertKind.BRD_READY and self.auto_approve and self.engine is not None:
            await self.engine.pipeline.approve(task_id, actor="test-operator")

    def kinds(self, task_id: int) -> list[AlertKind]:
        return [kind for tid, kind, _ in self.alerts if tid == task_id]


@pytest.fixture
async def remote(tmp_path: Path) -> Path:
    return await create_sample_remote(tmp_path / "remote.git")


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., None]:
    """Set the scripted agent's behaviour per role: agent_env(reviewer="negative,ok")."""
    monkeypatch.setenv("SANDBOX_AGENT_STATE", str(tmp_path / "agent-state"))
    for role in ("ANALYST", "ARCHITECT", "DEVELOPER", "REVIEWER", "TESTER", "DEPLOYER"):
        monkeypatch.delenv(f"SANDBOX_AGENT_{role}", raising=False)
    monkeypatch.delenv("SANDBOX_AGENT_DELAY_S", raising=False)

    def set_behaviour(**roles: str) -> None:
        for role, steps in roles.items():
            monkeypatch.setenv(f"SANDBOX_AGENT_{role.upper()}", steps)

    return set_behaviour


@pytest.fixture
def make_settings(tmp_path: Path, remote: Path) -> Callable[..., Settings]:
    def build(**overrides) -> Settings:
        values = dict(
            _env_file=None,
            db_path=tmp_path / "conveyor.db",
            workdir=tmp_path / "work",
            projects=[
                {
                    "key": "ORCH",
                    "remote": str(remote),
                    "check_command": [sys.executable, "check.py"],
                }
            ],
            agent_command=SANDBOX_AGENT,
            agent_timeout_s=30,
            agent_retry_backoff_s=0,
            job_lease_s=10,
        )
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
async def notifier() -> RecordingNotifier:
    return RecordingNotifier()


@pytest.fixture
async def engine(
    make_settings: Callable[..., Settings], notifier: RecordingNotifier, agent_env
) -> AsyncIterator[Engine]:
    engine = Engine(make_settings(), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        yield engine


async def settle(engine: Engine, task_id: int) -> Task:
    """Wait until nothing in the engine will move the task any more.

    With an auto-approving notifier a BRD waiting for approval is about to move,
    so that status does not count as settled.
    """
    statuses = SETTLED
    notifiers = getattr(engine.pipeline.notifier, "notifiers", [engine.pipeline.notifier])
    if any(getattr(notifier, "auto_approve", False) for notifier in notifiers):
        statuses = SETTLED - {Status.AWAITING_APPROVAL}
    return await asyncio.wait_for(engine.wait_settled(task_id, statuses), HANG_GUARD_S)


async def start(engine: Engine, title: str = "Add a greeting", issue: str = "issue-1") -> Task:
    outcome = await engine.pipeline.start_task(
        "ORCH", title, "Return a greeting from GET /hello.", tracker_issue_id=issue
    )
    assert outcome.task is not None, outcome.reason
    return outcome.task
