"""The Gitea sandbox over real HTTP, with real bare repositories and a real webhook receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from engine.git import run_git
from engine.sandbox.gitea import GiteaSandbox

OWNER, NAME = "org", "app"
TOKEN = "gitea_token"
SECRET = "hook-secret"
FILES = {"README.md": "line one\nline two\n", "src/app.py": "x = 1\n"}


# --- helpers shared with test_gitea_client ---------------------------------------------------


async def git(*args: str, cwd: Path | None = None) -> str:
    res = await run_git(*args, cwd=cwd)
    assert res.ok, res.err
    return res.out.strip()


async def clone(remote: Path, dest: Path) -> Path:
    await git("clone", "-q", str(remote), str(dest))
    return dest


async def commit_push(
    work: Path, branch: str, files: dict[str, str], message: str = "change"
) -> str:
    """Commit `files` on `branch` (created from the current HEAD if new) and push it."""
    exists = await run_git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", cwd=work)
    await git("checkout", "-q", *([branch] if exists.ok else ["-b", branch]), cwd=work)
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text, encoding="utf-8")
    await git("add", "-A", cwd=work)
    await git("commit", "-q", "-m", message, cwd=work)
    await git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
    return await git("rev-parse", "HEAD", cwd=work)


async def bare_rev(remote: Path, ref: str) -> str:
    return await git("rev-parse", ref, cwd=remote)


async def parents(remote: Path, sha: str) -> list[str]:
    return (await git("rev-list", "--parents", "-n", "1", sha, cwd=remote)).split()[1:]


@dataclass
class Received:
    headers: CIMultiDict[str]
    body: bytes

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A webhook endpoint that records every request and answers `status`."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.status = 200
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def of_type(self, event_type: str) -> list[Received]:
        return [r for r in self.requests if r.headers["X-Gitea-Event-Type"] == event_type]

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(CIMultiDict(request.headers), await request.read()))
        return web.Response(status=self.status)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.stop()


@pytest.fixture
async def gitea(tmp_path: Path) -> AsyncIterator[GiteaSandbox]:
    async with GiteaSandbox(tmp_path / "forge", TOKEN, watch=False) as sandbox:
        await sandbox.create_repo(OWNER, NAME, FILES)
        yield sandbox


@pytest.fixture
async def hooked(gitea: GiteaSandbox, receiver: Receiver) -> GiteaSandbox:
    gitea.add_hook(OWNER, NAME, receiver.url, SECRET)
    return gitea


@pytest.fixture
async def work(gitea: GiteaSandbox, tmp_path: Path) -> Path:
    return await clone(gitea.repo_path(OWNER, NAME), tmp_path / "work")


@pytest.fixture
async def api(gitea: GiteaSandbox) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"token {TOKEN}"}
    base = f"{gitea.api_url}/repos/{OWNER}/{NAME}"
    async with httpx.AsyncClient(base_url=base, headers=headers) as client:
        yield client


async def open_pr(api: httpx.AsyncClient, head: str, base: str = "main") -> dict:
    resp = await api.post("/pulls", json={"head": head, "base": base, "title": f"PR {head}"})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def settle(gitea: GiteaSandbox) -> None:
    await gitea.sync()
    await gitea.drain()


def hmac_hex(secret: str, body: bytes, digest=hashlib.sha256) -> str:
    return hmac.new(secret.encode(), body, digest).hexdigest()


# --- push webhooks ---------------------------------------------------------------------------


async def test_push_is_announced_after_sync_with_a_signed_pretty_body(
    hooked: GiteaSandbox, receiver: Receiver, work: Path
) -> None:
    main_before = await hooked.branch_sha(OWNER, NAME, "main")
    sha = await commit_push(work, "feature/x", {"new.txt": "new\n"}, "add new")
    assert receiver.requests == []  # nothing before the sandbox looks
    await settle(hooked)

    [push] = receiver.requests
    h = push.headers
    assert (h["X-Gitea-Event"], h["X-Gitea-Event-Type"]) == ("push", "push")
    assert uuid.UUID(h["X-Gitea-Delivery"])
    assert h["X-Gitea-Delivery"] == h["X-GitHub-Delivery"] == h["X-Gogs-Delivery"]
    assert h["X-GitHub-Event"] == "push"
    assert h["X-Gitea-Signature"] == h["X-Gogs-Signature"] == hmac_hex(SECRET, push.body)
    assert h["X-Hub-Signature-256"] == "sha256=" + hmac_hex(SECRET, push.body)
    assert h["X-Hub-Signature"] == "sha1=" + hmac_hex(SECRET, push.body, hashlib.sha1)
    assert h["Content-Type"] == "application/json"
    # Pretty-printed like Go's MarshalIndent; a re-serialised body no longer verifies.
    assert push.body == json.dumps(push.payload, indent=2).encode()
    compact = json.dumps(push.payload).encode()
    assert hmac_hex(SECRET, compact) != h["X-Gitea-Signature"]

    payload = push.payload
    assert payload["ref"] == "refs/heads/feature/x"
    assert (payload["before"], payload["after"]) == ("0" * 40, sha)
    assert payload["head_commit"]["id"] == sha
    assert [c["id"] for c in payload["commits"]] == [sha]  # only what main lacks
    assert payload["commits"][0]["added"] == ["new.txt"]
    assert payload["commits"][0]["message"] == "add new\n"
    assert payload["total_commits"] == 1
    assert payload["repository"]["full_name"] == f"{OWNER}/{NAME}"
    assert payload["repository"]["clone_url"] == str(hooked.repo_path(OWNER, NAME))
    assert payload["pusher"]["login"] and payload["sender"]["login"]
    assert await hooked.branch_sha(OWNER, NAME, "main") == main_before


async def test_second_push_lists_commits_since_before(
    hooked: GiteaSandbox, receiver: Receiver, work: Path
) -> None:
    first = await commit_push(work, "feature/x", {"a.txt": "a\n"})
    await settle(hooked)
    second = await commit_push(work, "feature/x", {"a.txt": "b\n"}, "edit a")
    third = await commit_push(work, "feature/x", {"c.txt": "c\n"}, "add c")
    await settle(hooked)
    pushes = receiver.of_type("push")
    assert len(pushes) == 2
    payload = pushes[1].payload
    assert (payload["before"], payload["after"]) == (first, third)
    assert [c["id"] for c in payload["commits"]] == [third, second]
    assert payload["commits"][1]["modified"] == ["a.txt"]
    await settle(hooked)
    assert len(receiver.requests) == 2  # nothing new, nothing sent


async def test_the_watcher_notices_pushes_on_its_own(tmp_path: Path, receiver: Receiver) -> None:
    async with GiteaSandbox(tmp_path / "forge", poll_interval_s=0.05) as gitea:
        remote = await gitea.create_repo(OWNER, NAME, FILES)
        gitea.add_hook(OWNER, NAME, receiver.url, SECRET)
        sha = await commit_push(await clone(remote, tmp_path / "w"), "main", {"z": "z\n"})
        for _ in range(200):
            if receiver.requests:
                break
            await asyncio.sleep(0.02)
        [push] = receiver.requests
        assert push.payload["after"] == sha
        await gitea.sync()
        await gitea.drain()
        assert len(receiver.requests) == 1  # the explicit sync does not announce it again


async def test_unsigned_hook_sends_empty_signature(
    gitea: GiteaSandbox, receiver: Receiver, work: Path
) -> None:
    gitea.add_hook(OWNER, NAME, receiver.url)
    await commit_push(work, "feature/x", {"a": "a\n"})
    await settle(gitea)
    [push] = receiver.requests
    assert push.headers["X-Gitea-Signature"] == ""
    assert push.headers["X-Hub-Signature-256"] == "sha256="


async def test_hooks_filter_by_repository_and_event(
    gitea: GiteaSandbox, receiver: Receiver, work: Path
) -> None:
    await gitea.create_repo(OWNER, "other", FILES)
    gitea.add_hook(OWNER, "other", receiver.url)
    gitea.add_hook(None, None, receiver.url, events={"status"})  # a global, status-only hook
    await commit_push(work, "feature/x", {"a": "a\n"})
    await settle(gitea)
    assert receiver.requests == []
    sha = await gitea.branch_sha(OWNER, NAME, "feature/x")
    await gitea.set_status(OWNER, NAME, sha, "success")
    await gitea.drain()
    assert [r.headers["X-Gitea-Event-Type"] for r in receiver.requests] == ["status"]


# --- commit statuses -------------------------------------------------------------------------


async def test_created_status_uses_the_key_status_and_combined_uses_state(
    gitea: GiteaSandbox, api: httpx.AsyncClient
) -> None:
    sha = await gitea.branch_sha(OWNER, NAME, "main")
    form = {"state": "pending", "context": "ci/tests", "description": "running", "target_url": ""}
    resp = await api.post(f"/statuses/{sha}", json=form)
    assert resp.status_code == 201
    created = resp.json()
    assert created["status"] == "pending" and "state" not in created
    assert created["context"] == "ci/tests" and created["description"] == "running"

    combined = (await api.get("/commits/main/status")).json()
    assert combined["state"] == "pending"
    assert combined["sha"] == sha and combined["total_count"] == 1
    assert [s["status"] for s in combined["statuses"]] == ["pending"]
    assert "state" not in combined["statuses"][0]
    assert combined["repository"]["full_name"] == f"{OWNER}/{NAME}"
    assert (await api.get(f"/commits/{sha}/status")).json()["state"] == "pending"

    listed = await api.get(f"/commits/{sha}/statuses")
    assert [s["status"] for s in listed.json()] == ["pending"]
    assert listed.headers["X-Total-Count"] == "1"


async def test_no_statuses_gives_older_giteas_empty_combined_status(
    api: httpx.AsyncClient,
) -> None:
    body = (await api.get("/commits/main/status")).json()
    assert (body["state"], body["total_count"]) == ("", 0)


@pytest.mark.parametrize(
    ("reports", "combined"),
    [
        ([("a", "success")], "success"),
        ([("a", "success"), ("b", "pending")], "pending"),
        ([("a", "pending"), ("b", "warning")], "warning"),
        ([("a", "warning"), ("b", "failure")], "failure"),
        ([("a", "failure"), ("b", "error")], "error"),
        ([("a", "error"), ("b", "success")], "error"),
        ([("a", "failure"), ("a", "success")], "success"),  # the latest per context counts
        ([("a", "success"), ("a", "pending"), ("b", "success")], "pending"),
    ],
)
async def test_combined_state_is_the_worst_latest_state(
    gitea: GiteaSandbox,
    api: httpx.AsyncClient,
    reports: list[tuple[str, str]],
    combined: str,
) -> None:
    sha = await gitea.branch_sha(OWNER, NAME, "main")
    for context, state in reports:
        await gitea.set_status(OWNER, NAME, sha, state, context)
    body = (await api.get(f"/commits/{sha}/status")).json()
    assert body["state"] == combined
    assert body["total_count"] == len({context for context, _ in reports})


async def test_invalid_status_state_is_refused(gitea: GiteaSandbox, api: httpx.AsyncClient) -> None:
    sha = await gitea.branch_sha(OWNER, NAME, "main")
    assert (await api.post(f"/statuses/{sha}", json={"state": "green"})).status_code == 422
    assert (await api.post(f"/statuses/{'f' * 40}", json={"state": "success"})).status_code == 404


async def test_status_webhook_carries_sha_and_no_branch(
    hooked: GiteaSandbox, receiver: Receiver, work: Path
) -> None:
    sha = await commit_push(work, "feature/x", {"a": "a\n"})
    await settle(hooked)
    await hooked.set_status(OWNER, NAME, sha, "failure", "ci/tests", description="2 failed")
    await hooked.drain()
    [status] = receiver.of_type("status")
    assert status.headers["X-Gitea-Event"] == "status"
    assert hmac_hex(SECRET, status.body) == status.headers["X-Gitea-Signature"]
    payload = status.payload
    assert (payload["sha"], payload["state"], payload["context"]) == (sha, "failure", "ci/tests")
    assert payload["commit"]["id"] == sha and payload["description"] == "2 failed"
    assert payload["sender"]["login"] == "ci"
    assert "feature/x" not in status.body.decode()
    assert not {"ref", "branches", "pull_request"} & payload.keys()


async def test_status_event_header_can_be_empty_like_gitea_1_23_0(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with GiteaSandbox(tmp_path / "forge", watch=False, empty_status_event=True) as gitea:
        await gitea.create_repo(OWNER, NAME, FILES)
        gitea.add_hook(OWNER, NAME, receiver.url, SECRET)
        sha = await gitea.branch_sha(OWNER, NAME, "main")
        await gitea.set_status(OWNER, NAME, sha, "success")
        await gitea.drain()
    [status] = receiver.requests
    assert status.headers["X-Gitea-Event"] == ""
    assert status.headers["X-Gitea-Event-Type"] == "status"


# --- pull requests and merges ----------------------------------------------------------------


async def test_create_pull_request(
    hooked: GiteaSandbox, receiver: Receiver, api: httpx.AsyncClient, work: Path
) -> None:
    sha = await commit_push(work, "feature/x", {"a": "a\n"})
    form = {"head": "feature/x", "base": "main", "title": "ENG-1: a", "body": "why"}
    resp = await api.post("/pulls", json=form)
    assert resp.status_code == 201
    pr = resp.json()
    assert (pr["number"], pr["state"], pr["merged"], pr["mergeable"]) == (1, "open", False, True)
    assert (pr["title"], pr["body"]) == ("ENG-1: a", "why")
    assert pr["head"]["ref"] == pr["head"]["label"] == "feature/x"
    assert pr["head"]["sha"] == sha and pr["head"]["repo_id"] == pr["base"]["repo_id"]
    assert pr["base"]["ref"] == "main"
    assert pr["merge_base"] == await hooked.branch_sha(OWNER, NAME, "main")
    assert pr["html_url"] == f"{hooked.base_url}/{OWNER}/{NAME}/pulls/1"
    assert pr["user"]["login"]
    assert (await api.get("/pulls/1")).json()["head"]["sha"] == sha

    await hooked.drain()
    opened = receiver.of_type("pull_request")
    assert [r.payload["action"] for r in opened] == ["opened"]


async def test_duplicate_pull_request_is_409_and_missing_head_is_404(
    api: httpx.AsyncClient, work: Path
) -> None:
    await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    again = await api.post("/pulls", json={"head": "feature/x", "base": "main", "title": "t"})
    assert again.status_code == 409
    assert "pull request already exists for these targets" in again.json()["message"]
    missing = await api.post("/pulls", json={"head": "nope", "base": "main", "title": "t"})
    assert missing.status_code == 404
    assert (await api.get("/pulls/99")).status_code == 404


async def test_head_push_sends_pull_request_sync(
    hooked: GiteaSandbox, receiver: Receiver, api: httpx.AsyncClient, work: Path
) -> None:
    await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    await settle(hooked)
    new_head = await commit_push(work, "feature/x", {"a": "b\n"})
    await settle(hooked)
    [sync] = receiver.of_type("pull_request_sync")
    assert sync.headers["X-Gitea-Event"] == "pull_request"
    assert sync.payload["action"] == "synchronized"
    assert sync.payload["pull_request"]["head"]["sha"] == new_head
    assert (await api.get("/pulls/1")).json()["head"]["sha"] == new_head


async def test_merge_with_the_current_head_writes_a_merge_commit(
    hooked: GiteaSandbox, receiver: Receiver, api: httpx.AsyncClient, work: Path
) -> None:
    remote = hooked.repo_path(OWNER, NAME)
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    old_main = await bare_rev(remote, "main")
    pr = await open_pr(api, "feature/x")
    assert (await api.get("/pulls/1/merge")).status_code == 404
    await settle(hooked)
    receiver.requests.clear()

    form = {"Do": "merge", "head_commit_id": pr["head"]["sha"], "MergeMessageField": "details"}
    resp = await api.post("/pulls/1/merge", json=form)
    assert (resp.status_code, resp.content) == (200, b"")

    new_main = await bare_rev(remote, "main")
    assert await parents(remote, new_main) == [old_main, head]
    message = await git("log", "-1", "--format=%B", new_main, cwd=remote)
    assert message.startswith("Merge pull request 'PR feature/x' (#1) from feature/x into main")
    assert "details" in message
    merged = (await api.get("/pulls/1")).json()
    assert (merged["state"], merged["merged"]) == ("closed", True)
    assert merged["merge_commit_sha"] == new_main and merged["merged_at"]
    assert (await api.get("/pulls/1/merge")).status_code == 204

    await hooked.drain()
    [closed] = receiver.of_type("pull_request")
    assert closed.payload["action"] == "closed"
    assert closed.payload["pull_request"]["merged"] is True
    assert closed.payload["pull_request"]["merge_commit_sha"] == new_main
    [push] = receiver.of_type("push")
    assert push.payload["ref"] == "refs/heads/main"
    assert (push.payload["before"], push.payload["after"]) == (old_main, new_main)
    await settle(hooked)
    assert len(receiver.of_type("push")) == 1  # the watcher does not announce it twice


@pytest.mark.parametrize(
    ("style", "parent_count", "linear"),
    [("squash", 1, False), ("rebase", 1, True), ("rebase-merge", 2, True)],
)
async def test_other_merge_styles(
    gitea: GiteaSandbox,
    api: httpx.AsyncClient,
    work: Path,
    tmp_path: Path,
    style: str,
    parent_count: int,
    linear: bool,
) -> None:
    remote = gitea.repo_path(OWNER, NAME)
    await commit_push(work, "feature/x", {"a": "a\n"})
    await commit_push(work, "feature/x", {"b": "b\n"})
    other = await clone(remote, tmp_path / "other")
    old_main = await commit_push(other, "main", {"m": "m\n"})
    await open_pr(api, "feature/x")
    resp = await api.post("/pulls/1/merge", json={"do": style})  # lowercase `do` works too
    assert resp.status_code == 200, resp.text
    new_main = await bare_rev(remote, "main")
    assert len(await parents(remote, new_main)) == parent_count
    files = await git("ls-tree", "--name-only", new_main, cwd=remote)
    assert {"a", "b", "m"} <= set(files.split())
    if linear:  # the branch's commits were replayed onto main
        assert await git("merge-base", "--is-ancestor", old_main, new_main, cwd=remote) == ""


async def test_fast_forward_only(gitea: GiteaSandbox, api: httpx.AsyncClient, work: Path) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    resp = await api.post("/pulls/1/merge", json={"Do": "fast-forward-only"})
    assert resp.status_code == 200
    assert await gitea.branch_sha(OWNER, NAME, "main") == head


async def test_stale_head_commit_id_is_409_and_main_is_unchanged(
    gitea: GiteaSandbox, api: httpx.AsyncClient, work: Path
) -> None:
    pushed = await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    await commit_push(work, "feature/x", {"a": "moved\n"})  # not synced: the merge must notice
    main = await gitea.branch_sha(OWNER, NAME, "main")
    resp = await api.post("/pulls/1/merge", json={"Do": "merge", "head_commit_id": pushed})
    assert resp.status_code == 409
    assert resp.json()["message"] == "head out of date"
    assert await gitea.branch_sha(OWNER, NAME, "main") == main
    pr = (await api.get("/pulls/1")).json()
    assert (pr["state"], pr["merged"]) == ("open", False)


async def test_conflict_is_409_and_main_is_unchanged(
    gitea: GiteaSandbox, api: httpx.AsyncClient, work: Path, tmp_path: Path
) -> None:
    head = await commit_push(work, "feature/x", {"README.md": "theirs\n"})
    other = await clone(gitea.repo_path(OWNER, NAME), tmp_path / "other")
    main = await commit_push(other, "main", {"README.md": "ours\n"})
    pr = await open_pr(api, "feature/x")
    assert pr["mergeable"] is False
    resp = await api.post("/pulls/1/merge", json={"Do": "merge", "head_commit_id": head})
    assert resp.status_code == 409
    assert "README.md" in resp.json()["message"]
    assert await gitea.branch_sha(OWNER, NAME, "main") == main
    assert (await api.get("/pulls/1/merge")).status_code == 404


async def test_second_merge_is_405(gitea: GiteaSandbox, api: httpx.AsyncClient, work: Path) -> None:
    head = await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    form = {"Do": "merge", "head_commit_id": head}
    assert (await api.post("/pulls/1/merge", json=form)).status_code == 200
    main = await gitea.branch_sha(OWNER, NAME, "main")
    again = await api.post("/pulls/1/merge", json=form)
    assert again.status_code == 405
    assert again.json()["message"] == "The PR is already merged"
    assert await gitea.branch_sha(OWNER, NAME, "main") == main


async def test_merge_can_delete_the_head_branch(
    hooked: GiteaSandbox, receiver: Receiver, api: httpx.AsyncClient, work: Path
) -> None:
    await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    form = {"Do": "merge", "delete_branch_after_merge": True}
    assert (await api.post("/pulls/1/merge", json=form)).status_code == 200
    assert await hooked.branch_sha(OWNER, NAME, "feature/x") is None
    await hooked.drain()
    [deleted] = receiver.of_type("delete")
    assert deleted.payload["ref"] == "feature/x"


async def test_unknown_merge_style_is_422(api: httpx.AsyncClient, work: Path) -> None:
    await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    assert (await api.post("/pulls/1/merge", json={"Do": "yolo"})).status_code == 422


async def test_pull_list_is_paginated_and_filtered(
    gitea: GiteaSandbox, api: httpx.AsyncClient, work: Path
) -> None:
    for n in range(3):
        await commit_push(work, f"feature/{n}", {f"f{n}": "x\n"})
        await git("checkout", "-q", "main", cwd=work)
        await open_pr(api, f"feature/{n}")
    first = await api.get("/pulls", params={"state": "open", "limit": 2, "page": 1})
    assert [p["number"] for p in first.json()] == [3, 2]
    assert first.headers["X-Total-Count"] == "3"
    assert 'rel="next"' in first.headers["Link"] and 'rel="last"' in first.headers["Link"]
    second = await api.get("/pulls", params={"state": "open", "limit": 2, "page": 2})
    assert [p["number"] for p in second.json()] == [1]
    assert 'rel="prev"' in second.headers["Link"]

    assert (await api.post("/pulls/2/merge", json={"Do": "merge"})).status_code == 200
    closed = await api.get("/pulls", params={"state": "closed"})
    assert [p["number"] for p in closed.json()] == [2]
    assert len((await api.get("/pulls", params={"state": "all"})).json()) == 3
    assert len((await api.get("/pulls")).json()) == 2  # open by default


# --- webhook delivery ------------------------------------------------------------------------


async def test_replay_sends_the_same_body_with_a_new_delivery_id(
    hooked: GiteaSandbox, receiver: Receiver
) -> None:
    sha = await hooked.branch_sha(OWNER, NAME, "main")
    await hooked.set_status(OWNER, NAME, sha, "success")
    await hooked.drain()
    [original] = hooked.deliveries
    replayed = hooked.replay(original.id)
    await hooked.drain()
    first, second = receiver.requests
    assert second.body == first.body
    assert second.headers["X-Gitea-Delivery"] != first.headers["X-Gitea-Delivery"]
    assert second.headers["X-Gitea-Delivery"] == replayed.id
    assert second.headers["X-Gitea-Signature"] == first.headers["X-Gitea-Signature"]
    assert replayed.replay_of == original.id


async def test_no_retry_when_the_receiver_answers_500(
    hooked: GiteaSandbox, receiver: Receiver
) -> None:
    receiver.status = 500
    sha = await hooked.branch_sha(OWNER, NAME, "main")
    await hooked.set_status(OWNER, NAME, sha, "success")
    await hooked.drain()
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1
    [delivery] = hooked.deliveries
    assert (delivery.status, delivery.succeeded) == (500, False)


async def test_no_retry_when_the_receiver_is_down(hooked: GiteaSandbox, receiver: Receiver) -> None:
    port = receiver.port
    await receiver.stop()
    sha = await hooked.branch_sha(OWNER, NAME, "main")
    await hooked.set_status(OWNER, NAME, sha, "success")
    await hooked.drain()
    [delivery] = hooked.deliveries
    assert delivery.status is None and delivery.error
    await receiver.start(port)  # back up: the lost delivery is not sent again
    await asyncio.sleep(0.3)
    await hooked.drain()
    assert receiver.requests == []


async def test_dropped_deliveries_are_never_sent(hooked: GiteaSandbox, receiver: Receiver) -> None:
    sha = await hooked.branch_sha(OWNER, NAME, "main")
    hooked.drop_next(1)
    await hooked.set_status(OWNER, NAME, sha, "pending", "one")
    await hooked.set_status(OWNER, NAME, sha, "success", "two")
    hooked.drop_rate(1.0, seed=7)
    await hooked.set_status(OWNER, NAME, sha, "success", "three")
    hooked.drop_rate(0.0)
    await hooked.set_status(OWNER, NAME, sha, "success", "four")
    await hooked.drain()
    await asyncio.sleep(0.1)
    assert [r.payload["context"] for r in receiver.requests] == ["two", "four"]
    assert [d.dropped for d in hooked.deliveries] == [True, False, True, False]
    assert [d.delivered for d in hooked.deliveries] == [False, True, False, True]


async def test_drop_rate_is_reproducible_with_a_seed(tmp_path: Path) -> None:
    patterns = []
    for run in range(2):
        async with GiteaSandbox(tmp_path / f"forge{run}", watch=False) as gitea:
            await gitea.create_repo(OWNER, NAME, FILES)
            gitea.add_hook(OWNER, NAME, "http://127.0.0.1:9/unused")
            gitea.drop_rate(0.5, seed=42)
            sha = await gitea.branch_sha(OWNER, NAME, "main")
            for n in range(12):
                await gitea.set_status(OWNER, NAME, sha, "pending", f"c{n}")
            patterns.append([d.dropped for d in gitea.deliveries])
    assert patterns[0] == patterns[1]
    assert True in patterns[0] and False in patterns[0]


# --- branches, files, auth -------------------------------------------------------------------


async def test_branches_contents_and_raw(
    gitea: GiteaSandbox, api: httpx.AsyncClient, work: Path
) -> None:
    sha = await commit_push(work, "feature/x", {"docs/note.md": "hi\n", "bin.dat": "\x00\x01"})
    branch = (await api.get("/branches/feature/x")).json()
    assert branch["name"] == "feature/x" and branch["commit"]["id"] == sha
    assert branch["protected"] is False
    assert (await api.get("/branches/nope")).status_code == 404

    content = (await api.get("/contents/docs/note.md", params={"ref": "feature/x"})).json()
    assert content["type"] == "file" and content["encoding"] == "base64"
    assert content["path"] == "docs/note.md"
    assert content["content"] == "aGkK" and content["size"] == 3 and content["download_url"]
    listing = (await api.get("/contents/docs", params={"ref": sha})).json()
    assert [entry["name"] for entry in listing] == ["note.md"]
    assert (await api.get("/contents/docs/note.md")).status_code == 404  # not on main
    assert (await api.get("/contents/missing.txt", params={"ref": "main"})).status_code == 404

    raw = await api.get("/raw/bin.dat", params={"ref": "feature/x"})
    assert raw.content == b"\x00\x01"
    assert (await api.get("/raw/src/app.py")).content == b"x = 1\n"
    assert (await api.get("/raw/missing.txt")).status_code == 404
    assert (await api.get("/raw/src/app.py", params={"ref": "nope"})).status_code == 404


@pytest.mark.parametrize(
    ("headers", "params", "status", "message"),
    [
        ({}, {}, 401, "token is required"),
        ({"Authorization": "token wrong"}, {}, 401, "user does not exist"),
        ({"Authorization": f"token {TOKEN}"}, {}, 200, None),
        ({"Authorization": f"Bearer {TOKEN}"}, {}, 401, "user does not exist"),
        (
            {"Authorization": "Basic " + base64.b64encode(f"x:{TOKEN}".encode()).decode()},
            {},
            200,
            None,
        ),
        ({}, {"token": TOKEN}, 200, None),
        ({}, {"access_token": TOKEN}, 200, None),
    ],
)
async def test_auth(
    gitea: GiteaSandbox, headers: dict, params: dict, status: int, message: str | None
) -> None:
    url = f"{gitea.api_url}/repos/{OWNER}/{NAME}/branches/main"
    async with httpx.AsyncClient() as client:
        resp = await client.get(url, headers=headers, params=params)
    assert resp.status_code == status
    if message:
        assert resp.json()["message"] == message and "url" in resp.json()


async def test_unknown_repository_is_404(gitea: GiteaSandbox) -> None:
    url = f"{gitea.api_url}/repos/{OWNER}/nope/branches/main"
    async with httpx.AsyncClient(headers={"Authorization": f"token {TOKEN}"}) as client:
        resp = await client.get(url)
    assert resp.status_code == 404
    assert resp.json()["message"] == "The target couldn't be found."


# --- control endpoints and the standalone server ---------------------------------------------


async def test_control_endpoints(
    hooked: GiteaSandbox, receiver: Receiver, api: httpx.AsyncClient, work: Path
) -> None:
    sha = await commit_push(work, "feature/x", {"a": "a\n"})
    await open_pr(api, "feature/x")
    control = f"{hooked.base_url}/sandbox/repos/{OWNER}/{NAME}"
    async with httpx.AsyncClient() as client:
        status = await client.post(f"{control}/statuses/{sha}", json={"state": "success"})
        assert status.status_code == 201 and status.json()["status"] == "success"
        pr = (await client.get(f"{control}/pulls/1")).json()
        assert pr["head"]["sha"] == sha
        branch = (await client.get(f"{control}/branches/feature/x")).json()
        assert branch == {"sha": sha}
        assert (await client.post(f"{hooked.base_url}/sandbox/drain")).status_code == 204
        deliveries = (await client.get(f"{hooked.base_url}/sandbox/deliveries")).json()
        assert "status" in [d["event_type"] for d in deliveries]
        replay = await client.post(
            f"{hooked.base_url}/sandbox/deliveries/{deliveries[-1]['id']}/replay"
        )
        assert replay.status_code == 201
        await client.post(f"{hooked.base_url}/sandbox/drain")
    assert receiver.requests[-1].body == receiver.requests[-2].body


async def test_standalone_server(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.sandbox.gitea",
        "--port",
        "0",
        "--root",
        str(tmp_path / "forge"),
        "--repo",
        f"{OWNER}/{NAME}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        base_url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        headers = {"Authorization": f"token {TOKEN}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
            assert (await client.get("/api/v1/version")).status_code == 200
            branch = await client.get(f"/api/v1/repos/{OWNER}/{NAME}/branches/main")
            assert branch.status_code == 200
        assert (tmp_path / "forge" / OWNER / f"{NAME}.git").is_dir()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
