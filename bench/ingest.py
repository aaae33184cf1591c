"""Webhook ingest: signed, deduplicated, durably recorded Plane deliveries per second.

The system under test is the real HTTP path: `engine.intake` mounted on an aiohttp
`web.Application` over a real SQLite file (WAL, synchronous=FULL), exactly as
`conveyor run` mounts it. Its baseline is a bare aiohttp handler on the same machine
that reads the body and answers 200. The load comes from a separate process
(`bench.loadgen`, an aiohttp client pool) over loopback.

The deliveries point at a Plane project Conveyor does not know, so each one is
recorded, answered, and then processed by the real code as "unknown project" (no
pipeline work behind it). After each run the rows are counted: every delivery
answered as new must be a committed row, and every row must have been processed.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.common import Row, fmt_spread, percentile, run_python_json, spread
from engine.config import Settings
from engine.runtime import Engine
from engine.webhooks import MAX_BODY_BYTES

SECRET = "bench_plane_secret"
KNOWN_PLANE_PROJECT = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"


def engine_settings(root: Path) -> Settings:
    return Settings(
        _env_file=None,
        db_path=root / "conveyor.db",
        workdir=root / "work",
        projects=[
            {
                "key": "BENCH",
                "remote": str(root / "remote.git"),
                "plane_project_id": KNOWN_PLANE_PROJECT,
            }
        ],
        plane_webhook_secret=SECRET,
        reconcile_enabled=False,
    )


async def _site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@contextlib.asynccontextmanager
async def bare_server() -> AsyncIterator[tuple[str, None]]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True, "duplicate": False})

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/webhooks/plane", handler)
    runner, url = await _site(app)
    try:
        yield f"{url}/webhooks/plane", None
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def engine_server() -> AsyncIterator[tuple[str, Engine]]:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-ingest-") as tmp:
        engine = Engine(engine_settings(Path(tmp)))
        async with engine:
            app = web.Application(client_max_size=MAX_BODY_BYTES)
            engine.intake.mount(app)
            runner, url = await _site(app)
            engine.start_worker()
            try:
                yield f"{url}/webhooks/plane", engine
            finally:
                await runner.cleanup()


async def verify(engine: Engine, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Every delivery answered as new is a committed, processed row, and nothing else is."""
    await engine.intake.idle()
    row = await engine.store.fetchone(
        "SELECT COUNT(*) AS n, SUM(processed_at IS NOT NULL) AS done,"
        " SUM(outcome = 'unknown project') AS unknown FROM webhook_deliveries"
    )
    new = sum(
        a["statuses"].get("200", 0) - a["duplicates"] for part in answers for a in _parts(part)
    )
    duplicates = sum(a["duplicates"] for part in answers for a in _parts(part))
    errors = sum(a["errors"] + sum(_non_200(a)) for part in answers for a in _parts(part))
    return {
        "acknowledged_new": new,
        "acknowledged_duplicate": duplicates,
        "rows": row["n"],
        "processed": row["done"] or 0,
        "processed_unknown_project": row["unknown"] or 0,
        "failed_requests": errors,
        "all_acknowledged_committed": row["n"] == new and errors == 0,
    }


def _parts(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [answer, answer.get("warmup", {"statuses": {}, "duplicates": 0, "errors": 0})]


def _non_200(answer: dict[str, Any]) -> list[int]:
    return [n for status, n in answer["statuses"].items() if status != "200"]


async def load(url: str, mode: str, tag: str, **options: Any) -> dict[str, Any]:
    args = ["-m", "bench.loadgen", "--url", url, "--secret", SECRET, "--mode", mode]
    args += ["--run", tag]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    budget = float(options.get("duration", 5)) + float(options.get("warmup", 0)) + 60
    return await run_python_json(*args, timeout_s=budget)


async def run(
    reps: int = 3,
    max_duration_s: float = 4.0,
    concurrency: int = 32,
    rate: float = 100.0,
    rate_duration_s: float = 5.0,
    log=print,
) -> dict[str, Any]:
    targets = {"bare": bare_server, "conveyor": engine_server}
    throughput: dict[str, list[float]] = {"bare": [], "conveyor": []}
    p50: dict[str, list[float]] = {"bare": [], "conveyor": []}
    p99: dict[str, list[float]] = {"bare": [], "conveyor": []}
    checks: list[dict[str, Any]] = []
    for rep in range(reps):
        order = ["bare", "conveyor"] if rep % 2 == 0 else ["conveyor", "bare"]
        for name in order:
            async with targets[name]() as (url, engine):
                peak = await load(
                    url,
                    "max",
                    f"max-{name}-{rep}",
                    concurrency=concurrency,
                    duration=max_duration_s,
                    warmup=0.5,
                    max_requests=int(max_duration_s * 12_000) + 6_000,
                )
                paced = await load(
                    url,
                    "rate",
                    f"rate-{name}-{rep}",
                    rate=rate,
                    duration=rate_duration_s,
                    max_requests=int(rate * rate_duration_s) + 1,
                )
                throughput[name].append(peak["rps"])
                p50[name].append(percentile(paced["latencies_ms"], 50))
                p99[name].append(percentile(paced["latencies_ms"], 99))
                line = (
                    f"  ingest rep {rep + 1}/{reps} {name:8s}: {peak['rps']:8.0f} req/s max,"
                    f" at {rate:.0f} req/s p50 {p50[name][-1]:.2f} ms p99 {p99[name][-1]:.2f} ms"
                )
                if engine is not None:
                    check = await verify(engine, [peak, paced])
                    check["rep"] = rep
                    checks.append(check)
                    line += (
                        f"; rows {check['rows']} = acked new {check['acknowledged_new']}"
                        f" ({check['acknowledged_duplicate']} duplicates)"
                    )
                log(line)
    ratios = [c / b for c, b in zip(throughput["conveyor"], throughput["bare"], strict=True)]
    return {
        "concurrency": concurrency,
        "max_duration_s": max_duration_s,
        "rate": rate,
        "rate_duration_s": rate_duration_s,
        "bare_rps": spread(throughput["bare"]),
        "conveyor_rps": spread(throughput["conveyor"]),
        "ratio": spread(ratios),
        "bare_p50_ms": spread(p50["bare"]),
        "bare_p99_ms": spread(p99["bare"]),
        "conveyor_p50_ms": spread(p50["conveyor"]),
        "conveyor_p99_ms": spread(p99["conveyor"]),
        "checks": checks,
        "all_committed": all(c["all_acknowledged_committed"] for c in checks),
        "all_processed": all(c["processed"] == c["rows"] for c in checks),
    }


def rows(result: dict[str, Any]) -> list[Row]:
    ratio = result["ratio"]
    p99 = result["conveyor_p99_ms"]
    return [
        Row(
            "webhook ingest, max req/s",
            f"{fmt_spread(result['conveyor_rps'], 0)} req/s",
            f"bare aiohttp {fmt_spread(result['bare_rps'], 0)} req/s",
            "ratio ≥ 0.5, every 2xx committed",
            ratio["median"] >= 0.5 and result["all_committed"] and result["all_processed"],
        ),
        Row(
            "webhook ingest, ratio to bare",
            fmt_spread(ratio, 2),
            "1.00",
            "≥ 0.5",
            ratio["median"] >= 0.5,
        ),
        Row(
            f"webhook ingest at {result['rate']:.0f} req/s, p50 / p99",
            f"{fmt_spread(result['conveyor_p50_ms'], 2)} / {fmt_spread(p99, 2)} ms",
            f"bare {fmt_spread(result['bare_p50_ms'], 2)} / {fmt_spread(result['bare_p99_ms'], 2)}",
            "p99 < 20 ms",
            p99["median"] < 20,
        ),
    ]


async def measure(quick: bool, log=print) -> dict[str, Any]:
    if quick:
        return await run(reps=1, max_duration_s=1.0, rate_duration_s=2.0, log=log)
    return await run(log=log)
