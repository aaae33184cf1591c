"""Read-only HTTP: /healthz, /metrics (Prometheus text) and /api/tasks (bearer token)."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from engine.config import Settings
from engine.store import Store, Task, now
from engine.summary import task_figures

STORE_KEY = web.AppKey("store", Store)
SETTINGS_KEY = web.AppKey("settings", Settings)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from datetime import UTC, datetime

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
        "tracker_issue_id": task.tracker_issue_id,
        "created_at": iso(task.created_at),
        "updated_at": iso(task.updated_at),
        "finished_at": iso(task.finished_at),
        "cost_usd": figures.total.cost_usd,
        "input_tokens": figures.total.input_tokens,
        "output_tokens": figures.total.output_tokens,
    }


def _authorised(request: web.Request) -> bool:
    token = request.app[SETTINGS_KEY].api_token
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
    await request.app[STORE_KEY].fetchone("SELECT 1")
    return web.json_response({"ok": True})


async def list_tasks(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    return web.json_response([await task_json(store, task) for task in await store.list_tasks()])


async def get_task(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
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
            "cached_input_tokens": (r.cache_read_tokens or 0) + (r.cache_creation_tokens or 0)
            if r.full_input is not None
            else None,
            "output_tokens": r.output_tokens,
            "cost_usd": r.cost_usd,
            "model": r.model,
        }
        for r in await store.agent_runs(task.id)
    ]
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    lines = [
        "# HELP conveyor_tasks Tasks by stage and status.",
        "# TYPE conveyor_tasks gauge",
    ]
    for row in await store.fetchall(
        "SELECT stage, status, COUNT(*) AS n FROM tasks GROUP BY stage, status"
    ):
        lines.append(
            f'conveyor_tasks{{stage="{row["stage"]}",status="{row["status"]}"}} {row["n"]}'
        )
    lines += ["# HELP conveyor_jobs Jobs by state.", "# TYPE conveyor_jobs gauge"]
    for row in await store.fetchall("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
        lines.append(f'conveyor_jobs{{state="{row["state"]}"}} {row["n"]}')
    lines += [
        "# HELP conveyor_agent_runs_total Agent runs by role and outcome.",
        "# TYPE conveyor_agent_runs_total counter",
    ]
    for row in await store.fetchall(
        "SELECT role, COALESCE(ok, 0) AS ok, COUNT(*) AS n, COALESCE(SUM(cost_usd), 0) AS cost"
        " FROM agent_runs GROUP BY role, ok"
    ):
        outcome = "ok" if row["ok"] else "failed"
        lines.append(
            f'conveyor_agent_runs_total{{role="{row["role"]}",outcome="{outcome}"}} {row["n"]}'
        )
    lines += [
        "# HELP conveyor_agent_cost_usd_total Agent cost in USD.",
        "# TYPE conveyor_agent_cost_usd_total counter",
    ]
    row = await store.fetchone("SELECT COALESCE(SUM(cost_usd), 0) AS cost FROM agent_runs")
    lines.append(f"conveyor_agent_cost_usd_total {row['cost']}")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def add_routes(app: web.Application, store: Store, settings: Settings) -> None:
    app[STORE_KEY] = store
    app[SETTINGS_KEY] = settings
    app.middlewares.append(require_token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_get("/api/tasks/{ref}", get_task)
