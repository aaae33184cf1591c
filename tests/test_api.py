"""The read-only HTTP interface: /healthz, /metrics, /api/tasks."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from engine.api import add_routes
from engine.runtime import Engine
from engine.stages import Status
from tests.conftest import settle, start


async def serve(engine: Engine) -> tuple[web.AppRunner, str]:
    app = web.Application()
    add_routes(app, engine)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_tasks_api_needs_the_token_and_shows_what_the_task_cost(
    make_settings, notifier, agent_env
) -> None:
    engine = Engine(make_settings(api_token="s3cret"), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)
        assert task.status == Status.DONE
        runner, url = await serve(engine)
        try:
            async with aiohttp.ClientSession() as http:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    async with http.get(f"{url}/api/tasks", headers=headers) as response:
                        assert response.status == 401
                auth = {"Authorization": "Bearer s3cret"}
                async with http.get(f"{url}/api/tasks", headers=auth) as response:
                    (listed,) = await response.json()
                assert listed["stage"] == "done" and listed["status"] == "done"
                assert listed["tracker_issue_id"] == "issue-1"
                assert listed["cost_usd"] > 0 and listed["input_tokens"] > listed["output_tokens"]
                async with http.get(f"{url}/api/tasks/ORCH-001", headers=auth) as response:
                    detail = await response.json()
                assert [e["kind"] for e in detail["events"]][-1] == "done"
                assert len(detail["agent_runs"]) == 6
                async with http.get(f"{url}/api/tasks/999", headers=auth) as response:
                    assert response.status == 404
                async with http.get(f"{url}/healthz") as response:
                    health = await response.json()
                assert response.status == 200 and health["store"] is True and health["worker"]
                async with http.get(f"{url}/metrics") as response:
                    text = await response.text()
                assert 'conveyor_tasks{stage="done",status="done"} 1' in text
                assert 'conveyor_agent_runs_total{role="developer",outcome="ok"} 1' in text
                assert 'conveyor_agent_cost_usd_total{role="analyst"} 0.21' in text
        finally:
            await runner.cleanup()


async def test_healthz_reports_a_dead_worker(make_settings) -> None:
    async with Engine(make_settings()) as engine:  # the worker was never started
        runner, url = await serve(engine)
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
                assert response.status == 503
                assert (await response.json())["worker"] is False
        finally:
            await runner.cleanup()
