"""The load generator for the ingest benchmark, run as its own process over loopback.

`python -m bench.loadgen --url URL --mode max|rate ...` posts signed Plane deliveries
(each a state change of a fresh issue in a project Conveyor does not know, a few of
them replays of an earlier one under a new delivery id) with an aiohttp client pool,
and prints one JSON object: how many were answered and how, and each answer's latency.

Every loop is bounded twice: by a request count and by a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import sys
import time
import uuid

import aiohttp

UNKNOWN_PROJECT = "00000000-0000-4000-8000-00000000beef"
REPLAY_EVERY = 20  # every 20th delivery repeats the one before it under a new delivery id


def delivery_body(n: int, run: str) -> bytes:
    issue_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"conveyor-bench/{run}/{n}"))
    state_id = "11111111-1111-4111-8111-111111111111"
    payload = {
        "event": "issue",
        "action": "updated",
        "webhook_id": "22222222-2222-4222-8222-222222222222",
        "workspace_id": "33333333-3333-4333-8333-333333333333",
        "data": {
            "id": issue_id,
            "name": f"Bench issue {n}",
            "project": UNKNOWN_PROJECT,
            "state": {"id": state_id, "name": "In Progress", "group": "started"},
            "updated_at": f"2025-01-01T00:00:{n % 60:02d}.{n:06d}Z",
            "description_stripped": "Load.",
        },
        "activity": {
            "field": "state_id",
            "old_value": None,
            "new_value": state_id,
            "actor": {"id": "u1", "display_name": "bench"},
        },
    }
    return json.dumps(payload).encode()


def build_requests(count: int, secret: str, run: str) -> list[tuple[bytes, dict[str, str]]]:
    """`count` signed deliveries; every REPLAY_EVERY-th repeats the previous body."""
    requests = []
    body = b""
    for n in range(count):
        if n % REPLAY_EVERY != REPLAY_EVERY - 1 or not body:
            body = delivery_body(n, run)
        signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-Plane-Event": "issue",
            "X-Plane-Delivery": str(uuid.uuid4()),
            "X-Plane-Signature": signature,
        }
        requests.append((body, headers))
    return requests


class Tally:
    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}
        self.duplicates = 0
        self.errors = 0
        self.latencies_ms: list[float] = []

    def answer(self, status: int, body: bytes, latency_s: float) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        self.latencies_ms.append(latency_s * 1000.0)
        if status == 200 and b'"duplicate": true' in body:
            self.duplicates += 1


async def post(session, url, request, tally: Tally, started: float) -> None:
    body, headers = request
    try:
        async with session.post(url, data=body, headers=headers) as response:
            answer = await response.read()
            tally.answer(response.status, answer, time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError):
        tally.errors += 1


async def run_max(url, requests, concurrency: int, duration_s: float, warmup_s: float) -> dict:
    """Closed loop: `concurrency` clients post back to back until the count or time runs out."""
    tally = Tally()
    cursor = iter(requests)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm_end = time.perf_counter() + warmup_s
        warm = Tally()
        measured_from = warm_end
        deadline = warm_end + duration_s

        async def client() -> None:
            for request in cursor:
                started = time.perf_counter()
                if started >= deadline:
                    return
                await post(session, url, request, warm if started < warm_end else tally, started)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = min(time.perf_counter(), deadline) - measured_from
    return summary(tally, elapsed, warm)


async def run_rate(url, requests, rate: float, duration_s: float) -> dict:
    """Open loop: one request every 1/rate seconds, each timed from when it was due."""
    tally = Tally()
    count = min(len(requests) - 1, int(rate * duration_s))
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # one request first, so the pool holds a connection before the clock starts
        warm = Tally()
        await post(session, url, requests[0], warm, time.perf_counter())
        start = time.perf_counter()
        pending = []
        for n in range(count):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(post(session, url, requests[n + 1], tally, due)))
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    return summary(tally, elapsed, warm, sent=count)


def summary(tally: Tally, elapsed: float, warm: Tally, sent: int | None = None) -> dict:
    answered = sum(tally.statuses.values())
    return {
        "elapsed_s": elapsed,
        "answered": answered,
        "sent": sent if sent is not None else answered + tally.errors,
        "statuses": tally.statuses,
        "duplicates": tally.duplicates,
        "errors": tally.errors,
        "rps": answered / elapsed if elapsed > 0 else 0.0,
        "latencies_ms": tally.latencies_ms,
        "warmup": {
            "statuses": warm.statuses,
            "duplicates": warm.duplicates,
            "errors": warm.errors,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--run", default="r", help="a tag that makes this run's issues unique")
    parser.add_argument("--mode", choices=["max", "rate"], required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--max-requests", type=int, default=60_000)
    args = parser.parse_args(argv)
    if not args.url.startswith("http://127.0.0.1:"):
        parser.error("the load generator only talks to 127.0.0.1")
    requests = build_requests(args.max_requests, args.secret, args.run)
    if args.mode == "max":
        result = asyncio.run(
            run_max(args.url, requests, args.concurrency, args.duration, args.warmup)
        )
    else:
        result = asyncio.run(run_rate(args.url, requests, args.rate, args.duration))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
