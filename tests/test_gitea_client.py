"""engine.gitea.GiteaClient against the Gitea sandbox over real HTTP and real git."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from engine.gitea import (
    MAX_PAGES,
    CombinedStatus,
    GiteaClient,
    MergeOutcome,
    event_type,
    normalise_state,
    verify_signature,
)
from engine.sandbox.gitea import GiteaSandbox
from tests.test_sandbox_gitea import FILES, clone, commit_push, git, parents

TOKEN = "s3cret-gitea-token-4711"
OWNER, NAME = "org", "app"
REPO = f"{OWNER}/{NAME}"
FAST = {"retry_base_s": 0.01, "retry_cap_s": 0.02}  # the default policy, with tiny waits


@pytest.fixture
async def gitea(tmp_path: Path) -> AsyncIterator[GiteaSandbox]:
    async with GiteaSandbox(tmp_path / "forge", TOKEN, watch=False) as sandbox:
        await sandbox.create_repo(OWNER, NAME, FILES)
        yield sandbox


@pytest.fixture
async def client(gitea: GiteaSandbox) -> AsyncIterator[GiteaClient]:
    async with GiteaClient(gitea.base_url, TOKEN, timeout_s=5) as gitea_client:
        yield gitea_client


@pytest.fixture
async def work(gitea: GiteaSandbox, tmp_path: Path) -> Path:
    return await clone(gitea.repo_path(OWNER, NAME), tmp_path / "work")


async def serve(handler, path: str = "/{tail:.*}") -> tuple[web.AppRunner, str]:
    """A tiny real server for answers the sandbox never gives."""
    app = web.Application()
    app.router.add_route("*", path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- pull requests ---------------------------------------------------------------------------


async def test_ensure_pull_request_creates_then_finds_the_open_one(
    client: GiteaClient, gitea: GiteaSandbox, work: Path
) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    first = await client.ensure_pull_request(REPO, "feature/x", "main", "ENG-1: a", "body")
    assert first.ok, first.error
    pr = first.value
    assert (pr.number, pr.state, pr.merged, pr.head_sha) == (1, "open", False, head)
    assert (pr.head_ref, pr.base_ref, pr.merge_commit_sha) == ("feature/x", "main", None)
    assert pr.html_url == f"{gitea.base_url}/{REPO}/pulls/1"

    again = await client.ensure_pull_request(REPO, "feature/x", "main", "ENG-1: a", "body")
    assert again.ok and again.value == pr
    assert len(await gitea.list_pulls(OWNER, NAME, "all")) == 1


async def test_ensure_pull_request_finds_its_pr_among_many(client: GiteaClient, work: Path) -> None:
    for n in range(3):
        await commit_push(work, f"feature/{n}", {f"f{n}": "x\n"})
        await git("checkout", "-q", "main", cwd=work)
        assert (await client.ensure_pull_request(REPO, f"feature/{n}", "main", "t", "")).ok
    found = await client.ensure_pull_request(REPO, f"{OWNER}:feature/1", "main", "t", "")
    assert found.ok and found.value.number == 2


async def test_ensure_pull_request_for_a_missing_branch_fails_cleanly(client: GiteaClient) -> None:
    res = await client.ensure_pull_request(REPO, "nope", "main", "t", "")
    assert not res.ok and res.status == 404
    assert "HTTP 404" in res.error


async def test_get_pull_request(client: GiteaClient, work: Path) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
    res = await client.get_pull_request(REPO, 1)
    assert res.ok and res.value.head_sha == head and res.value.state == "open"
    missing = await client.get_pull_request(REPO, 9)
    assert not missing.ok and missing.status == 404


# --- merge outcomes --------------------------------------------------------------------------


async def test_merge_outcome_merged(client: GiteaClient, gitea: GiteaSandbox, work: Path) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    old_main = await gitea.branch_sha(OWNER, NAME, "main")
    await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
    res = await client.merge_pull_request(REPO, 1, head, message="ENG-1 lands")
    assert res.ok and res.value == MergeOutcome(merged=True)
    new_main = (await client.branch_head(REPO, "main")).value
    assert await parents(gitea.repo_path(OWNER, NAME), new_main) == [old_main, head]
    pr = (await client.get_pull_request(REPO, 1)).value
    assert (pr.state, pr.merged, pr.merge_commit_sha) == ("closed", True, new_main)


async def test_merge_outcome_head_moved(
    client: GiteaClient, gitea: GiteaSandbox, work: Path
) -> None:
    tested = await commit_push(work, "feature/x", {"a": "a\n"})
    await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
    await commit_push(work, "feature/x", {"a": "newer\n"})
    main = await gitea.branch_sha(OWNER, NAME, "main")
    res = await client.merge_pull_request(REPO, 1, tested)
    assert res.ok and res.value == MergeOutcome(head_moved=True)
    assert await gitea.branch_sha(OWNER, NAME, "main") == main


async def test_merge_outcome_conflict(
    client: GiteaClient, gitea: GiteaSandbox, work: Path, tmp_path: Path
) -> None:
    head = await commit_push(work, "feature/x", {"README.md": "theirs\n"})
    other = await clone(gitea.repo_path(OWNER, NAME), tmp_path / "other")
    await commit_push(other, "main", {"README.md": "ours\n"})
    await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
    res = await client.merge_pull_request(REPO, 1, head)
    assert res.ok and res.value == MergeOutcome(conflict=True)


async def test_merge_outcome_already_merged(client: GiteaClient, work: Path) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
    assert (await client.merge_pull_request(REPO, 1, head)).value.merged
    res = await client.merge_pull_request(REPO, 1, head)
    assert res.ok and res.value == MergeOutcome(already_merged=True)


@pytest.mark.parametrize("style", ["squash", "rebase", "fast-forward-only"])
async def test_merge_styles(client: GiteaClient, work: Path, style: str) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
    res = await client.merge_pull_request(REPO, 1, head, style=style, title="ENG-1: a")
    assert res.ok and res.value.merged


def pull_json(head_sha: str, merged: bool = False) -> dict:
    branch = {"ref": "feature/x", "sha": head_sha}
    return {"number": 1, "state": "open", "merged": merged, "head": branch, "base": {"ref": "main"}}


@pytest.mark.parametrize(
    ("message", "current", "expected"),
    [
        ("merge conflicts", pull_json("a" * 40), MergeOutcome(conflict=True)),
        ("Merge Conflict", pull_json("b" * 40), MergeOutcome(head_moved=True)),
        ("", pull_json("a" * 40, merged=True), MergeOutcome(already_merged=True)),
        ("merge conflicts", None, None),  # the PR cannot be re-read: no guess
        ("merge push out of date", pull_json("a" * 40), None),  # the base moved: retry
    ],
)
async def test_a_409_is_classified_by_re_reading_the_pr(
    message: str, current: dict | None, expected: MergeOutcome | None
) -> None:
    async def forge(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.json_response({"message": message}, status=409)
        if current is None:
            return web.json_response({"message": "boom"}, status=500)
        return web.json_response(current)

    runner, url = await serve(forge)
    try:
        async with GiteaClient(url, TOKEN, **FAST) as client:
            res = await client.merge_pull_request(REPO, 1, "a" * 40)
    finally:
        await runner.cleanup()
    assert res.value == expected
    assert res.ok is (expected is not None)


async def test_merging_a_missing_pr_is_a_failure(client: GiteaClient) -> None:
    res = await client.merge_pull_request(REPO, 5, "0" * 40)
    assert not res.ok and res.status == 404


# --- combined status -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reports", "state", "contexts"),
    [
        ([], "none", {}),
        ([("ci", "success")], "success", {"ci": "success"}),
        ([("ci", "pending")], "pending", {"ci": "pending"}),
        ([("ci", "success"), ("lint", "pending")], "pending", {"ci": "success", "lint": "pending"}),
        ([("ci", "warning")], "failure", {"ci": "failure"}),
        ([("ci", "error")], "failure", {"ci": "failure"}),
        ([("ci", "failure"), ("lint", "success")], "failure", {"ci": "failure", "lint": "success"}),
        ([("ci", "failure"), ("ci", "success")], "success", {"ci": "success"}),
    ],
)
async def test_combined_status_is_normalised(
    client: GiteaClient,
    gitea: GiteaSandbox,
    work: Path,
    reports: list[tuple[str, str]],
    state: str,
    contexts: dict[str, str],
) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    for context, raw in reports:
        await gitea.set_status(OWNER, NAME, head, raw, context)
    by_sha = await client.combined_status(REPO, head)
    assert by_sha.ok, by_sha.error
    assert by_sha.value == CombinedStatus(state=state, sha=head, contexts=contexts)
    by_branch = await client.combined_status(REPO, "feature/x")  # a ref with a slash
    assert by_branch.ok and by_branch.value.state == state


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("success", "success"),
        ("skipped", "success"),
        ("pending", "pending"),
        ("warning", "failure"),
        ("failure", "failure"),
        ("error", "failure"),
        ("", "none"),
        ("SUCCESS", "success"),
        ("something-new", "failure"),  # unknown words fail closed
    ],
)
def test_normalise_state(raw: str, normalised: str) -> None:
    assert normalise_state(raw) == normalised


async def test_combined_status_of_an_unknown_ref_fails(client: GiteaClient) -> None:
    res = await client.combined_status(REPO, "no-such-branch")
    assert not res.ok and res.status == 404


# --- branches and files ----------------------------------------------------------------------


async def test_branch_head(client: GiteaClient, work: Path) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    assert (await client.branch_head(REPO, "feature/x")).value == head
    missing = await client.branch_head(REPO, "feature/none")
    assert missing.ok and missing.value is None


async def test_file_text(client: GiteaClient, work: Path) -> None:
    text = "---\nverdict: APPROVE\n---\nПривет\n"
    head = await commit_push(work, "feature/x", {"docs/review.md": text})
    assert (await client.file_text(REPO, "docs/review.md", "feature/x")).value == text
    assert (await client.file_text(REPO, "docs/review.md", head)).value == text
    assert (await client.file_text(REPO, "src/app.py", "main")).value == FILES["src/app.py"]
    missing = await client.file_text(REPO, "docs/review.md", "main")
    assert missing.ok and missing.value is None
    directory = await client.file_text(REPO, "docs", "feature/x")
    assert not directory.ok and "not a file" in directory.error


# --- failures never raise and never leak the token -------------------------------------------


async def test_a_server_that_is_down_gives_clear_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"http://127.0.0.1:{closed_port()}"
    async with GiteaClient(url, TOKEN, timeout_s=2, **FAST) as client:
        calls = [
            client.ensure_pull_request(REPO, "feature/x", "main", "t", ""),
            client.get_pull_request(REPO, 1),
            client.merge_pull_request(REPO, 1, "0" * 40),
            client.combined_status(REPO, "main"),
            client.branch_head(REPO, "main"),
            client.file_text(REPO, "README.md", "main"),
        ]
        for call in calls:
            res = await call
            assert not res.ok and res.value is None and res.status is None
            assert "cannot reach Gitea" in res.error
            assert TOKEN not in res.error
    assert "cannot reach Gitea" in caplog.text
    assert TOKEN not in caplog.text


async def test_a_refused_token_is_reported_without_the_token(
    gitea: GiteaSandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-0815"
    async with GiteaClient(gitea.base_url, wrong) as client:
        res = await client.branch_head(REPO, "main")
    assert not res.ok and res.status == 401 and "token was refused" in res.error
    assert wrong not in res.error and wrong not in caplog.text and TOKEN not in caplog.text


async def test_a_server_echoing_the_token_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    async def echo(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        return web.json_response({"message": f"internal error for {auth}"}, status=500)

    caplog.set_level(logging.DEBUG)
    runner, url = await serve(echo)
    try:
        async with GiteaClient(url, TOKEN, **FAST) as client:
            res = await client.get_pull_request(REPO, 1)
    finally:
        await runner.cleanup()
    assert not res.ok and res.status == 500
    assert "internal error for token ***" in res.error
    assert TOKEN not in res.error and TOKEN not in caplog.text


async def test_a_slow_server_times_out_without_raising() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    runner, url = await serve(slow)
    try:
        async with GiteaClient(url, TOKEN, timeout_s=0.2, **FAST) as client:
            res = await client.branch_head(REPO, "main")
    finally:
        await runner.cleanup()
    assert not res.ok and "did not answer within 0.2s" in res.error


async def test_garbage_answers_are_failures(caplog: pytest.LogCaptureFixture) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>proxy error</html>", status=200)

    runner, url = await serve(garbage)
    try:
        async with GiteaClient(url, TOKEN) as client:
            pull = await client.get_pull_request(REPO, 1)
            status = await client.combined_status(REPO, "main")
            branch = await client.branch_head(REPO, "main")
    finally:
        await runner.cleanup()
    assert not pull.ok and "malformed pull request" in pull.error
    assert not status.ok and not branch.ok


async def test_invalid_repository_names_fail(client: GiteaClient) -> None:
    for repo in ("no-slash", "a/b/c", "/b", "a/"):
        res = await client.branch_head(repo, "main")
        assert not res.ok and "owner/name" in res.error


async def test_the_base_url_is_the_server_root(gitea: GiteaSandbox) -> None:
    for base in (gitea.base_url, gitea.base_url + "/", gitea.api_url):
        async with GiteaClient(base, TOKEN) as client:
            assert client.api_url == gitea.api_url
            assert (await client.branch_head(REPO, "main")).ok
    assert TOKEN not in repr(GiteaClient(gitea.base_url, TOKEN))


# --- retries ---------------------------------------------------------------------------------


class Script:
    """Answers scripted (status, headers) in turn, then `body` with 200; an error answer
    echoes the Authorization header, as a careless proxy might."""

    def __init__(self, *answers: tuple[int, dict[str, str]] | int, body: object = None) -> None:
        self.answers = [(a, {}) if isinstance(a, int) else a for a in answers]
        self.body = body
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.method)
        if len(self.seen) > len(self.answers):
            return web.json_response(self.body)
        status, headers = self.answers[len(self.seen) - 1]
        message = {"message": f"trouble for {request.headers.get('Authorization')}"}
        return web.json_response(message, status=status, headers=headers)


class CountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return await super().handle_async_request(request)


async def test_a_get_succeeds_after_two_502s(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    script = Script(502, 502, body=pull_json("a" * 40))
    runner, url = await serve(script.handle)
    try:
        async with GiteaClient(url, TOKEN, **FAST) as client:
            res = await client.get_pull_request(REPO, 1)
    finally:
        await runner.cleanup()
    assert res.ok and res.value.head_sha == "a" * 40
    assert script.seen == ["GET"] * 3
    assert caplog.text.count("gitea: GET /repos/org/app/pulls/1: HTTP 502; retry") == 2
    assert TOKEN not in caplog.text


async def test_a_503_with_retry_after_is_honoured() -> None:
    script = Script((503, {"Retry-After": "1"}), body=pull_json("a" * 40))
    runner, url = await serve(script.handle)
    try:
        async with GiteaClient(url, TOKEN, **FAST) as client:
            res = await client.get_pull_request(REPO, 1)
    finally:
        await runner.cleanup()
    assert res.ok and script.seen == ["GET", "GET"]


async def test_a_429_asking_for_more_than_the_limit_fails_at_once() -> None:
    script = Script((429, {"Retry-After": "3600"}), body=pull_json("a" * 40))
    runner, url = await serve(script.handle)
    try:
        async with GiteaClient(url, TOKEN, max_retry_wait_s=5) as client:
            res = await client.get_pull_request(REPO, 1)
    finally:
        await runner.cleanup()
    assert not res.ok and res.status == 429
    assert res.error == "GET /repos/org/app/pulls/1: rate limited by Gitea (retry after 3600s)"
    assert script.seen == ["GET"]


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_posts_are_not_repeated_after_a_5xx(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    script = Script(status, status)
    runner, url = await serve(script.handle)
    try:
        async with GiteaClient(url, TOKEN, **FAST) as client:
            created = await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
            merged = await client.merge_pull_request(REPO, 1, "a" * 40)
    finally:
        await runner.cleanup()
    assert script.seen == ["POST", "POST"]  # one each: a retry could open a second PR
    assert not created.ok and created.status == status
    assert not merged.ok and merged.status == status
    assert "trouble for token ***" in created.error
    for text in (created.error, merged.error, caplog.text):
        assert TOKEN not in text


async def test_a_post_to_a_closed_port_is_retried_then_fails_clearly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    transport = CountingTransport()
    url = f"http://127.0.0.1:{closed_port()}"
    async with GiteaClient(url, TOKEN, transport=transport, retry_attempts=4, **FAST) as client:
        res = await client.ensure_pull_request(REPO, "feature/x", "main", "t", "")
    assert not res.ok and res.status is None
    assert res.error.startswith(f"POST /repos/org/app/pulls: cannot reach Gitea at {url}/api/v1")
    assert "ConnectError" in res.error
    assert transport.sent == 4
    assert len([r for r in caplog.records if r.name == "engine.http_retry"]) == 3
    assert TOKEN not in res.error and TOKEN not in caplog.text


# --- pagination ------------------------------------------------------------------------------


class PullList:
    """GET /pulls over `count` open PRs (feature/0, feature/1, ...), capping `limit` at
    `cap` as Gitea's MAX_RESPONSE_ITEMS does; X-Total-Count only when `total` is set."""

    def __init__(self, count: int, cap: int, *, total: bool = True, ignore_page: bool = False):
        self.pulls = [
            {"number": n + 1, "head": {"ref": f"feature/{n}"}, "base": {"ref": "main"}}
            for n in range(count)
        ]
        self.cap, self.total, self.ignore_page = cap, total, ignore_page
        self.pages: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.json_response({"message": "pull request already exists"}, status=409)
        page = int(request.query["page"])
        limit = min(int(request.query["limit"]), self.cap)
        self.pages.append(page)
        start = 0 if self.ignore_page else (page - 1) * limit
        headers = {"X-Total-Count": str(len(self.pulls))} if self.total else {}
        return web.json_response(self.pulls[start : start + limit], headers=headers)


async def find(server: PullList, branch: str):
    runner, url = await serve(server.handle)
    try:
        async with GiteaClient(url, TOKEN, **FAST) as client:
            return await client.ensure_pull_request(REPO, branch, "main", "t", "")
    finally:
        await runner.cleanup()


async def test_the_open_pr_is_found_on_a_late_page_of_a_capped_list() -> None:
    server = PullList(5, cap=2)
    res = await find(server, "feature/4")
    assert res.ok and res.value.number == 5
    assert server.pages == [1, 2, 3]


async def test_x_total_count_ends_the_list_without_an_empty_page() -> None:
    server = PullList(4, cap=2)
    res = await find(server, "feature/none")
    assert not res.ok and "none is open" in res.error
    assert server.pages == [1, 2]


async def test_without_x_total_count_an_empty_page_ends_the_list() -> None:
    server = PullList(4, cap=2, total=False)
    res = await find(server, "feature/none")
    assert not res.ok and "none is open" in res.error
    assert server.pages == [1, 2, 3]


async def test_the_search_stops_at_the_page_with_the_pr() -> None:
    server = PullList(9, cap=2)
    res = await find(server, "feature/2")
    assert res.ok and res.value.number == 3
    assert server.pages == [1, 2]


async def test_a_list_that_never_ends_is_given_up() -> None:
    server = PullList(3, cap=3, total=False, ignore_page=True)
    res = await find(server, "feature/none")
    assert not res.ok and f"gave up after {MAX_PAGES} pages" in res.error
    assert len(server.pages) == MAX_PAGES


# --- webhook helpers -------------------------------------------------------------------------


def test_verify_signature() -> None:
    body = b'{\n  "ref": "refs/heads/main"\n}'
    good = hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    assert verify_signature("secret", body, good)
    assert verify_signature("secret", body, good.upper())
    assert verify_signature("secret", body, "sha256=" + good)
    assert not verify_signature("secret", body + b" ", good)
    assert not verify_signature("other", body, good)
    assert not verify_signature("secret", body, None)
    assert not verify_signature("secret", body, "")
    assert not verify_signature("", body, "")  # an unsigned delivery never verifies


async def test_verify_signature_over_a_sandbox_delivery(gitea: GiteaSandbox) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response()

    runner, url = await serve(hook)
    try:
        gitea.add_hook(OWNER, NAME, f"{url}/hook", "hook-secret")
        sha = await gitea.branch_sha(OWNER, NAME, "main")
        await gitea.set_status(OWNER, NAME, sha, "success")
        await gitea.drain()
    finally:
        await runner.cleanup()
    [(headers, body)] = received
    assert verify_signature("hook-secret", body, headers["X-Gitea-Signature"])
    assert not verify_signature("wrong", body, headers["X-Gitea-Signature"])
    assert event_type(headers) == "status"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"X-Gitea-Event": "pull_request", "X-Gitea-Event-Type": "pull_request_sync"},
            "pull_request_sync",
        ),
        ({"X-Gitea-Event": "", "X-Gitea-Event-Type": "status"}, "status"),  # Gitea 1.23.0
        ({"X-Gitea-Event": "Push"}, "push"),
        ({"x-gitea-event-type": "status"}, "status"),
        ({"X-GitHub-Event": "push"}, "push"),
        ({"X-Gitea-Event-Type": "", "X-Gitea-Event": ""}, ""),
        ({}, ""),
    ],
)
def test_event_type(headers: dict[str, str], expected: str) -> None:
    assert event_type(headers) == expected
