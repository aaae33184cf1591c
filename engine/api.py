"""Read-only HTTP: /healthz, /metrics (Prometheus text) and /api/tasks (bearer token)."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine.metrics import COUNTERS, format_labels
from engine.reconciler import TICK_SETTING
from engine.store import Store, Task, now
from engine.summary import task_figures

if TYPE_CHECKING:
    from engine.runtime import Engine

ENGINE_KEY = web.AppKey("engine", object)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def task_json(store: Store, task: Task) -> dict[str, Any]:
    figures = await task_figures(store, task, now())
    return {
        "id": task.id,
        "work_item": task.work_item,
        "project": task.project,
        "title": task.title,
        "stage": task.stage,
        "status": task.status,
        "status_reason": task.status_reason,
        "developer_retries": task.developer_retries,
        "branch": task.branch,
        "head_sha": task.head_sha,
        "merge_sha": task.merge_sha,
        "pr_url": task.pr_url,
        "tracker_issue_id": task.tracker_issue_id,
        "created_at": iso(task.created_at),
        "updated_at": iso(task.updated_at),
        "finished_at": iso(task.finished_at),
        "cost_usd": figures.total.cost_usd,
        "input_tokens": figures.total.input_tokens,
        "output_tokens": figures.total.output_tokens,
    }


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE_KEY]  # type: ignore[return-value]


def _authorised(request: web.Request) -> bool:
    token = _engine(request).settings.api_token
    if token is None:
        return False
    header = request.headers.get("Authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    return hmac.compare_digest(header.encode(), expected.encode())


@web.middleware
async def require_token(request: web.Request, handler):
    if request.path.startswith("/api/") and not _authorised(request):
        raise web.HTTPUnauthorized(
            text='{"error": "a valid bearer token (ORCH_API_TOKEN) is required"}',
            content_type="application/json",
        )
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    engine = _engine(request)
    checks: dict[str, Any] = {}
    try:
        await engine.store.fetchone("SELECT 1")
        checks["store"] = True
    except Exception as error:  # the answer is the health report, whatever broke
        checks["store"] = f"unreachable: {type(error).__name__}"
    checks["worker"] = engine.worker_alive()
    tick = await engine.store.get_setting(TICK_SETTING) if checks["store"] is True else None
    checks["reconciler_last_tick"] = iso(tick["at"]) if tick else None
    healthy = checks["store"] is True and checks["worker"] is True
    return web.json_response({"ok": healthy, **checks}, status=200 if healthy else 503)


async def list_tasks(request: web.Request) -> web.Response:
    store = _engine(request).store
    return web.json_response([await task_json(store, task) for task in await store.list_tasks()])


async def get_task(request: web.Request) -> web.Response:
    store = _engine(request).store
    task = await store.find_task(request.match_info["ref"])
    if task is None:
        raise web.HTTPNotFound(text='{"error": "no such task"}', content_type="application/json")
    body = await task_json(store, task)
    body["events"] = [
        {
            "at": iso(e.at),
            "kind": e.kind,
            "from": e.from_state,
            "to": e.to_state,
            "detail": e.detail,
            "actor": e.actor,
        }
        for e in await store.events(task.id)
    ]
    body["agent_runs"] = [
        {
            "stage": r.stage,
            "role": r.role,
            "attempt": r.attempt,
            "started_at": iso(r.started_at),
            "duration_s": r.duration_s,
            "exit_code": r.exit_code,
            "ok": None if r.ok is None else bool(r.ok),
            "error": r.error,
            "input_tokens": r.full_input,
            "cache_read_tokens": r.cache_read_tokens,
            "cache_creation_tokens": r.cache_creation_tokens,
            "output_tokens": r.output_tokens,
            "cost_usd": r.cost_usd,
            "model": r.model,
        }
        for r in await store.agent_runs(task.id)
    ]
    return web.json_response(body)


# gauges read from the store: (name, help, query whose rows are the labels plus "n")
STORE_SERIES: tuple[tuple[str, str, str], ...] = (
    (
        "conveyor_tasks",
        "Tasks by stage and status.",
        "SELECT stage, status, COUNT(*) AS n FROM tasks GROUP BY stage, status",
    ),
    ("conveyor_jobs", "Jobs by state.", "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"),
    (
        "conveyor_agent_runs_total",
        "Agent runs by role and outcome.",
        "SELECT role, CASE WHEN ok THEN 'ok' ELSE 'failed' END AS outcome, COUNT(*) AS n"
        " FROM agent_runs WHERE finished_at IS NOT NULL GROUP BY role, outcome",
    ),
    (
        "conveyor_agent_tokens_total",
        "Agent tokens by role and kind (input is the full input, cache included).",
        "SELECT role, 'input' AS kind, COALESCE(SUM(COALESCE(input_tokens, 0)"
        " + COALESCE(cache_read_tokens, 0) + COALESCE(cache_creation_tokens, 0)), 0) AS n"
        " FROM agent_runs GROUP BY role"
        " UNION ALL SELECT role, 'cached', COALESCE(SUM(COALESCE(cache_read_tokens, 0)"
        " + COALESCE(cache_creation_tokens, 0)), 0) FROM agent_runs GROUP BY role"
        " UNION ALL SELECT role, 'output', COALESCE(SUM(output_tokens), 0)"
        " FROM agent_runs GROUP BY role",
    ),
    (
        "conveyor_agent_cost_usd_total",
        "Agent cost in USD by role.",
        "SELECT role, COALESCE(SUM(cost_usd), 0) AS n FROM agent_runs GROUP BY role",
    ),
    (
        "conveyor_webhook_deliveries_total",
        "Recorded webhook deliveries by source and processing outcome.",
        "SELECT source, COALESCE(outcome, 'pending') AS outcome, COUNT(*) AS n"
        " FROM webhook_deliveries GROUP BY source, outcome",
    ),
)


async def metrics(request: web.Request) -> web.Response:
    store = _engine(request).store
    lines: list[str] = []
    for name, help_text, query in STORE_SERIES:
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for row in await store.fetchall(query):
            labels = dict(row)
            value = labels.pop("n")
            lines.append(f"{name}{format_labels(labels)} {value:g}")
    lines += COUNTERS.render()
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def add_routes(app: web.Application, engine: Engine) -> None:
    app[ENGINE_KEY] = engine
    app.middlewares.append(require_token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_get("/api/tasks/{ref}", get_task)
