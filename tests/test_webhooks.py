"""Plane and Gitea over HTTP: signed webhooks into the running app, the board and the forge
kept in sync, against the sandbox servers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engine.api import add_routes
from engine.runtime import Engine
from engine.sandbox.gitea import GiteaSandbox
from engine.sandbox.plane import PlaneSandbox
from engine.stages import Stage, Status
from engine.store import Task
from engine.webhooks import MAX_BODY_BYTES
from tests.conftest import HANG_GUARD_S, RecordingNotifier

PLANE_TOKEN = "plane_api_conveyor"
PLANE_SECRET = "plane_wh_secret"
GITEA_TOKEN = "gitea_conveyor"
GITEA_SECRET = "gitea_wh_secret"
BOT_TOKENS = {"developer": "plane_api_developer_bot", "reviewer": "plane_api_reviewer_bot"}
DESCRIPTION = "<p>Return a <b>greeting</b> from GET /hello.</p>"


@dataclass
class Board:
    engine: Engine
    plane: PlaneSandbox
    gitea: GiteaSandbox
    project_id: str
    human: str
    url: str
    notifier: RecordingNotifier

    async def settle(self) -> None:
        await self.plane.drain()
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
                task = await self.engine.store.get_task(task_id)
                resting = not await self.engine.has_active_job(task_id)
                if task.status in statuses and resting and stage in (None, task.stage):
                    return task
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(loop(), HANG_GUARD_S)

    async def board_state(self, issue_id: str, name: str) -> None:
        async def loop() -> None:
            while self.plane.state_name(issue_id) != name:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(loop(), HANG_GUARD_S)

    async def post(self, source: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/webhooks/{source}", data=body, headers=headers) as r,
        ):
            try:
                return r.status, await r.json(content_type=None)
            except ValueError:
                return r.status, {}


def plane_headers(body: bytes, delivery: str | None = None, secret: str = PLANE_SECRET) -> dict:
    return {
        "Content-Type": "application/json",
        "X-Plane-Event": "issue",
        "X-Plane-Delivery": delivery or str(uuid.uuid4()),
        "X-Plane-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }


def state_change(issue: dict, field: str = "state_id") -> bytes:
    payload = {
        "event": "issue",
        "action": "updated",
        "webhook_id": str(uuid.uuid4()),
        "workspace_id": str(uuid.uuid4()),
        "data": issue,
        "activity": {
            "field": field,
            "old_value": None,
            "new_value": issue["state"]["id"],
            "actor": {"id": "u1", "display_name": "alice"},
        },
    }
    return json.dumps(payload).encode()


async def open_board(tmp_path: Path, make_settings, notifier, ci_state: str | None, **extra):
    plane = PlaneSandbox(workspace="acme", api_token=PLANE_TOKEN, rate_limit=None)
    await plane.start()
    project_id = plane.create_project("ORCH", "Orchestrator")
    human = plane.add_bot("plane_api_alice", "alice")
    for role, token in BOT_TOKENS.items():
        plane.add_bot(token, f"{role} bot")
    gitea = GiteaSandbox(tmp_path / "forge", token=GITEA_TOKEN, ci_state=ci_state)
    await gitea.start()
    repo = await gitea.create_repo("team", "app")
    settings = make_settings(
        projects=[
            {
                "key": "ORCH",
                "remote": str(repo),
                "repo": "team/app",
                "plane_project_id": project_id,
            }
        ],
        plane_api_url=plane.base_url,
        plane_api_token=PLANE_TOKEN,
        plane_workspace="acme",
        plane_webhook_secret=PLANE_SECRET,
        plane_bot_developer=BOT_TOKENS["developer"],
        plane_bot_reviewer=BOT_TOKENS["reviewer"],
        gitea_url=gitea.base_url,
        gitea_token=GITEA_TOKEN,
        gitea_webhook_secret=GITEA_SECRET,
        gitea_public_url="https://git.example.com",
        locale="en",
        **extra,
    )
    engine = Engine(settings, notifier)
    notifier.engine = engine
    notifier.auto_approve = False
    await engine.open()
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    add_routes(app, engine)
    engine.intake.mount(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    plane.set_webhook(f"{url}/webhooks/plane", PLANE_SECRET)
    gitea.add_hook("team", "app", f"{url}/webhooks/gitea", GITEA_SECRET)
    engine.start_worker()
    board = Board(engine, plane, gitea, project_id, human, url, notifier)

    async def close() -> None:
        await runner.cleanup()
        await engine.close()
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


async def test_duplicate_and_replayed_deliveries_start_one_task(board: Board) -> None:
    issue = board.issue(state="Backlog")
    board.plane.move_issue(issue["id"], "In Progress", via="web", as_user=board.human)
    await board.settle()
    body = state_change(board.plane.issue(issue["id"]))
    delivery = str(uuid.uuid4())
    answers = await asyncio.gather(
        *(board.post("plane", body, plane_headers(body, delivery)) for _ in range(50))
    )
    assert {status for status, _ in answers} == {200}
    status, answer = await board.post("plane", body, plane_headers(body))  # a new delivery id
    assert status == 200 and answer["duplicate"]
    await board.settle()

    assert len(await board.engine.store.list_tasks()) == 1
    task = await board.task_of(issue["id"])
    jobs = await board.engine.store.fetchall(
        "SELECT * FROM jobs WHERE task_id = ? AND stage = 'analysis'", (task.id,)
    )
    assert len(jobs) == 1
    created = [e for e in await board.engine.store.events(task.id) if e.kind == "created"]
    assert len(created) == 1


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


async def test_comments_never_drive_the_pipeline(board: Board) -> None:
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    await board.settle()
    before = await board.engine.store.events(task.id)

    bot = next(u for u in ("developer bot",))
    board.plane.add_comment(issue["id"], "<p>/approve — Approved!</p>", as_user=bot)
    board.plane.add_comment(issue["id"], "<p>In Progress</p>", as_user=board.human)
    await board.settle()

    assert await board.engine.store.events(task.id) == before
    outcomes = await board.engine.store.fetchall(
        "SELECT outcome FROM webhook_deliveries WHERE event LIKE 'issue_comment%'"
    )
    # ours, the bot's and the person's: all recorded, none acted on
    assert len(outcomes) >= 2 and {row["outcome"] for row in outcomes} == {"ignored"}


async def test_approve_in_telegram_then_approved_in_plane_advances_once(board: Board) -> None:
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    assert (await board.engine.pipeline.approve(task.id, actor="@alice (42)")).changed
    board.move(issue["id"], "Approved")
    await board.settle()
    await board.until(task.id, Status.DONE)
    kinds = [e.kind for e in await board.engine.store.events(task.id)]
    assert kinds.count("approved") == 1
    architects = [r for r in await board.engine.store.agent_runs(task.id) if r.role == "architect"]
    assert len(architects) == 1


async def test_a_rejection_carries_the_comment_into_the_analysts_prompt(board: Board) -> None:
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    board.plane.add_comment(
        issue["id"], "<p>Please cover the <b>error</b> page &amp; the 404.</p>", as_user=board.human
    )
    board.move(issue["id"], "Rejected")
    await board.settle()

    async def second_analyst_run():
        while True:
            runs = [r for r in await board.engine.store.agent_runs(task.id) if r.role == "analyst"]
            if len(runs) == 2 and runs[1].finished_at:
                return runs[1]
            await asyncio.sleep(0.05)

    run = await asyncio.wait_for(second_analyst_run(), HANG_GUARD_S)
    assert "Please cover the error page & the 404." in Path(run.prompt_path).read_text()
    rejected = [e for e in await board.engine.store.events(task.id) if e.kind == "rejected"]
    assert rejected[0].actor == "plane:alice"


async def test_a_renamed_in_progress_state_is_recognised_by_its_group(board: Board) -> None:
    board.plane.add_state(board.project_id, "Doing", "started")
    issue = board.issue()
    board.move(issue["id"], "Doing")
    task = await board.task_of(issue["id"])
    assert task.tracker_issue_id == issue["id"]


async def test_an_issue_without_a_description_is_not_started_and_says_why(board: Board) -> None:
    issue = board.plane.create_issue(board.project_id, "Empty", "<p></p>", as_user=board.human)
    board.move(issue["id"], "In Progress")
    await board.settle()
    assert await board.engine.store.list_tasks() == []
    (comment,) = board.plane.comments(issue["id"])
    assert "description is empty" in comment["comment_html"]


async def test_a_status_webhook_for_the_head_moves_development_to_review(
    tmp_path, make_settings, agent_env
) -> None:
    notifier = RecordingNotifier()
    board, close = await open_board(tmp_path, make_settings, notifier, ci_state=None)
    try:
        issue = board.issue()
        board.move(issue["id"], "In Progress")
        task = await board.task_of(issue["id"])
        await board.until(task.id, Status.AWAITING_APPROVAL)
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


async def test_a_merged_pr_at_the_deploy_stage_does_not_finish_the_task(
    board: Board, agent_env
) -> None:
    agent_env(deployer="crash")
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    board.move(issue["id"], "Approved")
    task = await board.until(task.id, Status.FAILED)
    assert task.stage == Stage.DEPLOY and task.pr_number

    payload = {
        "action": "closed",
        "number": task.pr_number,
        "pull_request": {
            "number": task.pr_number,
            "merged": True,
            "merge_commit_sha": "f" * 40,
            "head": {"ref": task.branch, "sha": task.head_sha},
        },
        "repository": {"full_name": "team/app"},
        "sender": {"login": "bob"},
    }
    body = json.dumps(payload, indent=2).encode()
    headers = {
        "X-Gitea-Event": "pull_request",
        "X-Gitea-Event-Type": "pull_request",
        "X-Gitea-Delivery": str(uuid.uuid4()),
        "X-Gitea-Signature": hmac.new(GITEA_SECRET.encode(), body, hashlib.sha256).hexdigest(),
    }
    assert (await board.post("gitea", body, headers))[0] == 200
    await board.settle()
    after = await board.engine.store.get_task(task.id)
    assert (after.stage, after.status) == (Stage.DEPLOY, Status.FAILED)


async def test_a_plane_outage_leaves_the_pipeline_running_and_the_sync_catches_up(
    board: Board,
) -> None:
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    await board.engine.pipeline.approve(task.id, actor="@alice (42)")  # from Telegram
    port = int(board.plane.base_url.rsplit(":", 1)[1])
    await board.plane.stop()  # Plane is down while the task runs
    task = await board.until(task.id, Status.DONE)

    async def sync_failed() -> None:
        query = "SELECT failures FROM tracker_sync WHERE task_id = ?"
        while not ((row := await board.engine.store.fetchone(query, (task.id,))) and row[0]):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(sync_failed(), HANG_GUARD_S)  # the sync noticed, and will retry
    await board.plane.start(port=port)
    await board.engine.tracker.task_changed(task.id)  # the retry, without waiting for backoff
    await board.board_state(issue["id"], "Done")


async def test_a_late_push_webhook_never_winds_the_head_back(board: Board) -> None:
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    task = await board.engine.store.get_task(task.id)

    def push(before: str, after: str) -> bytes:
        return json.dumps(
            {
                "ref": f"refs/heads/{task.branch}",
                "before": before,
                "after": after,
                "repository": {"full_name": "team/app"},
            },
            indent=2,
        ).encode()

    def headers(body: bytes) -> dict:
        return {
            "X-Gitea-Event": "push",
            "X-Gitea-Event-Type": "push",
            "X-Gitea-Delivery": str(uuid.uuid4()),
            "X-Gitea-Signature": hmac.new(GITEA_SECRET.encode(), body, hashlib.sha256).hexdigest(),
        }

    stale = push("0" * 40, "1" * 40)  # an older push, delivered late
    await board.post("gitea", stale, headers(stale))
    await board.settle()
    assert (await board.engine.store.get_task(task.id)).head_sha == task.head_sha
    human = push(task.head_sha, "2" * 40)  # someone pushed on top of our head
    await board.post("gitea", human, headers(human))
    await board.settle()
    assert (await board.engine.store.get_task(task.id)).head_sha == "2" * 40
