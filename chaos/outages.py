"""Outages: the sandbox Telegram, Plane and Gitea answering 500, 429 or nothing for a while.

`conveyor run` reaches each service through a loopback proxy of this module that forwards
to the sandbox or, while its service is out, answers 500, answers 429 with a Retry-After,
or holds the request and then drops the connection (a timeout, as the client sees it).
The sandboxes cannot do that to their own APIs (their fault injection is on the webhooks
they send), hence the proxies. The services go out one at a time, in a seeded order, each
through the three faults in turn: with all of them out at once, the work that needs the
forge (CI, merges) and the reconciler (which reads the board first) would only wait.

Checked: the process stays up and tasks keep moving while the services are out; every task
is done afterwards; then each card's text is the card rendered from the store, each Plane
issue is in Done and each pull request is merged. The scripted agents never fail, so a
rollback, an escalation or a failed task can only be the outage's doing: each is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from bot.cards import CardRenderer
from bot.publisher import MODE_SETTING
from bot.texts import Texts
from chaos.crashes import Sandboxes, as_env, end_agents, task_states
from chaos.harness import (
    CHAT,
    ChaosTimeout,
    Conveyor,
    Outcome,
    bounded,
    conveyor_env,
    free_port,
    wait_until,
)
from engine.config import Settings
from engine.sandbox.telegram import ApiError
from engine.stages import Status
from engine.store import Store

SERVICES = ("telegram", "plane", "gitea")
FAULTS = ("500", "429", "hang")
RETRY_AFTER_S = 2
# headers that describe one hop, not the message: the proxy sets its own
HOP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)
# transitions that undo work or stop a task
SETBACKS = ("rolled_back", "escalated", "failed", "agent_retry")
MOVES = "SELECT COUNT(*) AS n FROM events WHERE at >= ? AND at < ? AND from_state != to_state"


class FaultProxy:
    """A loopback reverse proxy in front of one sandbox, with a fault switch."""

    def __init__(self, service: str, upstream: str) -> None:
        self.service = service
        self.upstream = upstream.rstrip("/")
        self.fault: str | None = None
        self.injected: Counter = Counter()
        self.forwarded = 0
        self.url = ""
        self._changed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        self._session = aiohttp.ClientSession(timeout=timeout)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        self.set_fault(None)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def set_fault(self, fault: str | None) -> None:
        self.fault = fault
        self._changed.set()
        self._changed = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault
        if fault is None:
            return await self._forward(request)
        self.injected[fault] += 1
        if fault == "hang":
            return await self._hang(request)
        return self._refusal(fault)

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        """Answer nothing while the fault lasts, then drop the connection."""
        while self.fault == "hang":
            await self._changed.wait()
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=504)

    def _refusal(self, fault: str) -> web.Response:
        status = int(fault)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
        if self.service == "telegram":
            error = (
                ApiError(f"Too Many Requests: retry after {RETRY_AFTER_S}", RETRY_AFTER_S)
                if status == 429
                else ApiError("Internal Server Error")
            )
            return web.json_response(error.body(), status=status, headers=headers)
        return web.json_response({"message": f"injected {status}"}, status=status, headers=headers)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            async with self._session.request(
                request.method,
                f"{self.upstream}{request.rel_url}",
                headers=headers,
                data=await request.read(),
                allow_redirects=False,
            ) as answer:
                body = await answer.read()
                back = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        except (aiohttp.ClientError, TimeoutError) as error:
            return web.json_response({"message": f"proxy: {error}"}, status=502)
        self.forwarded += 1
        return web.Response(status=answer.status, body=body, headers=back)


def schedule(rng: random.Random) -> list[tuple[str, str]]:
    """(service, fault) in order: one service out at a time, through all three faults."""
    services = list(SERVICES)
    rng.shuffle(services)
    order = []
    for service in services:
        faults = list(FAULTS)
        rng.shuffle(faults)
        order.extend((service, fault) for fault in faults)
    return order


@dataclass(frozen=True)
class OutagePlan:
    tasks: int
    stagger_s: float  # between two issues started
    agent_delay_s: float  # each scripted agent's run: long enough for work to span the outage
    fault_s: float  # how long a service answers 500 or 429
    hang_s: float  # how long it answers nothing (over 15 s: Plane's and Gitea's clients give up)
    timeout_s: float  # for every task to be done once the services are back
    catch_up_s: float  # for the board, the forge and the chat to catch up after that

    def seconds(self, fault: str) -> float:
        return self.hang_s if fault == "hang" else self.fault_s


@dataclass
class Window:
    service: str
    started: float
    ended: float = 0.0


async def _phase(proxy: FaultProxy, fault: str, seconds: float) -> None:
    """The service is out for `seconds`, longer (up to twice) until a request has met it."""
    hits = proxy.injected[fault]
    proxy.set_fault(fault)
    try:
        deadline = time.monotonic() + 2 * seconds
        await asyncio.sleep(seconds)
        while proxy.injected[fault] == hits and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
    finally:
        proxy.set_fault(None)


async def _outage(
    proxies: dict[str, FaultProxy], plan: OutagePlan, seed: int, windows: list[Window]
) -> None:
    for service, fault in schedule(random.Random(seed)):
        if not windows or windows[-1].service != service:
            windows.append(Window(service, time.time()))
        await _phase(proxies[service], fault, plan.seconds(fault))
        windows[-1].ended = time.time()


async def _watch_alive(conveyor: Conveyor, outage: asyncio.Task[None]) -> None:
    """The process must outlive the outage: fail at once if it exits meanwhile."""
    while not outage.done():
        if conveyor.process is None or conveyor.process.poll() is not None:
            outage.cancel()
            raise AssertionError(f"conveyor run exited during the outage: {conveyor.log_tail()}")
        await asyncio.sleep(0.2)
    await outage


async def _all_done(store: Store, n: int) -> bool:
    row = await store.fetchone(
        "SELECT COUNT(*) AS n FROM tasks WHERE status = ? AND NOT EXISTS (SELECT 1 FROM jobs"
        " WHERE jobs.task_id = tasks.id AND jobs.state IN ('queued', 'running'))",
        (Status.DONE,),
    )
    return row["n"] >= n


class Laggards:
    """What has not caught up with the store yet: cards, board issues, pull requests."""

    def __init__(self, boxes: Sandboxes, store: Store, settings: Settings) -> None:
        self.boxes = boxes
        self.store = store
        self.renderer = CardRenderer(store, settings, Texts(settings.locale))

    async def find(self) -> list[str]:
        behind = []
        mode = await self.store.get_setting(MODE_SETTING) or "edit"
        shown = {m.message_id: m for m in self.boxes.telegram.messages(CHAT) if m.from_bot}
        cards = {
            row["task_id"]: row["message_id"]
            for row in await self.store.fetchall("SELECT task_id, message_id FROM cards")
        }
        for task in await self.store.list_tasks():
            message = shown.get(cards.get(task.id))
            rendered = await self.renderer.render(task, mode)
            if message is None or message.deleted or message.html != rendered.text:
                behind.append(f"{task.work_item} card")
            state = self.boxes.plane.state_name(task.tracker_issue_id)
            if state != "Done":
                behind.append(f"{task.work_item} issue in {state}")
            if task.pr_number is None or not self.boxes.gitea.is_merged(
                "team", "app", task.pr_number
            ):
                behind.append(f"{task.work_item} PR #{task.pr_number} not merged")
        return behind


def _fault_figures(proxies: dict[str, FaultProxy]) -> str:
    hits = ", ".join(
        f"{name} " + "/".join(f"{proxy.injected[f]}×{f}" for f in FAULTS)
        for name, proxy in proxies.items()
    )
    missed = [f"{n} {f}" for n, p in proxies.items() for f in FAULTS if not p.injected[f]]
    return hits + (f" (not exercised: {', '.join(missed)})" if missed else "")


async def _catch_up(
    laggards: Laggards, plan: OutagePlan, recovered: float, outcome: Outcome
) -> None:
    behind: list[str] = []

    async def caught_up() -> bool:
        behind[:] = await laggards.find()
        return not behind

    try:
        await wait_until(caught_up, "the board, the forge and the chat", plan.catch_up_s, 1.0)
    except ChaosTimeout as error:
        outcome.check(False, f"{error}; behind: {behind[:6]}")
        return
    outcome.figure(
        f"cards, issues and PRs caught up {time.time() - recovered:.0f}s after the last recovery"
    )


async def _check_history(store: Store, windows: list[Window], outcome: Outcome) -> None:
    moved = {}
    for window in windows:
        row = await store.fetchone(MOVES, (window.started, window.ended))
        moved[window.service] = (row["n"], window.ended - window.started)
    outcome.figure(
        "transitions while out: "
        + ", ".join(f"{name} {n} in {s:.0f}s" for name, (n, s) in moved.items())
    )
    outcome.check(
        sum(n for n, _ in moved.values()) > 0, "no task moved while the services were out"
    )
    setbacks = await store.fetchall(
        "SELECT tasks.work_item, events.kind, events.detail FROM events JOIN tasks"
        " ON tasks.id = events.task_id"
        f" WHERE events.kind IN ({', '.join('?' * len(SETBACKS))}) ORDER BY events.id",
        SETBACKS,
    )
    outcome.figure(f"tasks sent back {len(setbacks)}")
    for row in setbacks:  # the scripted agents never fail: the outage did it
        outcome.check(False, f"{row['work_item']} {row['kind']}: {(row['detail'] or '')[:160]}")


async def _approvals(store: Store) -> int:
    row = await store.fetchone("SELECT COUNT(*) AS n FROM events WHERE kind = 'approved'")
    return int(row["n"])


async def _start_staggered(
    boxes: Sandboxes, store: Store, issues: list[str], plan: OutagePlan
) -> None:
    """Start the issues a little apart, so that their stages (and the services those call)
    overlap, and wait until every BRD is approved: past the human gate, everything left
    to do is the engine's."""
    for _ in range(plan.tasks):
        issues.extend(boxes.start_issues(1, first=len(issues) + 1))
        await asyncio.sleep(plan.stagger_s)

    async def approved() -> bool:
        return await _approvals(store) >= plan.tasks

    await wait_until(approved, "every BRD to be approved", 120)


async def _run_outage(
    boxes: Sandboxes,
    proxies: dict[str, FaultProxy],
    conveyor: Conveyor,
    settings: Settings,
    plan: OutagePlan,
    seed: int,
    outcome: Outcome,
) -> Store:
    async with aiohttp.ClientSession() as session:
        conveyor.spawn()
        await conveyor.healthy(session, timeout_s=120)
    store = await Store(settings.db_path).open()
    issues: list[str] = []
    person = asyncio.create_task(boxes.approve_reviews(issues, set()), name="person")
    windows: list[Window] = []
    try:
        await _start_staggered(boxes, store, issues, plan)
        outage = asyncio.create_task(_outage(proxies, plan, seed, windows))
        longest = 2 * len(SERVICES) * (plan.seconds("500") * 2 + plan.seconds("hang"))
        await bounded(_watch_alive(conveyor, outage), "the outage", longest + 30)
        outcome.figure(f"{plan.tasks} tasks; faults {_fault_figures(proxies)}")
        try:
            await wait_until(
                lambda: _all_done(store, plan.tasks), "every task done", plan.timeout_s
            )
        except ChaosTimeout as error:
            raise ChaosTimeout(f"{error} ({await task_states(store)})") from None
        await _catch_up(Laggards(boxes, store, settings), plan, windows[-1].ended, outcome)
    finally:
        person.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await person
    await _check_history(store, windows, outcome)
    tasks = await store.list_tasks()
    done = sum(task.status == Status.DONE for task in tasks)
    outcome.figure(f"{done}/{plan.tasks} done")
    return store


async def outage_batch(root: Path, *, seed: int, plan: OutagePlan) -> Outcome:
    outcome = Outcome("outages")
    boxes = await Sandboxes.open(root)
    upstreams = {
        "telegram": boxes.telegram.base_url,
        "plane": boxes.plane.base_url,
        "gitea": boxes.gitea.base_url,
    }
    proxies = {name: FaultProxy(name, url) for name, url in upstreams.items()}
    conveyor: Conveyor | None = None
    store: Store | None = None
    try:
        for proxy in proxies.values():
            await proxy.start()
        values = boxes.settings(
            plane_url=proxies["plane"].url,
            gitea_url=proxies["gitea"].url,
            telegram_url=proxies["telegram"].url,
            max_concurrency=2,
        )
        port = free_port()
        env = conveyor_env(
            root, port, **as_env(values), SANDBOX_AGENT_DELAY_S=str(plan.agent_delay_s)
        )
        conveyor = Conveyor(root, env, port)
        boxes.hook(conveyor.url)
        settings = Settings(
            _env_file=None, db_path=root / "conveyor.db", workdir=root / "work", **values
        )
        try:
            store = await _run_outage(boxes, proxies, conveyor, settings, plan, seed, outcome)
        except ChaosTimeout as error:
            outcome.check(False, str(error))
    finally:
        if conveyor is not None:
            await conveyor.stop()
        outcome.figure(f"agents left running at the end {await end_agents(store, root)}")
        if store is not None:
            await store.close()
        for proxy in proxies.values():
            with contextlib.suppress(Exception):
                await proxy.stop()
        await boxes.close()
    return outcome


async def run(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """Telegram, Plane and Gitea out in turns (500, 429, hang) while tasks run."""
    plan = OutagePlan(
        tasks=3 if quick else 6,
        stagger_s=1.0,
        agent_delay_s=1.0 if quick else 1.5,
        fault_s=4.0 if quick else 8.0,
        hang_s=6.0 if quick else 16.0,
        timeout_s=180 if quick else 240,
        catch_up_s=120 if quick else 180,
    )
    return [await outage_batch(root, seed=seed, plan=plan)]
