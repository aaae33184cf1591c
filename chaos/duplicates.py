"""Duplicate storms: the same start of work delivered many times, many ways, at once.

For each issue a person moves to In Progress, the app receives one storm, every post of it
in flight at once, in a seeded shuffled order: 100 copies of one Plane delivery (same
X-Plane-Delivery), replays of it under new delivery ids (Plane retries with a new id each
time), the same state change as API v1 sends it (`activity.field == "state"`) next to the
web app's (`state_id`), and the sibling delivery Plane sends for another field changed by
the same PATCH (it carries the same full issue, In Progress included). After the analysts
have run, a second, smaller storm per issue replays it all under new ids. Checked: one task
per issue, one `created` event, one analysis job, one analyst run and one card each, and
every post answered 2xx.

The sandbox Plane's own webhook is detached, so the only deliveries the app gets from Plane
are the ones this class sends.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from chaos.harness import (
    ChaosTimeout,
    Outcome,
    Stack,
    agent_env,
    bounded,
    plane_headers,
    state_change,
    wait_until,
)
from engine.stages import Stage, Status

COPIES = 100  # concurrent copies of one delivery, same delivery id
REPLAYS = 10  # the same body under new delivery ids, per wave
SECOND_WAVE_COPIES = 20
STORM_CONNECTIONS = 128  # more than a storm holds: every copy in flight at once


@dataclass(frozen=True)
class Post:
    issue_id: str
    kind: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    duplicate_answers: int = 0
    in_flight: int = 0
    peak: int = 0  # most posts in flight at once
    failures: list[str] = field(default_factory=list)

    @property
    def posts(self) -> int:
        return sum(self.statuses.values())

    @property
    def accepted(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)


def _sibling_field(issue: dict, field_name: str = "priority") -> bytes:
    """The delivery Plane sends for another key of the same PATCH: same issue, other field."""
    payload = json.loads(state_change(issue, "state_id"))
    payload["activity"].update(field=field_name, old_value="none", new_value="high")
    return json.dumps(payload).encode()


def _storm(issue: dict, copies: int, replays: int) -> list[Post]:
    """Every way the start of one issue arrives more than once."""
    issue_id = issue["id"]
    web = state_change(issue, "state_id")
    api = state_change(issue, "state")
    sibling = _sibling_field(issue)
    original = str(uuid.uuid4())
    posts = [Post(issue_id, "copy", web, plane_headers(web, delivery=original))] * copies
    posts += [Post(issue_id, "replay", web, plane_headers(web)) for _ in range(replays)]
    posts += [Post(issue_id, "field=state", api, plane_headers(api)) for _ in range(replays)]
    posts += [Post(issue_id, "sibling field", sibling, plane_headers(sibling))]
    return posts


async def _send(session: aiohttp.ClientSession, url: str, post: Post, tally: Tally) -> None:
    tally.in_flight += 1
    tally.peak = max(tally.peak, tally.in_flight)
    try:
        async with session.post(
            f"{url}/webhooks/plane", data=post.body, headers=post.headers
        ) as response:
            answer = await response.json(content_type=None)
            tally.statuses[response.status] += 1
            tally.duplicate_answers += bool(isinstance(answer, dict) and answer.get("duplicate"))
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        tally.statuses[0] += 1
        tally.failures.append(f"{post.kind} for {post.issue_id}: {type(error).__name__} {error}")
    finally:
        tally.in_flight -= 1


async def _fire(url: str, storms: list[list[Post]], tally: Tally) -> None:
    """One storm after another, each all at once over a pool wide enough to hold it."""
    connector = aiohttp.TCPConnector(limit=STORM_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for posts in storms:
            await bounded(
                asyncio.gather(*(_send(session, url, post, tally) for post in posts)),
                f"a storm of {len(posts)} posts",
                120,
            )


def _storms(board: list[dict], copies: int, rng: random.Random) -> list[list[Post]]:
    storms = []
    for issue in board:
        posts = _storm(issue, copies, REPLAYS)
        rng.shuffle(posts)
        storms.append(posts)
    return storms


async def _analysed(stack: Stack, count: int) -> bool:
    store = stack.engine.store
    waiting = await store.fetchone(
        "SELECT COUNT(*) AS n FROM tasks WHERE status = ?", (Status.AWAITING_APPROVAL,)
    )
    busy = await store.fetchone(
        "SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running')"
    )
    return waiting["n"] >= count and busy["n"] == 0


async def _per_task(stack: Stack, table: str, where: str, value: str) -> Counter:
    """Rows of `table` per task whose column `where` equals `value`."""
    rows = await stack.engine.store.fetchall(
        f"SELECT task_id, COUNT(*) AS n FROM {table} WHERE {where} = ? GROUP BY task_id", (value,)
    )
    return Counter({row["task_id"]: row["n"] for row in rows})


async def _check(stack: Stack, issues: list[str], outcome: Outcome) -> None:
    store = stack.engine.store
    tasks = await store.list_tasks()
    by_issue = Counter(task.tracker_issue_id for task in tasks)
    outcome.figure(f"{len(tasks)} tasks for {len(issues)} issues")
    outcome.check(len(tasks) == len(issues), f"{len(tasks)} tasks for {len(issues)} issues")
    outcome.check(set(by_issue) == set(issues), "tasks do not match the issues one to one")
    created = await _per_task(stack, "events", "kind", "created")
    jobs = await _per_task(stack, "jobs", "stage", Stage.ANALYSIS)
    runs = await _per_task(stack, "agent_runs", "role", "analyst")
    cards = stack.card_sends()
    for label, counts in (
        ("created events", {t.id: created[t.id] for t in tasks}),
        ("analysis jobs", {t.id: jobs[t.id] for t in tasks}),
        ("analyst runs", {t.id: runs[t.id] for t in tasks}),
        ("cards", {t.id: cards.get(t.work_item, 0) for t in tasks}),
    ):
        spread = Counter(counts.values())
        outcome.figure(f"{label} {sum(counts.values())} ({_spread(spread)})")
        wrong = [task_id for task_id, n in counts.items() if n != 1]
        outcome.check(not wrong, f"{label} not exactly one for task(s) {wrong[:5]}: {spread}")


def _spread(spread: Counter) -> str:
    """How many tasks had each count: "1 each", or "1: 9 task(s), 2: 1 task(s)"."""
    if set(spread) == {1}:
        return "1 each"
    return ", ".join(f"{count}: {n} task(s)" for count, n in sorted(spread.items()))


async def _recorded(stack: Stack) -> Counter:
    rows = await stack.engine.store.fetchall("SELECT event, outcome FROM webhook_deliveries")
    return Counter(f"{row['event']}→{row['outcome']}" for row in rows)


def _report_wave(label: str, tally: Tally, outcome: Outcome) -> None:
    outcome.figure(
        f"{label}: {tally.posts} posts (up to {tally.peak} at once), {tally.accepted} 2xx,"
        f" {tally.duplicate_answers} answered duplicate"
    )
    outcome.check(tally.accepted == tally.posts, f"{label} non-2xx answers: {dict(tally.statuses)}")
    for failure in tally.failures[:3]:
        outcome.check(False, failure)


def _start_issues(stack: Stack, count: int) -> list[dict]:
    """Issues a person moved to In Progress, as webhook data (no delivery sent)."""
    stack.plane.set_webhook(None)
    issues = []
    for n in range(count):
        issue = stack.issue(f"Storm {n + 1}")
        stack.move(issue["id"], "In Progress")
        issues.append(stack.plane.issue(issue["id"]))
    return issues


async def run_storms(root: Path, *, issues: int, seed: int, timeout_s: float) -> list[Outcome]:
    outcome = Outcome("duplicates")
    started = time.monotonic()
    rng = random.Random(seed)
    with agent_env(root / "agent-state"):
        stack = await Stack.open(root, ci_state=None, max_concurrency=2)
        try:
            board = _start_issues(stack, issues)
            first = _storms(board, COPIES, rng)
            wave1 = Tally()
            await _fire(stack.url, first, wave1)
            try:
                await wait_until(
                    lambda: _analysed(stack, issues), "every analyst to finish", timeout_s, 0.2
                )
            except ChaosTimeout as error:  # the checks below say what is missing
                outcome.check(False, str(error))
            await stack.settle()
            wave2 = Tally()
            await _fire(stack.url, _storms(board, SECOND_WAVE_COPIES, rng), wave2)
            await stack.settle()
            outcome.figure(f"{issues} issues × {len(first[0])} deliveries")
            _report_wave("storm", wave1, outcome)
            _report_wave("after the analyst", wave2, outcome)
            recorded = await _recorded(stack)
            outcome.figure("recorded " + ", ".join(f"{k} {n}" for k, n in sorted(recorded.items())))
            started_count = sum(n for key, n in recorded.items() if key.endswith("→started"))
            outcome.check(
                started_count == issues, f"{started_count} deliveries started a task, not {issues}"
            )
            await _check(stack, [issue["id"] for issue in board], outcome)
        finally:
            await stack.close()
    outcome.seconds = time.monotonic() - started
    return [outcome]


async def run(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """Storms for 10 issues (3 quick): 100 copies, replays, both state fields, a sibling."""
    return await run_storms(
        root, issues=3 if quick else 10, seed=seed, timeout_s=120 if quick else 300
    )
