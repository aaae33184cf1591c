"""The Plane sandbox behaves like the real Plane (shared/reference/plane-gitea.md §1-3)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from engine.sandbox.plane import CONVEYOR_STATES, PlaneSandbox

ROOT = Path(__file__).resolve().parent.parent
MAIN = "plane_api_main"
BOT = "plane_api_developer"
SECRET = "plane_wh_test_secret"


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class WebhookReceiver:
    """A small aiohttp app in place of Conveyor's /webhooks/plane; answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[Received] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/webhooks/plane", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/webhooks/plane"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read()))
        return web.Response(status=self.status)

    def fields(self) -> list[str | None]:
        return [r.payload["activity"]["field"] for r in self.received]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/webhooks/plane"


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
async def sandbox(receiver: WebhookReceiver) -> AsyncIterator[PlaneSandbox]:
    async with PlaneSandbox(
        webhook_url=receiver.url, webhook_secret=SECRET, rate_limit=None, retry_backoff_s=0
    ) as box:
        yield box


@pytest.fixture
def project(sandbox: PlaneSandbox) -> str:
    return sandbox.create_project("ORCH", "Orchestrator")


@pytest.fixture
async def api(sandbox: PlaneSandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"{sandbox.base_url}/api/v1/workspaces/acme/", headers={"X-Api-Key": MAIN}
    ) as client:
        yield client


def items(project_id: str, issue_id: str | None = None, kind: str = "work-items") -> str:
    path = f"projects/{project_id}/{kind}/"
    return f"{path}{issue_id}/" if issue_id else path


# --- webhooks ------------------------------------------------------------------------------


async def test_signature_is_hmac_of_the_raw_body(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver
) -> None:
    sandbox.create_issue(project, "Add a greeting", "<p>Say hello</p>")
    await sandbox.drain()

    [hit] = receiver.received
    expected = hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
    assert hit.headers["X-Plane-Signature"] == expected
    assert hit.body == json.dumps(hit.payload).encode()  # default json.dumps separators
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["User-Agent"] == "Autopilot"
    assert hit.headers["X-Plane-Event"] == "issue"
    uuid.UUID(hit.headers["X-Plane-Delivery"])


async def test_created_issue_sends_action_created_with_the_full_issue(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver
) -> None:
    issue = sandbox.create_issue(project, "Add a greeting", "<p>Say <b>hello</b></p>")
    await sandbox.drain()

    payload = receiver.received[0].payload
    assert payload["event"] == "issue"
    assert payload["action"] == "created"
    assert payload["webhook_id"] == sandbox.webhook.id
    assert payload["workspace_id"] == sandbox.workspace["id"]
    assert payload["activity"]["field"] is None
    assert payload["activity"]["actor"]["id"] == sandbox.main_user_id
    data = payload["data"]
    assert data["id"] == issue["id"]
    assert data["project"] == project
    assert data["state"] == {
        "id": sandbox.state_id(project, "Backlog"),
        "name": "Backlog",
        "color": "#60646C",
        "group": "backlog",
    }
    assert data["description_html"] == "<p>Say <b>hello</b></p>"
    assert data["description_stripped"] == "Say hello"
    assert data["sequence_id"] == 1
    assert data["labels"] == [] and data["assignees"] == []
    assert "project_id" not in data and "state_id" not in data


async def test_patch_of_two_fields_sends_two_deliveries_with_the_full_issue(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Old title")
    await sandbox.drain()
    receiver.received.clear()
    in_review = sandbox.state_id(project, "In Review")

    answer = await api.patch(items(project, issue["id"]), json={"name": "New", "state": in_review})
    await sandbox.drain()

    assert answer.status_code == 200
    assert answer.json()["state"] == in_review  # a UUID string without ?expand=state
    assert sorted(receiver.fields()) == ["name", "state"]
    ids = {hit.headers["X-Plane-Delivery"] for hit in receiver.received}
    assert len(ids) == 2
    for hit in receiver.received:
        data = hit.payload["data"]
        assert data["name"] == "New"
        assert data["state"]["name"] == "In Review"
        assert data["state"]["group"] == "started"
    by_field = {
        hit.payload["activity"]["field"]: hit.payload["activity"] for hit in receiver.received
    }
    assert by_field["state"]["old_value"] == sandbox.state_id(project, "Backlog")
    assert by_field["state"]["new_value"] == in_review
    assert by_field["name"]["old_value"] == "Old title"


async def test_unchanged_value_sends_nothing(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Same")
    backlog = sandbox.state_id(project, "Backlog")

    answer = await api.patch(items(project, issue["id"]), json={"state": backlog, "name": "Same"})
    await sandbox.drain()

    assert answer.status_code == 200
    assert [hit.payload["action"] for hit in receiver.received] == ["created"]


@pytest.mark.parametrize(("via", "field"), [("web", "state_id"), ("api", "state")])
async def test_state_field_name_depends_on_who_moved_the_card(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver, via: str, field: str
) -> None:
    issue = sandbox.create_issue(project, "Move me")

    sandbox.move_issue(issue["id"], "In Progress", via=via)
    await sandbox.drain()

    assert receiver.fields() == [None, field]
    activity = receiver.received[1].payload["activity"]
    assert activity["new_value"] == sandbox.state_id(project, "In Progress")
    assert receiver.received[1].payload["data"]["state"]["name"] == "In Progress"
    assert sandbox.state_name(issue["id"]) == "In Progress"


async def test_comment_sends_issue_comment_event(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver, api: httpx.AsyncClient
) -> None:
    bot_id = sandbox.add_bot(BOT, "Developer")
    issue = sandbox.create_issue(project, "Discuss")

    answer = await api.post(
        items(project, issue["id"]) + "comments/",
        json={"comment_html": "<p>Working on it</p>", "access": "INTERNAL"},
        headers={"X-Api-Key": BOT},
    )
    await sandbox.drain()

    assert answer.status_code == 201
    comment = answer.json()
    assert comment["actor"] == bot_id
    assert comment["created_by"] == bot_id
    hit = receiver.received[-1]
    assert hit.headers["X-Plane-Event"] == "issue_comment"
    payload = hit.payload
    assert (payload["event"], payload["action"]) == ("issue_comment", "created")
    assert payload["data"]["id"] == comment["id"]
    assert payload["data"]["issue"] == issue["id"]
    assert payload["data"]["comment_html"] == "<p>Working on it</p>"
    assert "comment_stripped" not in payload["data"]
    assert payload["activity"]["actor"]["display_name"] == "Developer"


async def test_comment_author_is_the_bot_whose_key_posted_it(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    bot_id = sandbox.add_bot(BOT, "Developer")
    issue = sandbox.create_issue(project, "Discuss")
    path = items(project, issue["id"]) + "comments/"

    await api.post(path, json={"comment_html": "<p>bot</p>"}, headers={"X-Api-Key": BOT})
    await api.post(path, json={"comment_html": "<p>human</p>"})
    listed = (await api.get(path)).json()

    assert [c["comment_html"] for c in listed["results"]] == ["<p>human</p>", "<p>bot</p>"]
    assert [c["actor"] for c in sandbox.comments(issue["id"])] == [bot_id, sandbox.main_user_id]
    assert all(c["is_member"] for c in listed["results"])


async def test_a_comment_with_a_used_external_id_is_refused_with_409(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Discuss")
    other = sandbox.create_issue(project, "Elsewhere")
    external = {"external_id": "run-7", "external_source": "conveyor"}
    body = {"comment_html": "<p>once</p>", **external}

    first = await api.post(items(project, issue["id"]) + "comments/", json=body)
    again = await api.post(items(project, issue["id"]) + "comments/", json=body)
    on_another_issue = await api.post(items(project, other["id"]) + "comments/", json=body)
    other_source = await api.post(
        items(project, issue["id"]) + "comments/", json=body | {"external_source": "github"}
    )
    without = [
        await api.post(items(project, issue["id"]) + "comments/", json={"comment_html": "<p/>"})
        for _ in range(2)
    ]

    assert first.status_code == 201
    assert {key: first.json()[key] for key in external} == external
    for refused in (again, on_another_issue):
        assert refused.status_code == 409
        assert refused.json() == {
            "error": "Issue Comment with the same external id and external source already exists",
            "id": first.json()["id"],
        }
    assert other_source.status_code == 201
    assert [answer.status_code for answer in without] == [201, 201]
    assert len(sandbox.comments(issue["id"])) == 4 and sandbox.comments(other["id"]) == []


async def test_delete_sends_no_webhook(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Short-lived")

    answer = await api.delete(items(project, issue["id"]))
    await sandbox.drain()

    assert answer.status_code == 204
    assert [hit.payload["action"] for hit in receiver.received] == ["created"]
    assert (await api.get(items(project, issue["id"]))).status_code == 404


async def test_error_answer_is_recorded_and_not_retried(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver
) -> None:
    receiver.status = 502

    sandbox.create_issue(project, "Unlucky")
    await sandbox.drain()

    assert len(receiver.received) == 1
    [delivery] = sandbox.deliveries
    assert (delivery.outcome, delivery.status, delivery.attempt) == ("http_error", 502, 0)
    assert sandbox.webhook_active


async def test_unreachable_receiver_is_retried_then_the_webhook_is_deactivated(
    sandbox: PlaneSandbox, project: str
) -> None:
    sandbox.set_webhook(closed_port_url(), SECRET)

    sandbox.create_issue(project, "Nobody listens")
    await sandbox.drain()

    attempts = sandbox.deliveries
    assert [d.attempt for d in attempts] == [0, 1, 2, 3, 4, 5]  # the first try and 5 retries
    assert {d.outcome for d in attempts} == {"connection_error"}
    assert len({d.delivery_id for d in attempts}) == 6
    assert not sandbox.webhook_active

    sandbox.create_issue(project, "After deactivation")
    await sandbox.drain()
    assert len(sandbox.deliveries) == 6


async def test_dropped_deliveries_are_never_sent(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver
) -> None:
    sandbox.drop_next(1)

    lost = sandbox.create_issue(project, "Lost")
    kept = sandbox.create_issue(project, "Kept")
    await sandbox.drain()

    assert [hit.payload["data"]["id"] for hit in receiver.received] == [kept["id"]]
    assert [d.outcome for d in sandbox.deliveries] == ["dropped", "delivered"]
    assert sandbox.deliveries[0].payload["data"]["id"] == lost["id"]


async def test_drop_rate_is_reproducible_with_a_seed(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver
) -> None:
    async def outcomes() -> list[str]:
        sandbox.deliveries.clear()
        sandbox.drop_rate(0.5, seed=7)
        for n in range(12):
            sandbox.create_issue(project, f"Issue {n}")
        await sandbox.drain()
        return [d.outcome for d in sandbox.deliveries]

    first, second = await outcomes(), await outcomes()

    assert first == second
    assert {"dropped", "delivered"} == set(first)
    assert len(receiver.received) == 2 * first.count("delivered")


async def test_fail_with_records_the_status_without_sending(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver
) -> None:
    sandbox.fail_with(503)
    sandbox.create_issue(project, "Refused")
    await sandbox.drain()
    sandbox.fail_with(None)
    sandbox.create_issue(project, "Accepted")
    await sandbox.drain()

    assert [(d.outcome, d.status) for d in sandbox.deliveries] == [
        ("http_error", 503),
        ("delivered", 200),
    ]
    assert len(receiver.received) == 1


# --- API v1 --------------------------------------------------------------------------------


async def test_states_list_excludes_triage_and_has_the_conveyor_board(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    page = (await api.get(f"projects/{project}/states/")).json()

    groups = {state["name"]: state["group"] for state in page["results"]}
    assert "Triage" not in groups
    assert groups["Backlog"] == "backlog" and groups["Done"] == "completed"
    assert all(groups[name] == group for name, group, _ in CONVEYOR_STATES)
    assert groups["Needs Input"] == "unstarted" and groups["Development"] == "started"
    assert page["total_results"] == 5 + len(CONVEYOR_STATES)


async def test_pagination_pages_through_with_cursors(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    created = [sandbox.create_issue(project, f"Issue {n}")["id"] for n in range(5)]

    pages, cursor = [], None
    while True:
        params = {"per_page": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.get(items(project), params=params)).json()
        pages.append(page)
        if not page["next_page_results"]:
            break
        cursor = page["next_cursor"]

    assert [page["count"] for page in pages] == [2, 2, 1]
    assert [page["next_cursor"] for page in pages] == ["2:1:0", "2:2:0", "2:3:0"]
    assert pages[0]["prev_cursor"] == "2:-1:1"
    assert [page["prev_page_results"] for page in pages] == [False, True, True]
    assert {(page["total_results"], page["total_pages"]) for page in pages} == {(5, 3)}
    listed = [issue["id"] for page in pages for issue in page["results"]]
    assert listed == created[::-1]  # newest first


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"per_page": 1001}, "Invalid per_page value. Cannot exceed 1000."),
        ({"per_page": "many"}, "Invalid per_page parameter."),
        ({"cursor": "garbage"}, "Invalid cursor parameter."),
        ({"cursor": "2:x:0"}, "Invalid cursor parameter."),
    ],
)
async def test_bad_pagination_is_400(
    project: str, api: httpx.AsyncClient, params: dict[str, Any], detail: str
) -> None:
    answer = await api.get(items(project), params=params)

    assert answer.status_code == 400
    assert answer.json() == {"detail": detail}


async def test_issues_alias_and_expand_state(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Aliased", state_name="Todo")

    plain = (await api.get(items(project, issue["id"], kind="issues"))).json()
    expanded = (await api.get(items(project, issue["id"]), params={"expand": "state"})).json()
    by_key = (await api.get("work-items/ORCH-1/")).json()

    assert plain["state"] == sandbox.state_id(project, "Todo")
    assert expanded["state"]["name"] == "Todo"
    assert by_key["id"] == issue["id"]
    assert "description_stripped" not in plain and "description_html" in plain
    assert plain["project"] == project and plain["sequence_id"] == 1


async def test_api_create_validates_and_sends_created(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver, api: httpx.AsyncClient
) -> None:
    missing = await api.post(items(project), json={"description_html": "<p>x</p>"})
    bad_state = await api.post(items(project), json={"name": "x", "state": str(uuid.uuid4())})
    made = await api.post(items(project), json={"name": "Via API", "priority": "high"})
    await sandbox.drain()

    assert missing.status_code == 400 and missing.json() == {"name": ["This field is required."]}
    assert bad_state.status_code == 400 and "state" in bad_state.json()
    assert made.status_code == 201
    assert made.json()["state"] == sandbox.state_id(project, "Backlog")
    assert [hit.payload["action"] for hit in receiver.received] == ["created"]


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({"X-Api-Key": "plane_api_wrong"}, "Given API token is not valid"),
        ({}, "Authentication credentials were not provided."),
    ],
)
async def test_bad_or_missing_key_is_401(
    sandbox: PlaneSandbox, project: str, headers: dict[str, str], detail: str
) -> None:
    async with httpx.AsyncClient(base_url=sandbox.base_url) as client:
        answer = await client.get(
            f"/api/v1/workspaces/acme/projects/{project}/states/", headers=headers
        )

    assert answer.status_code == 401
    assert answer.json() == {"detail": detail}


async def test_rate_limit_is_per_key_with_retry_after() -> None:
    async with PlaneSandbox(rate_limit=2, rate_window_s=60) as box:
        project = box.create_project("ORCH", "Orchestrator")
        box.add_bot(BOT, "Developer")
        url = f"{box.base_url}/api/v1/workspaces/acme/projects/{project}/states/"
        async with httpx.AsyncClient() as client:
            answers = [(await client.get(url, headers={"X-Api-Key": MAIN})) for _ in range(3)]
            other = await client.get(url, headers={"X-Api-Key": BOT})

    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["X-RateLimit-Remaining"] == "1"
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 60
    assert answers[2].json()["detail"].startswith("Request was throttled.")
    assert other.status_code == 200


# --- control endpoints and the standalone server -----------------------------------------


async def test_api_fault_500_answers_like_plane_until_cleared(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    sandbox.api_fault(500)
    failed = [await api.get(f"projects/{project}/states/") for _ in range(3)]
    sandbox.api_fault(None)
    served = await api.get(f"projects/{project}/states/")

    assert [answer.status_code for answer in failed] == [500] * 3
    assert failed[0].json() == {"error": "Something went wrong please try again later"}
    assert served.status_code == 200
    assert [call.status for call in sandbox.api_log] == [500, 500, 500, 200]


async def test_api_fault_429_carries_retry_after_for_the_given_number_of_requests(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Throttled")
    sandbox.api_fault(429, times=2, retry_after_s=7)
    path = items(project, issue["id"]) + "comments/"
    answers = [await api.post(path, json={"comment_html": "<p>x</p>"}) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [429, 429, 201]
    assert answers[0].headers["Retry-After"] == "7"
    assert answers[0].json() == {
        "detail": "Request was throttled. Expected available in 7 seconds."
    }
    assert len(sandbox.comments(issue["id"])) == 1  # a refused request did nothing


async def test_api_fault_with_another_status_answers_as_a_proxy(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    sandbox.api_fault(502, times=1)
    answer = await api.get(f"projects/{project}/states/")
    assert (answer.status_code, answer.text) == (502, "502 Bad Gateway")
    assert (await api.get(f"projects/{project}/states/")).status_code == 200
    with pytest.raises(ValueError):
        sandbox.api_fault(200)


async def test_api_fault_hang_holds_requests_until_cleared_then_serves_them(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Slow")
    path = items(project, issue["id"]) + "comments/"
    sandbox.api_fault("hang")

    with pytest.raises(httpx.ReadTimeout):
        await api.post(path, json={"comment_html": "<p>late</p>"}, timeout=0.3)
    held = asyncio.create_task(api.get(f"projects/{project}/states/", timeout=30))
    await until(lambda: sandbox.hung == 2)
    assert not held.done() and sandbox.comments(issue["id"]) == []
    sandbox.api_fault(None)

    assert (await held).status_code == 200
    await until(lambda: sandbox.comments(issue["id"]))  # the one the client gave up on, too
    assert sandbox.comments(issue["id"])[0]["comment_html"] == "<p>late</p>"


async def until(predicate) -> None:
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(loop(), 30)


async def test_a_renamed_state_keeps_its_issues_and_its_group(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    issue = sandbox.create_issue(project, "Shipping", state_name="Done")
    state_id = sandbox.rename_state(project, "Done", "Shipped")

    listed = (await api.get(f"projects/{project}/states/")).json()["results"]

    shipped = next(state for state in listed if state["id"] == state_id)
    assert (shipped["name"], shipped["group"], shipped["slug"]) == (
        "Shipped",
        "completed",
        "shipped",
    )
    assert "Done" not in {state["name"] for state in listed}
    assert sandbox.state_name(issue["id"]) == "Shipped"
    with pytest.raises(ValueError):
        sandbox.rename_state(project, "Shipped", "Backlog")


async def test_control_endpoints_drive_the_board(
    sandbox: PlaneSandbox, project: str, receiver: WebhookReceiver
) -> None:
    async with httpx.AsyncClient(base_url=f"{sandbox.base_url}/sandbox") as control:
        made = await control.post(
            "/issues", json={"project_id": project, "name": "From outside", "state_name": "Todo"}
        )
        issue_id = made.json()["id"]
        moved = await control.post(f"/issues/{issue_id}/move", json={"state_name": "In Progress"})
        await control.post(f"/issues/{issue_id}/comments", json={"comment_html": "<p>hi</p>"})
        await control.post("/drain")
        seen = (await control.get(f"/issues/{issue_id}")).json()
        unknown = await control.post(f"/issues/{issue_id}/move", json={"state_name": "Nope"})
        deliveries = (await control.get("/deliveries")).json()

    assert made.status_code == 201
    assert moved.json() == {"state_name": "In Progress"}
    assert seen["state_name"] == "In Progress"
    assert [c["comment_html"] for c in seen["comments"]] == ["<p>hi</p>"]
    assert unknown.status_code == 404
    assert [d["field"] for d in deliveries] == [None, "state_id", None]
    assert receiver.fields() == [None, "state_id", None]


async def test_api_faults_are_staged_through_the_control_endpoint(
    sandbox: PlaneSandbox, project: str, api: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=f"{sandbox.base_url}/sandbox") as control:
        staged = await control.post("/faults", json={"api": {"fault": 503, "times": 1}})
        failed = await api.get(f"projects/{project}/states/")
        await control.post("/faults", json={"api": {"fault": 500}})
        await control.post("/faults", json={"api": None})
        served = await api.get(f"projects/{project}/states/")
        wrong = await control.post("/faults", json={"api": {"fault": "slow"}})

    assert staged.status_code == 200 and failed.status_code == 503
    assert served.status_code == 200
    assert wrong.status_code == 400


async def test_standalone_server_prints_its_address_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.sandbox.plane",
        "--port",
        "0",
        "--project",
        "ORCH",
        "--bot",
        f"{BOT}:Developer",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        project = info["projects"]["ORCH"]
        async with httpx.AsyncClient(base_url=info["base_url"]) as client:
            states = await client.get(
                f"/api/v1/workspaces/acme/projects/{project}/states/", headers={"X-Api-Key": BOT}
            )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)

    assert states.status_code == 200
    assert proc.returncode == 0
