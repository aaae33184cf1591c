"""A local stand-in for Plane Community Edition: REST API v1 and v1 webhooks over real HTTP.

It follows the real server as recorded in shared/reference/plane-gitea.md §1-3, including the
awkward parts a client has to cope with:

- one webhook delivery per changed field, each carrying the full current issue; the state
  field is `state` when the change came through API v1 and `state_id` when a person moved the
  card in the web app (`move_issue(..., via="web")`);
- deliveries are retried only on connection errors and timeouts (5 retries, each with a new
  X-Plane-Delivery), never on an HTTP error answer; after the last retry the webhook is
  deactivated; deleting an issue or a comment sends nothing;
- cursor pagination ("per_page:page:is_prev", per_page default and max 1000, 400 on a bad
  cursor) and no state filter on the issue list, which is ordered newest first;
- X-Api-Key auth, one token per user, and a per-key rate limit answering 429 + Retry-After;
- a comment created with an `external_id` and `external_source` already used in the project
  is refused with 409, as issues are.

An outage can be staged with `api_fault(...)` (or POST /sandbox/faults with
{"api": {"fault": 500 | 429 | "hang" | ..., "times": n}}, {"api": null} to clear): the API
answers 500 with Plane's body, 429 with Retry-After like its throttle, another status as a
proxy in front of it would, or "hang"s (holds each request unanswered until the fault is
cleared; then the request is served, as a slow server finally would).

Two deliberate differences: it delivers to loopback addresses (as if WEBHOOK_ALLOWED_HOSTS
allowed them), and it sends deliveries one at a time in order, retries included, so that a
test can `await sandbox.drain()` and then look.

Out-of-process drivers use the control endpoints under /sandbox/ (see CONTROL_ROUTES) or run
it standalone: `python -m engine.sandbox.plane --port 8091 --project ORCH`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import math
import random
import re
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

Via = Literal["web", "api"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Plane's DEFAULT_STATES of a new project: name, group, color, sequence. Triage is never listed.
DEFAULT_STATES: tuple[tuple[str, str, str, int], ...] = (
    ("Backlog", "backlog", "#60646C", 15000),
    ("Todo", "unstarted", "#60646C", 25000),
    ("In Progress", "started", "#F59E0B", 35000),
    ("Done", "completed", "#46A758", 45000),
    ("Cancelled", "cancelled", "#9AA4BC", 55000),
    ("Triage", "triage", "#4E5355", 65000),
)
DEFAULT_STATE = "Backlog"
STATE_GROUPS = ("backlog", "unstarted", "started", "completed", "cancelled", "triage")
STATE_SEQUENCE_STEP = 15000

# The extra columns of a Conveyor board (name, group, color). The group says who owns the card:
# "started" while the pipeline works on it or runs its own human gate (In Review, Approved and
# the stage columns); "unstarted" while it waits for a person before any work resumes (Needs
# Input: questions; Rejected: the BRD went back; Blocked: escalated or parked).
CONVEYOR_STATES: tuple[tuple[str, str, str], ...] = (
    ("In Review", "started", "#3B82F6"),
    ("Needs Input", "unstarted", "#EAB308"),
    ("Approved", "started", "#22C55E"),
    ("Rejected", "unstarted", "#EF4444"),
    ("Blocked", "unstarted", "#DC2626"),
    ("Architecture", "started", "#8B5CF6"),
    ("Development", "started", "#F97316"),
    ("Review", "started", "#06B6D4"),
    ("Testing", "started", "#14B8A6"),
    ("Deploy", "started", "#0EA5E9"),
)

PRIORITIES = ("urgent", "high", "medium", "low", "none")
COMMENT_ACCESS = ("INTERNAL", "EXTERNAL")
MAX_PER_PAGE = 1000
MAX_RETRIES = 5
# API v1's IssueSerializer leaves these out; webhooks (IssueExpandSerializer) keep them.
API_EXCLUDED_ISSUE_FIELDS = ("description_json", "description_stripped")
# The web app's serializer names some fields differently; its PATCH sends these names.
WEB_FIELD_NAMES = {
    "state": "state_id",
    "parent": "parent_id",
    "labels": "label_ids",
    "assignees": "assignee_ids",
}
ISSUE_ORDERABLE = ("created_at", "updated_at", "sequence_id", "name", "sort_order", "priority")

NOT_FOUND = {"error": "The requested resource does not exist."}
# BaseAPIView.handle_exception's answer to an unexpected error
SERVER_ERROR = {"error": "Something went wrong please try again later"}
HANG = "hang"
DUPLICATE_COMMENT = "Issue Comment with the same external id and external source already exists"
NO_CREDENTIALS = {"detail": "Authentication credentials were not provided."}
BAD_TOKEN = {"detail": "Given API token is not valid"}
PAYLOAD_INVALID = {"error": "The payload is not valid"}


class ApiError(ValueError):
    """An answer other than success, shaped like Plane's (DRF's) error bodies."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
        self.headers = headers or {}


def _field_error(name: str, message: str) -> ApiError:
    return ApiError(400, {name: [message]})


@dataclass
class Webhook:
    id: str
    url: str
    secret: str | None
    is_active: bool = True


@dataclass(frozen=True)
class Delivery:
    """One delivery attempt, as the sender saw it."""

    delivery_id: str
    event: str
    action: str
    field: str | None
    attempt: int  # 0 for the first try, n for the n-th retry
    outcome: str  # delivered | http_error | connection_error | dropped
    status: int | None = None
    error: str | None = None
    payload: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ApiCall:
    method: str
    path: str
    query: str
    status: int
    user_id: str | None


@dataclass
class ApiFault:
    """A staged outage of the API: a status or "hang", `remaining` times (None: until cleared)."""

    fault: int | str
    remaining: int | None
    retry_after_s: int

    def response(self) -> web.Response:
        if self.fault == 500:
            return web.json_response(SERVER_ERROR, status=500)
        if self.fault == 429:
            wait = self.retry_after_s
            unit = "second" if wait == 1 else "seconds"
            detail = f"Request was throttled. Expected available in {wait} {unit}."
            return web.json_response(
                {"detail": detail}, status=429, headers={"Retry-After": str(wait)}
            )
        status = int(self.fault)
        return web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}")


@dataclass(frozen=True)
class _Job:
    event: str
    action: str
    field: str | None
    payload: dict[str, Any]


def _now() -> str:
    # DRF renders an aware UTC datetime as ISO 8601 with microseconds and a Z.
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _new_id() -> str:
    return str(uuid.uuid4())


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _strip_tags(html: str) -> str:
    # Django's strip_tags, which Plane uses for description_stripped: tags go, entities stay.
    return re.sub(r"<[^>]*>", "", html)


# --- request parsing helpers -------------------------------------------------------------


def _per_page(query: Any) -> int:
    raw = query.get("per_page", str(MAX_PER_PAGE))
    try:
        per_page = int(raw)
    except ValueError:
        raise ApiError(400, {"detail": "Invalid per_page parameter."}) from None
    if per_page > MAX_PER_PAGE:
        raise ApiError(400, {"detail": f"Invalid per_page value. Cannot exceed {MAX_PER_PAGE}."})
    if per_page < 1:
        raise ApiError(400, {"detail": "Invalid per_page parameter."})
    return per_page


def _cursor_page(query: Any) -> int:
    raw = query.get("cursor")
    if not raw:
        return 0
    bits = raw.split(":")
    try:
        if len(bits) != 3:
            raise ValueError(raw)
        float(bits[0]) if "." in bits[0] else int(bits[0])
        page, _is_prev = int(bits[1]), int(bits[2])
    except ValueError:
        raise ApiError(400, {"detail": "Invalid cursor parameter."}) from None
    if page < 0:
        raise ApiError(400, {"detail": "Error in parsing"})
    return page


def paginate(query: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Plane's BasePaginator over an already ordered list."""
    per_page = _per_page(query)
    page = _cursor_page(query)
    offset = page * per_page
    results = items[offset : offset + per_page]
    total = len(items)
    return {
        "grouped_by": None,
        "sub_grouped_by": None,
        "total_count": total,
        "next_cursor": f"{per_page}:{page + 1}:0",
        "prev_cursor": f"{per_page}:{page - 1}:1",
        "next_page_results": offset + per_page < total,
        "prev_page_results": page > 0,
        "count": len(results),
        "total_pages": math.ceil(total / per_page) if total else 0,
        "total_results": total,
        "extra_stats": None,
        "results": results,
    }


def _csv(query: Any, name: str) -> list[str]:
    return [part for part in query.get(name, "").split(",") if part]


def _only_fields(data: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key in fields} if fields else data


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if await request.read() else {}
    except ValueError as exc:
        raise ApiError(400, {"detail": f"JSON parse error - {exc}"}) from None
    if not isinstance(body, dict):
        kind = type(body).__name__
        message = f"Invalid data. Expected a dictionary, but got {kind}."
        raise ApiError(400, {"non_field_errors": [message]})
    return body


# --- field validators (DRF messages) ------------------------------------------------------


def _v_string(name: str, value: Any, *, blank: bool = False, null: bool = False) -> Any:
    if value is None:
        if null:
            return None
        raise _field_error(name, "This field may not be null.")
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise _field_error(name, "Not a valid string.")
    value = str(value)
    if not blank and not value.strip():
        raise _field_error(name, "This field may not be blank.")
    return value


def _v_name(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    value = _v_string("name", value)
    if len(value) > 255:
        raise _field_error("name", "Ensure this field has no more than 255 characters.")
    return value


def _v_html(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    return _v_string("description_html", value, blank=True, null=True) or "<p></p>"


def _v_optional(name: str) -> Callable[[PlaneSandbox, str, Any], Any]:
    return lambda box, project_id, value: _v_string(name, value, blank=True, null=True)


def _v_priority(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    if value not in PRIORITIES:
        raise _field_error("priority", f'"{value}" is not a valid choice.')
    return value


def _v_number(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _field_error("sort_order", "A valid number is required.")
    return float(value)


def _v_bool(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise _field_error("is_draft", "Must be a valid boolean.")
    return value


def _v_state(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    if value is None:
        raise _field_error("state", "This field may not be null.")
    state = box._states.get(str(value))
    if state is None:
        raise _field_error("state", f'Invalid pk "{value}" - object does not exist.')
    if state["project"] != project_id:
        message = "State is not valid please pass a valid state_id"
        raise ApiError(400, {"non_field_errors": [message]})
    return state["id"]


def _v_parent(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    if value is None:
        return None
    parent = box._issues.get(str(value))
    if parent is None or parent["project"] != project_id:
        raise _field_error("parent", f'Invalid pk "{value}" - object does not exist.')
    return parent["id"]


def _v_assignees(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    if not isinstance(value, list):
        raise _field_error("assignees", f'Expected a list of items but got type "{value}".')
    unknown = [item for item in value if str(item) not in box._users]
    if unknown:
        raise _field_error("assignees", f'Invalid pk "{unknown[0]}" - object does not exist.')
    return [str(item) for item in value]


def _v_labels(box: PlaneSandbox, project_id: str, value: Any) -> Any:
    # The sandbox has no labels, so only an empty list is valid.
    if not isinstance(value, list):
        raise _field_error("labels", f'Expected a list of items but got type "{value}".')
    if value:
        raise _field_error("labels", f'Invalid pk "{value[0]}" - object does not exist.')
    return []


ISSUE_WRITABLE: dict[str, Callable[[PlaneSandbox, str, Any], Any]] = {
    "name": _v_name,
    "description_html": _v_html,
    "state": _v_state,
    "priority": _v_priority,
    "start_date": _v_optional("start_date"),
    "target_date": _v_optional("target_date"),
    "external_id": _v_optional("external_id"),
    "external_source": _v_optional("external_source"),
    "sort_order": _v_number,
    "is_draft": _v_bool,
    "parent": _v_parent,
    "assignees": _v_assignees,
    "labels": _v_labels,
}


# --- rate limit ---------------------------------------------------------------------------


class _Throttle:
    """DRF's SimpleRateThrottle: a sliding window of request times per key."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._history: dict[str, deque[float]] = {}

    def check(self, key: str) -> dict[str, str]:
        now = time.monotonic()
        history = self._history.setdefault(key, deque())
        while history and history[0] <= now - self.window_s:
            history.popleft()
        if len(history) >= self.limit:
            wait = max(1, math.ceil(self.window_s - (now - history[0])))
            unit = "second" if wait == 1 else "seconds"
            detail = f"Request was throttled. Expected available in {wait} {unit}."
            raise ApiError(429, {"detail": detail}, {"Retry-After": str(wait)})
        history.append(now)
        return {
            "X-RateLimit-Remaining": str(self.limit - len(history)),
            "X-RateLimit-Reset": str(int(time.time() + self.window_s)),
        }


# --- webhook delivery ---------------------------------------------------------------------


class WebhookSender:
    """Plane's webhook_send_task, one delivery at a time in order, with fault injection."""

    def __init__(self, backoff_s: float, backoff_max_s: float, timeout_s: float) -> None:
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.webhook: Webhook | None = None
        self.deliveries: list[Delivery] = []
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._drop_budget = 0
        self._drop_rate = 0.0
        self._rng = random.Random()
        self._fail_status: int | None = None
        self._worker: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._worker = asyncio.create_task(self._loop(), name="plane-sandbox-webhooks")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self) -> None:
        if self._worker is None:
            raise RuntimeError("the sandbox is not started")
        await self._queue.join()

    def set_webhook(self, url: str | None, secret: str | None = None) -> Webhook | None:
        """Register (and activate) the workspace webhook; None removes it.

        Plane always has a secret (default "plane_wh_" + hex); so does this one.
        """
        if url is None:
            self.webhook = None
            return None
        hook_id = self.webhook.id if self.webhook else _new_id()
        self.webhook = Webhook(hook_id, url, secret or f"plane_wh_{uuid.uuid4().hex}")
        return self.webhook

    @property
    def active(self) -> bool:
        return bool(self.webhook and self.webhook.is_active)

    def enqueue(self, job: _Job) -> None:
        self._queue.put_nowait(job)

    def drop_next(self, n: int = 1) -> None:
        """Silently lose the next n delivery attempts (never sent, like a lost 502)."""
        self._drop_budget += n

    def drop_rate(self, p: float, seed: int | None = None) -> None:
        """Silently lose each delivery attempt with probability p (reproducible with a seed)."""
        self._drop_rate = p
        self._rng = random.Random(seed)

    def fail_with(self, status: int | None) -> None:
        """Record `status` as the receiver's answer without sending, until fail_with(None)."""
        self._fail_status = status

    async def _loop(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._deliver(job)
            except Exception:
                log.exception("plane sandbox: delivery of %s failed unexpectedly", job.event)
            finally:
                self._queue.task_done()

    async def _deliver(self, job: _Job) -> None:
        # The same payload on every try, a new delivery id each time; only a network error or
        # a timeout is retried, and the last failed retry deactivates the webhook.
        body = json.dumps(job.payload).encode("utf-8")
        for attempt in range(MAX_RETRIES + 1):
            hook = self.webhook
            if hook is None:
                return
            if not await self._attempt(job, hook, body, attempt):
                return
            if attempt == MAX_RETRIES:
                hook.is_active = False
                log.warning("plane sandbox: webhook %s deactivated after retries", hook.id)
                return
            await asyncio.sleep(min(self.backoff_s * 2**attempt, self.backoff_max_s))

    async def _attempt(self, job: _Job, hook: Webhook, body: bytes, attempt: int) -> bool:
        """Send once and record it; True when Plane would retry (a network error)."""
        delivery_id = _new_id()

        def record(outcome: str, status: int | None = None, error: str | None = None) -> None:
            delivery = Delivery(delivery_id, job.event, job.action, job.field, attempt, outcome)
            self.deliveries.append(
                replace(delivery, status=status, error=error, payload=job.payload)
            )

        if self._take_drop():
            record("dropped")
            return False
        if self._fail_status is not None:
            record("http_error", self._fail_status, "injected")
            return False
        try:
            status = await self._post(hook, body, delivery_id, job.event)
        except (aiohttp.ClientError, TimeoutError) as exc:
            record("connection_error", error=f"{type(exc).__name__}: {exc}")
            return True
        record("delivered" if 200 <= status < 300 else "http_error", status)
        return False

    def _take_drop(self) -> bool:
        if self._drop_budget > 0:
            self._drop_budget -= 1
            return True
        return self._drop_rate > 0 and self._rng.random() < self._drop_rate

    async def _post(self, hook: Webhook, body: bytes, delivery_id: str, event: str) -> int:
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Autopilot",
            "X-Plane-Delivery": delivery_id,
            "X-Plane-Event": event,
        }
        if hook.secret:
            digest = hmac.new(hook.secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
            headers["X-Plane-Signature"] = digest
        async with self._session.post(hook.url, data=body, headers=headers) as response:
            await response.read()
            return response.status


# --- the sandbox --------------------------------------------------------------------------


class PlaneSandbox:
    """An in-process Plane server with a Python API for tests and the demo."""

    def __init__(
        self,
        workspace: str = "acme",
        api_token: str = "plane_api_main",
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        *,
        rate_limit: int | None = 60,
        rate_window_s: float = 60.0,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 10.0,
        delivery_timeout_s: float = 30.0,
    ) -> None:
        """`rate_limit` requests per key per `rate_window_s` (Plane: 60/minute); None = off.

        A failed delivery waits min(retry_backoff_s * 2**n, retry_backoff_max_s) before retry
        n+1 (Plane waits a random 0-600 s); use 0 in tests.
        """
        self.workspace = {"id": _new_id(), "slug": workspace}
        self.sender = WebhookSender(retry_backoff_s, retry_backoff_max_s, delivery_timeout_s)
        self.base_url: str | None = None
        self.api_log: list[ApiCall] = []
        self._throttle = _Throttle(rate_limit, rate_window_s) if rate_limit else None
        self._users: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, str] = {}
        self._projects: dict[str, dict[str, Any]] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._issues: dict[str, dict[str, Any]] = {}
        self._comments: dict[str, dict[str, Any]] = {}
        self._order: dict[str, int] = {}  # creation order, to break created_at ties
        self._runner: web.AppRunner | None = None
        self._fault: ApiFault | None = None
        self._unhang = asyncio.Event()
        self.hung = 0  # requests held by a "hang" fault so far
        self.main_user_id = self._add_user(api_token, "admin", "Ada", "Admin")
        if webhook_url:
            self.set_webhook(webhook_url, webhook_secret)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self.sender.start()
        self._runner = web.AppRunner(self._build_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving; deliveries still queued are discarded (call drain() first to send)."""
        self.api_fault(None)
        await self.sender.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PlaneSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def drain(self) -> None:
        """Wait until every queued delivery, retries included, has been sent or given up."""
        await self.sender.drain()

    # --- people, projects, states ---------------------------------------------------------

    def _add_user(self, token: str, display_name: str, first: str, last: str = "") -> str:
        user_id = _new_id()
        self._users[user_id] = {
            "id": user_id,
            "first_name": first,
            "last_name": last,
            "email": f"{_slugify(display_name) or 'user'}@{self.workspace['slug']}.example",
            "avatar": "",
            "avatar_url": None,
            "display_name": display_name,
        }
        self._tokens[token] = user_id
        return user_id

    def add_bot(self, token: str, display_name: str) -> str:
        """A bot account (a workspace member with its own API token); returns its user id."""
        if token in self._tokens:
            raise ValueError("that API token is already in use")
        return self._add_user(token, display_name, display_name)

    def user(self, user_id: str) -> dict[str, Any]:
        return copy.deepcopy(self._users[user_id])

    def create_project(
        self,
        identifier: str,
        name: str,
        *,
        project_id: str | None = None,
        conveyor_states: bool = True,
    ) -> str:
        """A project with Plane's default states, plus a Conveyor board's states if asked."""
        project_id = project_id or _new_id()
        if project_id in self._projects:
            raise ValueError(f"project {project_id} exists")
        self._projects[project_id] = {
            "id": project_id,
            "identifier": identifier,
            "name": name,
            "workspace": self.workspace["id"],
            "next_sequence": 1,
        }
        for state_name, group, color, sequence in DEFAULT_STATES:
            self._make_state(project_id, state_name, group, color, sequence)
        if conveyor_states:
            self.add_conveyor_states(project_id)
        return project_id

    def add_conveyor_states(self, project_id: str) -> None:
        existing = {state["name"] for state in self._project_states(project_id)}
        for state_name, group, color in CONVEYOR_STATES:
            if state_name not in existing:
                self.add_state(project_id, state_name, group, color)

    def add_state(self, project_id: str, name: str, group: str, color: str = "#60646C") -> str:
        self._project(project_id)
        if group not in STATE_GROUPS:
            raise ValueError(f"state group must be one of {', '.join(STATE_GROUPS)}")
        if any(state["name"] == name for state in self._project_states(project_id)):
            raise ValueError(f"state {name!r} exists in the project")
        last = max((state["sequence"] for state in self._project_states(project_id)), default=0)
        return self._make_state(project_id, name, group, color, last + STATE_SEQUENCE_STEP)

    def _make_state(self, project_id: str, name: str, group: str, color: str, seq: float) -> str:
        state_id = _new_id()
        stamp = _now()
        self._states[state_id] = {
            "id": state_id,
            "name": name,
            "description": "",
            "color": color,
            "slug": _slugify(name),
            "sequence": float(seq),
            "group": group,
            "is_triage": group == "triage",
            "default": name == DEFAULT_STATE,
            "external_source": None,
            "external_id": None,
            "project": project_id,
            "workspace": self.workspace["id"],
            "created_at": stamp,
            "updated_at": stamp,
            "deleted_at": None,
            "created_by": self.main_user_id,
            "updated_by": self.main_user_id,
        }
        return state_id

    def _project_states(self, project_id: str) -> list[dict[str, Any]]:
        states = [s for s in self._states.values() if s["project"] == project_id]
        return sorted(states, key=lambda state: state["sequence"])

    def states(self, project_id: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self._project_states(project_id))

    def rename_state(self, project_id: str, name: str, new_name: str) -> str:
        """Rename a state, as a person can on the board (issues keep it); returns its id."""
        state = self._states[self.state_id(project_id, name)]
        if any(other["name"] == new_name for other in self._project_states(project_id)):
            raise ValueError(f"state {new_name!r} exists in the project")
        state.update(name=new_name, slug=_slugify(new_name), updated_at=_now())
        return state["id"]

    def state_id(self, project_id: str, name: str) -> str:
        for state in self._project_states(project_id):
            if state["name"] == name:
                return state["id"]
        raise KeyError(f"no state {name!r} in project {project_id}")

    # --- issues and comments (as a person on the board) -----------------------------------

    def create_issue(
        self,
        project_id: str,
        name: str,
        description_html: str = "<p></p>",
        state_name: str = DEFAULT_STATE,
        *,
        as_user: str | None = None,
    ) -> dict[str, Any]:
        """Create an issue as a person would in the web app; returns the full issue."""
        project = self._project(project_id)
        actor = self._actor(as_user)
        fields = {
            "name": name,
            "description_html": description_html,
            "state": self.state_id(project_id, state_name),
        }
        rec = self._create_issue_record(project, self._validated(project_id, fields), actor)
        return self.issue(rec["id"])

    def move_issue(
        self, issue_id: str, state_name: str, via: Via = "web", *, as_user: str | None = None
    ) -> dict[str, Any]:
        """Change the state as the web app (field `state_id`) or API v1 (field `state`) does."""
        if via not in ("web", "api"):
            raise ValueError("via must be 'web' or 'api'")
        rec = self._issue_rec(issue_id)
        state_id = self.state_id(rec["project"], state_name)
        key = WEB_FIELD_NAMES["state"] if via == "web" else "state"
        self._update_issue(rec, {key: state_id}, via=via, actor=self._actor(as_user))
        return self.issue(issue_id)

    def add_comment(
        self, issue_id: str, comment_html: str, as_user: str | None = None
    ) -> dict[str, Any]:
        """Comment as a person (default: the main user) or a bot (its user id or name)."""
        rec = self._issue_rec(issue_id)
        comment = self._create_comment(rec, comment_html, "INTERNAL", self._actor(as_user))
        return self._comment_view(comment)

    def issue(self, issue_id: str) -> dict[str, Any]:
        """The full current issue, shaped like webhook data (state nested)."""
        return self._hook_issue(self._issue_rec(issue_id))

    def issues(self, project_id: str) -> list[dict[str, Any]]:
        """All issues of a project in creation order, shaped like webhook data."""
        recs = [rec for rec in self._issues.values() if rec["project"] == project_id]
        return [self._hook_issue(rec) for rec in sorted(recs, key=self._creation)]

    def comments(self, issue_id: str) -> list[dict[str, Any]]:
        """The issue's comments, oldest first (the API lists them newest first)."""
        self._issue_rec(issue_id)
        return [self._comment_view(comment) for comment in self._issue_comments(issue_id)]

    def state_name(self, issue_id: str) -> str:
        return self._states[self._issue_rec(issue_id)["state"]]["name"]

    # --- webhook control and fault injection ----------------------------------------------

    def set_webhook(self, url: str | None, secret: str | None = None) -> Webhook | None:
        return self.sender.set_webhook(url, secret)

    @property
    def webhook(self) -> Webhook | None:
        return self.sender.webhook

    @property
    def webhook_active(self) -> bool:
        return self.sender.active

    @property
    def deliveries(self) -> list[Delivery]:
        return self.sender.deliveries

    def drop_next(self, n: int = 1) -> None:
        self.sender.drop_next(n)

    def drop_rate(self, p: float, seed: int | None = None) -> None:
        self.sender.drop_rate(p, seed)

    def fail_with(self, status: int | None) -> None:
        self.sender.fail_with(status)

    def api_fault(
        self, fault: int | str | None, *, times: int | None = None, retry_after_s: int = 1
    ) -> None:
        """Make the API fail: a status (500, 429 with `retry_after_s`, 502, ...) or "hang",
        for the next `times` requests or until `api_fault(None)`. Hung requests are released
        (and then served) when the fault is cleared or the sandbox stops."""
        if fault is None:
            self._fault = None
            self._unhang.set()
            return
        if fault != HANG and not (isinstance(fault, int) and 400 <= fault <= 599):
            raise ValueError('a fault is an HTTP error status or "hang"')
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        self._fault = ApiFault(fault, times, retry_after_s)
        self._unhang.set()  # requests a previous hang holds are released
        self._unhang = asyncio.Event()

    # --- internals: records and views -----------------------------------------------------

    def _project(self, project_id: str) -> dict[str, Any]:
        project = self._projects.get(str(project_id))
        if project is None:
            raise KeyError(f"no project {project_id}")
        return project

    def _issue_rec(self, issue_id: str) -> dict[str, Any]:
        rec = self._issues.get(str(issue_id))
        if rec is None:
            raise KeyError(f"no issue {issue_id}")
        return rec

    def _actor(self, ref: str | None) -> dict[str, Any]:
        if ref is None:
            return self._users[self.main_user_id]
        if ref in self._users:
            return self._users[ref]
        for user in self._users.values():
            if user["display_name"] == ref:
                return user
        raise KeyError(f"no user {ref!r}")

    def _creation(self, rec: dict[str, Any]) -> int:
        return self._order[rec["id"]]

    def _next_order(self, object_id: str) -> None:
        self._order[object_id] = len(self._order)

    def _validated(
        self, project_id: str, data: dict[str, Any], *, partial: bool = False
    ) -> dict[str, Any]:
        if not partial and "name" not in data:
            raise _field_error("name", "This field is required.")
        return {
            key: check(self, project_id, data[key])
            for key, check in ISSUE_WRITABLE.items()
            if key in data
        }

    def _create_issue_record(
        self, project: dict[str, Any], fields: dict[str, Any], actor: dict[str, Any]
    ) -> dict[str, Any]:
        issue_id = _new_id()
        stamp = _now()
        sequence_id = project["next_sequence"]
        project["next_sequence"] += 1
        rec: dict[str, Any] = {
            "id": issue_id,
            "created_at": stamp,
            "updated_at": stamp,
            "deleted_at": None,
            "created_by": actor["id"],
            "updated_by": actor["id"],
            "project": project["id"],
            "workspace": self.workspace["id"],
            "parent": None,
            "state": self.state_id(project["id"], DEFAULT_STATE),
            "estimate_point": None,
            "name": "",
            "description": {},
            "description_json": {},
            "description_html": "<p></p>",
            "description_stripped": None,
            "description_binary": None,
            "priority": "none",
            "start_date": None,
            "target_date": None,
            "sequence_id": sequence_id,
            "sort_order": 65535.0 + 10000 * (sequence_id - 1),
            "completed_at": None,
            "archived_at": None,
            "is_draft": False,
            "external_source": None,
            "external_id": None,
            "type": None,
            "point": None,
            "labels": [],
            "assignees": [],
        }
        self._issues[issue_id] = rec
        self._next_order(issue_id)
        self._apply(rec, fields, actor, stamp)
        self._emit("issue", "created", self._hook_issue(rec), None, None, None, actor)
        return rec

    def _apply(
        self,
        rec: dict[str, Any],
        fields: dict[str, Any],
        actor: dict[str, Any],
        stamp: str | None = None,
    ) -> None:
        stamp = stamp or _now()
        rec.update(fields)
        html = rec["description_html"]
        rec["description_stripped"] = _strip_tags(html) if html else None
        completed = self._states[rec["state"]]["group"] == "completed"
        rec["completed_at"] = (rec["completed_at"] or stamp) if completed else None
        rec["updated_at"] = stamp
        rec["updated_by"] = actor["id"]

    def _update_issue(
        self, rec: dict[str, Any], requested: dict[str, Any], *, via: Via, actor: dict[str, Any]
    ) -> None:
        """Apply a PATCH body and send one webhook per requested key whose value changed."""
        before = self._web_issue(rec) if via == "web" else self._api_issue(rec)
        model_names = {web: model for model, web in WEB_FIELD_NAMES.items()} if via == "web" else {}
        data = {model_names.get(key, key): value for key, value in requested.items()}
        fields = self._validated(rec["project"], data, partial=True)
        self._apply(rec, fields, actor)
        self._emit_changes("issue", self._hook_issue(rec), before, requested, actor)

    def _emit_changes(
        self,
        event: str,
        data: dict[str, Any],
        before: dict[str, Any],
        requested: dict[str, Any],
        actor: dict[str, Any],
    ) -> None:
        # Plane's model_activity: every requested key present in the old representation whose
        # value differs gets its own delivery, each with the full current object.
        for key, new_value in requested.items():
            if key in before and before[key] != new_value:
                self._emit(event, "updated", data, key, before[key], new_value, actor)

    def _issue_comments(self, issue_id: str) -> list[dict[str, Any]]:
        found = [c for c in self._comments.values() if c["issue"] == issue_id]
        return sorted(found, key=self._creation)

    def _create_comment(
        self,
        rec: dict[str, Any],
        html: str,
        access: str,
        actor: dict[str, Any],
        external: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        comment_id = _new_id()
        stamp = _now()
        comment = {
            "id": comment_id,
            "comment_html": html,
            "comment_stripped": _strip_tags(html),
            "issue": rec["id"],
            "project": rec["project"],
            "workspace": self.workspace["id"],
            "actor": actor["id"],
            "access": access,
            "edited_at": None,
            "parent": None,
            "external_source": None,
            "external_id": None,
            "created_at": stamp,
            "updated_at": stamp,
            "created_by": actor["id"],
            "updated_by": actor["id"],
            "deleted_at": None,
        }
        comment.update(external or {})
        self._comments[comment_id] = comment
        self._next_order(comment_id)
        self._emit("issue_comment", "created", self._comment_view(comment), None, None, None, actor)
        return comment

    def _state_lite(self, state_id: str | None) -> dict[str, Any] | None:
        state = self._states.get(state_id or "")
        if state is None:
            return None
        return {key: state[key] for key in ("id", "name", "color", "group")}

    def _user_lite(self, user_id: str) -> dict[str, Any]:
        return copy.deepcopy(self._users[user_id])

    def _api_issue(
        self, rec: dict[str, Any], expand: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """API v1's IssueSerializer: foreign keys as UUID strings unless expanded."""
        data = {k: copy.deepcopy(v) for k, v in rec.items() if k not in API_EXCLUDED_ISSUE_FIELDS}
        data["type_id"] = rec["type"]
        if "state" in expand:
            data["state"] = self._state_lite(rec["state"])
        if "assignees" in expand:
            data["assignees"] = [self._user_lite(user_id) for user_id in rec["assignees"]]
        return data

    def _hook_issue(self, rec: dict[str, Any]) -> dict[str, Any]:
        """IssueExpandSerializer, as webhooks send it: every field, state/assignees nested."""
        data = copy.deepcopy(rec)
        data["state"] = self._state_lite(rec["state"])
        data["assignees"] = [self._user_lite(user_id) for user_id in rec["assignees"]]
        data["labels"] = []
        return data

    def _web_issue(self, rec: dict[str, Any]) -> dict[str, Any]:
        data = self._api_issue(rec)
        for model_name, web_name in WEB_FIELD_NAMES.items():
            data[web_name] = data.pop(model_name)
        return data

    def _comment_view(self, comment: dict[str, Any]) -> dict[str, Any]:
        """IssueCommentSerializer without the list's `is_member` annotation."""
        return {k: copy.deepcopy(v) for k, v in comment.items() if k != "comment_stripped"}

    # --- webhooks ---------------------------------------------------------------------------

    def _emit(
        self,
        event: str,
        action: str,
        data: dict[str, Any],
        field_name: str | None,
        old_value: Any,
        new_value: Any,
        actor: dict[str, Any],
    ) -> None:
        hook = self.sender.webhook
        if hook is None or not hook.is_active:
            return  # Plane only queues deliveries for active webhooks
        payload = {
            "event": event,
            "action": action,
            "webhook_id": hook.id,
            "workspace_id": self.workspace["id"],
            "data": copy.deepcopy(data),
            "activity": {
                "field": field_name,
                "new_value": new_value,
                "old_value": old_value,
                "actor": self._user_lite(actor["id"]),
                "old_identifier": None,
                "new_identifier": None,
            },
        }
        self.sender.enqueue(_Job(event, action, field_name, payload))

    # --- HTTP: the API v1 -----------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._api_middleware, self._control_middleware])
        for method, path, name in API_ROUTES + CONTROL_ROUTES:
            app.router.add_route(method, path, getattr(self, name))
        return app

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        user_id: str | None = None
        try:
            user_id = self._authenticate(request)
            faulted = await self._staged_fault(request)
            if faulted is not None:
                self._log_call(request, faulted.status, user_id)
                return faulted
            rate_headers = self._throttle.check(user_id) if self._throttle else {}
            response = await handler(request)
            response.headers.update(rate_headers)
        except ApiError as exc:
            response = web.json_response(exc.body, status=exc.status, headers=exc.headers)
        except web.HTTPException as exc:
            self._log_call(request, exc.status, user_id)
            if exc.status != 404:
                raise
            return web.json_response(NOT_FOUND, status=404)
        self._log_call(request, response.status, user_id)
        return response

    async def _staged_fault(self, request: web.Request) -> web.Response | None:
        """The answer of a staged fault, if one applies to this request (a hang waits here,
        with the request already received, so it is served even if the client gave up)."""
        fault = self._fault
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._fault = None
        if fault.fault != HANG:
            return fault.response()
        await request.read()
        self.hung += 1
        released = self._unhang
        await released.wait()
        return None

    async def _h_me(self, request: web.Request) -> web.Response:
        """The user the API key belongs to (Plane's `users/me/`)."""
        return web.json_response(self._caller(request))

    def _log_call(self, request: web.Request, status: int, user_id: str | None) -> None:
        call = ApiCall(request.method, request.path, request.query_string, status, user_id)
        self.api_log.append(call)

    def _authenticate(self, request: web.Request) -> str:
        token = request.headers.get("X-Api-Key")
        if not token:
            raise ApiError(401, NO_CREDENTIALS)
        user_id = self._tokens.get(token)
        if user_id is None:
            raise ApiError(401, BAD_TOKEN)
        return user_id

    def _caller(self, request: web.Request) -> dict[str, Any]:
        """The user whose API key made the (already authenticated) request."""
        return self._users[self._tokens[request.headers["X-Api-Key"]]]

    def _api_project(self, request: web.Request) -> dict[str, Any]:
        if request.match_info["slug"] != self.workspace["slug"]:
            raise ApiError(404, NOT_FOUND)
        project = self._projects.get(request.match_info["project_id"])
        if project is None:
            raise ApiError(404, NOT_FOUND)
        return project

    def _api_issue_rec(self, request: web.Request) -> dict[str, Any]:
        project = self._api_project(request)
        rec = self._issues.get(request.match_info["issue_id"])
        if rec is None or rec["project"] != project["id"]:
            raise ApiError(404, NOT_FOUND)
        return rec

    def _issue_response(
        self, request: web.Request, rec: dict[str, Any], status: int = 200
    ) -> web.Response:
        data = self._api_issue(rec, frozenset(_csv(request.query, "expand")))
        return web.json_response(_only_fields(data, _csv(request.query, "fields")), status=status)

    async def _h_list_states(self, request: web.Request) -> web.Response:
        project = self._api_project(request)
        states = [s for s in self._project_states(project["id"]) if not s["is_triage"]]
        return web.json_response(paginate(request.query, copy.deepcopy(states)))

    async def _h_list_issues(self, request: web.Request) -> web.Response:
        project = self._api_project(request)
        recs = [rec for rec in self._issues.values() if rec["project"] == project["id"]]
        by_external = self._by_external(request, recs)
        if by_external is not None:
            return self._issue_response(request, by_external)
        expand = frozenset(_csv(request.query, "expand"))
        fields = _csv(request.query, "fields")
        ordered = self._ordered(recs, request.query.get("order_by", "-created_at"))
        page = paginate(request.query, ordered)
        page["results"] = [
            _only_fields(self._api_issue(r, expand), fields) for r in page["results"]
        ]
        return web.json_response(page)

    def _by_external(
        self, request: web.Request, recs: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        external_id = request.query.get("external_id")
        source = request.query.get("external_source")
        if not (external_id and source):
            return None
        for rec in recs:
            if rec["external_id"] == external_id and rec["external_source"] == source:
                return rec
        raise ApiError(404, NOT_FOUND)

    def _ordered(self, recs: list[dict[str, Any]], order_by: str) -> list[dict[str, Any]]:
        key = order_by.removeprefix("-")
        if key not in ISSUE_ORDERABLE:
            key, order_by = "created_at", "-created_at"
        ranked = sorted(recs, key=self._creation, reverse=True)  # the "-created_at" tie-break
        if key == "created_at":
            return ranked if order_by.startswith("-") else ranked[::-1]
        if key == "priority":
            return sorted(ranked, key=lambda r: PRIORITIES.index(r["priority"]))
        return sorted(ranked, key=lambda r: r[key], reverse=order_by.startswith("-"))

    async def _h_create_issue(self, request: web.Request) -> web.Response:
        project = self._api_project(request)
        body = await _json_object(request)
        self._check_external_unique(project["id"], body)
        fields = self._validated(project["id"], body)
        rec = self._create_issue_record(project, fields, self._caller(request))
        return self._issue_response(request, rec, status=201)

    def _check_external_unique(self, project_id: str, body: dict[str, Any]) -> None:
        external_id, source = body.get("external_id"), body.get("external_source")
        if not (external_id and source):
            return
        for rec in self._issues.values():
            same = (rec["external_id"], rec["external_source"]) == (external_id, source)
            if rec["project"] == project_id and same:
                message = "Issue with the same external id and external source already exists"
                raise ApiError(409, {"error": message, "id": rec["id"]})

    async def _h_get_issue(self, request: web.Request) -> web.Response:
        return self._issue_response(request, self._api_issue_rec(request))

    async def _h_get_issue_by_identifier(self, request: web.Request) -> web.Response:
        if request.match_info["slug"] != self.workspace["slug"]:
            raise ApiError(404, NOT_FOUND)
        identifier, _, sequence = request.match_info["ident"].rpartition("-")
        for rec in self._issues.values():
            project = self._projects[rec["project"]]
            if project["identifier"] == identifier and str(rec["sequence_id"]) == sequence:
                return self._issue_response(request, rec)
        raise ApiError(404, NOT_FOUND)

    async def _h_patch_issue(self, request: web.Request) -> web.Response:
        rec = self._api_issue_rec(request)
        body = await _json_object(request)
        self._update_issue(rec, body, via="api", actor=self._caller(request))
        return web.json_response(self._api_issue(rec))

    async def _h_delete_issue(self, request: web.Request) -> web.Response:
        # Plane sends no webhook for an issue delete (only issue_activity records it).
        rec = self._api_issue_rec(request)
        del self._issues[rec["id"]]
        for comment_id in [c["id"] for c in self._issue_comments(rec["id"])]:
            del self._comments[comment_id]
        return web.Response(status=204)

    async def _h_list_comments(self, request: web.Request) -> web.Response:
        self._api_project(request)
        found = self._issue_comments(request.match_info["issue_id"])[::-1]  # newest first
        views = [{**self._comment_view(comment), "is_member": True} for comment in found]
        fields = _csv(request.query, "fields")
        return web.json_response(paginate(request.query, [_only_fields(v, fields) for v in views]))

    async def _h_create_comment(self, request: web.Request) -> web.Response:
        project = self._api_project(request)
        body = await _json_object(request)
        html = _v_string("comment_html", body.get("comment_html", "<p></p>"), blank=True)
        access = body.get("access", "INTERNAL")
        if access not in COMMENT_ACCESS:
            raise _field_error("access", f'"{access}" is not a valid choice.')
        rec = self._issues.get(request.match_info["issue_id"])
        if rec is None or rec["project"] != project["id"]:
            raise ApiError(400, PAYLOAD_INVALID)  # a foreign key violation in real Plane
        external = self._comment_external(project["id"], body)
        comment = self._create_comment(rec, html, access, self._caller(request), external)
        return web.json_response(self._comment_view(comment), status=201)

    def _comment_external(self, project_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """external_id and external_source of a new comment; 409 when both are in use."""
        external = {
            key: _v_string(key, body.get(key), blank=True, null=True)
            for key in ("external_id", "external_source")
        }
        if not (external["external_id"] and external["external_source"]):
            return external
        for comment in self._comments.values():
            same = all(comment[key] == value for key, value in external.items())
            if comment["project"] == project_id and same:
                raise ApiError(409, {"error": DUPLICATE_COMMENT, "id": comment["id"]})
        return external

    def _api_comment(self, request: web.Request) -> dict[str, Any]:
        rec = self._api_issue_rec(request)
        comment = self._comments.get(request.match_info["comment_id"])
        if comment is None or comment["issue"] != rec["id"]:
            raise ApiError(404, NOT_FOUND)
        return comment

    async def _h_get_comment(self, request: web.Request) -> web.Response:
        comment = self._api_comment(request)
        return web.json_response({**self._comment_view(comment), "is_member": True})

    async def _h_patch_comment(self, request: web.Request) -> web.Response:
        comment = self._api_comment(request)
        body = await _json_object(request)
        before = self._comment_view(comment)
        changes = {key: body[key] for key in ("comment_html", "access") if key in body}
        if "comment_html" in changes:
            html = _v_string("comment_html", changes["comment_html"], blank=True)
            changes.update(comment_html=html, comment_stripped=_strip_tags(html))
        if changes.get("access", "INTERNAL") not in COMMENT_ACCESS:
            raise _field_error("access", f'"{changes["access"]}" is not a valid choice.')
        comment.update(changes, updated_at=_now(), updated_by=self._caller(request)["id"])
        view = self._comment_view(comment)
        self._emit_changes("issue_comment", view, before, body, self._caller(request))
        return web.json_response(view)

    async def _h_delete_comment(self, request: web.Request) -> web.Response:
        del self._comments[self._api_comment(request)["id"]]
        return web.Response(status=204)

    # --- HTTP: control endpoints for out-of-process drivers -------------------------------

    @web.middleware
    async def _control_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if not request.path.startswith("/sandbox/"):
            return await handler(request)
        try:
            return await handler(request)
        except KeyError as exc:
            return web.json_response({"error": str(exc.args[0] if exc.args else exc)}, status=404)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def _c_overview(self, request: web.Request) -> web.Response:
        projects = [
            {key: project[key] for key in ("id", "identifier", "name")}
            for project in self._projects.values()
        ]
        return web.json_response(
            {
                "workspace": self.workspace,
                "projects": projects,
                "users": list(self._users.values()),
                "webhook": self._webhook_info(),
            }
        )

    def _webhook_info(self) -> dict[str, Any] | None:
        if self.webhook is None:
            return None
        hook = self.webhook
        return {"id": hook.id, "url": hook.url, "is_active": hook.is_active}

    async def _c_create_project(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        project_id = self.create_project(
            body["identifier"], body.get("name", body["identifier"]), project_id=body.get("id")
        )
        return web.json_response({"id": project_id}, status=201)

    async def _c_add_bot(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        return web.json_response({"id": self.add_bot(body["token"], body["display_name"])})

    async def _c_create_issue(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        issue = self.create_issue(
            body["project_id"],
            body["name"],
            body.get("description_html", "<p></p>"),
            body.get("state_name", DEFAULT_STATE),
            as_user=body.get("as_user"),
        )
        return web.json_response(issue, status=201)

    async def _c_get_issue(self, request: web.Request) -> web.Response:
        issue_id = request.match_info["issue_id"]
        return web.json_response(
            {
                "issue": self.issue(issue_id),
                "state_name": self.state_name(issue_id),
                "comments": self.comments(issue_id),
            }
        )

    async def _c_move_issue(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        issue_id = request.match_info["issue_id"]
        self.move_issue(
            issue_id, body["state_name"], body.get("via", "web"), as_user=body.get("as_user")
        )
        return web.json_response({"state_name": self.state_name(issue_id)})

    async def _c_list_comments(self, request: web.Request) -> web.Response:
        return web.json_response(self.comments(request.match_info["issue_id"]))

    async def _c_add_comment(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        comment = self.add_comment(
            request.match_info["issue_id"], body["comment_html"], body.get("as_user")
        )
        return web.json_response(comment, status=201)

    async def _c_set_webhook(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        self.set_webhook(body.get("url"), body.get("secret"))
        return web.json_response({"webhook": self._webhook_info()})

    async def _c_deliveries(self, request: web.Request) -> web.Response:
        return web.json_response([asdict(delivery) for delivery in self.deliveries])

    async def _c_drain(self, request: web.Request) -> web.Response:
        await self.drain()
        return web.json_response({"ok": True})

    async def _c_faults(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if "drop_next" in body:
            self.drop_next(int(body["drop_next"]))
        if "drop_rate" in body:
            self.drop_rate(float(body["drop_rate"]), body.get("seed"))
        if "fail_with" in body:
            self.fail_with(body["fail_with"])
        if "api" in body:
            api = body["api"] or {}
            self.api_fault(
                api.get("fault"),
                times=api.get("times"),
                retry_after_s=int(api.get("retry_after_s", 1)),
            )
        return web.json_response({"ok": True})


API = "/api/v1/workspaces/{slug}/projects/{project_id}"
ITEMS = API + "/{kind:work-items|issues}"
API_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/api/v1/users/me/", "_h_me"),
    ("GET", f"{API}/states/", "_h_list_states"),
    ("GET", f"{ITEMS}/", "_h_list_issues"),
    ("POST", f"{ITEMS}/", "_h_create_issue"),
    ("GET", f"{ITEMS}/{{issue_id}}/", "_h_get_issue"),
    ("PATCH", f"{ITEMS}/{{issue_id}}/", "_h_patch_issue"),
    ("DELETE", f"{ITEMS}/{{issue_id}}/", "_h_delete_issue"),
    ("GET", f"{ITEMS}/{{issue_id}}/comments/", "_h_list_comments"),
    ("POST", f"{ITEMS}/{{issue_id}}/comments/", "_h_create_comment"),
    ("GET", f"{ITEMS}/{{issue_id}}/comments/{{comment_id}}/", "_h_get_comment"),
    ("PATCH", f"{ITEMS}/{{issue_id}}/comments/{{comment_id}}/", "_h_patch_comment"),
    ("DELETE", f"{ITEMS}/{{issue_id}}/comments/{{comment_id}}/", "_h_delete_comment"),
    (
        "GET",
        "/api/v1/workspaces/{slug}/{kind:work-items|issues}/{ident:[A-Za-z0-9]+-[0-9]+}/",
        "_h_get_issue_by_identifier",
    ),
)
# No auth: these drive the sandbox the way a person on the board (or a test) would.
CONTROL_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/sandbox/", "_c_overview"),
    ("POST", "/sandbox/projects", "_c_create_project"),
    ("POST", "/sandbox/bots", "_c_add_bot"),
    ("POST", "/sandbox/issues", "_c_create_issue"),
    ("GET", "/sandbox/issues/{issue_id}", "_c_get_issue"),
    ("POST", "/sandbox/issues/{issue_id}/move", "_c_move_issue"),
    ("GET", "/sandbox/issues/{issue_id}/comments", "_c_list_comments"),
    ("POST", "/sandbox/issues/{issue_id}/comments", "_c_add_comment"),
    ("PUT", "/sandbox/webhook", "_c_set_webhook"),
    ("GET", "/sandbox/deliveries", "_c_deliveries"),
    ("POST", "/sandbox/drain", "_c_drain"),
    ("POST", "/sandbox/faults", "_c_faults"),
)


# --- standalone -------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.sandbox.plane", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--workspace", default="acme")
    parser.add_argument("--token", default="plane_api_main", help="the main user's API token")
    parser.add_argument(
        "--project",
        action="append",
        default=[],
        metavar="KEY[:UUID]",
        help="create a project (repeatable); default one project ORCH",
    )
    parser.add_argument(
        "--bot", action="append", default=[], metavar="TOKEN:NAME", help="add a bot account"
    )
    parser.add_argument("--webhook-url")
    parser.add_argument("--webhook-secret")
    parser.add_argument("--rate-limit", type=int, default=60, help="per key per minute; 0 = off")
    parser.add_argument("--retry-backoff", type=float, default=1.0, help="seconds")
    return parser.parse_args(argv)


def _configure(args: argparse.Namespace) -> tuple[PlaneSandbox, dict[str, str]]:
    sandbox = PlaneSandbox(
        args.workspace,
        args.token,
        args.webhook_url,
        args.webhook_secret,
        rate_limit=args.rate_limit or None,
        retry_backoff_s=args.retry_backoff,
    )
    projects: dict[str, str] = {}
    for spec in args.project or ["ORCH"]:
        key, _, project_id = spec.partition(":")
        projects[key] = sandbox.create_project(key, key, project_id=project_id or None)
    for spec in args.bot:
        token, _, name = spec.partition(":")
        sandbox.add_bot(token, name or token)
    return sandbox, projects


async def _serve(args: argparse.Namespace) -> None:
    sandbox, projects = _configure(args)
    base_url = await sandbox.start(args.host, args.port)
    print(json.dumps({"base_url": base_url, "workspace": args.workspace, "projects": projects}))
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await sandbox.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; the first stdout line is JSON with base_url and projects."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
