"""Lost webhooks of every kind: every task still reaches done, each transition happens
once, and each task's card is one message in the ops chat, edited, never sent again."""

from __future__ import annotations

import asyncio
from itertools import count
from pathlib import Path

from chaos.harness import CHAT, Stack
from engine.notifier import AlertKind, FanoutNotifier
from engine.stages import Stage, Status
from tests.conftest import HANG_GUARD_S
from tests.test_reconciler_bounce import running_stack

SHARE = 0.3  # of the webhooks lost outside the deterministic losses below
TASKS = 3
STATE_FIELDS = ("state", "state_id")


class LossyDeploys:
    """Loses every Gitea webhook while some task is in its deploy stage, a seeded share
    otherwise: each task's merge (pull_request closed) and its deployer's CI status are
    certainly among the lost."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.deploying: set[int] = set()
        self.seeds = count(11)
        self.rate = -1.0
        self._set(SHARE)

    def _set(self, rate: float) -> None:
        if rate != self.rate:
            self.stack.gitea.drop_rate(rate, next(self.seeds))
            self.rate = rate

    async def task_changed(self, task_id: int) -> None:
        task = await self.stack.engine.store.get_task(task_id)
        if task.stage == Stage.DEPLOY:
            self.deploying.add(task_id)
        else:
            self.deploying.discard(task_id)
        self._set(1.0 if self.deploying else SHARE)

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        return None


async def approve_losing_the_webhook(stack: Stack, issue_id: str, seed: int) -> None:
    stack.plane.drop_rate(1.0)
    stack.move(issue_id, "Approved")
    await stack.plane.drain()
    stack.plane.drop_rate(SHARE, seed=seed)


async def drive_to_done(stack: Stack, issue_ids: list[str]) -> None:
    """A person approves each BRD once the board shows it; the reconciler ticks between."""
    approved: set[str] = set()
    while True:
        await stack.settle()
        await stack.engine.reconciler.tick()
        tasks = await stack.engine.store.list_tasks()
        for task in tasks:
            issue_id = task.tracker_issue_id
            waiting = task.status == Status.AWAITING_APPROVAL
            if waiting and stack.plane.state_name(issue_id) == "In Review":
                if approved:
                    stack.move(issue_id, "Approved")
                else:
                    await approve_losing_the_webhook(stack, issue_id, seed=len(approved))
                approved.add(issue_id)
        if len(tasks) == len(issue_ids) and all(t.status == Status.DONE for t in tasks):
            return
        await asyncio.sleep(0.1)


async def test_lost_webhooks_of_every_kind_still_bring_every_task_to_done(
    tmp_path: Path, agent_env
) -> None:
    async with running_stack(tmp_path, ci_state="success") as (stack, _):
        lossy = LossyDeploys(stack)
        stack.engine.use_notifier(FanoutNotifier([lossy, stack.console.notifier]))
        stack.plane.drop_rate(SHARE, seed=7)
        issue_ids = [stack.issue(f"Feature {n}")["id"] for n in range(TASKS)]
        for issue_id in issue_ids:
            stack.move(issue_id, "In Progress")

        await asyncio.wait_for(drive_to_done(stack, issue_ids), 4 * HANG_GUARD_S)
        await stack.settle()

        tasks = await stack.engine.store.list_tasks()
        assert sorted(t.tracker_issue_id for t in tasks) == sorted(issue_ids)
        for task in tasks:
            events = await stack.engine.store.events(task.id)
            moves = [(e.kind, e.from_state, e.to_state) for e in events]
            assert len(moves) == len(set(moves)), f"{task.work_item} moved twice: {moves}"
            assert [e.kind for e in events].count("done") == 1
        assert stack.card_sends() == {task.work_item: 1 for task in tasks}
        for task in tasks:
            cards = [
                m for m in stack.telegram.messages(CHAT) if m.text.startswith(task.work_item + " ")
            ]
            assert len(cards) == 1 and cards[0].edited and "deployed" in cards[0].text

        plane = stack.plane.deliveries
        states = [d for d in plane if d.event == "issue" and d.field in STATE_FIELDS]
        assert any(d.outcome == "dropped" for d in states)
        assert any(d.outcome == "delivered" for d in states)
        statuses = [d for d in stack.gitea.deliveries if d.event_type == "status"]
        assert any(d.dropped for d in statuses) and not all(d.dropped for d in statuses)
        merges = [
            d
            for d in stack.gitea.deliveries
            if d.event_type == "pull_request" and d.payload["pull_request"]["merged"]
        ]
        assert len(merges) == TASKS and all(d.dropped for d in merges)
