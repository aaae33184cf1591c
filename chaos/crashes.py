"""Crashes, and acknowledged-means-durable: `conveyor run` killed with SIGKILL and restarted.

Crashes: a batch of tasks goes from the board to done while the `conveyor run` process is
killed at random (seeded) moments and started again each time. Plane, Gitea and Telegram
run in this process and outlive every restart; a scripted person starts each issue and
approves each BRD on the board. Checked: every task done, every intended transition
exactly once, one merge commit per branch on the remote's main, no job left queued or
running, every task with a card (a kill between Telegram taking a card and the store
recording it can orphan one: counted, not failed).

Acknowledged means durable: signed Plane deliveries are posted at a fixed rate, the
process is killed mid-burst and started again; every delivery id that was answered 2xx
must be a row of `webhook_deliveries`, and every row must be processed after the restart.

`conveyor run` is forked from a fork server that has already imported what
`python -m bot.cli run` imports (aiogram alone takes seconds to import on a small
machine), so that fifty restarts take minutes and not a quarter of an hour. Each child
runs the command itself, `bot.cli.main(["run"])`, with the server's ORCH_* environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from chaos.board import INTENDED, TOLERATED
from chaos.harness import (
    ADMIN,
    CHAT,
    DESCRIPTION,
    GITEA_SECRET,
    GITEA_TOKEN,
    HUMAN_TOKEN,
    PLANE_SECRET,
    PLANE_TOKEN,
    TELEGRAM_TOKEN,
    ChaosTimeout,
    Conveyor,
    Outcome,
    Stack,
    bounded,
    conveyor_env,
    free_port,
    kill_group,
    merge_commits,
    plane_headers,
    process_alive,
    state_change,
    wait_until,
)
from engine.sandbox.gitea import GiteaSandbox
from engine.sandbox.plane import PlaneSandbox
from engine.sandbox.repo import create_sample_remote
from engine.sandbox.telegram import TelegramSandbox
from engine.stages import Status
from engine.store import Store, Task

REPO_ROOT = Path(__file__).resolve().parent.parent
FORK_SERVER_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from chaos.crashes import serve_forks; serve_forks(sys.argv[2])"
)
AGENT_STATE = "agent-state"
ACTIVE_JOBS = "SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running')"
# Besides the board's: the PR-merged webhook can arrive between the forge merge and the
# `done` transition; the deploy stage then lets go of its merge lease (no state change).
EXPECTED = frozenset(INTENDED) | TOLERATED


# --- the fork server ------------------------------------------------------------------------


def serve_forks(log_path: str) -> None:
    """Fork server main loop: `spawn` on stdin forks a `conveyor run`; replies `pid N`,
    and `exit N CODE` once it is reaped. End of input kills the children left and exits.

    Single-threaded on purpose: a fork from a process with other threads can inherit a
    lock some thread held.
    """
    import bot.app  # noqa: F401  (preloaded: the import is the slow part of a start)
    import bot.cli

    children: set[int] = set()
    pending = b""
    _say("ready")
    try:
        while True:
            _reap(children, block=False)
            ready, _, _ = select.select([0], [], [], 0.05)
            if not ready:
                continue
            chunk = os.read(0, 4096)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip() == b"spawn":
                    pid = _fork_conveyor(bot.cli.main, log_path)
                    children.add(pid)
                    _say(f"pid {pid}")
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap(children, block=True)


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _reap(children: set[int], *, block: bool) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")


def _fork_conveyor(main: Any, log_path: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(log, 2)
        code = main(["run"])
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


class Forked:
    """A forked `conveyor run`: the part of `subprocess.Popen` that `Conveyor` uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"conveyor run (pid {self.pid})", timeout or 0)
        return self.returncode

    def exited(self, code: int) -> None:
        self.returncode = code
        self._exited.set()


class ForkServer:
    """The fork server as a subprocess, and the children it reports."""

    def __init__(self, root: Path, env: dict[str, str], log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115  (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER_BOOT, str(REPO_ROOT), str(log_path)],
            env=env,
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.children: dict[int, Forked] = {}
        self._spawned: queue.Queue[Forked] = queue.Queue()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="fork-server", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            word, *rest = raw.decode().split()
            if word == "ready":
                self._ready.set()
            elif word == "pid":
                child = Forked(int(rest[0]))
                self.children[child.pid] = child
                self._spawned.put(child)
            elif word == "exit" and int(rest[0]) in self.children:
                self.children[int(rest[0])].exited(int(rest[1]))
        self._ready.set()  # it ended: nobody waits for it any longer

    async def ready(self, timeout_s: float = 120) -> None:
        """Wait for the server's imports; it ends with an error when they fail."""
        if not await asyncio.to_thread(self._ready.wait, timeout_s):
            raise ChaosTimeout(f"the fork server did not start within {timeout_s:.0f}s")
        if self.process.poll() is not None:
            raise AssertionError(f"the fork server exited with {self.process.returncode}")

    def spawn(self) -> Forked:
        assert self.process.stdin is not None
        self.process.stdin.write(b"spawn\n")
        self.process.stdin.flush()
        try:
            return self._spawned.get(timeout=30)
        except queue.Empty:
            raise ChaosTimeout("the fork server did not fork within 30s") from None

    async def close(self) -> None:
        for child in self.children.values():
            child.send_signal(signal.SIGKILL)
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 30)
        self._log.close()


class ForkedConveyor(Conveyor):
    """`Conveyor`, with each start forked by the fork server instead of a fresh Python."""

    def __init__(self, root: Path, env: dict[str, str], port: int) -> None:
        super().__init__(root, env, port)
        self.server = ForkServer(root, env, self.log_path)

    def spawn(self) -> Forked:  # type: ignore[override]
        self.process = self.server.spawn()
        self.starts += 1
        return self.process

    async def close(self) -> None:
        await self.kill()
        await self.server.close()


# --- the outside world, in this process -----------------------------------------------------


def as_env(values: dict[str, Any]) -> dict[str, str]:
    """Settings as `ORCH_*` variables: objects as JSON, lists of scalars comma-separated."""

    def text(value: Any) -> str:
        if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
            return ",".join(str(v) for v in value)
        if isinstance(value, list | dict):
            return json.dumps(value)
        return str(value)

    return {f"ORCH_{key.upper()}": text(value) for key, value in values.items()}


@dataclass
class Sandboxes:
    """Plane, Gitea and Telegram served from this process, so they outlive every
    `conveyor run` started against them."""

    root: Path
    plane: PlaneSandbox
    gitea: GiteaSandbox
    telegram: TelegramSandbox
    project_id: str
    human: str
    remote: Path

    @classmethod
    async def open(cls, root: Path) -> Sandboxes:
        root.mkdir(parents=True, exist_ok=True)
        plane = PlaneSandbox(
            workspace="acme",
            api_token=PLANE_TOKEN,
            rate_limit=None,
            retry_backoff_s=0.5,
            retry_backoff_max_s=2.0,
        )
        gitea = GiteaSandbox(root / "forge", token=GITEA_TOKEN, ci_state="success")
        telegram = TelegramSandbox(TELEGRAM_TOKEN, group_per_minute=60_000, private_per_second=1000)
        started: list[Any] = []
        try:
            for server in (plane, gitea, telegram):
                await server.start()
                started.append(server)
            project_id = plane.create_project("ORCH", "Orchestrator")
            human = plane.add_bot(HUMAN_TOKEN, "alice")
            remote = await gitea.create_repo("team", "app")
        except BaseException:
            for server in started:
                with contextlib.suppress(Exception):
                    await server.stop()
            raise
        return cls(root, plane, gitea, telegram, project_id, human, remote)

    def settings(
        self,
        *,
        plane_url: str | None = None,
        gitea_url: str | None = None,
        telegram_url: str | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """`conveyor run`'s settings against these servers (or proxies standing before them)."""
        values: dict[str, Any] = {
            "projects": [
                {
                    "key": "ORCH",
                    "remote": str(self.remote),
                    "repo": "team/app",
                    "plane_project_id": self.project_id,
                }
            ],
            "plane_api_url": plane_url or self.plane.base_url,
            "plane_api_token": PLANE_TOKEN,
            "plane_workspace": "acme",
            "plane_webhook_secret": PLANE_SECRET,
            "gitea_url": gitea_url or self.gitea.base_url,
            "gitea_token": GITEA_TOKEN,
            "gitea_webhook_secret": GITEA_SECRET,
            "gitea_public_url": "https://git.example.com",
            "telegram_token": TELEGRAM_TOKEN,
            "telegram_api_base": telegram_url or self.telegram.base_url,
            "telegram_chat_id": CHAT,
            "telegram_admin_ids": [ADMIN],
            "telegram_pace_s": 0,
            "telegram_debounce_s": 0.05,
            "locale": "en",
            "agent_timeout_s": 120,
            "reconcile_grace_s": 0,
            "reconcile_interval_s": 1,
            "merge_defer_s": 1,
        }
        values.update(overrides)
        return values

    def hook(self, url: str) -> None:
        """Plane's and Gitea's webhooks go to the `conveyor run` at `url`."""
        self.plane.set_webhook(f"{url}/webhooks/plane", PLANE_SECRET)
        self.gitea.add_hook("team", "app", f"{url}/webhooks/gitea", GITEA_SECRET)

    def start_issues(self, count: int, first: int = 1) -> list[str]:
        """Issues a person creates and moves to In Progress."""
        issues = []
        for n in range(first, first + count):
            issue = self.plane.create_issue(
                self.project_id, f"Feature {n}", DESCRIPTION, "Backlog", as_user=self.human
            )
            self.plane.move_issue(issue["id"], "In Progress", via="web", as_user=self.human)
            issues.append(issue["id"])
        return issues

    async def approve_reviews(self, issues: list[str], approved: set[str]) -> None:
        """The person on the board: every BRD In Review is approved (until cancelled)."""
        while True:
            for issue_id in issues:
                if issue_id not in approved and self.plane.state_name(issue_id) == "In Review":
                    self.plane.move_issue(issue_id, "Approved", via="web", as_user=self.human)
                    approved.add(issue_id)
            await asyncio.sleep(0.2)

    def card_sends(self) -> dict[str, int]:
        """Work item -> cards sent for it, counted as the in-process stack counts them."""
        return Stack.card_sends(self)  # type: ignore[arg-type]  (it reads only .telegram)

    async def close(self) -> None:
        for server in (self.telegram, self.gitea, self.plane):
            with contextlib.suppress(Exception):
                await server.stop()


# --- agents a killed process left behind ----------------------------------------------------


def _started_here(pid: int, marker: bytes) -> bool:
    """The process is a scripted agent of this run: its environment names our state dir."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return b"engine.sandbox.agent" in command and marker in environ.split(b"\0")


async def end_agents(store: Store | None, root: Path) -> int:
    """End the agent process groups of this run still alive, by their ids; how many."""
    marker = f"SANDBOX_AGENT_STATE={root / AGENT_STATE}".encode()
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    if store is not None:
        rows = await store.fetchall("SELECT pid FROM agent_runs WHERE pid IS NOT NULL")
        pids |= {int(row["pid"]) for row in rows}
    ended = 0
    for pid in sorted(pids):
        if pid != os.getpid() and process_alive(pid) and _started_here(pid, marker):
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == pid:
                    kill_group(pid)
                    ended += 1
    return ended


# --- crashes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrashPlan:
    tasks: int
    kills: int
    kill_after_s: tuple[float, float]  # a kill comes this long after the (re)start
    agent_delay_s: float
    timeout_s: float


@dataclass
class Kills:
    made: int = 0
    starting: int = 0  # /healthz did not answer yet
    mid_agent: int = 0  # an agent run was open
    busy: int = 0  # some task was not done yet


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=0.5)) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _done_count(store: Store) -> int:
    row = await store.fetchone("SELECT COUNT(*) AS n FROM tasks WHERE status = ?", (Status.DONE,))
    return int(row["n"])


async def _kill_once(
    conveyor: ForkedConveyor, session: aiohttp.ClientSession, store: Store, kills: Kills, n: int
) -> None:
    if conveyor.process is None or conveyor.process.poll() is not None:
        raise AssertionError(
            f"conveyor run exited by itself before kill {kills.made + 1}: {conveyor.log_tail()}"
        )
    starting = not await _answers(session, conveyor.url)
    runs = await store.unfinished_runs()
    busy = await _done_count(store) < n
    await conveyor.kill()
    kills.made += 1
    kills.starting += starting
    kills.mid_agent += bool(runs)
    kills.busy += busy


async def _kill_repeatedly(
    conveyor: ForkedConveyor,
    session: aiohttp.ClientSession,
    store: Store,
    plan: CrashPlan,
    rng: random.Random,
    kills: Kills,
) -> None:
    """Kill at `plan.kills` seeded moments after each start, and start again each time."""
    for _ in range(plan.kills):
        await asyncio.sleep(rng.uniform(*plan.kill_after_s))
        await _kill_once(conveyor, session, store, kills, plan.tasks)
        conveyor.spawn()


async def _finished(store: Store, n: int) -> bool:
    busy = await store.fetchone(ACTIVE_JOBS)
    return await _done_count(store) >= n and busy["n"] == 0


async def task_states(store: Store) -> str:
    """How many tasks are at each stage/status, for a timeout's message."""
    rows = await store.fetchall(
        "SELECT stage, status, COUNT(*) AS n FROM tasks GROUP BY stage, status"
    )
    return ", ".join(f"{r['stage']}/{r['status']}: {r['n']}" for r in rows)


async def _cards_current(store: Store) -> bool:
    """Every task's card was delivered at (or after) the task's latest change."""
    row = await store.fetchone(
        "SELECT COUNT(*) AS n FROM tasks LEFT JOIN cards ON cards.task_id = tasks.id"
        " WHERE cards.message_id IS NULL OR cards.updated_at < tasks.updated_at"
    )
    return row["n"] == 0


async def _check_transitions(store: Store, outcome: Outcome) -> None:
    lost = duplicated = unexpected = 0
    for task in await store.list_tasks():
        events = await store.events(task.id)
        counts = Counter((e.kind, e.from_state, e.to_state) for e in events)
        missing = [move for move in INTENDED if not counts[move]]
        twice = {move: n for move, n in counts.items() if move in INTENDED and n > 1}
        strange = [
            f"{e.kind} {e.from_state} -> {e.to_state} ({(e.detail or '')[:140]})"
            for e in events
            if (e.kind, e.from_state, e.to_state) not in EXPECTED
        ]
        lost += len(missing)
        duplicated += sum(n - 1 for n in twice.values())
        unexpected += len(strange)
        for label, moves in (("lost", missing), ("duplicated", twice), ("unexpected", strange)):
            outcome.check(not moves, f"{task.work_item} {label}: {moves}")
    outcome.figure(f"transitions lost {lost}, duplicated {duplicated}, unexpected {unexpected}")


async def _check_crashes(
    boxes: Sandboxes, store: Store, issues: list[str], outcome: Outcome
) -> None:
    tasks = await store.list_tasks()
    done = sum(task.status == Status.DONE for task in tasks)
    outcome.figure(f"{done}/{len(issues)} done")
    outcome.check(done == len(issues), f"{len(issues) - done} task(s) not done")
    per_issue = Counter(task.tracker_issue_id for task in tasks)
    outcome.check(
        len(tasks) == len(issues) and set(per_issue) == set(issues),
        f"{len(tasks)} tasks for {len(issues)} issues",
    )
    await _check_transitions(store, outcome)
    jobs = Counter(
        row["state"] for row in await store.fetchall("SELECT state FROM jobs ORDER BY id")
    )
    left = jobs["queued"] + jobs["running"]
    outcome.figure(f"jobs {dict(sorted(jobs.items()))}")
    outcome.check(left == 0, f"{left} job(s) left queued or running")
    runs = await store.fetchall("SELECT ok, error FROM agent_runs")
    interrupted = sum(1 for run in runs if (run["error"] or "").startswith("interrupted"))
    outcome.figure(f"agent runs {len(runs)} ({interrupted} interrupted)")
    _check_merges(boxes, tasks, outcome)
    _check_cards(boxes, tasks, outcome)


def _check_merges(boxes: Sandboxes, tasks: list[Task], outcome: Outcome) -> None:
    merges = Counter(
        subject.split(":", 1)[0].removeprefix("Merge ") for subject in merge_commits(boxes.remote)
    )
    twice = {branch: n for branch, n in merges.items() if n > 1}
    unmerged = sorted(task.branch for task in tasks if not merges.get(task.branch))
    outcome.figure(f"merges {sum(merges.values())} (twice {len(twice)})")
    outcome.check(not twice, f"merge commits on main per branch: {twice}")
    outcome.check(not unmerged, f"never merged: {unmerged[:5]}")


def _check_cards(boxes: Sandboxes, tasks: list[Task], outcome: Outcome) -> None:
    cards = boxes.card_sends()
    extra = {t.work_item: cards[t.work_item] for t in tasks if cards.get(t.work_item, 0) > 1}
    missing = [task.work_item for task in tasks if not cards.get(task.work_item)]
    # A kill after Telegram took a card but before the store recorded it leaves that card
    # behind (the Bot API cannot list a chat's messages to find it): counted, not failed.
    # Its buttons are safe: a press names a version the task has left, and is refused.
    outcome.figure(
        f"cards {sum(cards.values())} (orphaned by a kill {sum(extra.values()) - len(extra)})"
    )
    outcome.check(not missing, f"no card: {missing[:5]}")


async def _run_batch(
    boxes: Sandboxes,
    conveyor: ForkedConveyor,
    session: aiohttp.ClientSession,
    plan: CrashPlan,
    seed: int,
    outcome: Outcome,
) -> Store:
    await conveyor.server.ready()
    conveyor.spawn()
    await conveyor.healthy(session)
    store = await Store(conveyor.root / "conveyor.db").open()
    issues = boxes.start_issues(plan.tasks)
    approved: set[str] = set()
    person = asyncio.create_task(boxes.approve_reviews(issues, approved), name="person")
    kills = Kills()
    started = time.monotonic()
    try:
        await _kill_repeatedly(conveyor, session, store, plan, random.Random(seed), kills)
        await conveyor.healthy(session)
        await wait_until(
            lambda: _finished(store, plan.tasks), "every task to finish", plan.timeout_s
        )
    except ChaosTimeout as error:
        outcome.check(False, f"{error} ({await task_states(store)})")
    finally:
        person.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await person
    outcome.figure(
        f"{plan.tasks} tasks, {kills.made} kills ({kills.busy} with work left,"
        f" {kills.mid_agent} mid-agent, {kills.starting} while starting),"
        f" {conveyor.starts} starts in {time.monotonic() - started:.0f}s"
        + (
            "; Plane's webhook gave up (the reconciler took over)"
            if not boxes.plane.webhook_active
            else ""
        )
    )
    with contextlib.suppress(ChaosTimeout):
        await wait_until(lambda: _cards_current(store), "the cards to catch up", 30)
    await conveyor.stop()
    outcome.check(
        conveyor.process is not None and conveyor.process.returncode == 0,
        f"the last conveyor run stopped with {conveyor.process and conveyor.process.returncode}",
    )
    await _check_crashes(boxes, store, issues, outcome)
    return store


async def crash_batch(root: Path, *, seed: int, plan: CrashPlan) -> Outcome:
    outcome = Outcome("crashes")
    boxes = await Sandboxes.open(root)
    store: Store | None = None
    conveyor: ForkedConveyor | None = None
    try:
        port = free_port()
        env = conveyor_env(
            root,
            port,
            **as_env(boxes.settings(job_lease_s=3, max_concurrency=2)),
            SANDBOX_AGENT_DELAY_S=str(plan.agent_delay_s),
        )
        conveyor = ForkedConveyor(root, env, port)
        boxes.hook(conveyor.url)
        async with aiohttp.ClientSession() as session:
            store = await _run_batch(boxes, conveyor, session, plan, seed, outcome)
    finally:
        if conveyor is not None:
            await conveyor.close()
        left = await end_agents(store, root)
        outcome.figure(f"agents left running at the end {left}")
        if store is not None:
            await store.close()
        await boxes.close()
    return outcome


async def run_crashes(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """SIGKILL `conveyor run` at 50 seeded moments across a batch of tasks (quick: 10)."""
    plan = CrashPlan(
        tasks=4 if quick else 20,
        kills=10 if quick else 50,
        kill_after_s=(0.4, 3.0),
        agent_delay_s=0.3,
        timeout_s=120 if quick else 240,
    )
    return [await crash_batch(root, seed=seed, plan=plan)]


# --- acknowledged means durable -------------------------------------------------------------


@dataclass(frozen=True)
class BurstPlan:
    rounds: int
    rate: float  # deliveries per second
    kill_after_s: tuple[float, float]  # into the burst
    tail_s: float  # the burst goes on this long after the kill


@dataclass
class Burst:
    """One burst's answers: delivery id -> HTTP status, or the error's name."""

    answers: dict[str, int | str] = field(default_factory=dict)
    sent: int = 0
    seconds: float = 0.0

    @property
    def acknowledged(self) -> set[str]:
        return {d for d, a in self.answers.items() if isinstance(a, int) and 200 <= a < 300}


def _stranger_delivery(rng: random.Random) -> tuple[str, bytes]:
    """A signed-to-be state change of an issue in a project Conveyor does not know."""
    issue = {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "project": "stranger-project",
        "name": "Not ours",
        "state": {"id": "state-started", "name": "In Progress", "group": "started"},
        "updated_at": f"2026-01-01T00:00:{rng.random():.9f}Z",
    }
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)), state_change(issue)


async def _post(session: aiohttp.ClientSession, url: str, delivery: str, body: bytes) -> int | str:
    try:
        async with session.post(
            url, data=body, headers=plane_headers(body, "issue", delivery)
        ) as r:
            await r.read()
            return r.status
    except (aiohttp.ClientError, TimeoutError) as error:
        return type(error).__name__


async def _burst(
    session: aiohttp.ClientSession,
    url: str,
    rng: random.Random,
    rate: float,
    stop: asyncio.Event,
    burst: Burst,
) -> None:
    """Open-loop load: one delivery every 1/rate s, whatever the answers take."""
    started = time.monotonic()
    posts: set[asyncio.Task[None]] = set()

    async def one(delivery: str, body: bytes) -> None:
        burst.answers[delivery] = await _post(session, f"{url}/webhooks/plane", delivery, body)

    while not stop.is_set():
        delivery, body = _stranger_delivery(rng)
        task = asyncio.create_task(one(delivery, body))
        posts.add(task)
        task.add_done_callback(posts.discard)
        burst.sent += 1
        pause = started + burst.sent / rate - time.monotonic()
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
    burst.seconds = time.monotonic() - started
    if posts:
        await asyncio.gather(*posts)


def _stored(db: Path, ids: Collection[str]) -> tuple[set[str], int]:
    """(which of `ids` are rows, how many rows are not processed), read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute("SELECT delivery_id FROM webhook_deliveries WHERE source = 'plane'")
        found = {row[0] for row in rows} & set(ids)
        (unprocessed,) = conn.execute(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE processed_at IS NULL"
        ).fetchone()
    return found, unprocessed


async def _all_processed(db: Path) -> bool:
    _, unprocessed = await asyncio.to_thread(_stored, db, ())
    return unprocessed == 0


async def _burst_round(
    conveyor: ForkedConveyor,
    session: aiohttp.ClientSession,
    plan: BurstPlan,
    rng: random.Random,
    outcome: Outcome,
) -> tuple[Burst, set[str]]:
    """One burst with a kill in it; the ids answered 2xx that the store lacks."""
    burst, stop = Burst(), asyncio.Event()
    sender = asyncio.create_task(_burst(session, conveyor.url, rng, plan.rate, stop, burst))
    try:
        await asyncio.sleep(rng.uniform(*plan.kill_after_s))
        await conveyor.kill()
        await asyncio.sleep(plan.tail_s)
    finally:
        stop.set()
        await bounded(sender, "the burst to end", 60)
    conveyor.spawn()
    await conveyor.healthy(session)
    db = conveyor.root / "conveyor.db"
    found, _ = await asyncio.to_thread(_stored, db, burst.acknowledged)
    try:
        await wait_until(lambda: _all_processed(db), "recorded deliveries to be processed", 30)
    except ChaosTimeout as error:
        outcome.check(False, str(error))
    return burst, burst.acknowledged - found


def _check_round(number: int, burst: Burst, missing: set[str], outcome: Outcome) -> None:
    outcome.check(bool(burst.acknowledged), f"round {number}: nothing answered 2xx")
    outcome.check(
        len(burst.acknowledged) < burst.sent,
        f"round {number}: every delivery answered 2xx, the kill missed the burst",
    )
    outcome.check(
        not missing,
        f"round {number}: {len(missing)} delivery id(s) answered 2xx but not stored,"
        f" e.g. {sorted(missing)[:3]}",
    )


def _burst_figures(bursts: list[tuple[Burst, set[str]]], outcome: Outcome) -> None:
    sent = sum(burst.sent for burst, _ in bursts)
    seconds = sum(burst.seconds for burst, _ in bursts)
    acked = sum(len(burst.acknowledged) for burst, _ in bursts)
    lost = sum(len(missing) for _, missing in bursts)
    refused = Counter(
        answer
        for burst, _ in bursts
        for answer in burst.answers.values()
        if not isinstance(answer, int) or answer >= 300
    )
    outcome.figure(
        f"{len(bursts)} kills mid-burst: {sent} deliveries at {sent / max(seconds, 1e-9):.0f}/s,"
        f" {acked} answered 2xx, {acked - lost}/{acked} stored after restart (lost {lost})"
    )
    outcome.figure(
        "not answered: " + (", ".join(f"{k} {n}" for k, n in refused.most_common(3)) or "0")
    )


async def ack_durable(root: Path, *, seed: int, plan: BurstPlan) -> Outcome:
    outcome = Outcome("ack-durable")
    remote = await create_sample_remote(root / "remote.git")
    port = free_port()
    settings = {"projects": [{"key": "ORCH", "remote": str(remote)}]}
    env = conveyor_env(root, port, **as_env(settings), ORCH_PLANE_WEBHOOK_SECRET=PLANE_SECRET)
    conveyor = ForkedConveyor(root, env, port)
    rng = random.Random(seed)
    bursts: list[tuple[Burst, set[str]]] = []
    try:
        connector = aiohttp.TCPConnector(limit=256)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await conveyor.server.ready()
            conveyor.spawn()
            await conveyor.healthy(session)
            for number in range(1, plan.rounds + 1):
                bursts.append(await _burst_round(conveyor, session, plan, rng, outcome))
                _check_round(number, *bursts[-1], outcome)
            await conveyor.stop()
    finally:
        await conveyor.close()
    _burst_figures(bursts, outcome)
    return outcome


async def run_ack_durable(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """SIGKILL during a 200 req/s burst of signed Plane deliveries, a few times."""
    plan = BurstPlan(rounds=2 if quick else 5, rate=200.0, kill_after_s=(0.8, 2.5), tail_s=0.3)
    return [await ack_durable(root, seed=seed, plan=plan)]
