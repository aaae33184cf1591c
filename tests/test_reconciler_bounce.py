"""The cure must not become the disease: what a person or a failing service stopped stays
still under the reconciler, with no agent run, no event and no Telegram call.

The whole stack runs as `conveyor run` wires it (chaos.harness.Stack: sandbox Plane, Gitea
and Telegram, the console, the webhooks); the engine reaches Plane's API through PlaneGate,
a reverse proxy that can refuse writes or answer like a Plane that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import aiohttp
import pytest
from aiohttp import web

from chaos.harness import Stack
from engine.reconciler import TickReport
from engine.runtime import Engine
from engine.stages import Stage, Status
from engine.store import Task
from tests.conftest import HANG_GUARD_S

TICKS = 100
FORWARDED_HEADERS = ("X-Api-Key", "Content-Type", "Accept")
GateMode = Literal["open", "read_only", "down"]


class PlaneGate:
    """An HTTP proxy in front of the Plane sandbox's API.

    open: every request passes. read_only: reads pass, writes get 403, as with an API key
    that may read but not write. down: everything gets 503 with a Retry-After of an hour,
    as from a Plane in maintenance (the client gives up at once instead of backing off).
    """

    def __init__(self) -> None:
        self.mode: GateMode = "open"
        self.target: str | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        if self.mode == "down" or self.target is None:
            return web.json_response(
                {"error": "Service Unavailable"}, status=503, headers={"Retry-After": "3600"}
            )
        if self.mode == "read_only" and request.method not in ("GET", "HEAD"):
            return web.json_response(
                {"detail": "You do not have permission to perform this action."}, status=403
            )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED_HEADERS}
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=await request.read(),
        ) as answer:
            body = await answer.read()
            return web.Response(body=body, status=answer.status, content_type=answer.content_type)


@contextlib.asynccontextmanager
async def running_stack(root: Path, **overrides) -> AsyncIterator[tuple[Stack, PlaneGate]]:
    """The whole stack, its Plane API reached through a PlaneGate (open to begin with)."""
    gate = PlaneGate()
    await gate.start()
    stack = await Stack.open(root, plane_api_url=gate.url, **overrides)
    gate.target = stack.plane.base_url
    try:
        yield stack, gate
    finally:
        await stack.close()
        await gate.stop()


async def task_of(stack: Stack, issue_id: str) -> Task:
    async def found() -> Task:
        store = stack.engine.store
        while (task := await store.task_by_tracker_issue("ORCH", issue_id)) is None:
            await asyncio.sleep(0.05)
        return task

    return await asyncio.wait_for(found(), HANG_GUARD_S)


async def resting(stack: Stack, task_id: int, *statuses: str, stage: str | None = None) -> Task:
    """Wait until the task is in one of `statuses` (and `stage`) with no job left to run."""

    async def rests() -> Task:
        while True:
            task = await stack.engine.store.resting_task(task_id)
            if task is not None and task.status in statuses and stage in (None, task.stage):
                return task
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(rests(), HANG_GUARD_S)


async def awaiting_approval_on_the_board(
    stack: Stack, name: str = "Add a greeting"
) -> tuple[dict, int]:
    issue = stack.issue(name)
    stack.move(issue["id"], "In Progress")
    task = await task_of(stack, issue["id"])
    await resting(stack, task.id, Status.AWAITING_APPROVAL)
    await stack.settle()
    assert stack.plane.state_name(issue["id"]) == "In Review"
    return issue, task.id


async def to_development_waiting_for_ci(
    stack: Stack, name: str = "Add a greeting"
) -> tuple[dict, int]:
    """An issue started and approved on the board, its task idle in development."""
    issue, task_id = await awaiting_approval_on_the_board(stack, name)
    stack.move(issue["id"], "Approved")
    await resting(stack, task_id, Status.ACTIVE, stage=Stage.DEVELOPMENT)
    await stack.settle()
    return issue, task_id


async def lose_a_green_status(stack: Stack, task_id: int) -> None:
    """CI turns green on the task's head, but the status webhook is lost on the way."""
    head = (await stack.engine.store.get_task(task_id)).head_sha
    stack.gitea.drop_rate(1.0)
    await stack.gitea.set_status("team", "app", head, "success")
    await stack.settle()
    stack.gitea.drop_rate(0.0)


def plane_writes(stack: Stack) -> int:
    return sum(1 for call in stack.plane.api_log if call.method not in ("GET", "HEAD"))


async def still_and_silent(stack: Stack, task_id: int, ticks: int = TICKS) -> list[TickReport]:
    """Tick `ticks` times; the task gets no agent run, no event, no Telegram call and no
    write to Plane."""
    store = stack.engine.store
    await stack.settle()
    runs, events = len(await store.agent_runs(task_id)), len(await store.events(task_id))
    calls, writes = stack.telegram_traffic(), plane_writes(stack)
    reports = [await stack.engine.reconciler.tick() for _ in range(ticks)]
    await stack.settle()
    assert len(await store.agent_runs(task_id)) == runs
    assert len(await store.events(task_id)) == events
    assert stack.telegram_traffic() == calls, "the reconciler made the bot say something"
    assert plane_writes(stack) == writes
    return reports


@pytest.mark.parametrize("held", ["Blocked", "Needs Input"])
async def test_a_task_a_person_holds_in_plane_stays_still_and_silent(
    tmp_path: Path, agent_env, held: str
) -> None:
    async with running_stack(tmp_path, ci_state=None) as (stack, _):
        issue, task_id = await to_development_waiting_for_ci(stack)
        stack.move(issue["id"], held)
        await lose_a_green_status(stack, task_id)

        reports = await still_and_silent(stack, task_id)
        assert all(r.skipped["held_by_person"] == 1 and r.unblocked == 0 for r in reports)

        stack.move(issue["id"], "In Progress")  # the person lets go
        await stack.settle()
        assert (await stack.engine.reconciler.tick()).unblocked == 1
        moved = [e for e in await stack.engine.store.events(task_id) if e.actor == "reconciler"]
        assert [(e.from_state, e.to_state) for e in moved] == [
            ("development/active", "review/active")
        ]


async def test_a_plane_outage_during_the_ticks_moves_nothing_and_says_nothing(
    tmp_path: Path, agent_env
) -> None:
    async with running_stack(tmp_path, ci_state=None) as (stack, gate):
        _, task_id = await to_development_waiting_for_ci(stack)
        await lose_a_green_status(stack, task_id)
        gate.mode = "down"

        reports = await still_and_silent(stack, task_id)
        assert all(r.skipped["tracker_unreachable"] == 1 and r.errors == 1 for r in reports)
        assert all(r.unblocked == 0 for r in reports)

        gate.mode = "open"
        assert (await stack.engine.reconciler.tick()).unblocked == 1


@pytest.mark.parametrize("webhook", ["delivered", "lost"])
async def test_a_stale_rejected_column_reruns_the_analyst_once_not_forever(
    tmp_path: Path, agent_env, webhook: str
) -> None:
    """Plane refuses our writes, so the issue stays in Rejected after the analyst reruns:
    that column judged the old BRD and must not reject the new one, tick after tick."""
    async with running_stack(tmp_path, ci_state=None) as (stack, gate):
        issue = stack.issue("Add a greeting")
        stack.move(issue["id"], "In Progress")
        task_id = (await task_of(stack, issue["id"])).id
        await resting(stack, task_id, Status.AWAITING_APPROVAL)
        await stack.settle()
        assert stack.plane.state_name(issue["id"]) == "In Review"
        gate.mode = "read_only"
        stack.plane.add_comment(issue["id"], "<p>Call it /greeting.</p>", as_user=stack.human)
        await stack.settle()
        if webhook == "lost":
            stack.plane.drop_next(1)
        stack.move(issue["id"], "Rejected")

        reports = []
        for _ in range(20):
            await stack.settle()
            reports.append(await stack.engine.reconciler.tick())
            await resting(stack, task_id, Status.AWAITING_APPROVAL)

        assert stack.plane.state_name(issue["id"]) == "Rejected"
        runs = await stack.engine.store.agent_runs(task_id)
        assert [run.role for run in runs] == ["analyst", "analyst"]
        rejections = [e for e in await stack.engine.store.events(task_id) if e.kind == "rejected"]
        assert len(rejections) == 1 and "/greeting" in rejections[0].detail
        assert sum(r.verdicts for r in reports) == (1 if webhook == "lost" else 0)
        assert reports[-1].skipped["stale_verdict"] == 1


async def test_a_lowered_retry_cap_holds_a_task_even_with_the_plane_guard_muted(
    tmp_path: Path, agent_env
) -> None:
    """ORCH_RECONCILE_SKIP_BLOCKED_ENABLED=false mutes only the Plane-state guard: a task
    Blocked on the board moves on, a task over the retry cap does not."""
    agent_env(reviewer="negative")
    async with running_stack(tmp_path, ci_state=None, reconcile_skip_blocked_enabled=False) as (
        stack,
        _,
    ):
        issue, task_id = await to_development_waiting_for_ci(stack)
        head = (await stack.engine.store.get_task(task_id)).head_sha
        await stack.gitea.set_status("team", "app", head, "success")  # on to the reviewer
        await stack.settle()
        await resting(stack, task_id, Status.ACTIVE, stage=Stage.DEVELOPMENT)
        task = await stack.engine.store.get_task(task_id)
        assert task.developer_retries == 1 and task.head_sha != head
        await stack.settle()
        stack.move(issue["id"], "Blocked")
        await lose_a_green_status(stack, task_id)

        restarted = stack.engine.settings.model_copy(update={"max_developer_retries": 1})
        async with Engine(restarted) as lowered:  # started again with a lower cap
            reports = [await lowered.reconciler.tick() for _ in range(5)]
        assert all(r.skipped["escalated"] == 1 and r.unblocked == 0 for r in reports)
        assert (await stack.engine.store.get_task(task_id)).state == "development/active"

        assert stack.plane.state_name(issue["id"]) == "Blocked"
        report = await stack.engine.reconciler.tick()
        assert report.unblocked == 1 and not report.skipped
