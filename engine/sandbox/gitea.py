"""A local Gitea stand-in: the REST API and webhooks Conveyor uses, over real bare git repos.

Repositories are bare repositories under `root/<owner>/<name>.git`; clients push to and
fetch from that path (it is the repository's `clone_url`). The sandbox notices pushes by
comparing branch heads, either on its own (a background watcher) or when `sync()` is
awaited, and then sends `push` and `pull_request_sync` webhooks. Merges are real: a merge
commit written with `git merge-tree`/`commit-tree`, or a rebase in a temporary worktree.

Behaviour follows the shared Gitea reference (plane-gitea.md §4-5), awkward parts included:
pretty-printed webhook bodies signed over the raw bytes, no automatic webhook retry, a
replay with a new delivery id, `"status"` in a CommitStatus but `"state"` in the combined
status and in the status webhook, status webhooks without branch information, the empty
combined status of older Gitea when a commit has no statuses, and access tokens taken as
`Authorization: token <t>`, basic auth or a query parameter, but not as `Bearer` (OAuth2).

Run it standalone with `python -m engine.sandbox.gitea --port N --root DIR`; it prints its
base URL. Out-of-process drivers use the control endpoints under `/sandbox/`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from engine.git import GitResult, run_git
from engine.sandbox.repo import create_sample_remote

log = logging.getLogger(__name__)

ZERO_SHA = "0" * 40
API_PREFIX = "/api/v1"
NOT_FOUND = "The target couldn't be found."
VERSION = "1.23.0+sandbox"
DEFAULT_PAGE_SIZE = 30  # [api] DEFAULT_PAGING_NUM
MAX_PAGE_SIZE = 50  # [api] MAX_RESPONSE_ITEMS
PUSH_COMMITS_LIMIT = 20  # a push payload lists at most this many commits; total_commits counts all
DELIVERY_LOG_BODY = 2000  # characters of a receiver's answer kept in the delivery log

# Combined status: the worst state present wins (older Gitea's NoBetterThan order).
STATE_RANK = {"error": 5, "failure": 4, "warning": 3, "pending": 2, "success": 1, "skipped": 0}
# X-Gitea-Event is the group of the specific X-Gitea-Event-Type.
EVENT_GROUPS = {
    "push": "push",
    "delete": "delete",
    "pull_request": "pull_request",
    "pull_request_sync": "pull_request",
    "status": "status",
}
PULL_STATES = ("open", "closed", "all")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Go's encoding/json escapes these even inside MarshalIndent output.
_GO_ESCAPES = (
    ("&", "\\u0026"),
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


class ApiError(Exception):
    """An API answer other than success; the HTTP layer turns it into Gitea's error JSON."""

    def __init__(self, status: int, message: str = NOT_FOUND, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class ApiFault:
    """A staged failure of the API for paths containing `path_contains`."""

    status: int
    path_contains: str
    remaining: int | None  # None: until cleared


# --- state -------------------------------------------------------------------------------


@dataclass
class Hook:
    id: int
    url: str
    secret: str = ""
    repo: str | None = None  # "owner/name"; None is a global (system) hook
    events: frozenset[str] | None = None  # event types or groups; None means every event
    authorization: str | None = None

    def wants(self, repo: str, event_type: str) -> bool:
        if self.repo is not None and self.repo != repo:
            return False
        return self.events is None or bool({event_type, EVENT_GROUPS[event_type]} & self.events)


@dataclass
class Delivery:
    id: str
    hook_id: int
    url: str
    event: str
    event_type: str
    headers: dict[str, str]
    body: bytes
    replay_of: str | None = None
    dropped: bool = False
    status: int | None = None
    response: str = ""
    error: str | None = None

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def delivered(self) -> bool:
        return self.status is not None or self.error is not None

    @property
    def succeeded(self) -> bool:
        return self.status is not None and self.status // 100 == 2


@dataclass
class Status:
    id: int
    sha: str
    state: str
    context: str
    description: str
    target_url: str
    creator: str
    created_at: str


@dataclass
class Pull:
    id: int
    number: int
    title: str
    body: str
    head: str
    base: str
    head_sha: str
    user: str
    created_at: str
    updated_at: str
    state: str = "open"
    merged: bool = False
    merged_at: str | None = None
    merged_by: str | None = None
    merge_commit_sha: str | None = None
    merge_base: str | None = None
    closed_at: str | None = None


@dataclass
class Repo:
    id: int
    owner: str
    name: str
    path: Path
    default_branch: str
    refs: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, Pull] = field(default_factory=dict)
    statuses: list[Status] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass(frozen=True)
class MergeForm:
    style: str
    title: str
    message: str
    head_commit_id: str
    delete_branch: bool

    @classmethod
    def parse(cls, body: dict[str, Any]) -> MergeForm:
        # Go matches JSON field names case-insensitively; newer Gitea also takes snake_case.
        fields = {key.lower().replace("_", ""): value for key, value in body.items()}
        style = str(fields.get("do") or "")
        if style not in MERGERS:
            raise ApiError(422, f"[Do]: unsupported merge style {style!r}")
        return cls(
            style=style,
            title=str(fields.get("mergetitlefield") or ""),
            message=str(fields.get("mergemessagefield") or ""),
            head_commit_id=str(fields.get("headcommitid") or ""),
            delete_branch=bool(fields.get("deletebranchaftermerge")),
        )


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def go_json(payload: Any) -> bytes:
    """The bytes Gitea sends: json.MarshalIndent(payload, "", "  ")."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    for raw, escaped in _GO_ESCAPES:
        text = text.replace(raw, escaped)
    return text.encode()


def _hex_hmac(secret: str, body: bytes, digest: Any) -> str:
    return hmac.new(secret.encode(), body, digest).hexdigest() if secret else ""


def delivery_headers(
    delivery_id: str, event_type: str, body: bytes, secret: str, *, empty_status_event: bool
) -> dict[str, str]:
    event = EVENT_GROUPS[event_type]
    if event_type == "status" and empty_status_event:
        event = ""  # Gitea 1.23.0 (go-gitea/gitea#33244)
    sha256 = _hex_hmac(secret, body, hashlib.sha256)
    return {
        "Content-Type": "application/json",
        "User-Agent": "Go-http-client/1.1",
        "X-Gitea-Delivery": delivery_id,
        "X-Gitea-Event": event,
        "X-Gitea-Event-Type": event_type,
        "X-Gitea-Signature": sha256,
        "X-Gogs-Delivery": delivery_id,
        "X-Gogs-Event": event,
        "X-Gogs-Event-Type": event_type,
        "X-Gogs-Signature": sha256,
        "X-Hub-Signature": "sha1=" + _hex_hmac(secret, body, hashlib.sha1),
        "X-Hub-Signature-256": "sha256=" + sha256,
        "X-GitHub-Delivery": delivery_id,
        "X-GitHub-Event": event,
        "X-GitHub-Event-Type": event_type,
    }


# --- webhook delivery --------------------------------------------------------------------


class WebhookSender:
    """Gitea's hook task queue: every delivery is sent once, in order, and only recorded."""

    def __init__(self, *, timeout_s: float = 5.0, empty_status_event: bool = False) -> None:
        self.timeout_s = timeout_s
        self.empty_status_event = empty_status_event
        self.hooks: list[Hook] = []
        self.deliveries: list[Delivery] = []
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._session: ClientSession | None = None
        self._drop_next = 0
        self._drop_p = 0.0
        self._drop_rng = random.Random(0)

    def add_hook(
        self,
        url: str,
        secret: str = "",
        *,
        repo: str | None = None,
        events: Collection[str] | None = None,
        authorization: str | None = None,
    ) -> Hook:
        wanted = None if events is None else frozenset(events)
        hook = Hook(len(self.hooks) + 1, url, secret, repo, wanted, authorization)
        self.hooks.append(hook)
        return hook

    def drop_next(self, n: int = 1) -> None:
        self._drop_next += n

    def drop_rate(self, p: float, seed: int = 0) -> None:
        self._drop_p = p
        self._drop_rng = random.Random(seed)

    def emit(self, repo: str, event_type: str, payload: dict[str, Any]) -> list[Delivery]:
        body = go_json(payload)
        sent = []
        for hook in self.hooks:
            if hook.wants(repo, event_type):
                sent.append(self._deliver(self._new_delivery(hook, event_type, body), lossy=True))
        return sent

    def replay(self, delivery_id: str) -> Delivery:
        """Gitea's manual replay: the same payload as a new task with a new delivery id."""
        original = next((d for d in self.deliveries if d.id == delivery_id), None)
        if original is None:
            raise KeyError(delivery_id)
        hook = next(h for h in self.hooks if h.id == original.hook_id)
        delivery = self._new_delivery(hook, original.event_type, original.body)
        delivery.replay_of = original.id
        return self._deliver(delivery, lossy=False)

    async def drain(self) -> None:
        await self._queue.join()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _new_delivery(self, hook: Hook, event_type: str, body: bytes) -> Delivery:
        delivery_id = str(uuid.uuid4())
        headers = delivery_headers(
            delivery_id, event_type, body, hook.secret, empty_status_event=self.empty_status_event
        )
        if hook.authorization:
            headers["Authorization"] = hook.authorization
        return Delivery(
            id=delivery_id,
            hook_id=hook.id,
            url=hook.url,
            event=headers["X-Gitea-Event"],
            event_type=event_type,
            headers=headers,
            body=body,
        )

    def _deliver(self, delivery: Delivery, *, lossy: bool) -> Delivery:
        self.deliveries.append(delivery)
        if lossy and self._should_drop():
            delivery.dropped = True
            return delivery
        self._queue.put_nowait(delivery)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return delivery

    def _should_drop(self) -> bool:
        if self._drop_next > 0:
            self._drop_next -= 1
            return True
        return self._drop_p > 0 and self._drop_rng.random() < self._drop_p

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._send(delivery)
            except Exception as exc:  # a broken receiver must not stop the queue
                delivery.error = f"{type(exc).__name__}: {exc}"
            finally:
                self._queue.task_done()

    async def _send(self, delivery: Delivery) -> None:
        if self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=self.timeout_s))
        try:
            async with self._session.post(
                delivery.url, data=delivery.body, headers=delivery.headers
            ) as resp:
                delivery.response = (await resp.text(errors="replace"))[:DELIVERY_LOG_BODY]
                delivery.status = resp.status
        except (ClientError, TimeoutError) as exc:
            delivery.error = f"{type(exc).__name__}: {exc}"
        log.info(
            "webhook %s %s -> %s", delivery.event_type, delivery.url, delivery.status or "failed"
        )


# --- git -------------------------------------------------------------------------------


async def _git(repo: Path, *args: str) -> GitResult:
    return await run_git(*args, cwd=repo)


async def _git_out(repo: Path, *args: str) -> str:
    res = await _git(repo, *args)
    if not res.ok:
        raise ApiError(500, f"git {args[0]} failed: {res.err.strip()[-300:]}")
    return res.out


async def _resolve(repo: Path, ref: str) -> str | None:
    """The commit a branch, tag or sha names, or None."""
    if not ref or ref.startswith("-"):
        return None
    res = await _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    return res.out.strip() if res.ok else None


async def _heads(repo: Path) -> dict[str, str]:
    out = await _git_out(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/")
    heads = {}
    for line in out.splitlines():
        sha, _, ref = line.partition(" ")
        heads[ref.removeprefix("refs/heads/")] = sha
    return heads


async def _rev_list(repo: Path, tip: str, exclude: Iterable[str]) -> list[str]:
    out = await _git_out(repo, "rev-list", tip, *(f"^{sha}" for sha in exclude), "--")
    return out.split()


async def _merge_base(repo: Path, a: str, b: str) -> str | None:
    res = await _git(repo, "merge-base", a, b)
    return res.out.strip() if res.ok else None


async def _is_ancestor(repo: Path, ancestor: str, descendant: str) -> bool:
    return (await _git(repo, "merge-base", "--is-ancestor", ancestor, descendant)).code == 0


async def _merge_tree(repo: Path, base: str, head: str) -> tuple[str | None, list[str]]:
    """(tree, []) for a clean merge, (None, conflicted files) otherwise."""
    res = await _git(repo, "merge-tree", "--write-tree", "--name-only", "--no-messages", base, head)
    lines = res.out.splitlines()
    if res.code == 0:
        return lines[0], []
    if res.code == 1:
        return None, [line for line in lines[1:] if line]
    raise _conflict("merge", res.err.strip())


async def _mergeable(repo: Path, base: str, head: str) -> bool:
    try:
        tree, _ = await _merge_tree(repo, base, head)
    except ApiError:  # unrelated histories
        return False
    return tree is not None


async def _commit_tree(repo: Path, tree: str, parents: Iterable[str], message: str) -> str:
    args = ["commit-tree", tree]
    for parent in parents:
        args += ["-p", parent]
    return (await _git_out(repo, *args, "-m", message)).strip()


async def _set_ref(repo: Path, branch: str, new: str, old: str) -> bool:
    """Compare-and-swap a branch head; ZERO_SHA as `new` deletes it."""
    ref = f"refs/heads/{branch}"
    args = ("-d", ref, old) if new == ZERO_SHA else (ref, new, old)
    return (await _git(repo, "update-ref", *args)).ok


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


async def _blob(repo: Path, sha: str) -> bytes | None:
    """A blob's exact bytes (run_git decodes output as text)."""
    proc = await asyncio.create_subprocess_exec(
        "git",
        "cat-file",
        "blob",
        sha,
        cwd=repo,
        env=_clean_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return out if proc.returncode == 0 else None


@dataclass(frozen=True)
class TreeEntry:
    path: str
    kind: str  # blob | tree | commit
    sha: str
    size: int


async def _tree_entries(repo: Path, commit: str, path: str) -> list[TreeEntry]:
    out = await _git_out(repo, "ls-tree", "-l", "-z", commit, "--", path)
    entries = []
    for record in filter(None, out.split("\0")):
        meta, _, name = record.partition("\t")
        _mode, kind, sha, size = meta.split()
        entries.append(TreeEntry(name, kind, sha, int(size) if size.isdigit() else 0))
    return entries


async def _entry(repo: Path, commit: str, path: str) -> TreeEntry | None:
    if not path or ".." in path.split("/"):
        return None
    return next((e for e in await _tree_entries(repo, commit, path) if e.path == path), None)


# --- merge styles --------------------------------------------------------------------------


def _conflict(style: str, detail: str, files: Iterable[str] = ()) -> ApiError:
    names = ", ".join(files)
    message = f"merge conflicts in {names}" if names else f"{style} failed: {detail[-300:]}"
    return ApiError(409, message, Style=style, StdOut="", StdErr=detail[-2000:])


async def _clean_tree(repo: Path, base: str, head: str, style: str) -> str:
    tree, conflicts = await _merge_tree(repo, base, head)
    if tree is None:
        raise _conflict(style, "", conflicts)
    return tree


async def _merge(repo: Path, base: str, head: str, message: str) -> str:
    tree = await _clean_tree(repo, base, head, "merge")
    return await _commit_tree(repo, tree, (base, head), message)


async def _squash(repo: Path, base: str, head: str, message: str) -> str:
    tree = await _clean_tree(repo, base, head, "squash")
    return await _commit_tree(repo, tree, (base,), message)


async def _fast_forward(repo: Path, base: str, head: str, message: str) -> str:
    if not await _is_ancestor(repo, base, head):
        raise _conflict("fast-forward-only", "the base branch is not an ancestor of the head")
    return head


async def _rebase(repo: Path, base: str, head: str, message: str) -> str:
    """Replay the head's commits onto the base in a throwaway worktree."""
    tmp = Path(tempfile.mkdtemp(prefix="gitea-sandbox-rebase-"))
    work = tmp / "work"
    try:
        await _git_out(repo, "worktree", "add", "--quiet", "--detach", str(work), head)
        res = await run_git("rebase", "--quiet", base, cwd=work)
        if not res.ok:
            await run_git("rebase", "--abort", cwd=work)
            raise _conflict("rebase", res.err or res.out)
        return (await _git_out(work, "rev-parse", "HEAD")).strip()
    finally:
        await _git(repo, "worktree", "remove", "--force", str(work))
        await _git(repo, "worktree", "prune")
        shutil.rmtree(tmp, ignore_errors=True)


async def _rebase_merge(repo: Path, base: str, head: str, message: str) -> str:
    rebased = await _rebase(repo, base, head, message)
    tree = (await _git_out(repo, "rev-parse", f"{rebased}^{{tree}}")).strip()
    return await _commit_tree(repo, tree, (base, rebased), message)


MERGERS: dict[str, Callable[[Path, str, str, str], Awaitable[str]]] = {
    "merge": _merge,
    "rebase": _rebase,
    "rebase-merge": _rebase_merge,
    "squash": _squash,
    "fast-forward-only": _fast_forward,
}


def merge_message(pr: Pull, form: MergeForm) -> str:
    if form.style == "squash":
        default = f"{pr.title} (#{pr.number})"
    else:
        default = f"Merge pull request '{pr.title}' (#{pr.number}) from {pr.head} into {pr.base}"
    title = form.title or default
    return f"{title}\n\n{form.message}" if form.message else title


# --- the forge -----------------------------------------------------------------------------


_LOG_FORMAT = "%H%x1f%an%x1f%ae%x1f%aI%x1f%cn%x1f%ce%x1f%cI%x1f%B"
_CHANGE_KINDS = {"A": "added", "D": "removed"}  # any other status letter is "modified"


class GiteaSandbox:
    def __init__(
        self,
        root: Path,
        token: str = "gitea_token",
        *,
        user: str = "conveyor",
        watch: bool = True,
        poll_interval_s: float = 0.2,
        deliver_timeout_s: float = 5.0,
        empty_status_event: bool = False,
        ci_state: str | None = None,
        ci_delay_s: float = 0.1,
    ) -> None:
        self.root = Path(root)
        # A stand-in CI (like Gitea Actions): reports `ci_state` on each new branch head.
        self.ci_state = ci_state
        self.ci_delay_s = ci_delay_s
        self._ci_runs: set[asyncio.Task[None]] = set()
        self.token = token
        self.user = user
        self.watch = watch
        self.poll_interval_s = poll_interval_s
        self.webhooks = WebhookSender(
            timeout_s=deliver_timeout_s, empty_status_event=empty_status_event
        )
        self.base_url = ""
        self._repos: dict[str, Repo] = {}
        self._user_ids: dict[str, int] = {}
        self._counters = {"repo": 0, "pull": 0, "status": 0}
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._faults: list[ApiFault] = []

    # lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        await self._discover()
        self._runner = web.AppRunner(build_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}"
        if self.watch:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self.base_url

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), drain_timeout_s)
        await self.webhooks.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> GiteaSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def api_url(self) -> str:
        return f"{self.base_url}{API_PREFIX}"

    @property
    def empty_status_event(self) -> bool:
        return self.webhooks.empty_status_event

    @empty_status_event.setter
    def empty_status_event(self, value: bool) -> None:
        self.webhooks.empty_status_event = value

    # the Python API for tests and the demo

    async def create_repo(
        self,
        owner: str,
        name: str,
        files: dict[str, str] | None = None,
        default_branch: str = "main",
    ) -> Path:
        """A bare repository seeded with one commit of `files` (the sample project if None)."""
        path = self._repo_path(owner, name)
        if f"{owner}/{name}" in self._repos or path.exists():
            raise ValueError(f"repository {owner}/{name} already exists")
        await create_sample_remote(path, files, default_branch)
        await self._register(owner, name, path, default_branch)
        return path

    def has_repo(self, owner: str, name: str) -> bool:
        return f"{owner}/{name}" in self._repos

    def repo_path(self, owner: str, name: str) -> Path:
        return self._repo(owner, name).path

    def add_hook(
        self,
        owner: str | None,
        name: str | None,
        url: str,
        secret: str = "",
        *,
        events: Collection[str] | None = None,
        authorization: str | None = None,
    ) -> Hook:
        """A repository's webhook; owner and name None make a global one."""
        repo = None if owner is None else self._repo(owner, name or "").full_name
        return self.webhooks.add_hook(
            url, secret, repo=repo, events=events, authorization=authorization
        )

    async def set_status(
        self,
        owner: str,
        name: str,
        sha: str,
        state: str,
        context: str = "ci/tests",
        *,
        description: str = "",
        target_url: str = "",
        creator: str = "ci",
    ) -> dict[str, Any]:
        """Report a commit status as a CI would (the `status` webhook follows)."""
        form = {
            "state": state,
            "context": context,
            "description": description,
            "target_url": target_url,
        }
        return await self.create_status(owner, name, sha, form, creator=creator)

    async def pr(self, owner: str, name: str, number: int) -> dict[str, Any]:
        return await self.get_pull(owner, name, number)

    async def branch_sha(self, owner: str, name: str, branch: str) -> str | None:
        repo = self._repo(owner, name)
        async with repo.lock:
            await self._sync_locked(repo)
            return repo.refs.get(branch)

    @property
    def deliveries(self) -> list[Delivery]:
        return list(self.webhooks.deliveries)

    def replay(self, delivery_id: str) -> Delivery:
        return self.webhooks.replay(delivery_id)

    def api_fault(
        self, status: int | None, *, path_contains: str = "", times: int | None = None
    ) -> None:
        """Answer API requests whose path contains `path_contains` with `status` (500, 502,
        503, 429 with Retry-After) for the next `times` of them, or until `api_fault(None)`
        clears every fault. The request does nothing else."""
        if status is None:
            self._faults.clear()
            return
        if not 400 <= status <= 599:
            raise ValueError("a fault is an HTTP error status")
        self._faults.append(ApiFault(status, path_contains, times))

    def staged_fault(self, path: str) -> ApiError | None:
        for fault in self._faults:
            if fault.path_contains in path:
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return ApiError(fault.status, HTTPStatus(fault.status).phrase)
        return None

    def drop_next(self, n: int = 1) -> None:
        self.webhooks.drop_next(n)

    def drop_rate(self, p: float, seed: int = 0) -> None:
        self.webhooks.drop_rate(p, seed)

    async def drain(self) -> None:
        await self.webhooks.drain()

    async def sync(self) -> None:
        """Notice pushes to every repository now (the watcher does the same on a timer)."""
        for repo in list(self._repos.values()):
            async with repo.lock:
                await self._sync_locked(repo)

    # repositories

    def _repo_path(self, owner: str, name: str) -> Path:
        for value in (owner, name):
            if not _SAFE_NAME.fullmatch(value) or ".." in value:
                raise ValueError(f"invalid repository name part: {value!r}")
        return self.root / owner / f"{name}.git"

    def _repo(self, owner: str, name: str) -> Repo:
        repo = self._repos.get(f"{owner}/{name}")
        if repo is None:
            raise ApiError(404)
        return repo

    async def _register(self, owner: str, name: str, path: Path, default_branch: str) -> Repo:
        self._counters["repo"] += 1
        repo = Repo(self._counters["repo"], owner, name, path, default_branch)
        repo.refs = await _heads(path)
        self._repos[repo.full_name] = repo
        return repo

    async def _discover(self) -> None:
        """Pick up repositories a previous run left under root (their PRs are gone)."""
        for path in sorted(self.root.glob("*/*.git")):
            owner, name = path.parent.name, path.name.removesuffix(".git")
            if f"{owner}/{name}" in self._repos or not (path / "HEAD").is_file():
                continue
            head = await _git(path, "symbolic-ref", "--short", "HEAD")
            await self._register(owner, name, path, head.out.strip() or "main")

    # noticing pushes

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.sync()
            except Exception:  # keep watching; the next round may succeed
                log.exception("gitea sandbox: ref watcher failed")

    async def _sync_locked(self, repo: Repo) -> None:
        heads = await _heads(repo.path)
        old, repo.refs = repo.refs, heads
        for branch in sorted(old.keys() | heads.keys()):
            before, after = old.get(branch, ZERO_SHA), heads.get(branch, ZERO_SHA)
            if before != after:
                await self._on_branch_moved(repo, branch, before, after)

    async def _on_branch_moved(self, repo: Repo, branch: str, before: str, after: str) -> None:
        if after == ZERO_SHA:
            self._emit_delete(repo, branch)
            return
        await self._emit_push(repo, branch, before, after)
        if self.ci_state and branch != repo.default_branch:
            run = asyncio.get_running_loop().create_task(self._run_ci(repo, after))
            self._ci_runs.add(run)
            run.add_done_callback(self._ci_runs.discard)
        for pr in repo.pulls.values():
            if pr.state == "open" and pr.head == branch:
                pr.head_sha, pr.updated_at = after, now()
                await self._emit_pull(repo, pr, "synchronized")

    async def _run_ci(self, repo: Repo, sha: str) -> None:
        await asyncio.sleep(self.ci_delay_s)
        await self.set_status(repo.owner, repo.name, sha, self.ci_state, context="ci/sandbox")

    # webhook payloads

    def _emit(self, repo: Repo, event_type: str, payload: dict[str, Any]) -> None:
        self.webhooks.emit(repo.full_name, event_type, payload)

    async def _emit_push(self, repo: Repo, branch: str, before: str, after: str) -> None:
        # A new branch lists the commits no other branch has.
        others = [sha for name, sha in repo.refs.items() if name != branch]
        shas = await _rev_list(repo.path, after, [before] if before != ZERO_SHA else others)
        commits = [await self._commit_json(repo, sha) for sha in shas[:PUSH_COMMITS_LIMIT]]
        payload = {
            "ref": f"refs/heads/{branch}",
            "before": before,
            "after": after,
            "compare_url": f"{self._html_url(repo)}/compare/{before}...{after}",
            "commits": commits,
            "total_commits": len(shas),
            "head_commit": await self._commit_json(repo, after),
            "repository": self._repo_json(repo),
            "pusher": self._user_json(self.user),
            "sender": self._user_json(self.user),
        }
        self._emit(repo, "push", payload)

    def _emit_delete(self, repo: Repo, branch: str) -> None:
        payload = {
            "ref": branch,
            "ref_type": "branch",
            "pusher_type": "user",
            "repository": self._repo_json(repo),
            "sender": self._user_json(self.user),
        }
        self._emit(repo, "delete", payload)

    async def _emit_pull(self, repo: Repo, pr: Pull, action: str) -> None:
        payload = {
            "action": action,
            "number": pr.number,
            "pull_request": await self._pull_json(repo, pr),
            "requested_reviewer": None,
            "repository": self._repo_json(repo),
            "sender": self._user_json(self.user),
            "commit_id": "",
            "review": None,
        }
        self._emit(
            repo, "pull_request_sync" if action == "synchronized" else "pull_request", payload
        )

    async def _emit_status(self, repo: Repo, status: Status) -> None:
        payload = {
            "id": status.id,
            "sha": status.sha,
            "context": status.context,
            "state": status.state,
            "description": status.description,
            "target_url": status.target_url,
            "created_at": status.created_at,
            "updated_at": status.created_at,
            "commit": await self._commit_json(repo, status.sha),
            "repository": self._repo_json(repo),
            "sender": self._user_json(status.creator),
        }
        self._emit(repo, "status", payload)

    # JSON shapes

    def _html_url(self, repo: Repo) -> str:
        return f"{self.base_url}/{repo.full_name}"

    def _repo_api_url(self, repo: Repo) -> str:
        return f"{self.api_url}/repos/{repo.full_name}"

    def _user_json(self, login: str) -> dict[str, Any]:
        uid = self._user_ids.setdefault(login, len(self._user_ids) + 1)
        return {
            "id": uid,
            "login": login,
            "login_name": "",
            "full_name": "",
            "email": f"{login}@noreply.localhost",
            "avatar_url": "",
            "username": login,
        }

    def _repo_json(self, repo: Repo) -> dict[str, Any]:
        return {
            "id": repo.id,
            "owner": self._user_json(repo.owner),
            "name": repo.name,
            "full_name": repo.full_name,
            "description": "",
            "empty": False,
            "private": False,
            "fork": False,
            "mirror": False,
            "archived": False,
            "html_url": self._html_url(repo),
            "url": self._repo_api_url(repo),
            "ssh_url": "",
            "clone_url": str(repo.path),
            "default_branch": repo.default_branch,
            "has_pull_requests": True,
            "allow_merge_commits": True,
            "allow_rebase": True,
            "allow_rebase_explicit": True,
            "allow_squash_merge": True,
            "allow_fast_forward_only_merge": True,
            "default_merge_style": "merge",
        }

    async def _commit_json(self, repo: Repo, sha: str) -> dict[str, Any]:
        out = await _git_out(repo.path, "log", "-1", f"--format={_LOG_FORMAT}", sha, "--")
        full, an, ae, adate, cn, ce, _cdate, message = out.split("\x1f", 7)
        files = await self._changed_files(repo, full)
        return {
            "id": full,
            "message": message.rstrip("\n") + "\n",
            "url": f"{self._html_url(repo)}/commit/{full}",
            "author": {"name": an, "email": ae, "username": ""},
            "committer": {"name": cn, "email": ce, "username": ""},
            "verification": None,
            "timestamp": adate,
            **files,
        }

    async def _changed_files(self, repo: Repo, sha: str) -> dict[str, list[str]]:
        out = await _git_out(
            repo.path,
            "diff-tree",
            "-r",
            "-z",
            "--no-commit-id",
            "--name-status",
            "--root",
            "--diff-merges=first-parent",
            sha,
        )
        files: dict[str, list[str]] = {"added": [], "removed": [], "modified": []}
        parts = out.split("\0")
        for kind, path in zip(parts[0::2], parts[1::2], strict=False):
            if kind:
                files[_CHANGE_KINDS.get(kind[0], "modified")].append(path)
        return files

    def _branch_ref_json(self, repo: Repo, branch: str, sha: str) -> dict[str, Any]:
        return {
            "label": branch,
            "ref": branch,
            "sha": sha,
            "repo_id": repo.id,
            "repo": self._repo_json(repo),
        }

    async def _pull_json(self, repo: Repo, pr: Pull) -> dict[str, Any]:
        base_sha = repo.refs.get(pr.base, pr.merge_base or "")
        mergeable, merge_base = True, pr.merge_base
        if pr.state == "open" and base_sha:
            mergeable = await _mergeable(repo.path, base_sha, pr.head_sha)
            merge_base = await _merge_base(repo.path, base_sha, pr.head_sha)
        html = f"{self._html_url(repo)}/pulls/{pr.number}"
        return {
            "id": pr.id,
            "url": html,
            "number": pr.number,
            "user": self._user_json(pr.user),
            "title": pr.title,
            "body": pr.body,
            "labels": [],
            "milestone": None,
            "assignee": None,
            "assignees": None,
            "state": pr.state,
            "draft": False,
            "is_locked": False,
            "comments": 0,
            "html_url": html,
            "diff_url": f"{html}.diff",
            "patch_url": f"{html}.patch",
            "mergeable": mergeable,
            "merged": pr.merged,
            "merged_at": pr.merged_at,
            "merge_commit_sha": pr.merge_commit_sha,
            "merged_by": self._user_json(pr.merged_by) if pr.merged_by else None,
            "allow_maintainer_edit": False,
            "base": self._branch_ref_json(repo, pr.base, base_sha),
            "head": self._branch_ref_json(repo, pr.head, pr.head_sha),
            "merge_base": merge_base,
            "due_date": None,
            "created_at": pr.created_at,
            "updated_at": pr.updated_at,
            "closed_at": pr.closed_at,
        }

    def _status_json(self, repo: Repo, status: Status) -> dict[str, Any]:
        return {
            "id": status.id,
            "status": status.state,  # "status" here, "state" in the combined status and webhook
            "target_url": status.target_url,
            "description": status.description,
            "url": f"{self._repo_api_url(repo)}/statuses/{status.sha}",
            "context": status.context,
            "creator": self._user_json(status.creator),
            "created_at": status.created_at,
            "updated_at": status.created_at,
        }

    # pull requests

    async def create_pull(self, owner: str, name: str, form: dict[str, Any]) -> dict[str, Any]:
        repo = self._repo(owner, name)
        head, base, title = (str(form.get(key) or "") for key in ("head", "base", "title"))
        if not (head and base and title):
            raise ApiError(422, "[Head Base Title]: Required")
        head = _same_repo_branch(repo, head)
        async with repo.lock:
            await self._sync_locked(repo)
            head_sha = repo.refs.get(head)
            if head_sha is None or base not in repo.refs:
                raise ApiError(404)
            if head == base:
                raise ApiError(422, "Invalid PullRequest: head and base are the same branch")
            self._refuse_duplicate(repo, head, base)
            pr = self._new_pull(repo, head, base, head_sha, title, str(form.get("body") or ""))
            await self._emit_pull(repo, pr, "opened")
            return await self._pull_json(repo, pr)

    def _refuse_duplicate(self, repo: Repo, head: str, base: str) -> None:
        for pr in repo.pulls.values():
            if pr.state == "open" and (pr.head, pr.base) == (head, base):
                raise ApiError(
                    409,
                    f"pull request already exists for these targets [id: {pr.id}, "
                    f"issue_id: {pr.id}, head_repo_id: {repo.id}, base_repo_id: {repo.id}, "
                    f"head_branch: {head}, base_branch: {base}]",
                )

    def _new_pull(
        self, repo: Repo, head: str, base: str, head_sha: str, title: str, body: str
    ) -> Pull:
        self._counters["pull"] += 1
        stamp = now()
        pr = Pull(
            id=self._counters["pull"],
            number=len(repo.pulls) + 1,
            title=title,
            body=body,
            head=head,
            base=base,
            head_sha=head_sha,
            user=self.user,
            created_at=stamp,
            updated_at=stamp,
        )
        repo.pulls[pr.number] = pr
        return pr

    async def get_pull(self, owner: str, name: str, number: int) -> dict[str, Any]:
        repo = self._repo(owner, name)
        async with repo.lock:
            await self._sync_locked(repo)
            return await self._pull_json(repo, _pull_of(repo, number))

    async def list_pulls(self, owner: str, name: str, state: str) -> list[dict[str, Any]]:
        if state not in PULL_STATES:
            raise ApiError(422, f"[State]: must be one of {', '.join(PULL_STATES)}")
        repo = self._repo(owner, name)
        async with repo.lock:
            await self._sync_locked(repo)
            pulls = sorted(repo.pulls.values(), key=lambda pr: pr.number, reverse=True)
            return [
                await self._pull_json(repo, pr)
                for pr in pulls
                if state == "all" or pr.state == state
            ]

    def is_merged(self, owner: str, name: str, number: int) -> bool:
        return _pull_of(self._repo(owner, name), number).merged

    async def merge_pull(self, owner: str, name: str, number: int, body: dict[str, Any]) -> None:
        repo = self._repo(owner, name)
        form = MergeForm.parse(body)
        async with repo.lock:
            await self._sync_locked(repo)
            pr = _pull_of(repo, number)
            _check_open(pr)
            if form.head_commit_id and form.head_commit_id != pr.head_sha:
                raise ApiError(409, "head out of date")
            base_sha = repo.refs.get(pr.base)
            if base_sha is None:
                raise ApiError(404)
            merged = await MERGERS[form.style](
                repo.path, base_sha, pr.head_sha, merge_message(pr, form)
            )
            await self._land(repo, pr, base_sha, merged)
            if form.delete_branch and repo.refs.get(pr.head) == pr.head_sha:
                await self._delete_branch(repo, pr.head, pr.head_sha)

    async def _land(self, repo: Repo, pr: Pull, base_sha: str, merged: str) -> None:
        """Move the base branch (compare-and-swap), close the PR, announce both."""
        merge_base = await _merge_base(repo.path, base_sha, pr.head_sha)
        if merged != base_sha and not await _set_ref(repo.path, pr.base, merged, base_sha):
            raise ApiError(409, "merge push out of date")
        repo.refs[pr.base] = merged
        stamp = now()
        pr.state, pr.merged, pr.merged_by = "closed", True, self.user
        pr.merged_at = pr.closed_at = pr.updated_at = stamp
        pr.merge_commit_sha, pr.merge_base = merged, merge_base
        await self._emit_pull(repo, pr, "closed")
        if merged != base_sha:
            await self._emit_push(repo, pr.base, base_sha, merged)

    async def _delete_branch(self, repo: Repo, branch: str, sha: str) -> None:
        if await _set_ref(repo.path, branch, ZERO_SHA, sha):
            repo.refs.pop(branch, None)
            self._emit_delete(repo, branch)

    # commit statuses

    async def create_status(
        self, owner: str, name: str, sha: str, form: dict[str, Any], *, creator: str | None = None
    ) -> dict[str, Any]:
        repo = self._repo(owner, name)
        state = str(form.get("state") or "")
        if state not in STATE_RANK:
            raise ApiError(422, f"[State]: invalid commit status state {state!r}")
        full = await _resolve(repo.path, sha)
        if full is None:
            raise ApiError(404)
        self._counters["status"] += 1
        status = Status(
            id=self._counters["status"],
            sha=full,
            state=state,
            context=str(form.get("context") or "default"),
            description=str(form.get("description") or ""),
            target_url=str(form.get("target_url") or ""),
            creator=creator or self.user,
            created_at=now(),
        )
        repo.statuses.append(status)
        await self._emit_status(repo, status)
        return self._status_json(repo, status)

    async def _statuses_of(self, owner: str, name: str, ref: str) -> tuple[Repo, str, list[Status]]:
        repo = self._repo(owner, name)
        sha = await _resolve(repo.path, ref)
        if sha is None:
            raise ApiError(404)
        newest_first = [s for s in reversed(repo.statuses) if s.sha == sha]
        return repo, sha, newest_first

    async def list_statuses(self, owner: str, name: str, ref: str) -> list[dict[str, Any]]:
        repo, _, statuses = await self._statuses_of(owner, name, ref)
        return [self._status_json(repo, s) for s in statuses]

    async def combined_status(self, owner: str, name: str, ref: str) -> dict[str, Any]:
        repo, sha, statuses = await self._statuses_of(owner, name, ref)
        if not statuses:  # older Gitea answers an empty CombinedStatus
            return {
                "state": "",
                "sha": "",
                "total_count": 0,
                "statuses": None,
                "repository": None,
                "commit_url": "",
                "url": "",
            }
        latest: dict[str, Status] = {}
        for status in statuses:
            latest.setdefault(status.context, status)
        current = sorted(latest.values(), key=lambda s: s.id)
        api = self._repo_api_url(repo)
        return {
            "state": max((s.state for s in current), key=STATE_RANK.__getitem__),
            "sha": sha,
            "total_count": len(current),
            "statuses": [self._status_json(repo, s) for s in current],
            "repository": self._repo_json(repo),
            "commit_url": f"{api}/commits/{sha}",
            "url": f"{api}/commits/{sha}/status",
        }

    # branches and files

    async def get_branch(self, owner: str, name: str, branch: str) -> dict[str, Any]:
        repo = self._repo(owner, name)
        sha = await _resolve(repo.path, f"refs/heads/{branch}")
        if sha is None:
            raise ApiError(404, "branch does not exist")
        return {
            "name": branch,
            "commit": await self._commit_json(repo, sha),
            "protected": False,
            "required_approvals": 0,
            "enable_status_check": False,
            "status_check_contexts": [],
            "user_can_push": True,
            "user_can_merge": True,
            "effective_branch_protection_name": "",
        }

    async def _file(
        self, owner: str, name: str, path: str, ref: str | None
    ) -> tuple[Repo, str, TreeEntry]:
        repo = self._repo(owner, name)
        commit = await _resolve(repo.path, ref or repo.default_branch)
        entry = await _entry(repo.path, commit, path.strip("/")) if commit else None
        if commit is None or entry is None:
            raise ApiError(404, f"object does not exist [id: {ref or ''}, rel_path: {path}]")
        return repo, commit, entry

    async def get_contents(
        self, owner: str, name: str, path: str, ref: str | None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        repo, commit, entry = await self._file(owner, name, path, ref)
        if entry.kind == "tree":
            children = await _tree_entries(repo.path, commit, entry.path + "/")
            return [self._content_json(repo, commit, ref, child, None) for child in children]
        data = await _blob(repo.path, entry.sha) if entry.kind == "blob" else None
        return self._content_json(repo, commit, ref, entry, data)

    async def get_raw(self, owner: str, name: str, path: str, ref: str | None) -> bytes:
        repo, _, entry = await self._file(owner, name, path, ref)
        data = await _blob(repo.path, entry.sha) if entry.kind == "blob" else None
        if data is None:
            raise ApiError(404)
        return data

    def _content_json(
        self, repo: Repo, commit: str, ref: str | None, entry: TreeEntry, data: bytes | None
    ) -> dict[str, Any]:
        kinds = {"blob": "file", "tree": "dir", "commit": "submodule"}
        ref_name = ref or repo.default_branch
        return {
            "name": entry.path.rsplit("/", 1)[-1],
            "path": entry.path,
            "sha": entry.sha,
            "last_commit_sha": commit,
            "type": kinds.get(entry.kind, "file"),
            "size": entry.size,
            "encoding": "base64" if data is not None else None,
            "content": base64.b64encode(data).decode() if data is not None else None,
            "target": None,
            "url": f"{self._repo_api_url(repo)}/contents/{entry.path}?ref={ref_name}",
            "html_url": f"{self._html_url(repo)}/src/{ref_name}/{entry.path}",
            "git_url": f"{self._repo_api_url(repo)}/git/blobs/{entry.sha}",
            "download_url": f"{self._html_url(repo)}/raw/{ref_name}/{entry.path}",
            "submodule_git_url": None,
        }


def _same_repo_branch(repo: Repo, head: str) -> str:
    """`owner:branch` names a branch of this repository; other forks are not simulated."""
    owner, sep, branch = head.partition(":")
    if not sep:
        return head
    if owner not in (repo.owner, repo.full_name):
        raise ApiError(404)
    return branch


def _pull_of(repo: Repo, number: int) -> Pull:
    pr = repo.pulls.get(number)
    if pr is None:
        raise ApiError(404)
    return pr


def _check_open(pr: Pull) -> None:
    if pr.merged:
        raise ApiError(405, "The PR is already merged")
    if pr.state != "open":
        raise ApiError(405, "The PR is closed and cannot be merged")


# --- HTTP ----------------------------------------------------------------------------------


def _error_json(
    request: web.Request, error: ApiError, headers: dict[str, str] | None = None
) -> web.Response:
    body: dict[str, Any] = {"message": error.message, "url": f"{request.url.origin()}/api/swagger"}
    if error.status == 404:
        body["errors"] = [error.message]
    body.update(error.extra)
    return web.json_response(body, status=error.status, headers=headers)


def _credential(request: web.Request) -> tuple[str, str] | None:
    """(kind, token) of a request: an access token from `Authorization: token <t>`, basic
    auth (the token as password, or as user), `?token=` or `?access_token=`; an "oauth2"
    token from `Authorization: Bearer <t>` (Gitea takes plain access tokens with `token`)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "token" and value:
        return ("access", value)
    if scheme == "bearer" and value:
        return ("oauth2", value)
    if scheme == "basic" and value:
        with contextlib.suppress(ValueError):
            user, _, password = base64.b64decode(value).decode().partition(":")
            return ("access", password or user)
    query = request.query.get("token") or request.query.get("access_token")
    return ("access", query) if query else None


def _paginate(request: web.Request, items: list[Any]) -> tuple[list[Any], dict[str, str]]:
    page = max(_int_query(request, "page", 1), 1)
    limit = min(max(_int_query(request, "limit", DEFAULT_PAGE_SIZE), 1), MAX_PAGE_SIZE)
    last = max((len(items) + limit - 1) // limit, 1)
    links = {"next": page + 1, "last": last} if page < last else {}
    if page > 1:
        links.update(first=1, prev=page - 1)
    link = ",".join(
        f'<{request.url.update_query(page=n, limit=limit)}>; rel="{rel}"'
        for rel, n in links.items()
    )
    headers = {
        "X-Total-Count": str(len(items)),
        "Access-Control-Expose-Headers": "X-Total-Count, Link",
    }
    if link:
        headers["Link"] = link
    return items[(page - 1) * limit : page * limit], headers


def _int_query(request: web.Request, key: str, default: int) -> int:
    try:
        return int(request.query.get(key, default))
    except ValueError:
        return default


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError as exc:
        raise ApiError(422, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(422, "the JSON body must be an object")
    return body


class _Http:
    """Request handlers: they translate HTTP to GiteaSandbox calls and back."""

    def __init__(self, sandbox: GiteaSandbox) -> None:
        self.gitea = sandbox

    @web.middleware
    async def errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_json(request, exc)
        except web.HTTPNotFound:
            return _error_json(request, ApiError(404))
        except web.HTTPMethodNotAllowed:
            return _error_json(request, ApiError(405, "Method Not Allowed"))

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(API_PREFIX) and (fault := self.gitea.staged_fault(request.path)):
            if fault.status == 429:
                return _error_json(request, fault, headers={"Retry-After": "1"})
            raise fault
        if request.path.startswith(f"{API_PREFIX}/repos/"):
            credential = _credential(request)
            if credential is None:
                raise ApiError(401, "token is required")
            kind, token = credential
            if kind == "oauth2":  # the sandbox issues no OAuth2 tokens
                raise ApiError(401, "user does not exist")
            if not hmac.compare_digest(token.encode(), self.gitea.token.encode()):
                raise ApiError(401, "user does not exist")
        return await handler(request)

    def routes(self) -> list[web.RouteDef]:
        repo = f"{API_PREFIX}/repos/{{owner}}/{{repo}}"
        pull = f"{repo}/pulls/{{index:\\d+}}"
        control = "/sandbox/repos/{owner}/{repo}"
        return [
            web.get(f"{API_PREFIX}/version", self.version),
            web.post(f"{repo}/pulls", self.create_pull),
            web.get(f"{repo}/pulls", self.list_pulls),
            web.get(pull, self.get_pull),
            web.post(f"{pull}/merge", self.merge),
            web.get(f"{pull}/merge", self.is_merged),
            web.post(f"{repo}/statuses/{{sha}}", self.create_status),
            web.get(f"{repo}/statuses/{{ref}}", self.list_statuses),
            web.get(f"{repo}/commits/{{ref:.+}}/status", self.combined_status),
            web.get(f"{repo}/commits/{{ref:.+}}/statuses", self.list_statuses),
            web.get(f"{repo}/branches/{{branch:.+}}", self.branch),
            web.get(f"{repo}/contents/{{path:.+}}", self.contents),
            web.get(f"{repo}/raw/{{path:.+}}", self.raw),
            web.post("/sandbox/repos", self.ctl_create_repo),
            web.post("/sandbox/hooks", self.ctl_add_hook),
            web.post("/sandbox/sync", self.ctl_sync),
            web.post("/sandbox/drain", self.ctl_drain),
            web.post("/sandbox/faults", self.ctl_faults),
            web.get("/sandbox/deliveries", self.ctl_deliveries),
            web.post("/sandbox/deliveries/{id}/replay", self.ctl_replay),
            web.post(f"{control}/statuses/{{sha}}", self.ctl_set_status),
            web.get(f"{control}/pulls/{{index:\\d+}}", self.ctl_pull),
            web.get(f"{control}/branches/{{branch:.+}}", self.ctl_branch),
        ]

    # the REST API

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def create_pull(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        pr = await self.gitea.create_pull(owner, repo, await _json_body(request))
        return web.json_response(pr, status=201)

    async def list_pulls(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        pulls = await self.gitea.list_pulls(owner, repo, request.query.get("state", "open"))
        page, headers = _paginate(request, pulls)
        return web.json_response(page, headers=headers)

    async def get_pull(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        return web.json_response(await self.gitea.get_pull(owner, repo, _index(request)))

    async def merge(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        body = await _json_body(request)
        await self.gitea.merge_pull(owner, repo, _index(request), body)
        return web.Response(status=200)

    async def is_merged(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        if not self.gitea.is_merged(owner, repo, _index(request)):
            raise ApiError(404)
        return web.Response(status=204)

    async def create_status(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        body = await _json_body(request)
        status = await self.gitea.create_status(owner, repo, request.match_info["sha"], body)
        return web.json_response(status, status=201)

    async def list_statuses(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        statuses = await self.gitea.list_statuses(owner, repo, request.match_info["ref"])
        page, headers = _paginate(request, statuses)
        return web.json_response(page, headers=headers)

    async def combined_status(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        ref = request.match_info["ref"]
        return web.json_response(await self.gitea.combined_status(owner, repo, ref))

    async def branch(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        branch = request.match_info["branch"]
        return web.json_response(await self.gitea.get_branch(owner, repo, branch))

    async def contents(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        path, ref = request.match_info["path"], request.query.get("ref")
        return web.json_response(await self.gitea.get_contents(owner, repo, path, ref))

    async def raw(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        path, ref = request.match_info["path"], request.query.get("ref")
        data = await self.gitea.get_raw(owner, repo, path, ref)
        return web.Response(body=data, content_type="application/octet-stream")

    # control endpoints for out-of-process drivers

    async def ctl_create_repo(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            path = await self.gitea.create_repo(
                str(body.get("owner", "")),
                str(body.get("name", "")),
                body.get("files"),
                str(body.get("default_branch") or "main"),
            )
        except ValueError as exc:
            raise ApiError(409, str(exc)) from exc
        return web.json_response({"clone_url": str(path)}, status=201)

    async def ctl_add_hook(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        hook = self.gitea.add_hook(
            body.get("owner"),
            body.get("name"),
            str(body.get("url", "")),
            str(body.get("secret") or ""),
            events=body.get("events"),
        )
        return web.json_response({"id": hook.id}, status=201)

    async def ctl_sync(self, request: web.Request) -> web.Response:
        await self.gitea.sync()
        return web.Response(status=204)

    async def ctl_drain(self, request: web.Request) -> web.Response:
        await self.gitea.drain()
        return web.Response(status=204)

    async def ctl_faults(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if "drop_next" in body:
            self.gitea.drop_next(int(body["drop_next"]))
        if "drop_rate" in body:
            self.gitea.drop_rate(float(body["drop_rate"]), int(body.get("seed", 0)))
        return web.Response(status=204)

    async def ctl_deliveries(self, request: web.Request) -> web.Response:
        return web.json_response([_delivery_json(d) for d in self.gitea.deliveries])

    async def ctl_replay(self, request: web.Request) -> web.Response:
        try:
            delivery = self.gitea.replay(request.match_info["id"])
        except KeyError as exc:
            raise ApiError(404) from exc
        return web.json_response(_delivery_json(delivery), status=201)

    async def ctl_set_status(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        body = await _json_body(request)
        status = await self.gitea.create_status(
            owner, repo, request.match_info["sha"], body, creator=str(body.get("creator") or "ci")
        )
        return web.json_response(status, status=201)

    async def ctl_pull(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        return web.json_response(await self.gitea.pr(owner, repo, _index(request)))

    async def ctl_branch(self, request: web.Request) -> web.Response:
        owner, repo = _repo_of(request)
        sha = await self.gitea.branch_sha(owner, repo, request.match_info["branch"])
        return web.json_response({"sha": sha})


def _repo_of(request: web.Request) -> tuple[str, str]:
    return request.match_info["owner"], request.match_info["repo"]


def _index(request: web.Request) -> int:
    return int(request.match_info["index"])


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "hook_id": delivery.hook_id,
        "url": delivery.url,
        "event": delivery.event,
        "event_type": delivery.event_type,
        "replay_of": delivery.replay_of,
        "dropped": delivery.dropped,
        "status": delivery.status,
        "error": delivery.error,
        "payload": delivery.payload,
    }


def build_app(sandbox: GiteaSandbox) -> web.Application:
    http = _Http(sandbox)
    app = web.Application(middlewares=[http.errors, http.auth])
    app.add_routes(http.routes())
    return app


# --- standalone ----------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    sandbox = GiteaSandbox(Path(args.root), args.token)
    base_url = await sandbox.start(args.host, args.port)
    for full_name in args.repo:
        owner, _, name = full_name.partition("/")
        if not sandbox.has_repo(owner, name):
            await sandbox.create_repo(owner, name)
    for url in args.hook:
        sandbox.add_hook(None, None, url, args.secret)
    print(base_url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sandbox.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.sandbox.gitea", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", required=True, help="directory holding the bare repositories")
    parser.add_argument("--token", default="gitea_token")
    parser.add_argument("--repo", action="append", default=[], help="owner/name to create")
    parser.add_argument("--hook", action="append", default=[], help="global webhook URL")
    parser.add_argument("--secret", default="", help="secret of the --hook webhooks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
