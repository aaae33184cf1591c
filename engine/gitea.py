"""The Gitea REST client Conveyor uses, and the webhook helpers.

Gitea's answers are normalised here, at the edge: callers get a `Result` (ok, value, error)
and never an exception, whatever the server or the network does. Requests go through
`engine.http_retry`: timeouts, bounded retries with backoff on transport errors, 5xx and 429
(Retry-After honoured), and a POST (a PR, a merge) never repeated once it may have reached
the server. Lists follow `page`/`limit` to the end, trusting X-Total-Count over the page size
(the server may cap `limit`). Failures are logged with the method, path and HTTP status; the
token never appears in a log line or an error string.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

import httpx

from engine.http_retry import RetryPolicy, describe_error, retry_after_s, send_with_retry
from engine.outcome import Result

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

API_PREFIX = "/api/v1"
PAGE_LIMIT = 50  # Gitea's default MAX_RESPONSE_ITEMS; a server may cap `limit` lower
MAX_PAGES = 100  # a guard against a server that never stops paging
ERROR_TEXT_LIMIT = 300

# Combined status words -> the four Conveyor uses. A warning is not green, so it blocks
# like a failure; "skipped" (newer Gitea) is not a failure. Unknown words fail closed.
NORMALISED_STATE = {
    "success": "success",
    "skipped": "success",
    "pending": "pending",
    "warning": "failure",
    "failure": "failure",
    "error": "failure",
    "": "none",
}
UNKNOWN_STATE = "failure"
# Worst first, to combine per-context states when the server gives no combined state.
STATE_RANK = ("error", "failure", "warning", "pending", "success", "skipped")
EVENT_HEADERS = ("x-gitea-event-type", "x-gitea-event", "x-github-event")
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@dataclass(frozen=True)
class PullRequest:
    number: int
    html_url: str
    state: str  # "open" | "closed"
    merged: bool
    head_sha: str
    head_ref: str
    base_ref: str
    merge_commit_sha: str | None


@dataclass(frozen=True)
class MergeOutcome:
    merged: bool = False
    conflict: bool = False
    head_moved: bool = False
    already_merged: bool = False


@dataclass(frozen=True)
class CombinedStatus:
    state: str  # "success" | "pending" | "failure" | "none"
    sha: str
    contexts: dict[str, str] = field(default_factory=dict)  # context -> normalised state


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any  # the decoded JSON, or None
    content: bytes
    total: int | None = None  # X-Total-Count, on lists

    @property
    def message(self) -> str:
        if isinstance(self.body, dict) and self.body.get("message"):
            return str(self.body["message"])
        return self.content.decode(errors="replace").strip()


# --- webhooks ------------------------------------------------------------------------------


def verify_signature(secret: str, body: bytes, signature: str | None) -> bool:
    """Check X-Gitea-Signature: hex HMAC-SHA256 of the raw body (a `sha256=` prefix is
    accepted too, for X-Hub-Signature-256). An empty secret verifies nothing."""
    if not secret or not signature or not signature.isascii():
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    given = signature.strip().lower().removeprefix("sha256=")
    return hmac.compare_digest(expected.encode(), given.encode())


def event_type(headers: Mapping[str, str]) -> str:
    """The specific event (push, pull_request_sync, status, ...). Gitea 1.23.0 sent an
    empty X-Gitea-Event for status hooks, so the specific header comes first."""
    lowered = {key.lower(): value for key, value in headers.items()}
    for name in EVENT_HEADERS:
        if value := (lowered.get(name) or "").strip():
            return value.lower()
    return ""


def normalise_state(state: str) -> str:
    return NORMALISED_STATE.get(state.strip().lower(), UNKNOWN_STATE)


# --- the client ------------------------------------------------------------------------------


def _guarded(
    method: Callable[Concatenate[GiteaClient, P], Awaitable[Result[T]]],
) -> Callable[Concatenate[GiteaClient, P], Awaitable[Result[T]]]:
    """The last line of defence: a bug or a surprise in a reply becomes a failed Result."""

    @functools.wraps(method)
    async def wrapper(self: GiteaClient, *args: P.args, **kwargs: P.kwargs) -> Result[T]:
        try:
            return await method(self, *args, **kwargs)
        except Exception as exc:
            return self._fail(f"{method.__name__}: unexpected {type(exc).__name__}: {exc}")

    return wrapper


class GiteaClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 15,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_attempts: int = 3,
        retry_base_s: float = 0.5,
        retry_cap_s: float = 8.0,
        max_retry_wait_s: float = 60.0,
    ) -> None:
        """`base_url` is the server root (or the API root). Each request gets `timeout_s` and
        up to `retry_attempts` tries in all, with backoff from `retry_base_s` doubling up to
        `retry_cap_s` (engine.http_retry); a Retry-After over `max_retry_wait_s` fails at once.
        """
        root = base_url.rstrip("/")
        self.api_url = root if root.endswith(API_PREFIX) else root + API_PREFIX
        self.timeout_s = timeout_s
        self._retry = RetryPolicy(
            attempts=retry_attempts,
            base_s=retry_base_s,
            cap_s=retry_cap_s,
            max_wait_s=max_retry_wait_s,
        )
        self._token = token
        self._http = httpx.AsyncClient(
            base_url=self.api_url,
            headers={"Authorization": f"token {token}", "Accept": "application/json"},
            timeout=timeout_s,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"GiteaClient({self.api_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> GiteaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # pull requests

    @_guarded
    async def ensure_pull_request(
        self, repo: str, head: str, base: str, title: str, body: str
    ) -> Result[PullRequest]:
        """Create the PR, or return the open one for the same head and base (Gitea: 409)."""
        form = {"head": head, "base": base, "title": title, "body": body}
        res = await self._call("POST", repo, "/pulls", json=form)
        if not res.ok:
            return self._carry(res)
        reply = res.value
        if reply.status == 201:
            return self._pull(reply)
        if reply.status == 409:
            return await self._find_open_pull(repo, head, base)
        return self._unexpected("create pull request", reply)

    @_guarded
    async def get_pull_request(self, repo: str, number: int) -> Result[PullRequest]:
        res = await self._call("GET", repo, f"/pulls/{int(number)}")
        if not res.ok:
            return self._carry(res)
        if res.value.status == 200:
            return self._pull(res.value)
        return self._unexpected(f"get pull request #{number}", res.value)

    @_guarded
    async def merge_pull_request(
        self,
        repo: str,
        number: int,
        head_commit_id: str,
        *,
        style: str = "merge",
        title: str | None = None,
        message: str | None = None,
    ) -> Result[MergeOutcome]:
        """Merge only if the PR head is still `head_commit_id`. A conflict, a moved head and
        an earlier merge are outcomes (ok); anything else is a failure to retry later."""
        form: dict[str, Any] = {"Do": style, "head_commit_id": head_commit_id}
        if title:
            form["MergeTitleField"] = title
        if message:
            form["MergeMessageField"] = message
        res = await self._call("POST", repo, f"/pulls/{int(number)}/merge", json=form)
        if not res.ok:
            return self._carry(res)
        reply = res.value
        if reply.status == 200:
            return Result.success(MergeOutcome(merged=True), 200)
        if reply.status == 409:
            return await self._merge_refused(repo, number, head_commit_id, reply)
        if reply.status == 405:
            return await self._merge_not_allowed(repo, number, reply)
        return self._unexpected(f"merge pull request #{number}", reply)

    async def _merge_refused(
        self, repo: str, number: int, head_commit_id: str, reply: _Reply
    ) -> Result[MergeOutcome]:
        """A 409 is a moved head or a conflict; re-read the PR rather than trust the words.
        A conflict sends the task back to development, so it is claimed only when sure."""
        if "push out of date" in reply.message:  # the base moved while merging: transient
            return self._fail(f"merge of #{number}: the base branch moved; retry", 409)
        if "head out of date" in reply.message:
            return Result.success(MergeOutcome(head_moved=True), 409)
        current = await self.get_pull_request(repo, number)
        if not current.ok:
            refused = f"merge of #{number} refused ({self._text(reply)})"
            return self._fail(f"{refused}; cannot re-read the PR: {current.error}", 409)
        if current.value.merged:
            return Result.success(MergeOutcome(already_merged=True), 409)
        if head_commit_id and current.value.head_sha != head_commit_id:
            return Result.success(MergeOutcome(head_moved=True), 409)
        return Result.success(MergeOutcome(conflict=True), 409)

    async def _merge_not_allowed(
        self, repo: str, number: int, reply: _Reply
    ) -> Result[MergeOutcome]:
        res = await self._call("GET", repo, f"/pulls/{int(number)}/merge")
        if res.ok and res.value.status == 204:
            return Result.success(MergeOutcome(already_merged=True), 405)
        return self._fail(f"pull request #{number} cannot be merged: {self._text(reply)}", 405)

    async def _find_open_pull(self, repo: str, head: str, base: str) -> Result[PullRequest]:
        branch = head.rpartition(":")[2]  # "owner:branch" names the same branch
        pages = self._pages(repo, "/pulls", {"state": "open"}, "list pull requests")
        async with aclosing(pages):
            async for page in pages:
                if not page.ok:
                    return self._carry(page)
                for item in page.value:
                    pull = _parse_pull(item)
                    if pull and (pull.head_ref, pull.base_ref) == (branch, base):
                        return Result.success(pull, 200)
        return self._fail(f"Gitea reports a PR for {head} -> {base} exists but none is open", 409)

    # statuses, branches, files

    @_guarded
    async def combined_status(self, repo: str, ref: str) -> Result[CombinedStatus]:
        res = await self._call("GET", repo, f"/commits/{quote(ref, safe='')}/status")
        if not res.ok:
            return self._carry(res)
        if res.value.status != 200 or not isinstance(res.value.body, dict):
            return self._unexpected(f"combined status of {ref}", res.value)
        return Result.success(_combined(res.value.body, ref), 200)

    @_guarded
    async def branch_head(self, repo: str, branch: str) -> Result[str | None]:
        res = await self._call("GET", repo, f"/branches/{quote(branch, safe='/')}")
        if not res.ok:
            return self._carry(res)
        if res.value.status == 404:
            return Result.success(None, 404)
        body = res.value.body
        sha = body.get("commit", {}).get("id") if isinstance(body, dict) else None
        if res.value.status != 200 or not sha:
            return self._unexpected(f"branch {branch}", res.value)
        return Result.success(str(sha), 200)

    @_guarded
    async def file_text(self, repo: str, path: str, ref: str) -> Result[str | None]:
        quoted = quote(path.strip("/"), safe="/")
        res = await self._call("GET", repo, f"/contents/{quoted}", params={"ref": ref})
        if not res.ok:
            return self._carry(res)
        reply = res.value
        if reply.status == 404:
            return Result.success(None, 404)
        if reply.status != 200:
            return self._unexpected(f"contents of {path}", reply)
        if not isinstance(reply.body, dict) or reply.body.get("type") != "file":
            return self._fail(f"{path} at {ref} is not a file", 200)
        content = reply.body.get("content")
        if content is None:  # Gitea leaves out the content of some files; read the raw bytes
            return await self._raw_text(repo, quoted, ref)
        return Result.success(_decode_base64(content), 200)

    async def _raw_text(self, repo: str, quoted_path: str, ref: str) -> Result[str | None]:
        res = await self._call("GET", repo, f"/raw/{quoted_path}", params={"ref": ref})
        if not res.ok:
            return self._carry(res)
        if res.value.status == 404:
            return Result.success(None, 404)
        if res.value.status != 200:
            return self._unexpected(f"raw {quoted_path}", res.value)
        return Result.success(res.value.content.decode(errors="replace"), 200)

    # plumbing

    async def _pages(
        self, repo: str, suffix: str, params: dict[str, Any], what: str
    ) -> AsyncIterator[Result[list[Any]]]:
        """Gitea's page/limit pagination: one Result per non-empty page; a failure is the last.

        It ends at an empty page, or once X-Total-Count items came. A short page alone proves
        nothing: the server caps `limit` at its MAX_RESPONSE_ITEMS, which may be below ours.
        """
        seen = 0
        for page in range(1, MAX_PAGES + 1):
            query = {**params, "page": page, "limit": PAGE_LIMIT}
            res = await self._call("GET", repo, suffix, params=query)
            if not res.ok:
                yield self._carry(res)
                return
            reply = res.value
            if reply.status != 200 or not isinstance(reply.body, list):
                yield self._unexpected(what, reply)
                return
            if not reply.body:
                return
            yield Result.success(reply.body, 200)
            seen += len(reply.body)
            if reply.total is not None and seen >= reply.total:
                return
        yield self._fail(f"{what}: gave up after {MAX_PAGES} pages")

    async def _call(
        self,
        method: str,
        repo: str,
        suffix: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Result[_Reply]:
        """One request under /repos/{owner}/{name}; a failed Result only when no answer came."""
        owner, slash, name = repo.partition("/")
        if not (owner and slash and name) or "/" in name:
            return self._fail(f"invalid repository {repo!r}: expected owner/name")
        path = f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}{suffix}"
        resp = await send_with_retry(
            self._http,
            method,
            path,
            policy=self._retry,
            service="gitea",
            scrub=self._scrub,
            json=json,
            params=params,
        )
        if isinstance(resp, httpx.TimeoutException):
            return self._fail(f"{method} {path}: Gitea did not answer within {self.timeout_s}s")
        if isinstance(resp, Exception):
            reason = describe_error(resp)
            return self._fail(f"{method} {path}: cannot reach Gitea at {self.api_url}: {reason}")
        if resp.status_code == 401:
            return self._fail(f"{method} {path}: HTTP 401: the Gitea token was refused", 401)
        if resp.status_code == 429:
            wait = retry_after_s(resp)
            after = f" (retry after {wait:g}s)" if wait is not None else ""
            return self._fail(f"{method} {path}: rate limited by Gitea{after}", 429)
        reply = _Reply(resp.status_code, _json_or_none(resp), resp.content, _total_count(resp))
        return Result.success(reply)

    def _pull(self, reply: _Reply) -> Result[PullRequest]:
        pull = _parse_pull(reply.body)
        if pull is None:
            return self._fail(f"malformed pull request in the answer: {self._text(reply)}")
        return Result.success(pull, reply.status)

    def _unexpected(self, what: str, reply: _Reply) -> Result[Any]:
        return self._fail(f"{what}: HTTP {reply.status}: {self._text(reply)}", reply.status)

    def _carry(self, res: Result[Any]) -> Result[Any]:
        return Result.failure(res.error, res.status)  # already logged

    def _text(self, reply: _Reply) -> str:
        return self._scrub(reply.message)[:ERROR_TEXT_LIMIT]

    def _fail(self, error: str, status: int | None = None) -> Result[Any]:
        error = self._scrub(error)
        log.warning("gitea: %s", error)
        return Result.failure(error, status)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json() if resp.content else None
    except ValueError:
        return None


def _total_count(resp: httpx.Response) -> int | None:
    try:
        total = int(resp.headers.get("X-Total-Count", ""))
    except ValueError:
        return None
    return total if total >= 0 else None


def _decode_base64(content: str) -> str:
    try:
        return base64.b64decode(content).decode(errors="replace")
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the file content is not valid base64") from exc


def _parse_pull(data: Any) -> PullRequest | None:
    try:
        head, base = data["head"], data["base"]
        return PullRequest(
            number=int(data["number"]),
            html_url=str(data.get("html_url") or ""),
            state=str(data.get("state") or ""),
            merged=bool(data.get("merged")),
            head_sha=str(head.get("sha") or ""),
            head_ref=str(head.get("ref") or ""),
            base_ref=str(base.get("ref") or ""),
            merge_commit_sha=data.get("merge_commit_sha") or None,
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _combined(body: dict[str, Any], ref: str) -> CombinedStatus:
    """Latest status per context; older Gitea answers {"state": ""} when there is none."""
    latest: dict[str, tuple[int, str]] = {}
    for item in body.get("statuses") or []:
        if not isinstance(item, dict):
            continue
        raw = str(item.get("status") or item.get("state") or "")  # the key is "status"
        rank = int(item.get("id") or 0)
        context = str(item.get("context") or "default")
        if context not in latest or rank >= latest[context][0]:
            latest[context] = (rank, raw)
    raw_state = str(body.get("state") or "")
    if not raw_state and latest:
        raw_state = min((raw for _, raw in latest.values()), key=_rank)
    state = normalise_state(raw_state) if latest or raw_state else "none"
    sha = str(body.get("sha") or "") or (ref if _SHA.fullmatch(ref) else "")
    contexts = {context: normalise_state(raw) for context, (_, raw) in latest.items()}
    return CombinedStatus(state=state, sha=sha, contexts=contexts)


def _rank(state: str) -> int:
    return STATE_RANK.index(state) if state in STATE_RANK else 0  # unknown counts as worst
