"""PlaneClient against the Plane sandbox over real HTTP; failures come back as Results."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from engine.config import DEFAULT_PLANE_STATE_NAMES
from engine.plane import (
    PlaneClient,
    PlaneIssue,
    logical_state,
    parse_issue,
    strip_html,
    verify_signature,
)
from engine.sandbox.plane import PlaneSandbox
from tests.test_sandbox_plane import WebhookReceiver

MAIN = "plane_api_main_s3cr3t"
BOT = "plane_api_bot_t0ps3cr3t"
SECRET = "plane_wh_client_tests"
FAST = {"retry_base_s": 0.01, "retry_cap_s": 0.02}  # the default policy, with tiny waits


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
async def sandbox(receiver: WebhookReceiver) -> AsyncIterator[PlaneSandbox]:
    async with PlaneSandbox(
        api_token=MAIN,
        webhook_url=receiver.url,
        webhook_secret=SECRET,
        rate_limit=None,
        retry_backoff_s=0,
    ) as box:
        yield box


@pytest.fixture
def project(sandbox: PlaneSandbox) -> str:
    return sandbox.create_project("ORCH", "Orchestrator")


@pytest.fixture
async def client(sandbox: PlaneSandbox) -> AsyncIterator[PlaneClient]:
    assert sandbox.base_url is not None
    async with PlaneClient(sandbox.base_url + "/", MAIN, "acme") as client:
        yield client


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def list_calls(sandbox: PlaneSandbox, suffix: str) -> list[int]:
    return [c.status for c in sandbox.api_log if c.method == "GET" and c.path.endswith(suffix)]


# --- states --------------------------------------------------------------------------------


async def test_list_states_is_cached(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    first = await client.list_states(project)
    second = await client.list_states(project)

    assert first.ok and first.value is not None
    groups = {state.name: state.group for state in first.value}
    assert groups["In Review"] == "started" and groups["Needs Input"] == "unstarted"
    assert "Triage" not in groups
    assert second.value == first.value
    assert len(list_calls(sandbox, "/states/")) == 1


async def test_state_id_exact_then_case_insensitive(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    exact = await client.state_id(project, "In Review")
    folded = await client.state_id(project, "in review")
    missing = await client.state_id(project, "Shipped")

    assert exact.ok and exact.value == sandbox.state_id(project, "In Review")
    assert folded.value == exact.value
    assert not missing.ok and "Shipped" in (missing.error or "")


async def test_state_added_on_the_board_is_found_despite_the_cache(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    await client.list_states(project)
    added = sandbox.add_state(project, "Staging", "started")

    found = await client.state_id(project, "Staging")

    assert found.ok and found.value == added


async def test_state_for_a_logical_key_by_name_then_by_group(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    names = DEFAULT_PLANE_STATE_NAMES
    review = await client.state_for(project, "in_review", names)
    sandbox.rename_state(project, "In Progress", "Doing")
    sandbox.rename_state(project, "Done", "Shipped")
    async with PlaneClient(sandbox.base_url or "", MAIN, "acme") as fresh:  # a cold cache
        doing = await fresh.state_for(project, "in_progress", names)
        shipped = await fresh.state_for(project, "done", names)
    renamed = await client.state_for(project, "in_review", names | {"in_review": "QA"})

    assert review.ok and review.value and review.value.name == "In Review"
    assert (
        doing.ok and doing.value and (doing.value.name, doing.value.group) == ("Doing", "started")
    )
    assert shipped.ok and shipped.value and shipped.value.id == sandbox.state_id(project, "Shipped")
    assert renamed.ok and renamed.value is None  # a configured name replaces the default


async def test_state_for_reloads_the_cache_on_a_miss(
    sandbox: PlaneSandbox, client: PlaneClient
) -> None:
    bare = sandbox.create_project("BARE", "Plane's default board", conveyor_states=False)
    absent = await client.state_for(bare, "in_review", DEFAULT_PLANE_STATE_NAMES)
    added = sandbox.add_state(bare, "In Review", "started")
    found = await client.state_for(bare, "in_review", DEFAULT_PLANE_STATE_NAMES)

    assert absent.ok and absent.value is None  # no group fallback for In Review
    assert found.ok and found.value and found.value.id == added


def test_logical_state_by_configured_name_else_group_for_in_progress_and_done() -> None:
    names = DEFAULT_PLANE_STATE_NAMES | {"approved": "Good to go"}
    assert logical_state(names, "in review", "started") == "in_review"
    assert logical_state(names, "Good to go", "started") == "approved"
    assert logical_state(names, "Approved", "started") == "in_progress"  # renamed away
    assert logical_state(names, "Doing", "started") == "in_progress"
    assert logical_state(names, "Shipped", "completed") == "done"
    assert logical_state(names, "Blocked", "unstarted") == "blocked"
    assert logical_state(names, "Waiting", "unstarted") is None
    assert logical_state(names, "Cancelled", "cancelled") is None
    assert logical_state(names, None, None) is None


# --- issues --------------------------------------------------------------------------------
# --- issues --------------------------------------------------------------------------------


async def test_get_issue_has_plain_text_and_state_name(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    made = sandbox.create_issue(
        project,
        "Add a greeting",
        "<h2>Goal</h2><p>Return&nbsp;a <b>greeting</b> &amp; a smile</p>"
        "<ul><li>GET /hello</li></ul>",
        state_name="Todo",
    )

    got = await client.get_issue(project, made["id"])

    assert got.ok
    assert got.value == PlaneIssue(
        id=made["id"],
        project_id=project,
        sequence_id=1,
        name="Add a greeting",
        description_html=made["description_html"],
        description_text="Goal\nReturn a greeting & a smile\nGET /hello",
        state_id=sandbox.state_id(project, "Todo"),
        state_name="Todo",
        state_group="unstarted",
    )


async def test_iter_issues_pages_through_everything(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    made = [sandbox.create_issue(project, f"Issue {n}")["id"] for n in range(5)]

    seen = [issue async for issue in client.iter_issues(project, per_page=2)]
    listed = await client.list_issues(project, per_page=2)

    assert sorted(issue.id for issue in seen) == sorted(made)
    assert {issue.state_name for issue in seen} == {"Backlog"}
    assert listed.ok and [issue.id for issue in listed.value or []] == [i.id for i in seen]
    assert len(list_calls(sandbox, "/work-items/")) == 6  # 3 pages, twice


async def test_set_state_moves_the_card_and_sends_a_state_webhook(
    sandbox: PlaneSandbox, project: str, client: PlaneClient, receiver: WebhookReceiver
) -> None:
    issue = sandbox.create_issue(project, "Move me")

    moved = await client.set_state(project, issue["id"], "In Review")
    again = await client.set_state(project, issue["id"], "In Review")
    await sandbox.drain()

    assert moved.ok and again.ok
    assert sandbox.state_name(issue["id"]) == "In Review"
    assert receiver.fields() == [None, "state"]  # the repeat changed nothing, so sent nothing
    activity = receiver.received[1].payload["activity"]
    assert activity["new_value"] == sandbox.state_id(project, "In Review")
    assert activity["actor"]["id"] == sandbox.main_user_id


async def test_set_state_to_an_unknown_state_fails_cleanly(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    issue = sandbox.create_issue(project, "Stay")

    result = await client.set_state(project, issue["id"], "Nowhere")

    assert not result.ok and "Nowhere" in (result.error or "")
    assert sandbox.state_name(issue["id"]) == "Backlog"


async def test_missing_issue_is_a_404_result(project: str, client: PlaneClient) -> None:
    result = await client.get_issue(project, "00000000-0000-4000-8000-000000000000")

    assert not result.ok and result.status == 404
    assert "404" in (result.error or "")


# --- comments ------------------------------------------------------------------------------


async def test_add_comment_as_a_bot_or_the_main_user(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    bot_id = sandbox.add_bot(BOT, "Analyst")
    issue = sandbox.create_issue(project, "Discuss")

    as_bot = await client.add_comment(project, issue["id"], "<p>BRD ready</p>", token=BOT)
    as_main = await client.add_comment(project, issue["id"], "<p>Thanks</p>")

    assert as_bot.ok and as_bot.value is not None and as_bot.value["actor"] == bot_id
    assert as_main.ok and as_main.value is not None
    assert as_main.value["actor"] == sandbox.main_user_id
    assert [c["actor"] for c in sandbox.comments(issue["id"])] == [bot_id, sandbox.main_user_id]


async def test_a_comment_with_an_external_id_is_posted_once(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    issue = sandbox.create_issue(project, "Discuss")

    first = await client.add_comment(project, issue["id"], "<p>a</p>", external_id="ORCH-1:run-1")
    again = await client.add_comment(project, issue["id"], "<p>a</p>", external_id="ORCH-1:run-1")

    assert (first.ok, first.status, again.ok, again.status) == (True, 201, True, 409)
    (comment,) = sandbox.comments(issue["id"])
    assert (comment["external_source"], comment["external_id"]) == ("conveyor", "ORCH-1:run-1")


async def test_a_comment_with_an_external_id_is_retried_after_a_500(
    sandbox: PlaneSandbox, project: str
) -> None:
    issue = sandbox.create_issue(project, "Discuss")
    sandbox.api_fault(500, times=1)
    assert sandbox.base_url is not None
    async with PlaneClient(sandbox.base_url, MAIN, "acme", **FAST) as client:
        posted = await client.add_comment(project, issue["id"], "<p>x</p>", external_id="e-1")

    assert posted.ok and posted.status == 201
    assert [call.status for call in sandbox.api_log] == [500, 201]
    assert len(sandbox.comments(issue["id"])) == 1


async def test_a_comment_lost_in_a_hang_is_not_posted_twice(
    sandbox: PlaneSandbox, project: str
) -> None:
    issue = sandbox.create_issue(project, "Discuss")
    sandbox.api_fault("hang")
    assert sandbox.base_url is not None
    async with PlaneClient(sandbox.base_url, MAIN, "acme", timeout_s=0.2, **FAST) as client:
        lost = await client.add_comment(project, issue["id"], "<p>x</p>", external_id="e-2")
        sandbox.api_fault(None)  # Plane catches up: the requests it held are served
        again = await client.add_comment(project, issue["id"], "<p>x</p>", external_id="e-2")

    assert not lost.ok and "did not answer within 0.2s" in (lost.error or "")
    assert sandbox.hung == 3  # every attempt of the client hung
    assert again.ok
    assert len(sandbox.comments(issue["id"])) == 1


async def test_latest_comment_text_is_the_newest_as_plain_text(
    sandbox: PlaneSandbox, project: str, client: PlaneClient
) -> None:
    issue = sandbox.create_issue(project, "Questions")
    empty = await client.latest_comment_text(project, issue["id"])
    sandbox.add_comment(issue["id"], "<p>first</p>")
    sandbox.add_comment(issue["id"], "<p>Answer: <b>yes</b> &amp; go</p><p>Second&nbsp; line</p>")

    latest = await client.latest_comment_text(project, issue["id"])

    assert empty.ok and empty.value is None
    assert latest.ok and latest.value == "Answer: yes & go\nSecond line"


# --- failures ------------------------------------------------------------------------------


async def test_server_down_gives_results_not_exceptions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with PlaneClient(closed_port_url(), MAIN, "acme", timeout_s=5, **FAST) as client:
        results = [
            await client.list_states("p"),
            await client.state_id("p", "Done"),
            await client.get_issue("p", "i"),
            await client.list_issues("p"),
            await client.set_state("p", "i", "Done"),
            await client.add_comment("p", "i", "<p>x</p>", token=BOT),
            await client.latest_comment_text("p", "i"),
        ]
        seen = [issue async for issue in client.iter_issues("p")]

    assert seen == []
    for result in results:
        assert not result.ok and result.value is None
        assert "Plane unreachable" in (result.error or "")
    assert "Plane unreachable" in caplog.text
    assert MAIN not in caplog.text and BOT not in caplog.text


async def test_bad_token_is_an_error_without_the_token(
    sandbox: PlaneSandbox, project: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong, wrong_bot = "plane_api_wrong_d0nt_l0g", "plane_api_wrong_bot_d0nt_l0g"
    assert sandbox.base_url is not None
    async with PlaneClient(sandbox.base_url, wrong, "acme") as client:
        states = await client.list_states(project)
        comment = await client.add_comment(project, "x", "<p>x</p>", token=wrong_bot)

    assert not states.ok and states.status == 401
    assert "Given API token is not valid" in (states.error or "")
    assert not comment.ok and comment.status == 401
    for text in (states.error or "", comment.error or "", caplog.text):
        assert wrong not in text and wrong_bot not in text


@pytest.fixture
async def odd_server() -> AsyncIterator[str]:
    """A server at the states URL of project "p" that answers HTML, or late."""

    async def states(request: web.Request) -> web.Response:
        if request.headers.get("X-Api-Key") == BOT:
            await asyncio.sleep(1)
        return web.Response(text="<html>proxy error</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/api/v1/workspaces/acme/projects/p/states/", states)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_invalid_json_is_a_clear_error(odd_server: str) -> None:
    async with PlaneClient(odd_server, MAIN, "acme") as client:
        result = await client.list_states("p")

    assert not result.ok and "invalid JSON" in (result.error or "")


async def test_slow_server_is_a_timeout_result(odd_server: str) -> None:
    async with PlaneClient(odd_server, BOT, "acme", timeout_s=0.2, **FAST) as client:
        result = await client.list_states("p")

    assert not result.ok and "did not answer within 0.2s" in (result.error or "")


async def test_rate_limit_is_waited_out_once() -> None:
    async with PlaneSandbox(api_token=MAIN, rate_limit=2, rate_window_s=1) as box:
        project = box.create_project("ORCH", "Orchestrator")
        issue = box.create_issue(project, "Busy")
        assert box.base_url is not None
        async with PlaneClient(box.base_url, MAIN, "acme") as client:
            results = [await client.get_issue(project, issue["id"]) for _ in range(3)]

    assert all(result.ok for result in results)
    assert [call.status for call in box.api_log] == [200, 200, 429, 200]


async def test_rate_limit_longer_than_the_cap_fails_fast() -> None:
    async with PlaneSandbox(api_token=MAIN, rate_limit=1, rate_window_s=60) as box:
        project = box.create_project("ORCH", "Orchestrator")
        assert box.base_url is not None
        async with PlaneClient(box.base_url, MAIN, "acme", max_retry_wait_s=1) as client:
            first = await client.list_states(project)
            second = await client.state_id(project, "Nope")  # the cache misses, so it refetches

    assert first.ok
    assert not second.ok and second.status == 429
    assert "rate limited" in (second.error or "")


# --- retries -------------------------------------------------------------------------------

STATES_PAGE = {
    "results": [{"id": "s1", "name": "Done", "group": "completed"}],
    "next_page_results": False,
    "next_cursor": "1000:1:0",
}


class Flaky:
    """A real server answering scripted (status, headers) in turn, then success. A success
    carries `body`; an error carries a detail that leaks the key (the client must scrub it)."""

    def __init__(self, *answers: tuple[int, dict[str, str]] | int, body: object = None) -> None:
        self.answers = [(a, {}) if isinstance(a, int) else a for a in answers]
        self.body = body
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.method)
        key = request.headers.get("X-Api-Key", "")
        status, headers = 201 if request.method == "POST" else 200, {}
        if len(self.seen) <= len(self.answers):
            status, headers = self.answers[len(self.seen) - 1]
        if status >= 400:
            detail = {"detail": f"upstream trouble for {key}"}
            return web.json_response(detail, status=status, headers=headers)
        return web.json_response(self.body, status=status, headers=headers)


@pytest.fixture
async def flaky() -> AsyncIterator[Callable[[Flaky], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(server: Flaky) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


class CountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return await super().handle_async_request(request)


async def test_a_get_succeeds_after_two_502s(flaky, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = Flaky(502, 502, body=STATES_PAGE)
    async with PlaneClient(await flaky(server), MAIN, "acme", **FAST) as client:
        states = await client.list_states("p")

    assert states.ok and [state.name for state in states.value or []] == ["Done"]
    assert server.seen == ["GET"] * 3
    assert caplog.text.count("plane: GET projects/p/states/: HTTP 502; retry") == 2
    assert MAIN not in caplog.text


async def test_retry_after_on_a_503_is_honoured(flaky) -> None:
    server = Flaky((503, {"Retry-After": "1"}), body=STATES_PAGE)
    async with PlaneClient(await flaky(server), MAIN, "acme", **FAST) as client:
        states = await client.list_states("p")

    assert states.ok and server.seen == ["GET", "GET"]


async def test_a_429_asking_for_more_than_the_limit_fails_at_once(flaky) -> None:
    server = Flaky((429, {"Retry-After": "3600"}), body=STATES_PAGE)
    async with PlaneClient(await flaky(server), MAIN, "acme", max_retry_wait_s=5) as client:
        states = await client.list_states("p")

    assert not states.ok and states.status == 429
    assert states.error == "GET projects/p/states/: rate limited by Plane (retry after 3600s)"
    assert server.seen == ["GET"]


async def test_a_comment_is_not_posted_again_after_a_500(
    flaky, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = Flaky(500, body={"id": "c1"})
    async with PlaneClient(await flaky(server), MAIN, "acme", **FAST) as client:
        posted = await client.add_comment("p", "i", "<p>once</p>", token=BOT)

    assert not posted.ok and posted.status == 500
    assert server.seen == ["POST"]  # a retry could have made a second comment
    assert "upstream trouble for ***" in (posted.error or "")
    for text in (posted.error or "", caplog.text):
        assert BOT not in text and MAIN not in text


async def test_a_state_change_is_repeated_after_a_502(flaky) -> None:
    """PATCH {"state"} is safe to repeat (the same state again changes nothing)."""
    server = Flaky(200, 502, body=STATES_PAGE)  # the states, then the first PATCH fails
    async with PlaneClient(await flaky(server), MAIN, "acme", **FAST) as client:
        moved = await client.set_state("p", "i", "Done")

    assert moved.ok and server.seen == ["GET", "PATCH", "PATCH"]


async def test_a_comment_to_a_closed_port_is_retried_then_fails_clearly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    transport = CountingTransport()
    options = {"transport": transport, "retry_attempts": 4, **FAST}
    async with PlaneClient(closed_port_url(), MAIN, "acme", **options) as client:
        posted = await client.add_comment("p", "i", "<p>x</p>", token=BOT)

    assert not posted.ok and posted.status is None
    error = posted.error or ""
    assert error.startswith("POST projects/p/work-items/i/comments/: Plane unreachable (Connect")
    assert transport.sent == 4
    assert len([r for r in caplog.records if r.name == "engine.http_retry"]) == 3
    for text in (posted.error or "", caplog.text):
        assert BOT not in text and MAIN not in text


# --- module functions --------------------------------------------------------------------


def test_verify_signature_over_raw_bytes() -> None:
    body = b'{"event": "issue", "action": "updated"}'
    good = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()

    assert verify_signature(SECRET, body, good)
    assert not verify_signature(SECRET, body + b" ", good)
    assert not verify_signature("other", body, good)
    assert not verify_signature(SECRET, body, None)
    assert not verify_signature(SECRET, body, "")
    assert not verify_signature(SECRET, body, "ünïcode")


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>a</p><p>b</p>", "a\nb"),
        ("line<br>next<br/>last", "line\nnext\nlast"),
        ("<p>  lots   of\n\t space </p>", "lots of space"),
        ("<pre>a = 1\nb = 2</pre>", "a = 1\nb = 2"),
        ("<p>&lt;tag&gt; &amp; &quot;q&quot; &#39;s&#39; &nbsp;x</p>", "<tag> & \"q\" 's' x"),
        ("<p>keep</p><script>alert(1)</script><style>p{}</style>", "keep"),
        ("<p><span>in</span>line <a href='x'>link</a></p>", "inline link"),
        ("", ""),
        (None, ""),
    ],
)
def test_strip_html(html: str | None, text: str) -> None:
    assert strip_html(html) == text


def test_parse_issue_reads_webhook_data() -> None:
    data = {
        "id": "i1",
        "project": "p1",
        "sequence_id": 7,
        "name": "Webhook issue",
        "description_html": "<p>Do it</p>",
        "state": {"id": "s1", "name": "Approved", "color": "#000", "group": "started"},
    }

    issue = parse_issue(data)

    assert issue is not None
    assert (issue.project_id, issue.state_id, issue.state_name) == ("p1", "s1", "Approved")
    assert issue.description_text == "Do it"
    assert parse_issue({"name": "no id"}) is None
    assert parse_issue(["not", "a", "dict"]) is None
