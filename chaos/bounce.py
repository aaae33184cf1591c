"""The bounce incident and its relatives: stopped tasks under many reconciler ticks.

The incident: CI is green and the reviewer always requests changes, so the developer's
retries reach the cap and the task is escalated; a reconciler that re-evaluated it would
bounce it between review and development for ever, spending an agent run and a Telegram
edit per tick. Here it gets 1,000 ticks (`engine.reconciler.tick`, no grace) and must stay
still: 0 agent runs, 0 events, 0 Telegram calls, and the tasks and jobs tables unchanged.

The same holds for tasks a person holds on the board (Blocked, Needs Input) whose CI turned
green with the status webhook lost, so that only the hold keeps the reconciler off them, and
during a Plane outage, when the reconciler cannot see whether a person holds a task: it must
skip conservatively (a tick is then ~1 s of client retries, hence fewer ticks), and once Plane
is back the free task moves on at the next tick while the held ones stay.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.harness import ChaosTimeout, Outcome, Stack, agent_env, table_digest
from engine.reconciler import TickReport
from engine.stages import Stage, Status
from engine.store import Task

STATE_TABLES = ("tasks", "events", "jobs", "agent_runs")
REPAIR_TICK_S = 5.0


@dataclass
class Snapshot:
    digests: dict[str, tuple[int, str]]
    runs: Counter
    events: Counter
    telegram: int


async def _snapshot(stack: Stack) -> Snapshot:
    await stack.settle()
    store = stack.engine.store
    digests = {table: await table_digest(store, table) for table in STATE_TABLES}
    runs = await store.fetchall("SELECT task_id, COUNT(*) AS n FROM agent_runs GROUP BY task_id")
    events = await store.fetchall("SELECT task_id, COUNT(*) AS n FROM events GROUP BY task_id")
    return Snapshot(
        digests,
        Counter({row["task_id"]: row["n"] for row in runs}),
        Counter({row["task_id"]: row["n"] for row in events}),
        stack.telegram_traffic(),
    )


async def _resting(stack: Stack, task_id: int, status: str, stage: str | None) -> Task | None:
    task = await stack.engine.store.get_task(task_id)
    if task is None or task.status != status or stage not in (None, task.stage):
        return None
    return None if await stack.engine.has_active_job(task_id) else task


@dataclass
class SetUp:
    """How a class's set-up went: the reconciler ticks it played, and what they repaired."""

    ticks: int = 0
    repairs: int = 0

    def figure(self) -> str:
        return f"set-up: {self.repairs} reconciler repairs in {self.ticks} ticks"


async def until_repaired(
    stack: Stack,
    predicate: Callable[[], Awaitable[Any]],
    what: str,
    setup: SetUp,
    timeout_s: float = 240,
) -> Any:
    """Wait, for a set-up, until `predicate` returns something truthy.

    The reconciler ticks every REPAIR_TICK_S meanwhile, as `conveyor run`'s scheduler would:
    a delivery the app acknowledged and then lost must not stall a set-up (the repairs are
    counted, so the loss still shows).
    """
    deadline = time.monotonic() + timeout_s
    next_tick = time.monotonic() + REPAIR_TICK_S
    while not (found := await predicate()):
        now = time.monotonic()
        if now >= deadline:
            raise ChaosTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}")
        if now >= next_tick:
            report = await stack.engine.reconciler.tick()
            setup.ticks += 1
            setup.repairs += report.started + report.verdicts + report.unblocked
            next_tick = time.monotonic() + REPAIR_TICK_S
        await asyncio.sleep(0.1)
    return found


async def until_resting(
    stack: Stack,
    task_id: int,
    status: str,
    stage: str | None = None,
    *,
    setup: SetUp,
    timeout_s: float = 240,
) -> Task:
    """The task once it rests at `stage`/`status` with no job left (see until_repaired)."""
    what = f"task {task_id} to rest at {stage or '*'}/{status}"
    return await until_repaired(
        stack, lambda: _resting(stack, task_id, status, stage), what, setup, timeout_s
    )


async def task_of_issue(stack: Stack, issue_id: str, setup: SetUp) -> Task:
    """The task the board's issue started (see until_repaired)."""

    async def found() -> Task | None:
        return await stack.engine.store.task_by_tracker_issue("ORCH", issue_id)

    return await until_repaired(stack, found, f"a task for issue {issue_id}", setup, 60)


async def _started(stack: Stack, name: str, setup: SetUp) -> tuple[str, int]:
    """An issue a person started and whose BRD they approved on the board."""
    issue_id = stack.issue(name)["id"]
    stack.move(issue_id, "In Progress")
    task = await task_of_issue(stack, issue_id, setup)
    await until_resting(stack, task.id, Status.AWAITING_APPROVAL, setup=setup)
    stack.move(issue_id, "Approved")
    return issue_id, task.id


async def _escalated(stack: Stack, setup: SetUp) -> Task:
    """CI green, the reviewer always negative: the retry cap escalates the task."""
    _, task_id = await _started(stack, "Bounce", setup)
    return await until_resting(stack, task_id, Status.ESCALATED, setup=setup, timeout_s=600)


async def _waiting_for_ci(stack: Stack, name: str, setup: SetUp) -> tuple[str, Task]:
    issue_id, task_id = await _started(stack, name, setup)
    task = await until_resting(stack, task_id, Status.ACTIVE, Stage.DEVELOPMENT, setup=setup)
    await stack.settle()
    return issue_id, task


async def _lose_green(stack: Stack, task: Task) -> None:
    """CI turns green on the task's head, but the status webhook never arrives."""
    await stack.settle()
    head = (await stack.engine.store.get_task(task.id)).head_sha
    stack.gitea.drop_rate(1.0)
    await stack.gitea.set_status("team", "app", head, "success")
    await stack.settle()
    stack.gitea.drop_rate(0.0)


async def _ticks(stack: Stack, count: int) -> list[TickReport]:
    return [await stack.engine.reconciler.tick() for _ in range(count)]


def _still(
    phase: str,
    tasks: dict[str, Task],
    before: Snapshot,
    after: Snapshot,
    reports: list[TickReport],
    outcome: Outcome,
) -> None:
    """One figure per stopped task (keyed by why it is stopped), and the invariants: nothing
    ran, nothing was recorded, nothing was said."""
    calls = after.telegram - before.telegram
    for why, task in tasks.items():
        runs = after.runs[task.id] - before.runs[task.id]
        events = after.events[task.id] - before.events[task.id]
        outcome.figure(
            f"{why} {task.work_item}{phase}: {len(reports)} ticks → {runs} agent runs,"
            f" {events} events, {calls} Telegram calls"
        )
        outcome.check(runs == 0, f"{why} {task.work_item}{phase}: {runs} agent run(s)")
        outcome.check(events == 0, f"{why} {task.work_item}{phase}: {events} event(s)")
    outcome.check(calls == 0, f"{len(reports)} ticks{phase}: {calls} Telegram call(s)")
    for table, digest in after.digests.items():
        outcome.check(
            digest == before.digests[table],
            f"{len(reports)} ticks{phase}: the {table} table changed"
            f" ({before.digests[table][0]} → {digest[0]} rows)",
        )
    moved = sum(r.unblocked + r.started + r.verdicts for r in reports)
    outcome.check(moved == 0, f"{len(reports)} ticks{phase}: the reconciler moved {moved} time(s)")


def _skips(reports: list[TickReport]) -> str:
    """What the ticks said they skipped and why (the reconciler's own account; not checked:
    a task it never reads is as still as one it skips)."""
    total: Counter = Counter()
    errors = 0
    for report in reports:
        total.update(report.skipped)
        errors += report.errors
    skipped = ", ".join(f"{k} {n}" for k, n in sorted(total.items())) or "none"
    return f"{skipped}; errors {errors}"


async def _phase_escalated(stack: Stack, ticks: int, setup: SetUp, outcome: Outcome) -> Task:
    task = await _escalated(stack, setup)
    outcome.check(
        task.developer_retries >= stack.engine.settings.max_developer_retries,
        f"{task.work_item} escalated with {task.developer_retries} retries",
    )
    before = await _snapshot(stack)
    reports = await _ticks(stack, ticks)
    after = await _snapshot(stack)
    _still("", {"escalated": task}, before, after, reports, outcome)
    outcome.figure(f"skips {_skips(reports)}")
    return task


async def _phase_held(stack: Stack, ticks: int, setup: SetUp, outcome: Outcome) -> dict[str, Task]:
    stack.gitea.ci_state = None  # from here on, a head's CI reports only when told to
    held: dict[str, Task] = {}
    for state in ("Blocked", "Needs Input"):
        issue_id, task = await _waiting_for_ci(stack, f"Held {state}", setup)
        stack.move(issue_id, state)
        await _lose_green(stack, task)
        held[state] = task
    before = await _snapshot(stack)
    reports = await _ticks(stack, ticks)
    after = await _snapshot(stack)
    _still(
        "", {f"held {state}": task for state, task in held.items()}, before, after, reports, outcome
    )
    outcome.figure(f"skips {_skips(reports)}")
    return held


async def _phase_outage(
    stack: Stack, stopped: dict[str, Task], ticks: int, setup: SetUp, outcome: Outcome
) -> None:
    """Plane down: a free task with a lost green status must wait like the held ones."""
    _, free = await _waiting_for_ci(stack, "Free", setup)
    await _lose_green(stack, free)
    before = await _snapshot(stack)
    port = int(stack.plane.base_url.rsplit(":", 1)[1])
    await stack.plane.stop()
    try:
        started = time.monotonic()
        reports = await _ticks(stack, ticks)
        per_tick = (time.monotonic() - started) / max(1, ticks)
    finally:
        await stack.plane.start(port=port)
    after = await _snapshot(stack)
    everyone = {**stopped, "free": free}
    _still(" in a Plane outage", everyone, before, after, reports, outcome)
    outcome.figure(f"outage skips {_skips(reports)}, {per_tick:.2f}s a tick")
    seen = {event.id for event in await stack.engine.store.events(free.id)}
    await stack.engine.reconciler.tick()
    moved = [
        event
        for event in await stack.engine.store.events(free.id)
        if event.id not in seen and event.actor == "reconciler"
    ]
    verb = "moved" if moved else "did not move"
    outcome.figure(f"Plane back: the next tick {verb} {free.work_item} on")
    outcome.check(
        bool(moved) and moved[0].from_state == f"{Stage.DEVELOPMENT}/{Status.ACTIVE}",
        f"{free.work_item} was not moved on by the reconciler after the outage",
    )


async def run_bounce(root: Path, *, ticks: int, outage_ticks: int) -> list[Outcome]:
    outcome = Outcome("bounce")
    started = time.monotonic()
    with agent_env(root / "agent-state", reviewer="negative"):
        stack = await Stack.open(root, ci_state="success", max_concurrency=2)
        setup = SetUp()
        try:
            escalated = await _phase_escalated(stack, ticks, setup, outcome)
            held = await _phase_held(stack, ticks, setup, outcome)
            stopped = {"escalated": escalated, **{f"held {k}": v for k, v in held.items()}}
            await _phase_outage(stack, stopped, outage_ticks, setup, outcome)
        except ChaosTimeout as error:  # keep the figures of the phases that finished
            outcome.check(False, str(error))
        finally:
            await stack.close()
        outcome.figure(setup.figure())
    outcome.seconds = time.monotonic() - started
    return [outcome]


async def run(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """1,000 ticks (200 quick) per phase; 60 ticks (10 quick) of Plane outage."""
    return await run_bounce(root, ticks=200 if quick else 1000, outage_ticks=10 if quick else 60)
