"""The Plane API v1 client Conveyor uses, normalised at the edge.

Every method returns a `Result` and logs what went wrong; none raises into the caller (DESIGN
§6). Facts about the real server it relies on (shared/reference/plane-gitea.md §2-3): auth by
the `X-Api-Key` header; cursor pagination followed while `next_page_results` is true; no state
filter on the issue list; a state change is `PATCH {"state": <uuid>}`, and Plane sends no
webhook when the value did not change, so repeating it is harmless; `?expand=state` nests the
state; over the rate limit it answers 429 with Retry-After; state names can be renamed, so a
state means a logical key by its configured name, else by its group (`logical_state`, used
for webhooks in and moves out alike); a comment with an `external_id` already used is refused
with 409, which makes posting it again harmless. Requests go through
`engine.http_retry`: timeouts, bounded retries with backoff, Retry-After honoured, and a POST
never repeated once it may have reached the server unless it carries an external id. Tokens
never appear in logs or error strings.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from engine.http_retry import RetryPolicy, describe_error, retry_after_s, send_with_retry
from engine.outcome import Result

log = logging.getLogger(__name__)

T = TypeVar("T")

API_PREFIX = "/api/v1"
DEFAULT_PER_PAGE = 100
MAX_PAGES = 10_000  # a guard against a server that never stops paging
DETAIL_LIMIT = 200
COMMENT_SOURCE = "conveyor"  # external_source of the comments Conveyor posts
# A state no configured name claims still means In Progress or Done by its group.
GROUP_FALLBACK = {"started": "in_progress", "completed": "done"}
# Tags that start a new line of text (fullmatch against the lower-case tag name).
BLOCK_TAG = re.compile(
    r"p|div|br|hr|li|ul|ol|dl|dt|dd|h[1-6]|pre|blockquote|table|thead|tbody|tfoot|tr|td|th"
    r"|section|article|aside|header|footer|main|nav|figure|figcaption|address"
)
SKIPPED_TAGS = frozenset({"script", "style", "template"})


def _ok(value: T) -> Result[T]:
    return Result.success(value)


def _failed(error: str, status: int | None = None) -> Result[Any]:
    return Result.failure(error, status)


@dataclass(frozen=True)
class PlaneState:
    id: str
    name: str
    group: str


@dataclass(frozen=True)
class PlaneIssue:
    id: str
    project_id: str
    sequence_id: int | None
    name: str
    description_html: str
    description_text: str
    state_id: str | None
    state_name: str | None  # only when the state came expanded (API ?expand=state, webhooks)
    state_group: str | None = None


# --- module functions --------------------------------------------------------------------


def logical_state(names: Mapping[str, str], name: str | None, group: str | None) -> str | None:
    """The logical state (a key of ORCH_PLANE_STATE_NAMES) a board state means: by its
    configured name, else by its group for In Progress and Done (states can be renamed)."""
    by_name = {board.casefold(): key for key, board in names.items()}
    key = by_name.get((name or "").casefold())
    return key if key is not None else GROUP_FALLBACK.get(group or "")


def state_meaning(
    states: list[PlaneState], key: str, names: Mapping[str, str]
) -> PlaneState | None:
    """The board state that means `key`: the one with its configured name, else the first
    (in board order) that means it by its group."""
    meaning = [s for s in states if logical_state(names, s.name, s.group) == key]
    named = [s for s in meaning if s.name.casefold() == names.get(key, "").casefold()]
    return (named or meaning or [None])[0]


def verify_signature(secret: str, body: bytes, signature: str | None) -> bool:
    """Check X-Plane-Signature: hex HMAC-SHA256 of the raw body, compared in constant time."""
    if not secret or not signature or not signature.isascii():
        return False
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), signature.strip().encode("utf-8"))


class _TextExtractor(HTMLParser):
    """Text with a newline at each block boundary; source newlines count only inside <pre>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in SKIPPED_TAGS:
            self._skipping += 1
        elif BLOCK_TAG.fullmatch(tag):
            self._pre += tag == "pre"
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if BLOCK_TAG.fullmatch(tag):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIPPED_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif BLOCK_TAG.fullmatch(tag):
            self._pre = max(0, self._pre - (tag == "pre"))
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def strip_html(html: str | None) -> str:
    """Plain text of Plane HTML: tags removed, entities unescaped, one line per block."""
    if not html:
        return ""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"\s+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return "\n".join(line for line in lines if line)


def parse_issue(raw: Any, project_id: str | None = None) -> PlaneIssue | None:
    """An issue from API JSON or webhook `data`; None when the shape is unusable."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        return None
    state = raw.get("state")
    nested = state if isinstance(state, dict) else {}
    state_id = nested.get("id") if nested else state
    project = raw.get("project") or project_id
    sequence_id = raw.get("sequence_id")
    html = raw.get("description_html")
    html = html if isinstance(html, str) else ""
    return PlaneIssue(
        id=raw["id"],
        project_id=str(project) if project else "",
        sequence_id=sequence_id if isinstance(sequence_id, int) else None,
        name=str(raw.get("name") or ""),
        description_html=html,
        description_text=strip_html(html),
        state_id=state_id if isinstance(state_id, str) else None,
        state_name=_str_or_none(nested.get("name")),
        state_group=_str_or_none(nested.get("group")),
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:DETAIL_LIMIT] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error"):
            if isinstance(body.get(key), str):
                return body[key][:DETAIL_LIMIT]
    return str(body)[:DETAIL_LIMIT]


def _created(comment: dict[str, Any]) -> datetime:
    try:
        stamp = datetime.fromisoformat(str(comment.get("created_at")))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _seg(value: str) -> str:
    # Ids arrive from webhooks; quoting keeps "../x" from reaching another endpoint.
    return quote(str(value), safe="")


# --- the client ----------------------------------------------------------------------------


class PlaneClient:
    def __init__(
        self,
        api_url: str,
        token: str,
        workspace: str,
        *,
        timeout_s: float = 15,
        transport: httpx.AsyncBaseTransport | None = None,
        state_cache_s: float = 60.0,
        retry_attempts: int = 3,
        retry_base_s: float = 0.5,
        retry_cap_s: float = 8.0,
        max_retry_wait_s: float = 60.0,
    ) -> None:
        """`api_url` is the server root; the client adds /api/v1.

        Each request gets `timeout_s` and up to `retry_attempts` tries in all, with backoff
        from `retry_base_s` doubling up to `retry_cap_s` (engine.http_retry). A Retry-After
        over `max_retry_wait_s` is not waited for: the call fails at once.
        """
        root = api_url.rstrip("/").removesuffix(API_PREFIX)
        self._me_url = f"{root}{API_PREFIX}/users/me/"
        self._timeout_s = timeout_s
        self._state_cache_s = state_cache_s
        self._retry = RetryPolicy(
            attempts=retry_attempts,
            base_s=retry_base_s,
            cap_s=retry_cap_s,
            max_wait_s=max_retry_wait_s,
        )
        self._secrets = {token}
        self._states: dict[str, tuple[float, list[PlaneState]]] = {}
        self._http = httpx.AsyncClient(
            base_url=f"{root}{API_PREFIX}/workspaces/{_seg(workspace)}/",
            headers={"X-Api-Key": token, "Accept": "application/json"},
            timeout=timeout_s,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> PlaneClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- states ---------------------------------------------------------------------------

    async def list_states(self, project_id: str) -> Result[list[PlaneState]]:
        """The project's states (Plane never lists triage), cached for `state_cache_s`."""
        cached = self._cached_states(project_id)
        if cached is not None:
            return _ok(cached)
        pages = await self._collect(f"projects/{_seg(project_id)}/states/")
        if not pages.ok:
            return pages
        states = [state for state in map(_parse_state, pages.value or []) if state]
        self._states[project_id] = (time.monotonic() + self._state_cache_s, states)
        return _ok(list(states))

    def _cached_states(self, project_id: str) -> list[PlaneState] | None:
        cached = self._states.get(project_id)
        return list(cached[1]) if cached and cached[0] > time.monotonic() else None

    async def state_id(self, project_id: str, name: str) -> Result[str]:
        """The id of the state called `name`: exact match first, then case-insensitive.

        A miss in the cache refreshes it once: states can be added or renamed on the board.
        """
        was_cached = self._cached_states(project_id) is not None
        found = await self._find_state(project_id, name)
        if found.ok and found.value is None and was_cached:
            self._states.pop(project_id, None)
            found = await self._find_state(project_id, name)
        if not found.ok:
            return found
        if found.value is None:
            return self._fail(f"Plane project {project_id} has no state named {name!r}")
        return _ok(found.value.id)

    async def state_for(
        self, project_id: str, key: str, names: Mapping[str, str]
    ) -> Result[PlaneState | None]:
        """The state that means logical `key` on the board (`state_meaning`), None when the
        board has none. A miss in the cache refreshes it once: states can be renamed."""
        was_cached = self._cached_states(project_id) is not None
        listed = await self.list_states(project_id)
        if listed.ok and state_meaning(listed.value or [], key, names) is None and was_cached:
            self._states.pop(project_id, None)
            listed = await self.list_states(project_id)
        if not listed.ok:
            return listed
        return _ok(state_meaning(listed.value or [], key, names))

    async def _find_state(self, project_id: str, name: str) -> Result[PlaneState | None]:
        listed = await self.list_states(project_id)
        if not listed.ok:
            return listed
        states = listed.value or []
        exact = [state for state in states if state.name == name]
        folded = [state for state in states if state.name.casefold() == name.casefold()]
        return _ok((exact or folded or [None])[0])

    # --- issues ---------------------------------------------------------------------------

    async def get_issue(self, project_id: str, issue_id: str) -> Result[PlaneIssue]:
        path = self._issue_path(project_id, issue_id)
        got = await self._call("GET", path, params={"expand": "state"})
        if not got.ok:
            return got
        issue = parse_issue(got.value, project_id)
        if issue is None:
            return self._fail(f"GET {path}: unexpected issue payload")
        return _ok(issue)

    async def iter_issues(
        self, project_id: str, *, per_page: int = DEFAULT_PER_PAGE
    ) -> AsyncIterator[PlaneIssue]:
        """Every issue of the project, newest first; stops (logged) at the first error.

        Callers that must tell a complete list from a partial one use `list_issues`.
        """
        path = f"projects/{_seg(project_id)}/work-items/"
        async for page in self._pages(path, {"expand": "state"}, per_page):
            if not page.ok:
                return
            for raw in page.value or []:
                issue = parse_issue(raw, project_id)
                if issue is None:
                    log.warning("plane: skipping an unreadable issue in project %s", project_id)
                    continue
                yield issue

    async def list_issues(
        self, project_id: str, *, per_page: int = DEFAULT_PER_PAGE
    ) -> Result[list[PlaneIssue]]:
        """Every issue of the project, or a failure: never a silently partial list."""
        pages = await self._collect(
            f"projects/{_seg(project_id)}/work-items/", {"expand": "state"}, per_page
        )
        if not pages.ok:
            return pages
        issues = [parse_issue(raw, project_id) for raw in pages.value or []]
        return _ok([issue for issue in issues if issue is not None])

    async def set_state(self, project_id: str, issue_id: str, state_name: str) -> Result[None]:
        """Move the issue to the named state; repeating it is harmless (no webhook, no change)."""
        state = await self.state_id(project_id, state_name)
        if not state.ok:
            return state
        return await self.move_issue(project_id, issue_id, state.value)

    async def move_issue(self, project_id: str, issue_id: str, state_id: str) -> Result[None]:
        """Move the issue to the state with this id; repeating it is harmless."""
        patched = await self._call(
            "PATCH",
            self._issue_path(project_id, issue_id),
            body={"state": state_id},
            idempotent=True,  # the same state again changes nothing and sends no webhook
        )
        return _ok(None) if patched.ok else patched

    # --- comments -------------------------------------------------------------------------

    async def add_comment(
        self,
        project_id: str,
        issue_id: str,
        html: str,
        *,
        token: str | None = None,
        external_id: str | None = None,
    ) -> Result[dict[str, Any]]:
        """Comment on the issue; `token` posts as an agent's own bot account.

        With `external_id` the comment is posted at most once: Plane answers 409 to a second
        comment with the same external id and source, which counts as posted (status 409),
        so the request may be repeated after a timeout.
        """
        path = self._issue_path(project_id, issue_id) + "comments/"
        body = {"comment_html": html, "access": "INTERNAL"}
        if external_id:
            body |= {"external_id": external_id, "external_source": COMMENT_SOURCE}
        posted = await self._call(
            "POST",
            path,
            body=body,
            token=token,
            idempotent=True if external_id else None,
            also_ok=frozenset({409}) if external_id else frozenset(),
        )
        if not posted.ok:
            return posted
        if not isinstance(posted.value, dict):
            return self._fail(f"POST {path}: unexpected comment payload")
        return Result.success(posted.value, posted.status)

    async def user_id(self, *, token: str | None = None) -> Result[str]:
        """The id of the account a token (default: the main one) belongs to."""
        me = await self._call("GET", self._me_url, token=token)
        if not me.ok:
            return me
        if not isinstance(me.value, dict) or not me.value.get("id"):
            return self._fail("users/me: unexpected answer")
        return _ok(str(me.value["id"]))

    async def latest_comment_text(
        self, project_id: str, issue_id: str, *, exclude_actors: Collection[str] = ()
    ) -> Result[str | None]:
        """The newest comment as plain text, skipping the given authors (our own accounts);
        None when there is no such comment."""
        listed = await self._collect(self._issue_path(project_id, issue_id) + "comments/")
        if not listed.ok:
            return listed
        comments = [c for c in listed.value or [] if str(c.get("actor")) not in exclude_actors]
        if not comments:
            return _ok(None)
        newest = max(comments, key=_created)
        return _ok(strip_html(str(newest.get("comment_html") or "")))

    # --- transport ------------------------------------------------------------------------

    @staticmethod
    def _issue_path(project_id: str, issue_id: str) -> str:
        return f"projects/{_seg(project_id)}/work-items/{_seg(issue_id)}/"

    async def _collect(
        self, path: str, params: dict[str, Any] | None = None, per_page: int = 1000
    ) -> Result[list[dict[str, Any]]]:
        items: list[dict[str, Any]] = []
        async for page in self._pages(path, params or {}, per_page):
            if not page.ok:
                return page
            items.extend(page.value or [])
        return _ok(items)

    async def _pages(
        self, path: str, params: dict[str, Any], per_page: int
    ) -> AsyncIterator[Result[list[dict[str, Any]]]]:
        """Plane's cursor pagination: one Result per page; a failure is the last one."""
        query: dict[str, Any] = {**params, "per_page": per_page}
        for _ in range(MAX_PAGES):
            got = await self._call("GET", path, params=query)
            if not got.ok:
                yield got
                return
            page = got.value
            if not isinstance(page, dict) or not isinstance(page.get("results"), list):
                yield self._fail(f"GET {path}: unexpected page payload")
                return
            yield _ok([item for item in page["results"] if isinstance(item, dict)])
            cursor = page.get("next_cursor")
            if not page.get("next_page_results") or not isinstance(cursor, str):
                return
            query["cursor"] = cursor
        yield self._fail(f"GET {path}: gave up after {MAX_PAGES} pages")

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        idempotent: bool | None = None,
        also_ok: frozenset[int] = frozenset(),
    ) -> Result[Any]:
        """One request, retried under the client's policy (engine.http_retry). Never raises.

        An answer with a status in `also_ok` is a success carrying that status."""
        what = f"{method} {path}"
        headers = {"X-Api-Key": token} if token else None
        if token:
            self._secrets.add(token)
        response = await send_with_retry(
            self._http,
            method,
            path,
            policy=self._retry,
            idempotent=idempotent,
            service="plane",
            scrub=self._scrub,
            params=params,
            json=body,
            headers=headers,
        )
        if isinstance(response, httpx.TimeoutException):
            return self._fail(f"{what}: Plane did not answer within {self._timeout_s:g}s")
        if isinstance(response, Exception):
            return self._fail(f"{what}: Plane unreachable ({describe_error(response)})")
        return self._answer(what, response, also_ok)

    def _answer(
        self, what: str, response: httpx.Response, also_ok: frozenset[int] = frozenset()
    ) -> Result[Any]:
        status = response.status_code
        if status in also_ok:
            return Result(ok=True, value=_json_or_none(response), status=status)
        if status == 429:
            wait = retry_after_s(response)
            after = f" (retry after {wait:g}s)" if wait is not None else ""
            return self._fail(f"{what}: rate limited by Plane{after}", status)
        if not 200 <= status < 300:
            return self._fail(f"{what}: HTTP {status}: {_error_detail(response)}", status)
        if status == 204 or not response.content:
            return Result(ok=True, value=None, status=status)
        try:
            return Result(ok=True, value=response.json(), status=status)
        except ValueError:
            return self._fail(f"{what}: Plane answered HTTP {status} with invalid JSON", status)

    def _fail(self, error: str, status: int | None = None) -> Result[Any]:
        error = self._scrub(error)
        log.warning("plane: %s", error)
        return _failed(error, status)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _parse_state(raw: dict[str, Any]) -> PlaneState | None:
    fields = [raw.get(key) for key in ("id", "name", "group")]
    if not all(isinstance(value, str) for value in fields):
        return None
    return PlaneState(*fields)
