"""`conveyor demo`: one sample task through every stage, against local stand-ins.

A bare git repository plays the remote, the scripted sandbox agent plays every
role (the reviewer asks for changes once, so a rollback is visible), and a
scripted person approves the BRD. Exits 0 when the task reaches done.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from bot.console import ConsoleNotifier
from engine.config import Settings
from engine.notifier import AlertKind, FanoutNotifier
from engine.runtime import Engine
from engine.sandbox.repo import create_sample_remote
from engine.stages import Stage, Status
from engine.store import now
from engine.summary import task_figures
from engine.templating import text_environment

DEMO_PROJECT = "DEMO"
DEMO_TIMEOUT_S = 120.0
TERMINAL = frozenset({Status.DONE, Status.FAILED, Status.ESCALATED, Status.CANCELLED})

SAMPLE_TITLE = "Add a greeting endpoint"
SAMPLE_DESCRIPTION = (
    "As an operator I want GET /hello to answer with a greeting, so that the health of the "
    "service can be checked by a person.\n\nAcceptance: the endpoint returns 200 and a text "
    "that names the service."
)

SANDBOX_DEFAULTS = {"SANDBOX_AGENT_REVIEWER": "negative,ok"}


class DemoHuman:
    """The demo's operator: approves a BRD as soon as it is ready."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def task_changed(self, task_id: int) -> None:
        return None

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        if kind is AlertKind.BRD_READY:
            await self.engine.pipeline.approve(task_id, actor="demo-operator")


def demo_settings(root: Path, remote: Path, locale: str) -> Settings:
    return Settings(
        _env_file=None,
        db_path=root / "conveyor.db",
        workdir=root / "work",
        locale=locale,
        projects=[
            {
                "key": DEMO_PROJECT,
                "remote": str(remote),
                "check_command": [sys.executable, "check.py"],
            }
        ],
        agent_command=f"{sys.executable} -m engine.sandbox.agent",
        agent_timeout_s=60,
        agent_retry_backoff_s=0.2,
    )


async def run_demo(locale: str | None = None) -> int:
    locale = locale or os.environ.get("ORCH_LOCALE", "ru")
    for name, value in SANDBOX_DEFAULTS.items():
        os.environ.setdefault(name, value)
    root = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    remote = await create_sample_remote(root / "remote.git")
    settings = demo_settings(root, remote, locale)
    os.environ.setdefault("SANDBOX_AGENT_STATE", str(root / "agent-state"))
    env = text_environment(settings.locale)
    engine = Engine(settings)
    async with engine:
        console = ConsoleNotifier(engine.store, env)
        engine.pipeline.notifier = FanoutNotifier([console, DemoHuman(engine)])
        engine.start_worker()
        outcome = await engine.pipeline.start_task(
            DEMO_PROJECT,
            SAMPLE_TITLE,
            SAMPLE_DESCRIPTION,
            tracker_issue_id="demo-1",
            sequence_id=1,
            actor="demo-tracker",
        )
        assert outcome.task is not None, outcome.reason
        try:
            task = await asyncio.wait_for(
                engine.wait_settled(outcome.task.id, TERMINAL), DEMO_TIMEOUT_S
            )
        except TimeoutError:
            print(f"demo: the task did not finish within {DEMO_TIMEOUT_S:.0f}s", file=sys.stderr)
            return 1
        figures = await task_figures(engine.store, task, now())
        print(
            env.get_template("console/summary.txt.j2").render(
                work_item=task.work_item,
                title=task.title,
                status=task.status,
                figures=figures,
                merge_sha=task.merge_sha,
            )
        )
        excerpt = await second_developer_feedback(engine, task.id)
        if excerpt:
            print(env.get_template("console/demo_feedback.txt.j2").render(excerpt=excerpt))
    print(f"{task.stage} ({task.status}); files in {root}")
    return 0 if task.status == Status.DONE and task.stage == Stage.DONE else 1


async def second_developer_feedback(engine: Engine, task_id: int) -> str | None:
    """The must-fix block of the developer's second prompt, as the agent read it."""
    runs = [r for r in await engine.store.agent_runs(task_id) if r.role == "developer"]
    if len(runs) < 2 or not runs[1].prompt_path:
        return None
    task = await engine.store.get_task(task_id)
    assert task is not None
    prompt = Path(runs[1].prompt_path).read_text(encoding="utf-8")
    lines = [line for line in prompt.splitlines() if line.startswith(("P0:", "P1:"))]
    return "\n".join(lines) or None
