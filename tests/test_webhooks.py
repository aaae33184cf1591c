"""Plane and Gitea over HTTP: signed webhooks into the running app, the board and the forge
kept in sync, against the sandbox servers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.telegram import TelegramConsole
from engine.api import add_routes
from engine.config import Settings
from engine.runtime import Engine
from engine.sandbox.gitea import GiteaSandbox, delivery_headers, go_json
from engine.sandbox.plane import PlaneSandbox
from engine.sandbox.telegram import TelegramSandbox
from engine.stages import Stage, Status
from engine.store import Task
from engine.webhooks import (
    AMBIGUOUS_SHA,
    MAX_BODY_BYTES,
    REJECTED_WITHOUT_COMMENT,
    plane_envelope,
)
from tests.conftest import HANG_GUARD_S, SANDBOX_AGENT, RecordingNotifier
from tests.test_console_run import exit_code, free_port, stop_process, wait_until
from tests.test_sandbox_plane import Received, WebhookReceiver
from tests.test_telegram import ADMIN, CHAT, TOKEN, console_settings

PLANE_TOKEN = "plane_api_conveyor"
PLANE_SECRET = "plane_wh_secret"
GITEA_TOKEN = "gitea_conveyor"
GITEA_SECRET = "gitea_wh_secret"
BOT_TOKENS = {"developer": "plane_api_developer_bot", "reviewer": "plane_api_reviewer_bot"}
DESCRIPTION = "<p>Return a <b>greeting</b> from GET /hello.</p>"
PUBLIC_FORGE = "https://git.example.com"


@dataclass
class Board:
    """Conveyor as `conveyor run` serves it, pointed at a sandbox Plane board and Gitea."""

    settings: Settings
    plane: PlaneSandbox
    gitea: GiteaSandbox | None
    project_id: str
    human: str
    notifier: RecordingNotifier
    telegram: TelegramSandbox | None = None
    engine: Engine = field(init=False)
    console: TelegramConsole | None = None
    url: str = ""
    port: int = 0
    runner: web.AppRunner | None = None

    async def serve(self) -> None:
        if self.telegram is not None:
            self.engine = Engine(self.settings)
            self.console = TelegramConsole(self.settings, self.engine)
            self.engine.use_notifier(self.console.notifier)
        else:
            self.engine = Engine(self.settings, self.notifier)
            self.notifier.engine = self.engine
            self.notifier.auto_approve = False
        await self.engine.open()
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        add_routes(app, self.engine)
        self.engine.intake.mount(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        if self.console is not None:
            await self.console.start()
        self.engine.start_worker()

    async def stop(self) -> None:
        """Stop the process (the sandboxes keep running), as a restart would."""
        assert self.runner is not None
        await self.runner.cleanup()
        if self.console is not None:
            await self.console.stop()
        await self.engine.close()

    async def settle(self) -> None:
        await self.plane.drain()
        if self.gitea is not None:
            await self.gitea.drain()
        await self.engine.intake.idle()

    def issue(self, name: str = "Add a greeting", state: str = "Backlog") -> dict:
        return self.plane.create_issue(
            self.project_id, name, DESCRIPTION, state, as_user=self.human
        )

    def move(self, issue_id: str, state: str) -> None:
        self.plane.move_issue(issue_id, state, via="web", as_user=self.human)

    async def task_of(self, issue_id: str) -> Task:
        async def loop() -> Task:
            while (task := await self.engine.store.task_by_tracker_issue("ORCH", issue_id)) is None:
                await asyncio.sleep(0.05)
            return task

        return await asyncio.wait_for(loop(), HANG_GUARD_S)

    async def until(self, task_id: int, *statuses: str, stage: str | None = None) -> Task:
        async def loop() -> Task:
            while True:
                task = await self.engine.store.resting_task(task_id)
                if task is not None and task.status in statuses and stage in (None, task.stage):
                    return task
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(loop(), HANG_GUARD_S)

    async def board_state(self, issue_id: str, name: str) -> None:
        async def loop() -> None:
            while self.plane.state_name(issue_id) != name:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(loop(), HANG_GUARD_S)

    async def awaiting_approval(self, name: str = "Add a greeting") -> tuple[dict, Task]:
        """A new issue moved to In Progress, its BRD written and waiting in In Review."""
        issue = self.issue(name)
        self.move(issue["id"], "In Progress")
        task = await self.task_of(issue["id"])
        task = await self.until(task.id, Status.AWAITING_APPROVAL)
        await self.board_state(issue["id"], "In Review")
        return issue, task

    async def post(self, source: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/webhooks/{source}", data=body, headers=headers) as r,
        ):
            try:
                return r.status, await r.json(content_type=None)
            except ValueError:
                return r.status, {}

    async def outcome(self, headers: dict[str, str]) -> str | None:
        """How the delivery these headers named was processed."""
        delivery = headers.get("X-Gitea-Delivery") or headers.get("X-Plane-Delivery")
        row = await self.engine.store.fetchone(
            "SELECT outcome FROM webhook_deliveries WHERE delivery_id = ?", (delivery,)
        )
        return None if row is None else row["outcome"]

    async def deliveries(self, source: str) -> list[dict]:
        rows = await self.engine.store.fetchall(
            "SELECT event, outcome FROM webhook_deliveries WHERE source = ? ORDER BY id", (source,)
        )
        return [dict(row) for row in rows]

    async def capture(self, move: Callable[[], Any]) -> list[Received]:
        """What the sandbox Plane sends for `move`, caught before it reaches Conveyor."""
        receiver = WebhookReceiver()
        await receiver.start()
        try:
            self.plane.set_webhook(receiver.url, PLANE_SECRET)
            move()
            await self.plane.drain()
        finally:
            self.plane.set_webhook(f"{self.url}/webhooks/plane", PLANE_SECRET)
            await receiver.stop()
        return receiver.received


def plane_headers(
    body: bytes, delivery: str | None = None, secret: str = PLANE_SECRET, event: str = "issue"
) -> dict:
    return {
        "Content-Type": "application/json",
        "X-Plane-Event": event,
        "X-Plane-Delivery": delivery or str(uuid.uuid4()),
        "X-Plane-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }


def gitea_headers(body: bytes, event_type: str, event: str | None = None) -> dict:
    """Headers as Gitea sends them; `event` alone (no *-Event-Type) when given."""
    if event is not None:
        signature = hmac.new(GITEA_SECRET.encode(), body, hashlib.sha256).hexdigest()
        return {
            "Content-Type": "application/json",
            "X-Gitea-Delivery": str(uuid.uuid4()),
            "X-Gitea-Event": event,
            "X-Gitea-Signature": signature,
        }
    return delivery_headers(
        str(uuid.uuid4()), event_type, body, GITEA_SECRET, empty_status_event=False
    )


def forwarded(received: Received) -> dict[str, str]:
    """The headers of a captured delivery that Conveyor reads, to post it again."""
    return {k: v for k, v in received.headers.items() if k.lower().startswith("x-plane-")} | {
        "Content-Type": "application/json"
    }


DROP = object()  # state_change(issue, name=DROP) leaves the key out


def state_change(issue: dict, field: str = "state_id", **data_changes: Any) -> bytes:
    data = {**issue, **data_changes}
    payload = {
        "event": "issue",
        "action": "updated",
        "webhook_id": str(uuid.uuid4()),
        "workspace_id": str(uuid.uuid4()),
        "data": {k: v for k, v in data.items() if v is not DROP},
        "activity": {
            "field": field,
            "old_value": None,
            "new_value": issue["state"]["id"],
            "actor": {"id": "u1", "display_name": "alice"},
        },
    }
    return json.dumps(payload).encode()


async def merged_pr_body(board: Board, task: Task, sender: str = "bob") -> bytes:
    """The pull_request webhook Gitea sends when someone merges the task's PR."""
    assert board.gitea is not None and task.pr_number is not None
    pull = await board.gitea.pr("team", "app", task.pr_number)
    merged = {**pull, "state": "closed", "merged": True, "merge_commit_sha": "f" * 40}
    payload = {
        "action": "closed",
        "number": task.pr_number,
        "pull_request": merged,
        "requested_reviewer": None,
        "repository": {"full_name": "team/app", "name": "app", "owner": {"login": "team"}},
        "sender": {"login": sender},
        "commit_id": "",
        "review": None,
    }
    return go_json(payload)


async def open_board(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    notifier: RecordingNotifier,
    ci_state: str | None,
    *,
    telegram: TelegramSandbox | None = None,
    forge: bool = True,
    **extra: Any,
) -> tuple[Board, Callable[[], Any]]:
    plane = PlaneSandbox(workspace="acme", api_token=PLANE_TOKEN, rate_limit=None)
    await plane.start()
    project_id = plane.create_project("ORCH", "Orchestrator")
    human = plane.add_bot("plane_api_alice", "alice")
    for role, token in BOT_TOKENS.items():
        plane.add_bot(token, f"{role} bot")
    gitea = GiteaSandbox(tmp_path / "forge", token=GITEA_TOKEN, ci_state=ci_state)
    await gitea.start()
    repo = await gitea.create_repo("team", "app")
    services: dict[str, Any] = dict(
        plane_api_url=plane.base_url,
        plane_api_token=PLANE_TOKEN,
        plane_workspace="acme",
        plane_webhook_secret=PLANE_SECRET,
        plane_bot_developer=BOT_TOKENS["developer"],
        plane_bot_reviewer=BOT_TOKENS["reviewer"],
        gitea_public_url=PUBLIC_FORGE,
        locale="en",
    )
    if forge:
        services |= dict(
            gitea_url=gitea.base_url, gitea_token=GITEA_TOKEN, gitea_webhook_secret=GITEA_SECRET
        )
    build = make_settings
    if telegram is not None:

        def build(**values: Any) -> Settings:
            return console_settings(make_settings, telegram, **values)

    settings = build(
        projects=[
            {"key": "ORCH", "remote": str(repo), "repo": "team/app", "plane_project_id": project_id}
        ],
        **(services | extra),
    )
    board = Board(settings, plane, gitea if forge else None, project_id, human, notifier, telegram)
    await board.serve()
    plane.set_webhook(f"{board.url}/webhooks/plane", PLANE_SECRET)
    gitea.add_hook("team", "app", f"{board.url}/webhooks/gitea", GITEA_SECRET)

    async def close() -> None:
        await board.stop()
        await gitea.stop()
        await plane.stop()

    return board, close


@pytest.fixture
async def board(tmp_path, make_settings, notifier, agent_env) -> AsyncIterator[Board]:
    opened, close = await open_board(tmp_path, make_settings, notifier, ci_state="success")
    try:
        yield opened
    finally:
        await close()


async def metrics(board: Board) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{board.url}/metrics") as r:
        return await r.text()


async def press(board: Board, task_id: int, label: str) -> str:
    """Press a button of the task's card in the ops chat, as the operator."""
    assert board.console is not None and board.telegram is not None
    await board.console.publisher.idle()
    row = await board.engine.store.fetchone(
        "SELECT message_id FROM cards WHERE task_id = ?", (task_id,)
    )
    query = board.telegram.press(CHAT, row["message_id"], ADMIN, button_text=label)
    await board.telegram.wait_for(lambda: query in board.telegram.callback_answers())
    return board.telegram.callback_answers()[query].get("text", "")


async def state_deliveries(board: Board, state_name: str) -> list[str]:
    """Outcomes of the Plane state-change deliveries that moved an issue to `state_name`."""
    rows = await board.engine.store.fetchall(
        "SELECT payload, outcome FROM webhook_deliveries WHERE event = 'issue.state' ORDER BY id"
    )
    return [
        row["outcome"]
        for row in rows
        if json.loads(row["payload"])["data"]["state"]["name"] == state_name
    ]


async def jobs_of(board: Board, task_id: int, stage: str) -> int:
    row = await board.engine.store.fetchone(
        "SELECT COUNT(*) AS n FROM jobs WHERE task_id = ? AND stage = ?", (task_id, stage)
    )
    return row["n"]


# --- the board drives a task ------------------------------------------------------------------


async def test_the_board_drives_a_task_from_in_progress_to_done(board: Board) -> None:
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    assert (
        task.title == "Add a greeting" and task.description == "Return a greeting from GET /hello."
    )
    await board.until(task.id, Status.AWAITING_APPROVAL)
    await board.board_state(issue["id"], "In Review")

    board.move(issue["id"], "Approved")
    task = await board.until(task.id, Status.DONE)

    await board.engine.tracker.idle()
    await board.board_state(issue["id"], "Done")
    # the PR was opened with the BRD linked, and merged through the API at the tested head
    pr = await board.gitea.pr("team", "app", task.pr_number)
    assert pr["title"] == "ORCH-001: Add a greeting" and pr["merged"]
    assert "01-brd.md" in pr["body"]
    assert pr["head"]["sha"] == task.head_sha
    assert await board.gitea.branch_sha("team", "app", "main") == task.merge_sha
    # each agent's finish is a comment by that agent's own account; the last one sums the cost
    comments = board.plane.comments(issue["id"])
    authors = {c["comment_html"].split("</strong>")[0]: c["actor"] for c in comments}
    dev_bot = next(c["actor"] for c in comments if "Developer" in c["comment_html"])
    assert board.plane.user(dev_bot)["display_name"] == "developer bot"
    assert len(authors) >= 6
    assert "is done" in comments[-1]["comment_html"] and "$" in comments[-1]["comment_html"]
    kinds = [e.kind for e in await board.engine.store.events(task.id)]
    assert kinds.count("approved") == 1 and kinds.count("done") == 1


async def test_metrics_show_deliveries_by_source_and_outcome_and_cost_by_role(
    board: Board,
) -> None:
    issue, task = await board.awaiting_approval()
    board.move(issue["id"], "Approved")
    await board.until(task.id, Status.DONE)
    await board.settle()

    text = await metrics(board)

    assert 'conveyor_webhook_deliveries_total{source="plane",outcome="started"} 1' in text
    rows = await board.engine.store.fetchall(
        "SELECT source, outcome, COUNT(*) AS n FROM webhook_deliveries GROUP BY source, outcome"
    )
    assert {row["source"] for row in rows} == {"plane", "gitea"}
    for row in rows:
        labels = f'source="{row["source"]}",outcome="{row["outcome"]}"'
        assert f"conveyor_webhook_deliveries_total{{{labels}}} {row['n']}" in text
    (developer,) = [
        r for r in await board.engine.store.agent_runs(task.id) if r.role == "developer"
    ]
    assert developer.full_input and developer.output_tokens and developer.cost_usd
    assert (
        f'conveyor_agent_tokens_total{{role="developer",kind="input"}} {developer.full_input:g}'
        in text
    )
    assert (
        f'conveyor_agent_tokens_total{{role="developer",kind="output"}} '
        f"{developer.output_tokens:g}" in text
    )
    assert f'conveyor_agent_cost_usd_total{{role="developer"}} {developer.cost_usd:g}' in text


# --- deduplication ------------------------------------------------------------------------------


async def test_fifty_copies_of_the_first_delivery_and_a_replay_start_one_task(
    board: Board,
) -> None:
    issue = board.issue()
    (delivery,) = await board.capture(lambda: board.move(issue["id"], "In Progress"))
    assert await board.engine.store.list_tasks() == []  # nothing has reached Conveyor yet
    headers = forwarded(delivery)

    answers = await asyncio.gather(
        *(board.post("plane", delivery.body, headers) for _ in range(50))
    )
    replayed = await board.post(
        "plane", delivery.body, {**headers, "X-Plane-Delivery": str(uuid.uuid4())}
    )
    await board.settle()

    assert [status for status, _ in answers] == [200] * 50
    assert sorted(answer["duplicate"] for _, answer in answers) == [False] + [True] * 49
    assert replayed == (200, {"ok": True, "duplicate": True})
    (task,) = await board.engine.store.list_tasks()
    assert task.tracker_issue_id == issue["id"]
    assert await jobs_of(board, task.id, Stage.ANALYSIS) == 1
    kinds = [e.kind for e in await board.engine.store.events(task.id)]
    assert kinds.count("created") == 1
    outcomes = [delivery["outcome"] for delivery in await board.deliveries("plane")]
    assert outcomes.count("started") == 1


# --- bad requests -----------------------------------------------------------------------------


async def test_bad_requests_change_nothing(board: Board) -> None:
    issue = board.issue(state="In Progress")  # created: recorded, starts nothing
    await board.settle()
    recorded = await board.engine.store.fetchall("SELECT id FROM webhook_deliveries")
    body = state_change(issue)
    wrong = plane_headers(body, secret="not-the-secret")
    missing = {k: v for k, v in plane_headers(body).items() if k != "X-Plane-Signature"}
    garbage = b"{not json"
    huge = b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    unsized = b'{"event": "issue"}'

    assert (await board.post("plane", body, wrong))[0] == 401
    assert (await board.post("plane", body, missing))[0] == 401
    assert (await board.post("plane", garbage, plane_headers(garbage)))[0] == 400
    assert (await board.post("plane", huge, plane_headers(huge)))[0] == 413
    assert (await board.post("plane", unsized, plane_headers(unsized)))[0] == 400
    assert (await board.post("gitea", body, {"X-Gitea-Signature": "00"}))[0] == 401

    assert len(await board.engine.store.fetchall("SELECT id FROM webhook_deliveries")) == len(
        recorded
    )
    assert await board.engine.store.list_tasks() == []


async def raw_post(board: Board, path: str, headers: list[bytes], body: bytes) -> int:
    """POST with header bytes as given (not even UTF-8); the answer's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", board.port)
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head.append(f"Content-Length: {len(body)}")
    writer.write("\r\n".join(head).encode() + b"\r\n" + b"\r\n".join(headers))
    writer.write(b"\r\n\r\n" + body)
    await writer.drain()
    status = (await reader.readline()).split()[1]
    writer.close()
    await writer.wait_closed()
    return int(status)


async def test_hostile_bytes_are_refused_and_never_fail_a_neighbour(board: Board) -> None:
    recorded = len(await board.engine.store.fetchall("SELECT id FROM webhook_deliveries"))
    body = b'{"event": "issue"}'
    for name in (b"X-Plane-Signature", b"X-Gitea-Signature"):
        source = "plane" if b"Plane" in name else "gitea"
        status = await raw_post(board, f"/webhooks/{source}", [name + b": \xe9\xff"], body)
        assert status == 401
    nested = b"[" * 5000 + b"]" * 5000
    assert (await board.post("plane", nested, plane_headers(nested)))[0] == 400

    def push(after: str) -> bytes:
        payload = {
            "ref": "refs/heads/feature/x",
            "before": "0" * 40,
            "after": after,
            "repository": {"full_name": "team/app"},
        }
        return json.dumps(payload).encode()

    poison = push("\udfff")  # a lone surrogate: JSON allows it, SQLite text does not
    good = [push(f"{n:040x}") for n in range(20)]
    answers = await asyncio.gather(
        board.post("gitea", poison, gitea_headers(poison, "push")),
        *(board.post("gitea", b, gitea_headers(b, "push")) for b in good),
    )
    assert answers[0][0] == 400
    assert [status for status, _ in answers[1:]] == [200] * 20
    rows = await board.engine.store.fetchall("SELECT id FROM webhook_deliveries")
    assert len(rows) == recorded + 20


def plane_update(project: str, data: Any = None, activity: Any = None) -> dict:
    """A well-shaped Plane state change; `data` and `activity` entries override its own."""
    base_data = {"id": "i-1", "project": project, "state": {"id": "s", "name": "Todo"}}
    base_activity = {"field": "state", "new_value": "s", "actor": {"id": "u"}}
    return {
        "event": "issue",
        "action": "updated",
        "data": base_data | (data or {}),
        "activity": base_activity | (activity or {}),
    }


def plane_shapes(project: str) -> list[tuple[str, str, Any]]:
    """(what is wrong, X-Plane-Event, body): JSON, but not what the event needs."""
    update = plane_update(project)
    return [
        ("a list", "issue", []),
        ("a string", "issue", "x"),
        ("data is a list", "issue", update | {"data": []}),
        ("activity is a string", "issue", update | {"activity": "x"}),
        ("the actor is a string", "issue", plane_update(project, activity={"actor": "bob"})),
        ("the field is a number", "issue", plane_update(project, activity={"field": 7})),
        ("the id is a number", "issue", plane_update(project, data={"id": 5})),
        ("the action is a number", "issue", update | {"action": 3}),
        ("no project", "issue", update | {"data": {"id": "i-1", "state": None}}),
        ("the state is a number", "issue", plane_update(project, data={"state": 5})),
        ("the state name is a list", "issue", plane_update(project, data={"state": {"name": []}})),
        ("the name is a list", "issue", plane_update(project, data={"name": ["x"]})),
        (
            "the description is an object",
            "issue",
            plane_update(project, data={"description_html": {}}),
        ),
        ("a comment without data", "issue_comment", {"event": "issue_comment", "action": "x"}),
    ]


GITEA_REPO = {"full_name": "team/app"}
GITEA_HEAD = {"sha": "a" * 40, "ref": "orch-001-x"}
GITEA_MERGED = {"merged": True, "head": GITEA_HEAD}
GITEA_BODIES = {
    "status": {"sha": "a" * 40, "context": "ci", "state": "success", "repository": GITEA_REPO},
    "pull_request": {
        "action": "closed",
        "number": 1,
        "pull_request": GITEA_MERGED,
        "repository": GITEA_REPO,
    },
    "push": {"ref": "refs/heads/x", "after": "a" * 40, "repository": GITEA_REPO},
}


def gitea_shapes() -> list[tuple[str, str, Any]]:
    """(what is wrong, X-Gitea-Event-Type, body): JSON, but not what the event needs."""
    status, pull, push = (GITEA_BODIES[kind] for kind in ("status", "pull_request", "push"))
    return [
        ("a list", "status", []),
        ("repository is a number", "status", status | {"repository": 5}),
        ("full_name is a number", "status", status | {"repository": {"full_name": 7}}),
        ("sha is null", "status", status | {"sha": None}),
        ("pull_request is a list", "pull_request", pull | {"pull_request": []}),
        ("number is a string", "pull_request", pull | {"number": "1"}),
        ("merged is a string", "pull_request", pull | {"pull_request": {"merged": "y"}}),
        ("head is a string", "pull_request_sync", pull | {"pull_request": {"head": "x"}}),
        ("ref is a number", "push", push | {"ref": 5}),
        ("no after", "push", {key: value for key, value in push.items() if key != "after"}),
        ("sender is a string", "push", push | {"sender": "bob"}),
    ]


async def test_bodies_of_the_wrong_shape_get_400_and_change_nothing(board: Board) -> None:
    answers = {}
    for what, event, payload in plane_shapes(board.project_id):
        body = json.dumps(payload).encode()
        answer = await board.post("plane", body, plane_headers(body, event=event))
        answers[f"plane: {what}"] = answer[0]
    for what, event_type, payload in gitea_shapes():
        body = go_json(payload)
        answers[f"gitea: {what}"] = (
            await board.post("gitea", body, gitea_headers(body, event_type))
        )[0]
    await board.settle()

    assert answers == {what: 400 for what in answers}
    assert await board.engine.store.fetchall("SELECT id FROM webhook_deliveries") == []
    assert await board.engine.store.list_tasks() == []
    # the same bodies with every field of the right type are accepted
    body = json.dumps(plane_update(board.project_id)).encode()
    assert (await board.post("plane", body, plane_headers(body)))[0] == 200
    for event_type, payload in GITEA_BODIES.items():
        body = go_json(payload)
        assert (await board.post("gitea", body, gitea_headers(body, event_type)))[0] == 200


async def test_unknown_events_and_projects_are_logged_and_change_nothing(
    board: Board, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.webhooks")
    elsewhere = board.plane.create_project("ELSE", "Not Conveyor's")
    other = board.plane.create_issue(elsewhere, "Elsewhere", DESCRIPTION, "In Progress")
    cycle = json.dumps({"event": "cycle", "action": "created", "data": {"id": "c-1"}}).encode()
    status = go_json(
        {"sha": "b" * 40, "context": "ci", "state": "success", "repository": {"full_name": "x/y"}}
    )
    push = go_json({"ref": "refs/heads/x", "after": "c" * 40, "repository": {"full_name": "x/y"}})
    merged = go_json(
        {
            "action": "closed",
            "number": 3,
            "pull_request": {"merged": True, "head": GITEA_HEAD},
            "repository": {"full_name": "x/y"},
        }
    )
    release = go_json({"action": "published", "repository": GITEA_REPO})
    await board.settle()  # the sandbox's own delivery of the issue created elsewhere
    plane_before = await board.deliveries("plane")
    caplog.clear()
    posts = [
        ("plane", body := state_change(other), plane_headers(body)),
        ("plane", cycle, plane_headers(cycle, event="cycle")),
        ("gitea", status, gitea_headers(status, "status")),
        ("gitea", push, gitea_headers(push, "push")),
        ("gitea", merged, gitea_headers(merged, "pull_request")),
        ("gitea", release, gitea_headers(release, "release", event="release")),
    ]
    for source, body, headers in posts:
        assert await board.post(source, body, headers) == (200, {"ok": True, "duplicate": False})
    await board.settle()

    assert await board.engine.store.list_tasks() == []
    assert await board.deliveries("plane") == [
        *plane_before,
        {"event": "issue.state", "outcome": "unknown project"},
        {"event": "cycle.created", "outcome": "ignored"},
    ]
    assert await board.deliveries("gitea") == [
        {"event": "status", "outcome": "unknown project"},
        {"event": "push", "outcome": "unknown project"},
        {"event": "pull_request", "outcome": "unknown project"},
        {"event": "release", "outcome": "ignored"},
    ]
    lines = sorted(r.getMessage() for r in caplog.records if "not acted on" in r.getMessage())
    unknown, no_effect = "not acted on: unknown project", "Conveyor does not act on this event"
    expected = [
        ("gitea webhook pull_request (", "repository x/y", unknown),
        ("gitea webhook push (", "repository x/y", unknown),
        ("gitea webhook release (", "repository team/app", no_effect),
        ("gitea webhook status (", "repository x/y, sha " + "b" * 40, unknown),
        ("plane webhook cycle.created (", "item c-1", no_effect),
        ("plane webhook issue.state (", f"project {elsewhere}, item {other['id']}", unknown),
    ]
    assert len(lines) == len(expected)
    for line, (event, subject, why) in zip(lines, expected, strict=True):
        assert line.startswith(event) and subject in line and line.endswith(why), line


# --- Plane: what the board says -------------------------------------------------------------


async def test_comments_never_drive_the_pipeline(board: Board) -> None:
    issue, task = await board.awaiting_approval()
    await board.settle()
    before = await board.engine.store.events(task.id)

    board.plane.add_comment(issue["id"], "<p>/approve — Approved!</p>", as_user="developer bot")
    board.plane.add_comment(issue["id"], "<p>In Progress</p>", as_user=board.human)
    await board.settle()

    assert await board.engine.store.events(task.id) == before
    outcomes = await board.engine.store.fetchall(
        "SELECT outcome FROM webhook_deliveries WHERE event LIKE 'issue_comment%'"
    )
    # ours, the bot's and the person's: all recorded, none acted on
    assert len(outcomes) >= 2 and {row["outcome"] for row in outcomes} == {"ignored"}


@pytest.fixture
async def telegram() -> AsyncIterator[TelegramSandbox]:
    async with TelegramSandbox(TOKEN, group_per_minute=6000, private_per_second=100) as server:
        yield server


async def test_approve_in_telegram_then_approved_in_plane_advances_once(
    tmp_path, make_settings, notifier, agent_env, telegram: TelegramSandbox
) -> None:
    board, close = await open_board(tmp_path, make_settings, notifier, "success", telegram=telegram)
    try:
        issue, task = await board.awaiting_approval()
        assert await press(board, task.id, "Approve") == "Done."
        board.move(issue["id"], "Approved")  # the person also moves the card, a moment later
        await board.settle()
        task = await board.until(task.id, Status.DONE)

        events = await board.engine.store.events(task.id)
        (approved,) = [e for e in events if e.kind == "approved"]
        assert str(ADMIN) in (approved.actor or "")
        runs = await board.engine.store.agent_runs(task.id)
        assert [r.role for r in runs].count("architect") == 1
        (outcome,) = await state_deliveries(board, "Approved")
        assert outcome.startswith("no change: the task is")
    finally:
        await close()


async def test_a_rejection_carries_the_comment_into_the_analysts_prompt(board: Board) -> None:
    issue, task = await board.awaiting_approval()
    board.plane.add_comment(
        issue["id"], "<p>Please cover the <b>error</b> page &amp; the 404.</p>", as_user=board.human
    )
    board.move(issue["id"], "Rejected")
    await board.settle()

    run = await analyst_run(board, task.id, 2)
    assert "Please cover the error page & the 404." in Path(run.prompt_path).read_text()
    rejected = [e for e in await board.engine.store.events(task.id) if e.kind == "rejected"]
    assert rejected[0].actor == "plane:alice"


async def test_a_rejection_without_a_comment_uses_the_fixed_note(board: Board) -> None:
    issue, task = await board.awaiting_approval()
    assert board.plane.comments(issue["id"])  # the analyst's own finish comment is there
    board.move(issue["id"], "Rejected")
    await board.settle()

    run = await analyst_run(board, task.id, 2)
    assert REJECTED_WITHOUT_COMMENT in Path(run.prompt_path).read_text()
    (rejected,) = [e for e in await board.engine.store.events(task.id) if e.kind == "rejected"]
    assert rejected.detail == REJECTED_WITHOUT_COMMENT


async def analyst_run(board: Board, task_id: int, number: int, finished: bool = True):
    """The `number`-th analyst run of the task, once it exists (and has finished)."""

    async def loop():
        while True:
            runs = [r for r in await board.engine.store.agent_runs(task_id) if r.role == "analyst"]
            run = runs[number - 1] if len(runs) >= number else None
            if run is not None and (run.finished_at if finished else run.pid):
                return run
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(loop(), HANG_GUARD_S)


async def test_needs_input_answered_then_in_progress_relaunches_the_analyst_once(
    board: Board, agent_env
) -> None:
    agent_env(analyst="negative,hang")  # questions first; the second run is still working
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.NEEDS_INPUT)
    await board.board_state(issue["id"], "Needs Input")

    board.plane.add_comment(issue["id"], "<p>Only admins. Reject empty input.</p>", board.human)
    board.move(issue["id"], "In Progress")
    await board.settle()
    run = await analyst_run(board, task.id, 2, finished=False)  # started: its prompt is written
    (prompt,) = (board.settings.workdir / "runs" / task.work_item).glob(f"{run.id:05d}-*.prompt.md")
    assert "Only admins. Reject empty input." in prompt.read_text()
    events = await board.engine.store.events(task.id)
    assert [e.kind for e in events].count("answered") == 1

    # moved again while the analyst works: its active job is left alone
    board.move(issue["id"], "Backlog")
    board.move(issue["id"], "In Progress")
    await board.settle()

    assert await board.engine.store.events(task.id) == events
    assert await jobs_of(board, task.id, Stage.ANALYSIS) == 2
    assert (await state_deliveries(board, "In Progress"))[-2:] == ["answers given", "task exists"]


async def test_a_payload_without_name_or_description_makes_conveyor_fetch_the_issue(
    board: Board,
) -> None:
    issue = board.issue(name="Fetched from the API", state="In Progress")
    body = state_change(issue, name=DROP, description_html=DROP, description_stripped=DROP)
    assert (await board.post("plane", body, plane_headers(body)))[0] == 200
    await board.settle()

    task = await board.task_of(issue["id"])
    assert task.title == "Fetched from the API"
    assert task.description == "Return a greeting from GET /hello."
    fetched = [
        call
        for call in board.plane.api_log
        if call.method == "GET" and call.path.endswith(f"/work-items/{issue['id']}/")
    ]
    assert fetched and fetched[0].status == 200


async def test_an_issue_without_a_description_is_not_started_and_says_why(board: Board) -> None:
    issue = board.plane.create_issue(board.project_id, "Empty", "<p></p>", as_user=board.human)
    board.move(issue["id"], "In Progress")
    await board.settle()
    assert await board.engine.store.list_tasks() == []
    (comment,) = board.plane.comments(issue["id"])
    assert "description is empty" in comment["comment_html"]


async def test_a_renamed_in_progress_state_is_recognised_by_its_group(board: Board) -> None:
    board.plane.rename_state(board.project_id, "In Progress", "Doing")
    assert "In Progress" not in {state["name"] for state in board.plane.states(board.project_id)}
    issue = board.issue()
    board.move(issue["id"], "Doing")
    task = await board.task_of(issue["id"])
    assert task.tracker_issue_id == issue["id"]
    await board.until(task.id, Status.AWAITING_APPROVAL)
    await board.board_state(issue["id"], "In Review")
    assert (await state_deliveries(board, "Doing"))[0] == "started"


# --- Gitea: what the forge says -------------------------------------------------------------


async def test_a_status_webhook_for_the_head_moves_development_to_review(
    tmp_path, make_settings, agent_env
) -> None:
    board, close = await open_board(tmp_path, make_settings, RecordingNotifier(), ci_state=None)
    try:
        issue, task = await board.awaiting_approval()
        board.move(issue["id"], "Approved")
        task = await board.until(task.id, Status.ACTIVE, stage=Stage.DEVELOPMENT)
        await board.settle()
        assert task.stage == Stage.DEVELOPMENT  # waiting for CI to report on the head
        other_sha = await board.gitea.branch_sha("team", "app", "main")
        await board.gitea.set_status("team", "app", task.head_sha, "pending")
        await board.gitea.set_status("team", "app", other_sha, "success")
        await board.settle()
        assert (await board.engine.store.get_task(task.id)).stage == Stage.DEVELOPMENT

        await board.gitea.set_status("team", "app", task.head_sha, "success")
        await board.settle()
        events = await board.engine.store.events(task.id)
        red = [e for e in events if e.kind == "gate_red"]
        assert red and "waiting for CI" in red[0].detail
        advanced = [
            e for e in events if e.kind == "advanced" and e.from_state == "development/active"
        ]
        assert advanced and advanced[0].to_state == "review/active"
        assert "CI green" in advanced[0].detail
        await board.until(task.id, Status.DONE)
    finally:
        await close()


async def test_a_status_for_a_sha_two_development_tasks_could_own_is_not_resolved(
    tmp_path, make_settings, agent_env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.webhooks")
    board, close = await open_board(tmp_path, make_settings, RecordingNotifier(), ci_state=None)
    try:
        waiting = []
        for name in ("First change", "Second change"):
            issue, task = await board.awaiting_approval(name)
            board.move(issue["id"], "Approved")
            waiting.append(await board.until(task.id, Status.ACTIVE, stage=Stage.DEVELOPMENT))
        await board.settle()
        before = [await board.engine.store.events(task.id) for task in waiting]
        main_sha = await board.gitea.branch_sha("team", "app", "main")
        assert main_sha not in {task.head_sha for task in waiting}

        await board.gitea.set_status("team", "app", main_sha, "success")
        await board.settle()

        assert [await board.engine.store.events(task.id) for task in waiting] == before
        rows = await board.engine.store.fetchall(
            "SELECT payload, outcome FROM webhook_deliveries WHERE event = 'status'"
        )
        (outcome,) = [r["outcome"] for r in rows if json.loads(r["payload"])["sha"] == main_sha]
        assert outcome == AMBIGUOUS_SHA
        (line,) = [r.getMessage() for r in caplog.records if f"sha {main_sha}" in r.getMessage()]
        assert "gitea webhook status" in line and line.endswith(f"not acted on: {AMBIGUOUS_SHA}")
    finally:
        await close()


async def test_a_merged_pr_at_the_deploy_stage_releases_the_lease_and_waits_for_the_deployer(
    board: Board, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_AGENT_DELAY_S", "2")  # the deployer is still at work below
    issue, task = await board.awaiting_approval()
    board.move(issue["id"], "Approved")

    async def deployer_running() -> bool:
        runs = await board.engine.store.agent_runs(task.id)
        return any(r.role == "deployer" and r.finished_at is None for r in runs)

    await wait_until(deployer_running, "the deployer to start")
    task = await board.engine.store.get_task(task.id)
    holder = await board.engine.store.fetchone(
        "SELECT task_id FROM merge_leases WHERE repo = 'team/app'"
    )
    assert task.stage == Stage.DEPLOY and holder["task_id"] == task.id

    body = await merged_pr_body(board, task)
    headers = gitea_headers(body, "pull_request")
    assert (await board.post("gitea", body, headers))[0] == 200
    await board.settle()

    assert await board.engine.store.fetchone("SELECT * FROM merge_leases") is None
    after = await board.engine.store.get_task(task.id)
    assert (after.stage, after.status) == (Stage.DEPLOY, Status.ACTIVE)
    assert await deployer_running()  # the webhook arrived while the deployer worked
    (released,) = [
        e for e in await board.engine.store.events(task.id) if e.kind == "lease_released"
    ]
    assert released.actor == "gitea:bob"
    assert await board.outcome(headers) == "lease released"

    done = await board.until(task.id, Status.DONE)  # the deployer's verdict decides
    (finished,) = [e for e in await board.engine.store.events(task.id) if e.kind == "done"]
    assert finished.actor is None and "merged into main" in finished.detail
    assert done.merge_sha == await board.gitea.branch_sha("team", "app", "main")


async def test_a_merged_pr_before_the_deploy_stage_marks_the_task_done(board: Board) -> None:
    issue, task = await board.awaiting_approval()
    await board.engine.tracker.idle()
    task = await board.engine.store.get_task(task.id)
    assert task.pr_number is not None

    body = await merged_pr_body(board, task)
    assert (await board.post("gitea", body, gitea_headers(body, "pull_request")))[0] == 200
    await board.settle()

    task = await board.engine.store.get_task(task.id)
    assert (task.stage, task.status, task.merge_sha) == (Stage.DONE, Status.DONE, "f" * 40)
    (done,) = [e for e in await board.engine.store.events(task.id) if e.kind == "done"]
    assert done.actor == "gitea:bob" and done.from_state == "analysis/awaiting_approval"


async def test_a_late_push_webhook_never_winds_the_head_back(board: Board) -> None:
    issue, task = await board.awaiting_approval()
    task = await board.engine.store.get_task(task.id)

    def push(before: str, after: str) -> bytes:
        return go_json(
            {
                "ref": f"refs/heads/{task.branch}",
                "before": before,
                "after": after,
                "repository": {"full_name": "team/app"},
            }
        )

    stale = push("0" * 40, "1" * 40)  # an older push, delivered late
    await board.post("gitea", stale, gitea_headers(stale, "push"))
    await board.settle()
    assert (await board.engine.store.get_task(task.id)).head_sha == task.head_sha
    human = push(task.head_sha, "2" * 40)  # someone pushed on top of our head
    await board.post("gitea", human, gitea_headers(human, "push"))
    await board.settle()
    assert (await board.engine.store.get_task(task.id)).head_sha == "2" * 40


async def test_without_x_gitea_event_type_the_x_gitea_event_header_is_used(board: Board) -> None:
    issue, task = await board.awaiting_approval()
    task = await board.engine.store.get_task(task.id)
    body = go_json(
        {
            "ref": f"refs/heads/{task.branch}",
            "before": task.head_sha,
            "after": "3" * 40,
            "repository": {"full_name": "team/app"},
        }
    )
    headers = gitea_headers(body, "push", event="push")
    assert "X-Gitea-Event-Type" not in headers

    assert (await board.post("gitea", body, headers))[0] == 200
    await board.settle()

    assert (await board.engine.store.get_task(task.id)).head_sha == "3" * 40
    assert await board.outcome(headers) == "head recorded"


# --- durability and start-up ------------------------------------------------------------------


async def test_a_delivery_recorded_but_not_processed_is_processed_at_the_next_start(
    board: Board,
) -> None:
    issue = board.issue()
    (delivery,) = await board.capture(lambda: board.move(issue["id"], "In Progress"))
    headers = forwarded(delivery)
    envelope = plane_envelope(headers, json.loads(delivery.body))
    # the answer was durable, then the process died before processing it
    row = await board.engine.intake.record(
        "plane", headers["X-Plane-Delivery"], envelope, delivery.body
    )
    assert row is not None
    assert await board.engine.store.list_tasks() == []
    await board.stop()

    await board.serve()  # the next start, on the same database
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    recorded = await board.engine.store.fetchone(
        "SELECT processed_at, outcome FROM webhook_deliveries WHERE id = ?", (row,)
    )
    assert recorded["processed_at"] is not None and recorded["outcome"] == "started"


def conveyor_env(tmp_path: Path, remote: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SANDBOX_"))}
    return env | {
        "ORCH_DB_PATH": str(tmp_path / "conveyor.db"),
        "ORCH_WORKDIR": str(tmp_path / "work"),
        "ORCH_PROJECTS": json.dumps([{"key": "ORCH", "remote": str(remote)}]),
        "ORCH_AGENT_COMMAND": SANDBOX_AGENT,
        "ORCH_RECONCILE_ENABLED": "false",
        "ORCH_PLANE_API_URL": "http://127.0.0.1:9",
        "ORCH_PLANE_API_TOKEN": "plane_api_x",
        "ORCH_PLANE_WORKSPACE": "acme",
        **extra,
    }


def test_run_refuses_to_start_with_webhooks_and_no_secret(tmp_path: Path, remote: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot.cli", "run"],
        cwd=tmp_path,
        env=conveyor_env(tmp_path, remote),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ORCH_PLANE_WEBHOOK_SECRET: is required" in result.stderr
    assert "ORCH_ALLOW_UNSIGNED_WEBHOOKS=true" in result.stderr
    assert not (tmp_path / "conveyor.db").exists()


def spawn_run(tmp_path: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def test_run_with_unsigned_webhooks_allowed_warns_and_accepts_them(
    tmp_path: Path, remote: Path
) -> None:
    port = free_port()
    env = conveyor_env(
        tmp_path, remote, ORCH_ALLOW_UNSIGNED_WEBHOOKS="true", ORCH_HTTP_PORT=str(port)
    )
    log_path = tmp_path / "conveyor.log"
    process = spawn_run(tmp_path, env, log_path)
    try:

        async def listening() -> bool:
            return "conveyor listening" in log_path.read_text()

        await wait_until(listening, "conveyor to listen")
        body = json.dumps({"event": "cycle", "action": "created", "data": {"id": "c"}}).encode()
        headers = {"Content-Type": "application/json", "X-Plane-Event": "cycle"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/webhooks/plane", data=body, headers=headers
            ) as r,
        ):
            assert r.status == 200
        process.send_signal(signal.SIGTERM)
        assert await exit_code(process) == 0
    finally:
        await stop_process(process)
    assert "ORCH_ALLOW_UNSIGNED_WEBHOOKS is on: unsigned webhooks are accepted" in (
        log_path.read_text()
    )
