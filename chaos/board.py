"""Dropped webhooks, then a replay of everything that was delivered.

Dropped webhooks: a batch of tasks goes from the board to done while Plane and Gitea lose
a share of all their deliveries at random (seeded). A scripted person starts each issue and
approves each BRD on the board; the reconciler (`engine.reconciler.tick`, no grace) repairs
what the lost deliveries never triggered. Checked: every task done, every intended
transition applied exactly once (Jepsen's total-queue sets: lost, duplicated, unexpected),
one task per issue, one Telegram card per task, one merge per branch.

Replay: the delivery log the app recorded during that run (`webhook_deliveries`: source,
the event header, the payload) is posted again three times in shuffled order, signed again;
the first round keeps the original delivery ids, the others carry new ones like a Plane
retry or a Gitea manual replay. The tasks and events tables must hash the same afterwards,
and no agent may have run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from chaos.harness import (
    ChaosTimeout,
    Outcome,
    Stack,
    agent_env,
    gitea_headers,
    merge_commits,
    plane_headers,
    table_digest,
)
from engine.stages import Status

# What a task that meets no red gate goes through, in order: the intended transitions.
INTENDED: tuple[tuple[str, str | None, str], ...] = (
    ("created", None, "analysis/active"),
    ("brd_ready", "analysis/active", "analysis/awaiting_approval"),
    ("approved", "analysis/awaiting_approval", "architecture/active"),
    ("advanced", "architecture/active", "development/active"),
    ("advanced", "development/active", "review/active"),
    ("advanced", "review/active", "testing/active"),
    ("advanced", "testing/active", "deploy-staging/active"),
    ("advanced", "deploy-staging/active", "deploy/active"),
    ("done", "deploy/active", "done/done"),
)
# The development gate may look before CI has reported on the head: one "waiting" record.
# Gitea's merged-PR webhook for Conveyor's own merge may arrive before the done transition;
# it lets go of the lease (no transition).
TOLERATED = frozenset(
    {
        ("gate_red", "development/active", "development/active"),
        ("lease_released", "deploy/active", "deploy/active"),
    }
)
AGENT_RUNS_PER_TASK = 6
REPLAY_ROUNDS = 3
REPLAY_CONCURRENCY = 32


@dataclass
class Repairs:
    ticks: int = 0
    started: int = 0
    verdicts: int = 0
    unblocked: int = 0
    errors: int = 0


async def _drive(
    stack: Stack, issues: list[str], repairs: Repairs, tick_s: float, timeout_s: float
) -> None:
    """The person and the reconciler, until every task is done (or the time is up)."""
    approved: set[str] = set()
    store = stack.engine.store
    deadline = time.monotonic() + timeout_s
    while True:
        report = await stack.engine.reconciler.tick()
        repairs.ticks += 1
        repairs.started += report.started
        repairs.verdicts += report.verdicts
        repairs.unblocked += report.unblocked
        repairs.errors += report.errors
        for issue_id in issues:  # the person looks at the board, not at the store
            if issue_id not in approved and stack.plane.state_name(issue_id) == "In Review":
                stack.move(issue_id, "Approved")
                approved.add(issue_id)
        done = await store.fetchone(
            "SELECT COUNT(*) AS n FROM tasks WHERE status = ?", (Status.DONE,)
        )
        busy = await store.fetchone(
            "SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running')"
        )
        if done["n"] >= len(issues) and busy["n"] == 0:
            return
        if time.monotonic() > deadline:
            rows = await store.fetchall(
                "SELECT stage, status, COUNT(*) AS n FROM tasks GROUP BY stage, status"
            )
            where = ", ".join(f"{r['stage']}/{r['status']}: {r['n']}" for r in rows)
            raise ChaosTimeout(
                f"after {timeout_s:.0f}s only {done['n']}/{len(issues)} tasks are done ({where})"
            )
        await asyncio.sleep(tick_s)


async def _check_dropped(stack: Stack, issues: list[str], outcome: Outcome) -> None:
    store = stack.engine.store
    tasks = await store.list_tasks()
    by_issue = Counter(task.tracker_issue_id for task in tasks)
    done = sum(task.status == Status.DONE for task in tasks)
    outcome.figure(f"{done}/{len(issues)} done")
    outcome.check(done == len(issues), f"{len(issues) - done} task(s) not done")
    outcome.check(
        len(tasks) == len(issues) and set(by_issue) == set(issues),
        f"{len(tasks)} tasks for {len(issues)} issues",
    )
    lost = duplicated = unexpected = 0
    for task in tasks:
        applied = [(e.kind, e.from_state, e.to_state) for e in await store.events(task.id)]
        counts = Counter(applied)
        missing = [move for move in INTENDED if move not in counts]
        doubled = [move for move, n in counts.items() if n > 1]
        strange = [m for m in counts if m not in INTENDED and m not in TOLERATED]
        lost += len(missing)
        duplicated += sum(counts[move] - 1 for move in doubled)
        unexpected += sum(counts[move] for move in strange)
        for label, moves in (("lost", missing), ("duplicated", doubled), ("unexpected", strange)):
            if moves:
                outcome.check(False, f"{task.work_item} {label}: {moves}")
        for event in await store.events(task.id):
            if (event.kind, event.from_state, event.to_state) in strange and event.detail:
                outcome.check(False, f"{task.work_item} {event.kind}: {event.detail[:300]}")
    outcome.figure(f"transitions lost {lost}, duplicated {duplicated}, unexpected {unexpected}")
    runs = await store.fetchone("SELECT COUNT(*) AS n FROM agent_runs")
    outcome.figure(f"agent runs {runs['n']} (expected {AGENT_RUNS_PER_TASK * len(issues)})")
    outcome.check(
        runs["n"] == AGENT_RUNS_PER_TASK * len(issues),
        f"{runs['n']} agent runs, expected {AGENT_RUNS_PER_TASK * len(issues)}",
    )
    cards = stack.card_sends()
    extra = sum(max(0, cards.get(task.work_item, 0) - 1) for task in tasks)
    missing_cards = sum(cards.get(task.work_item, 0) == 0 for task in tasks)
    outcome.figure(f"cards {sum(cards.values())} (extra {extra}, missing {missing_cards})")
    outcome.check(extra == 0, f"{extra} extra card(s)")
    outcome.check(missing_cards == 0, f"{missing_cards} task(s) without a card")
    merges = Counter(
        subject.split(":", 1)[0].removeprefix("Merge ") for subject in merge_commits(stack.remote)
    )
    twice = [branch for branch, n in merges.items() if n > 1]
    unmerged = [task.branch for task in tasks if merges.get(task.branch, 0) == 0]
    outcome.figure(f"merges {sum(merges.values())} (twice {len(twice)})")
    outcome.check(not twice, f"merged more than once: {twice[:5]}")
    outcome.check(not unmerged, f"never merged: {unmerged[:5]}")


def _redelivery_headers(source: str, event: str, payload: bytes, delivery: str) -> dict:
    if source == "plane":
        kind = json.loads(payload).get("event") or "issue"
        return plane_headers(payload, kind, delivery)
    event_type = event
    if event == "pull_request" and json.loads(payload).get("action") == "synchronized":
        event_type = "pull_request_sync"
    return gitea_headers(payload, event_type, delivery)


async def _replay(stack: Stack, seed: int, outcome: Outcome) -> None:
    store = stack.engine.store
    await stack.settle()
    tasks_before = await table_digest(store, "tasks")
    events_before = await table_digest(store, "events")
    runs_before = (await store.fetchone("SELECT COUNT(*) AS n FROM agent_runs"))["n"]
    traffic_before = stack.telegram_traffic()
    log = await store.fetchall(
        "SELECT id, source, delivery_id, event, payload FROM webhook_deliveries ORDER BY id"
    )
    last_id = log[-1]["id"] if log else 0
    rng = random.Random(seed)
    statuses: Counter = Counter()
    duplicates = 0
    gate = asyncio.Semaphore(REPLAY_CONCURRENCY)

    async def send(row, fresh: bool) -> None:
        nonlocal duplicates
        payload = bytes(row["payload"])
        delivery = str(uuid.uuid4()) if fresh or not row["delivery_id"] else row["delivery_id"]
        headers = _redelivery_headers(row["source"], row["event"], payload, delivery)
        async with gate:
            status, answer = await stack.post(row["source"], payload, headers)
        statuses[status] += 1
        duplicates += bool(answer.get("duplicate"))

    for round_number in range(REPLAY_ROUNDS):
        order = list(log)
        rng.shuffle(order)
        await asyncio.gather(*(send(row, fresh=round_number > 0) for row in order))
        await stack.engine.intake.idle()
        await stack.engine.reconciler.tick()
    await stack.settle()

    posts = sum(statuses.values())
    accepted = sum(n for status, n in statuses.items() if 200 <= status < 300)
    again = await store.fetchall(
        "SELECT event, outcome FROM webhook_deliveries WHERE id > ?", (last_id,)
    )
    outcomes = Counter(f"{row['event']}→{row['outcome']}" for row in again)
    outcome.figure(
        f"{len(log)} recorded deliveries × {REPLAY_ROUNDS} = {posts} posts, {accepted} 2xx,"
        f" {duplicates} answered duplicate, {len(again)} recorded again"
        + (f" ({', '.join(f'{k} {n}' for k, n in outcomes.most_common(4))})" if again else "")
    )
    outcome.check(accepted == posts, f"non-2xx answers: {dict(statuses)}")
    tasks_after = await table_digest(store, "tasks")
    events_after = await table_digest(store, "events")
    runs_after = (await store.fetchone("SELECT COUNT(*) AS n FROM agent_runs"))["n"]
    same = tasks_after == tasks_before and events_after == events_before
    outcome.figure(
        f"tasks {tasks_after[0]} rows #{tasks_after[1][:8]}"
        f" {'=' if tasks_after == tasks_before else '≠'} #{tasks_before[1][:8]},"
        f" events {events_after[0]} rows #{events_after[1][:8]}"
        f" {'=' if events_after == events_before else '≠'} #{events_before[1][:8]}"
    )
    outcome.check(same, "the tasks or events table changed under the replay")
    outcome.figure(f"agent runs +{runs_after - runs_before}")
    outcome.check(runs_after == runs_before, f"{runs_after - runs_before} agent(s) ran again")
    extra_traffic = stack.telegram_traffic() - traffic_before
    outcome.figure(f"Telegram calls +{extra_traffic}")
    outcome.check(extra_traffic == 0, f"{extra_traffic} Telegram call(s) during the replay")
    unsafe = [k for k in outcomes if not k.endswith(("ignored", "no change", "no task"))]
    outcome.check(not unsafe, f"replayed deliveries that acted: {unsafe}")


async def run_board(
    root: Path,
    *,
    tasks: int,
    drop: float,
    seed: int,
    concurrency: int,
    timeout_s: float,
    replay: bool,
) -> list[Outcome]:
    dropped = Outcome("dropped-webhooks")
    replayed = Outcome("replay")
    started = time.monotonic()
    with agent_env(root / "agent-state"):
        stack = await Stack.open(root, max_concurrency=concurrency)
        try:
            stack.plane.drop_rate(drop, seed=seed)
            stack.gitea.drop_rate(drop, seed=seed + 1)
            issues = []
            for n in range(tasks):
                issue = stack.issue(f"Feature {n + 1}")
                stack.move(issue["id"], "In Progress")
                issues.append(issue["id"])
            repairs = Repairs()
            finished = True
            try:
                await _drive(stack, issues, repairs, tick_s=0.5, timeout_s=timeout_s)
            except ChaosTimeout as error:
                finished = dropped.check(False, str(error))
            stack.plane.drop_rate(0.0)
            stack.gitea.drop_rate(0.0)
            await stack.settle()
            plane_lost = sum(d.outcome == "dropped" for d in stack.plane.deliveries)
            gitea_lost = sum(d.dropped for d in stack.gitea.deliveries)
            dropped.figure(
                f"{tasks} tasks, {drop:.0%} dropped: Plane {plane_lost}/"
                f"{len(stack.plane.deliveries)}, Gitea {gitea_lost}/{len(stack.gitea.deliveries)}"
            )
            dropped.check(plane_lost > 0 and gitea_lost > 0, "no delivery was dropped")
            dropped.figure(
                f"reconciler {repairs.ticks} ticks: started {repairs.started},"
                f" verdicts {repairs.verdicts}, unblocked {repairs.unblocked},"
                f" errors {repairs.errors}"
            )
            await _check_dropped(stack, issues, dropped)
            dropped.seconds = time.monotonic() - started
            if replay:
                started = time.monotonic()
                if finished:
                    await _replay(stack, seed, replayed)
                else:
                    replayed.check(False, "skipped: the dropped-webhooks run did not finish")
                replayed.seconds = time.monotonic() - started
        finally:
            await stack.close()
    return [dropped, replayed] if replay else [dropped]


async def run(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """Dropped webhooks (200 tasks, 30% of all deliveries lost), then the replay."""
    return await run_board(
        root,
        tasks=20 if quick else 200,
        drop=0.3,
        seed=seed,
        concurrency=4,
        timeout_s=300 if quick else 1500,
        replay=True,
    )
