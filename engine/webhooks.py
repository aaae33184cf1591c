"""Webhooks in: Plane and Gitea, verified, recorded durably, answered, then processed.

A delivery is answered 200 only after its row is committed, and processed after
the answer; rows left unprocessed by a crash are processed at the next start.
Deduplication is by delivery id and by content key: Plane sends a new delivery
id on every retry and one delivery per changed field, Gitea's manual replay
sends a new id, so the same state change or the same status is recognised by
what it says. Processing translates what the tracker or the forge says into the
same engine calls the buttons and the reconciler make; comments never drive it. A body
that is JSON but not the shape its event needs is refused with 400 before anything is
recorded; a delivery that is recorded but not acted on (an unknown event or project, a
sha no task owns) is logged once, with its source, event and reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from aiohttp import web

from engine import gitea, plane
from engine.config import ProjectConfig, Settings
from engine.metrics import COUNTERS
from engine.pipeline import Pipeline
from engine.plane import PlaneClient, logical_state, strip_html
from engine.stages import ROLES, Stage, Status
from engine.store import Store, Task, now

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
REJECTED_WITHOUT_COMMENT = "The BRD was rejected in the tracker without a comment."
NOT_STARTED_COMMENT = "tracker/not_started.html.j2"


INSERT_DELIVERIES = (
    "INSERT INTO webhook_deliveries (source, delivery_id, content_key, event, received_at,"
    " payload) VALUES "
)
MAX_COMMIT_BATCH = 500  # deliveries committed in one transaction at most
MARK_COALESCE_S = 0.05  # outcome marks wait this long to share a transaction
# processing outcomes that changed something; any other is logged with its reason
ACTED = frozenset(
    {"started", "answers given", "approved", "rejected", "advanced", "done", "lease released"}
    | {"head recorded"}
)
IGNORED = "ignored"
AMBIGUOUS_SHA = "not resolved: the sha is no task's head and several tasks are in development"


class BadPayload(ValueError):
    """The body is JSON but lacks what its event needs."""


@dataclass(frozen=True)
class Envelope:
    event: str
    content_key: str


def _get(payload: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(payload, dict) or key not in payload:
            raise BadPayload(f"missing {'.'.join(path)}")
        payload = payload[key]
    return payload


def _typed(payload: Any, *path: str, kind: type | tuple[type, ...] = str) -> Any:
    """The value at `path`, which must be of `kind` (a bool is not a number here)."""
    value = _get(payload, *path)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise BadPayload(f"{'.'.join(path)} is not {_names(kind)}")
    return value


def _optional(payload: Any, *path: str, kind: type | tuple[type, ...] = str) -> Any:
    """Like `_typed`, but a missing key or null is None."""
    value = payload
    for key in path:
        if not isinstance(value, dict) or (value := value.get(key)) is None:
            return None
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise BadPayload(f"{'.'.join(path)} is not {_names(kind)}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in _kinds(kind))


def _object(payload: Any) -> dict:
    if not isinstance(payload, dict):
        raise BadPayload("the body is not a JSON object")
    return payload


# --- reading deliveries --------------------------------------------------------------------

PLANE_ITEM_EVENTS = frozenset({"issue", "issue_comment"})
PLANE_ACTIONS = frozenset({"created", "updated", "deleted"})
STATE_FIELDS = frozenset({"state", "state_id"})
GITEA_EVENTS = {
    "status": "status",
    "pull_request": "pull_request",
    "pull_request_sync": "pull_request",
    "push": "push",
}


def plane_envelope(headers: Mapping[str, str], payload: Any) -> Envelope:
    """What a Plane delivery is about; BadPayload when it lacks what its event needs."""
    payload = _object(payload)
    event = headers.get("X-Plane-Event") or _typed(payload, "event")
    if event not in PLANE_ITEM_EVENTS:
        return Envelope(f"{event}.{payload.get('action')}", "")
    action = _typed(payload, "action")
    data = _typed(payload, "data", kind=dict)
    issue_id = _typed(data, "id")
    activity = _optional(payload, "activity", kind=dict) or {}
    field = _optional(activity, "field")
    _optional(activity, "actor", kind=dict)
    updated = _optional(data, "updated_at")
    if event == "issue" and field in STATE_FIELDS:
        new_state = _optional(activity, "new_value")
        _plane_issue_fields(data)
        return Envelope("issue.state", f"issue:{issue_id}:state:{new_state}:{updated}")
    # an action Plane does not send must not be read as one Conveyor handles ("issue.state")
    name = f"{event}.{action}" if action in PLANE_ACTIONS else f"{event}:{action}"
    return Envelope(name, f"{event}:{action}:{issue_id}:{field}:{updated}")


def _plane_issue_fields(data: dict) -> None:
    """The issue fields a state change is read from: the project, and when present the state,
    the name and the description."""
    _typed(data, "project")
    state = _optional(data, "state", kind=(dict, str))
    if isinstance(state, dict):
        _optional(state, "name")
        _optional(state, "group")
    for key in ("name", "description_html", "description_stripped"):
        _optional(data, key)
    _optional(data, "sequence_id", kind=int)


def gitea_envelope(headers: Mapping[str, str], payload: Any) -> Envelope:
    """What a Gitea delivery is about; BadPayload when it lacks what its event needs."""
    payload = _object(payload)
    kind = gitea.event_type(headers)
    event = GITEA_EVENTS.get(kind)
    if event is None:
        return Envelope(kind or "unknown", "")
    repo = _typed(payload, "repository", "full_name")
    _optional(payload, "sender", kind=dict)
    if event == "status":
        sha, context, state = (_typed(payload, key) for key in ("sha", "context", "state"))
        return Envelope("status", f"status:{repo}:{sha}:{context}:{state}")
    if event == "pull_request":
        number = _typed(payload, "number", kind=int)
        action = _typed(payload, "action")
        pull = _typed(payload, "pull_request", kind=dict)
        merged = bool(_optional(pull, "merged", kind=bool))
        _optional(pull, "merge_commit_sha")
        head = _typed(pull, "head", "sha")
        _typed(pull, "head", "ref")
        return Envelope("pull_request", f"pr:{repo}:{number}:{action}:{merged}:{head}")
    ref, after = _typed(payload, "ref"), _typed(payload, "after")
    _optional(payload, "before")
    return Envelope("push", f"push:{repo}:{ref}:{after}")


@dataclass(frozen=True)
class _Waiting:
    """A delivery waiting for the transaction that commits it."""

    params: tuple[Any, ...]
    future: asyncio.Future[int | None]


def _storable(*texts: str | None) -> bool:
    """Text SQLite can store: valid UTF-8 (a header's stray bytes or a JSON lone surrogate
    would make the insert fail)."""
    try:
        for text in texts:
            if text is not None:
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _inserted_ids(batch: list[_Waiting], inserted: Iterable[Any]) -> list[int | None]:
    """The row id each delivery of a multi-row insert got, None for those that conflicted.

    SQLite inserts the rows in order and gives each the next rowid, so the inserted rows
    sorted by id are in batch order; two deliveries with the same keys share their fate,
    except that the first of them is the one inserted.
    """
    rows = iter(sorted((int(r[0]), tuple(r[1:4])) for r in inserted))
    row = next(rows, None)
    ids: list[int | None] = []
    for waiting in batch:
        if row is not None and row[1] == waiting.params[:3]:
            ids.append(row[0])
            row = next(rows, None)
        else:
            ids.append(None)
    return ids


def plane_subject(payload: Any) -> str:
    """What a Plane delivery names, for log lines."""
    data = payload.get("data") if isinstance(payload, dict) else None
    data = data if isinstance(data, dict) else {}
    return f"project {data.get('project', '?')}, item {data.get('id', '?')}"


def gitea_subject(payload: Any) -> str:
    """What a Gitea delivery names, for log lines."""
    repo = payload.get("repository") if isinstance(payload, dict) else None
    subject = f"repository {repo.get('full_name', '?') if isinstance(repo, dict) else '?'}"
    sha = payload.get("sha") if isinstance(payload, dict) else None
    return f"{subject}, sha {sha}" if isinstance(sha, str) else subject


@dataclass(frozen=True)
class Source:
    name: str
    signature_header: str
    delivery_header: str
    verify: Callable[[str, bytes, str | None], bool]
    envelope: Callable[[Mapping[str, str], Any], Envelope]
    subject: Callable[[Any], str]


SOURCES = {
    "plane": Source(
        "plane",
        "X-Plane-Signature",
        "X-Plane-Delivery",
        plane.verify_signature,
        plane_envelope,
        plane_subject,
    ),
    "gitea": Source(
        "gitea",
        "X-Gitea-Signature",
        "X-Gitea-Delivery",
        gitea.verify_signature,
        gitea_envelope,
        gitea_subject,
    ),
}


class WebhookIntake:
    """The two endpoints and the processing of what they recorded."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        pipeline: Pipeline,
        plane_client: PlaneClient | None,
        env: jinja2.Environment,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.plane = plane_client
        self.env = env
        self._own_actors: set[str] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: list[_Waiting] = []
        self._committer: asyncio.Task[None] | None = None
        self._marks: list[tuple[float, str, int]] = []
        self._marker: asyncio.Task[None] | None = None
        self.handlers: dict[str, Callable[[dict], Awaitable[str]]] = {
            "issue.state": self._plane_state,
            "status": self._gitea_status,
            "pull_request": self._gitea_pull_request,
            "push": self._gitea_push,
        }

    def secret(self, source: str) -> str | None:
        value = getattr(self.settings, f"{source}_webhook_secret")
        return value.get_secret_value() if value else None

    def mount(self, app: web.Application) -> None:
        app.router.add_post("/webhooks/plane", self.receive_plane)
        app.router.add_post("/webhooks/gitea", self.receive_gitea)

    async def receive_plane(self, request: web.Request) -> web.Response:
        return await self.receive(request, SOURCES["plane"])

    async def receive_gitea(self, request: web.Request) -> web.Response:
        return await self.receive(request, SOURCES["gitea"])

    async def receive(self, request: web.Request, source: Source) -> web.Response:
        try:
            response = await self._receive(request, source)
        except web.HTTPException as error:
            COUNTERS.inc(
                "conveyor_webhooks_received_total", source=source.name, status=str(error.status)
            )
            raise
        COUNTERS.inc(
            "conveyor_webhooks_received_total", source=source.name, status=str(response.status)
        )
        return response

    async def _receive(self, request: web.Request, source: Source) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
        body = await request.read()
        secret = self.secret(source.name)
        if secret is not None or not self.settings.allow_unsigned_webhooks:
            signature = request.headers.get(source.signature_header)
            if secret is None or not source.verify(secret, body, signature):
                return web.json_response({"error": "bad or missing signature"}, status=401)
        try:
            payload = json.loads(body)
            envelope = source.envelope(request.headers, payload)
        except (ValueError, TypeError, RecursionError) as error:
            return web.json_response({"error": f"bad payload: {error}"}, status=400)
        delivery_id = request.headers.get(source.delivery_header) or None
        if not _storable(delivery_id, envelope.event, envelope.content_key):
            return web.json_response({"error": "bad payload: text that is not UTF-8"}, status=400)
        row_id = await self.record(source.name, delivery_id, envelope, body)
        if row_id is not None:
            self._spawn(row_id, source.name, envelope.event, payload)
        return web.json_response({"ok": True, "duplicate": row_id is None})

    async def record(
        self, source: str, delivery_id: str | None, envelope: Envelope, body: bytes
    ) -> int | None:
        """Commit the delivery; None when its id or its content was seen before.

        Deliveries that arrive while a commit is in flight wait for the next one, and all
        of them are committed in one transaction (one fsync); each caller returns only
        after the transaction holding its row has committed, so an answer still means
        the row is durable. A failed commit fails every delivery it held.
        """
        params = (source, delivery_id, envelope.content_key or None, envelope.event, now(), body)
        waiting = _Waiting(params, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_waiting(), name="deliveries")
            self._tasks.add(self._committer)
            self._committer.add_done_callback(self._tasks.discard)
        # shielded: a caller that goes away must not cancel its neighbours' commit
        return await asyncio.shield(waiting.future)

    async def _commit_waiting(self) -> None:
        while self._waiting:
            batch = self._waiting[:MAX_COMMIT_BATCH]
            del self._waiting[:MAX_COMMIT_BATCH]
            try:
                failed = await self._commit_batch(batch)
                if failed is not None and len(batch) > 1:
                    # one delivery the store refuses must not fail its neighbours: alone,
                    # each of them succeeds or fails on its own
                    for waiting in batch:
                        await self._commit_batch([waiting])
            except BaseException:  # cancelled (shutting down): the waiting requests end too
                for waiting in batch + self._waiting:
                    waiting.future.cancel()
                self._waiting.clear()
                raise

    async def _commit_batch(self, batch: list[_Waiting]) -> Exception | None:
        """Insert the batch in one transaction and answer its callers; the error, if any,
        is returned (a batch of one is answered with it; nothing of a failed batch is kept)."""
        try:
            async with self.store.tx() as conn:
                inserted = await conn.execute_fetchall(
                    INSERT_DELIVERIES
                    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(batch))
                    + " ON CONFLICT DO NOTHING RETURNING id, source, delivery_id, content_key",
                    [value for waiting in batch for value in waiting.params],
                )
        except Exception as error:
            if len(batch) == 1 and not batch[0].future.done():
                batch[0].future.set_exception(error)
            return error
        for waiting, row_id in zip(batch, _inserted_ids(batch, inserted), strict=True):
            if not waiting.future.done():
                waiting.future.set_result(row_id)
        return None

    def _spawn(self, row_id: int, source: str, event: str, payload: Any) -> None:
        task = asyncio.create_task(
            self._process(row_id, source, event, payload), name=f"delivery-{row_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle(self) -> None:
        """Wait until every delivery received so far is processed and marked."""
        while self._tasks or (self._marker is not None and not self._marker.done()):
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            if self._marker is not None:
                await asyncio.gather(self._marker, return_exceptions=True)

    async def process_pending(self) -> int:
        """Process deliveries recorded but not processed (the process stopped in between)."""
        rows = await self.store.fetchall(
            "SELECT id FROM webhook_deliveries WHERE processed_at IS NULL ORDER BY id"
        )
        for row in rows:
            await self.process(row["id"])
        return len(rows)

    async def process(self, row_id: int) -> None:
        """Process a recorded delivery, read back from the store."""
        row = await self.store.fetchone(
            "SELECT source, event, payload FROM webhook_deliveries WHERE id = ?", (row_id,)
        )
        await self._process(row_id, row["source"], row["event"], json.loads(row["payload"]))

    async def _process(self, row_id: int, source_name: str, event: str, payload: Any) -> None:
        handler = self.handlers.get(event)
        try:
            outcome = await handler(payload) if handler else IGNORED
        except Exception:
            log.exception("processing %s delivery %s failed", source_name, row_id)
            outcome = "error"
        if outcome not in ACTED and log.isEnabledFor(logging.INFO):
            source = SOURCES[source_name]
            why = "Conveyor does not act on this event" if handler is None else outcome
            log.info(
                "%s webhook %s (delivery %s, %s) not acted on: %s",
                source.name,
                event,
                row_id,
                source.subject(payload),
                why,
            )
        await self._mark_processed(row_id, outcome)

    async def _mark_processed(self, row_id: int, outcome: str) -> None:
        """Record the outcome soon, with the marks of the deliveries processed meanwhile, in
        one transaction: they leave the writer free for deliveries, whose answers wait for
        their commit. A mark lost in a crash only means the delivery is processed again at
        start, which is safe: processing is idempotent on content."""
        self._marks.append((now(), outcome, row_id))
        if self._marker is None or self._marker.done():
            self._marker = asyncio.create_task(self._write_marks(), name="delivery-marks")

    async def _write_marks(self) -> None:
        while self._marks:
            await asyncio.sleep(MARK_COALESCE_S)
            marks, self._marks = self._marks, []
            async with self.store.tx() as conn:
                await conn.executemany(
                    "UPDATE webhook_deliveries SET processed_at = ?, outcome = ? WHERE id = ?",
                    marks,
                )

    # --- Plane ---------------------------------------------------------------------------

    def _plane_project(self, plane_project_id: str) -> ProjectConfig | None:
        return next(
            (p for p in self.settings.projects if p.plane_project_id == plane_project_id), None
        )

    def logical_state(self, state: dict) -> str | None:
        """The logical state a board state means (engine.plane.logical_state)."""
        name, group = state.get("name"), state.get("group")
        return logical_state(
            self.settings.plane_state_names,
            name if isinstance(name, str) else None,
            group if isinstance(group, str) else None,
        )

    async def _plane_state(self, payload: dict) -> str:
        data = payload["data"]
        project = self._plane_project(str(data.get("project")))
        if project is None:
            return "unknown project"
        state = data.get("state")
        if not isinstance(state, dict):
            state = await self._fetch_state(project, data["id"])
            if state is None:
                return "state unknown"
        logical = self.logical_state(state)
        actor = self._actor(payload)
        verdicts = {
            "in_progress": self._in_progress,
            "approved": self.on_approved,
            "rejected": self.on_rejected,
        }
        act = verdicts.get(logical or "")
        if act is None:
            return f"no effect ({logical})"
        return await act(project, data, actor)

    async def _fetch_state(self, project: ProjectConfig, issue_id: str) -> dict | None:
        if self.plane is None:
            return None
        issue = await self.plane.get_issue(project.plane_project_id, issue_id)
        if not issue.ok or issue.value.state_name is None:
            return None
        return {"name": issue.value.state_name, "group": issue.value.state_group}

    @staticmethod
    def _actor(payload: dict) -> str:
        actor = (payload.get("activity") or {}).get("actor") or {}
        return f"plane:{actor.get('display_name') or actor.get('id') or '?'}"

    async def _in_progress(self, project: ProjectConfig, data: dict, actor: str) -> str:
        existing = await self.store.task_by_tracker_issue(project.key, data["id"])
        if existing is not None:
            return await self._resume(existing, project, actor)
        name, description = data.get("name"), self._description(data)
        if name is None or description is None:
            if self.plane is None:
                return "issue unreadable"
            fetched = await self.plane.get_issue(project.plane_project_id, data["id"])
            if not fetched.ok:
                return "issue unreadable"
            name, description = fetched.value.name, fetched.value.description_text
            data = {**data, "sequence_id": fetched.value.sequence_id}
        outcome = await self.pipeline.start_task(
            project.key,
            name or "",
            description or "",
            tracker_issue_id=data["id"],
            sequence_id=data.get("sequence_id"),
            actor=actor,
        )
        if outcome.created:
            return "started"
        if outcome.task is None and self.plane is not None:
            why = self.env.get_template(NOT_STARTED_COMMENT).render(reason=outcome.reason)
            await self.plane.add_comment(project.plane_project_id, data["id"], why)
        return f"not started: {outcome.reason}"

    async def _resume(self, task: Task, project: ProjectConfig, actor: str) -> str:
        """In Progress again: a task waiting for answers relaunches its analyst with them."""
        if task.status != Status.NEEDS_INPUT or await self.store.has_active_job(task.id):
            return "task exists"
        answers = await self._latest_comment(project, task) or ""
        outcome = await self.pipeline.answer(task.id, answers, actor)
        return "answers given" if outcome.changed else "task exists"

    @staticmethod
    def _description(data: dict) -> str | None:
        if "description_html" in data:
            return strip_html(data.get("description_html"))
        if "description_stripped" in data:
            return data.get("description_stripped") or ""
        return None

    async def on_approved(self, project: ProjectConfig, data: dict, actor: str) -> str:
        task = await self.store.task_by_tracker_issue(project.key, data["id"])
        if task is None:
            return "no task"
        outcome = await self.pipeline.approve(task.id, actor)
        return "approved" if outcome.changed else f"no change: {outcome.reason}"

    async def on_rejected(self, project: ProjectConfig, data: dict, actor: str) -> str:
        task = await self.store.task_by_tracker_issue(project.key, data["id"])
        if task is None:
            return "no task"
        if task.status != Status.AWAITING_APPROVAL:
            return f"no change: the task is {task.status}"
        reason = await self._latest_comment(project, task) or REJECTED_WITHOUT_COMMENT
        outcome = await self.pipeline.reject(task.id, reason, actor)
        return "rejected" if outcome.changed else f"no change: {outcome.reason}"

    async def _latest_comment(self, project: ProjectConfig, task: Task) -> str | None:
        """The newest comment a person wrote (Conveyor's and its agents' own are skipped)."""
        if self.plane is None:
            return None
        text = await self.plane.latest_comment_text(
            project.plane_project_id, task.tracker_issue_id, exclude_actors=await self.own_actors()
        )
        return text.value if text.ok else None

    async def own_actors(self) -> set[str]:
        """The Plane accounts Conveyor posts as: the main token's and each agent's."""
        if self._own_actors is not None:
            return self._own_actors
        assert self.plane is not None
        bots = [getattr(self.settings, f"plane_bot_{role}") for role in ROLES]
        tokens = [None, *(bot.get_secret_value() for bot in bots if bot)]
        found = [await self.plane.user_id(token=token) for token in tokens]
        actors = {result.value for result in found if result.ok}
        if all(result.ok for result in found):
            self._own_actors = actors
        return actors

    # --- Gitea ---------------------------------------------------------------------------

    def _gitea_project(self, repo: str) -> ProjectConfig | None:
        return next((p for p in self.settings.projects if p.repo == repo), None)

    async def _task_for_sha(self, project: ProjectConfig, sha: str) -> Task | str:
        """The task whose recorded head is `sha`, else the only development task of the repo;
        why there is none, when there is none."""
        row = await self.store.fetchone(
            "SELECT id FROM tasks WHERE project = ? AND head_sha = ?", (project.key, sha)
        )
        if row is not None:
            return await self.store.get_task(row["id"])
        rows = await self.store.fetchall(
            "SELECT id FROM tasks WHERE project = ? AND stage = ? AND status = ?",
            (project.key, Stage.DEVELOPMENT, Status.ACTIVE),
        )
        if len(rows) == 1:
            return await self.store.get_task(rows[0]["id"])
        return AMBIGUOUS_SHA if rows else "no task for the sha"

    async def _gitea_status(self, payload: dict) -> str:
        project = self._gitea_project(payload["repository"]["full_name"])
        if project is None:
            return "unknown project"
        task = await self._task_for_sha(project, payload["sha"])
        if isinstance(task, str):
            return task
        return "advanced" if await self.pipeline.recheck(task.id) else "no change"

    async def _task_for_branch(self, project: ProjectConfig, branch: str) -> Task | None:
        row = await self.store.fetchone(
            "SELECT id FROM tasks WHERE project = ? AND branch = ?", (project.key, branch)
        )
        return None if row is None else await self.store.get_task(row["id"])

    async def _gitea_pull_request(self, payload: dict) -> str:
        pull = payload["pull_request"]
        if payload["action"] != "closed" or not pull.get("merged"):
            return f"{IGNORED}: {payload['action']}, not a merge"
        project = self._gitea_project(payload["repository"]["full_name"])
        if project is None:
            return "unknown project"
        task = await self._task_for_branch(project, pull["head"]["ref"])
        if task is None:
            return "no task for the branch"
        held = await self.store.fetchone("SELECT 1 FROM merge_leases WHERE task_id = ?", (task.id,))
        sender = (payload.get("sender") or {}).get("login", "?")
        done = await self.pipeline.merged_in_forge(
            task.id, pull.get("merge_commit_sha"), actor=f"gitea:{sender}"
        )
        if done:
            return "done"
        return "lease released" if held and task.stage == Stage.DEPLOY else "no change"

    async def _gitea_push(self, payload: dict) -> str:
        project = self._gitea_project(payload["repository"]["full_name"])
        if project is None:
            return "unknown project"
        ref = payload["ref"]
        if not ref.startswith("refs/heads/"):
            return f"{IGNORED}: not a branch"
        task = await self._task_for_branch(project, ref.removeprefix("refs/heads/"))
        if task is None:
            return "no task for the branch"
        # Only a push that continues from the head we know moves it: a late delivery of an
        # older push (before our own newer one) must not wind the head back.
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "UPDATE tasks SET head_sha = ? WHERE id = ? AND (head_sha = ? OR head_sha IS NULL)",
                (payload["after"], task.id, payload.get("before")),
            )
        return "head recorded" if cursor.rowcount else "stale push"


def check_secrets(settings: Settings) -> list[str]:
    """Webhook sources that are enabled with no secret (start-up refuses them)."""
    enabled = {"plane": settings.plane_api_url, "gitea": settings.gitea_url}
    return [
        f"ORCH_{source.upper()}_WEBHOOK_SECRET"
        for source, configured in enabled.items()
        if configured and getattr(settings, f"{source}_webhook_secret") is None
    ]
