"""Pipeline overhead: what the engine itself adds to each transition of the demo scenario.

The system under test is the real engine (`engine.runtime.Engine` with its worker) over a
real SQLite file, a real bare git remote (`engine.sandbox.repo`) and real subprocess agents:
the scripted sandbox agent (`python -m engine.sandbox.agent`), which does its work at once.
The scenario is the demo's: one task from creation to done, the reviewer asking for changes
once (`bot.demo.SANDBOX_DEFAULTS`), the BRD approved the moment it is ready, the merge gate
on. No tracker, forge or Telegram: the engine alone.

Figures, per repetition, from the store's own clock (`time.time()`):
  wall    the task's `finished_at - created_at`;
  agents  the sum of `agent_runs.duration_s` (each agent process, start to exit);
  engine  wall - agents, divided by the task's events (one row per transition).
The split of the engine's time comes from timing every call into the git workspace and
the store (their intervals merged, with the agents' own intervals cut out): git, store, and
the rest (Python, templates, gates, subprocess spawning, waiting for the event loop).

Baseline: a bare start of `python -m engine.sandbox.agent` (it exits at once without
`ORCH_ROLE`), i.e. the least any agent run can cost, timed in the same repetitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from bench.common import Row, fmt_spread, run_python, spread
from bot.demo import DEMO_PROJECT, SAMPLE_DESCRIPTION, SAMPLE_TITLE, SANDBOX_DEFAULTS
from engine.config import Settings
from engine.notifier import AlertKind
from engine.runtime import SETTLED, Engine
from engine.sandbox.repo import create_sample_remote
from engine.stages import Status
from engine.store import AgentRun, Task

T = TypeVar("T")
Interval = tuple[float, float]
Log = Callable[[str], object]

TARGET_MS = 50.0
TASK_TIMEOUT_S = 120.0
AGENT_START_TIMEOUT_S = 30.0
BARE_STARTS_PER_REP = 3
AGENT_ENV_PREFIX = "SANDBOX_AGENT_"
# Every status where nothing in the engine will move the task again (approval is automatic).
RESTING = SETTLED - {Status.AWAITING_APPROVAL}

# False in the benchmark's own waiting, so that its polling of the store is not timed.
RECORDING: contextvars.ContextVar[bool] = contextvars.ContextVar("recording", default=True)


class Spans:
    """Wall-clock intervals spent inside calls of one kind ("git", "store")."""

    def __init__(self) -> None:
        self.intervals: dict[str, list[Interval]] = {"git": [], "store": []}

    def _add(self, kind: str, started: float) -> None:
        if RECORDING.get():
            self.intervals[kind].append((started, time.time()))

    def timed(self, kind: str, method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        async def call(*args: Any, **kwargs: Any) -> T:
            started = time.time()
            try:
                return await method(*args, **kwargs)
            finally:
                self._add(kind, started)

        return call

    def timed_tx(self, kind: str, tx: Callable[[], Any]) -> Callable[[], Any]:
        """A transaction counts from waiting for the write lock to its COMMIT."""

        @contextlib.asynccontextmanager
        async def timed() -> AsyncIterator[Any]:
            started = time.time()
            try:
                async with tx() as conn:
                    yield conn
            finally:
                self._add(kind, started)

        return timed


def instrument(engine: Engine, spans: Spans) -> None:
    """Time every public coroutine of the git workspace and the store's primitives."""
    for name, method in inspect.getmembers(engine.git, inspect.iscoroutinefunction):
        if not name.startswith("_"):
            setattr(engine.git, name, spans.timed("git", method))
    for name in ("fetchone", "fetchall"):
        setattr(engine.store, name, spans.timed("store", getattr(engine.store, name)))
    engine.store.tx = spans.timed_tx("store", engine.store.tx)


def merged(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def without(intervals: list[Interval], holes: list[Interval]) -> list[Interval]:
    """The parts of `intervals` (merged) outside every hole."""
    out = merged(intervals)
    for hole_start, hole_end in merged(holes):
        pieces = []
        for start, end in out:
            if start < hole_start:
                pieces.append((start, min(end, hole_start)))
            if end > hole_end:
                pieces.append((max(start, hole_end), end))
        out = [(s, e) for s, e in pieces if e > s]
    return out


def length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in merged(intervals))


class AutoApprover:
    """The person in the loop, answering at once: approves each BRD the moment it is ready."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.alerts: list[AlertKind] = []

    async def task_changed(self, task_id: int) -> None:
        return None

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        self.alerts.append(kind)
        if kind is AlertKind.BRD_READY and self.engine is not None:
            await self.engine.pipeline.approve(task_id, actor="bench-operator")


@contextlib.contextmanager
def agent_environment(state_dir: Path) -> Iterator[None]:
    """The demo's agent script, with run counters of our own; the old environment after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(AGENT_ENV_PREFIX)}
    for name in saved:
        del os.environ[name]
    os.environ.update(SANDBOX_DEFAULTS)
    os.environ[f"{AGENT_ENV_PREFIX}STATE"] = str(state_dir)
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith(AGENT_ENV_PREFIX)]:
            del os.environ[name]
        os.environ.update(saved)


def engine_settings(root: Path, remote: Path) -> Settings:
    return Settings(
        _env_file=None,
        db_path=root / "conveyor.db",
        workdir=root / "work",
        projects=[{"key": DEMO_PROJECT, "remote": str(remote)}],
        agent_command=f"{sys.executable} -m engine.sandbox.agent",
        agent_timeout_s=60,
        agent_retry_backoff_s=0,
        reconcile_enabled=False,
        locale="en",
    )


async def _unrecorded(awaitable: Awaitable[T]) -> T:
    RECORDING.set(False)  # this task's context only
    return await awaitable


async def run_scenario(root: Path) -> tuple[Task, int, list[AgentRun], Spans, list[AlertKind]]:
    remote = await create_sample_remote(root / "remote.git")
    approver = AutoApprover()
    spans = Spans()
    with agent_environment(root / "agent-state"):
        async with Engine(engine_settings(root, remote), approver) as engine:
            approver.engine = engine
            instrument(engine, spans)
            engine.start_worker()
            started = await engine.pipeline.start_task(
                DEMO_PROJECT, SAMPLE_TITLE, SAMPLE_DESCRIPTION, tracker_issue_id="bench-1"
            )
            assert started.task is not None, started.reason
            settled = engine.wait_settled(started.task.id, RESTING, idle_active=False)
            task = await asyncio.wait_for(_unrecorded(settled), TASK_TIMEOUT_S)
            events = len(await engine.store.events(task.id))
            runs = await engine.store.agent_runs(task.id)
    return task, events, runs, spans, approver.alerts


def figures(task: Task, events: int, runs: list[AgentRun], spans: Spans) -> dict[str, Any]:
    if task.status != Status.DONE or task.finished_at is None:
        raise RuntimeError(f"{task.work_item} ended {task.status}: {task.status_reason}")
    window = (task.created_at, task.finished_at)
    agents = [(r.finished_at - r.duration_s, r.finished_at) for r in runs if r.finished_at]
    outside = [(float("-inf"), window[0]), (window[1], float("inf"))]
    git = without(spans.intervals["git"], agents + outside)
    store = without(spans.intervals["store"], agents + outside + git)
    wall_s = window[1] - window[0]
    agents_s = sum(r.duration_s or 0.0 for r in runs)
    engine_s = wall_s - agents_s
    git_s, store_s = length(git), length(store)
    ms_each = 1000.0 / events  # seconds in total -> milliseconds per transition
    return {
        "wall_s": wall_s,
        "agents_s": agents_s,
        "engine_s": engine_s,
        "transitions": events,
        "agent_runs": len(runs),
        "engine_ms_per_transition": engine_s * ms_each,
        "git_ms_per_transition": git_s * ms_each,
        "store_ms_per_transition": store_s * ms_each,
        "rest_ms_per_transition": (engine_s - git_s - store_s) * ms_each,
        "git_calls": len(spans.intervals["git"]),
        "store_calls": len(spans.intervals["store"]),
        "agent_run_ms": [round((r.duration_s or 0.0) * 1000, 1) for r in runs],
    }


async def bare_agent_start_ms() -> float:
    """One `python -m engine.sandbox.agent` that exits at once (no ORCH_ROLE), in ms."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    started = time.monotonic()
    code, _, err = await run_python(
        "-m", "engine.sandbox.agent", timeout_s=AGENT_START_TIMEOUT_S, env=env
    )
    elapsed = (time.monotonic() - started) * 1000.0
    if code != 2 or "ORCH_ROLE" not in err:
        raise RuntimeError(f"bare sandbox agent exited {code}: {err.strip()[-500:]}")
    return elapsed


async def one_rep(rep: int, reps: int, log: Log = print) -> tuple[dict[str, Any], list[float]]:
    bare = [await bare_agent_start_ms() for _ in range(BARE_STARTS_PER_REP)]
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-overhead-") as tmp:
        task, events, runs, spans, alerts = await run_scenario(Path(tmp))
    result = {**figures(task, events, runs, spans), "alerts": [a.value for a in alerts]}
    log(
        f"  overhead rep {rep + 1}/{reps}: wall {result['wall_s']:.2f} s, agents"
        f" {result['agents_s']:.2f} s ({result['agent_runs']} runs), engine"
        f" {result['engine_ms_per_transition']:.1f} ms x {events} transitions"
        f" (git {result['git_ms_per_transition']:.1f}, store"
        f" {result['store_ms_per_transition']:.1f}, rest {result['rest_ms_per_transition']:.1f});"
        f" bare agent start {statistics.median(bare):.0f} ms"
    )
    return result, bare


async def run(reps: int = 5, log: Log = print) -> dict[str, Any]:
    results, bare = [], []
    for rep in range(reps):
        result, starts = await one_rep(rep, reps, log)
        results.append(result)
        bare.extend(starts)
    keys = ("wall_s", "agents_s", "engine_ms_per_transition", "git_ms_per_transition")
    keys += ("store_ms_per_transition", "rest_ms_per_transition")
    summary = {key: spread([r[key] for r in results]) for key in keys}
    runs = [ms for r in results for ms in r["agent_run_ms"]]
    return {
        **summary,
        "transitions": results[0]["transitions"],
        "agent_runs": results[0]["agent_runs"],
        "agent_run_ms": spread(runs),
        "bare_agent_start_ms": spread(bare),
        "reps": results,
    }


def rows(result: dict[str, Any]) -> list[Row]:
    engine_ms = result["engine_ms_per_transition"]
    bare = result["bare_agent_start_ms"]["median"]
    split = " / ".join(
        f"{part} {result[f'{part}_ms_per_transition']['median']:.1f}"
        for part in ("git", "store", "rest")
    )
    return [
        Row(
            "pipeline overhead, engine time per transition",
            fmt_spread(engine_ms, 1, " ms"),
            f"bare agent process start {bare:.0f} ms",
            f"≤ {TARGET_MS:.0f} ms",
            engine_ms["median"] <= TARGET_MS,
        ),
        Row(
            f"pipeline, demo scenario ({result['transitions']} transitions,"
            f" {result['agent_runs']} agent runs)",
            f"total {fmt_spread(result['wall_s'], 2, ' s')}",
            f"agents' own {fmt_spread(result['agents_s'], 2, ' s')}",
            "—",
            None,
        ),
        Row(
            "pipeline engine time split, ms per transition",
            split,
            f"agent run median {result['agent_run_ms']['median']:.0f} ms",
            "—",
            None,
        ),
    ]


async def measure(quick: bool, log: Log = print) -> dict[str, Any]:
    return await run(reps=2 if quick else 5, log=log)
