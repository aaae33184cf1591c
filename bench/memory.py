"""Memory: resident set size of `conveyor run`, idle after start and with active tasks and cards.

The system under test is a real `python -m bot.cli run` subprocess in long-polling
mode against the sandbox Bot API server (`engine.sandbox.telegram`, served from this
process on 127.0.0.1, rate limits off: this figure is about memory, not pacing).
RSS is VmRSS from /proc/<pid>/status, in MiB (the targets' MB are read as MiB), the
median of a few samples taken after the process has settled; VmHWM (the peak) is
recorded beside it.

- Idle: an empty store; sampled once the bot's first long poll has arrived.
- Loaded: a store created by `engine.store.Store`, then filled by SQL with `tasks`
  active tasks in development, each with the events and agent runs of the stages
  before it. At start the console finds them without cards and sends one card per
  task; RSS is sampled once every card is delivered, and the cards table is checked
  to hold one delivered card per task. The reconciler runs, but its grace period is
  set longer than the run, so it checks out no worktrees and starts no agents.

Baselines, measured the same way: `python -c` with nothing imported beyond the
interpreter's start-up, and `python -c "import bot.app"`, which loads every module and
library `conveyor run` does but starts nothing. The table compares with the latter.
The four processes of a repetition run side by side, each with its own store and
sandbox: a process's RSS does not depend on how much CPU it gets, and start-up (most
of it importing aiogram) would otherwise dominate the run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from bench.common import ROOT, Row, fmt_spread, spread
from engine.sandbox.repo import create_sample_remote
from engine.sandbox.telegram import TelegramSandbox
from engine.stages import Stage, Status
from engine.store import Store

TOKEN = "5151:BENCH-MEMORY"
CHAT = -1005151
ADMIN = 42
PROJECT = "BENCH"
IDLE_TARGET_MIB = 80.0
LOADED_TARGET_MIB = 150.0
SETTLE_S = 2.0
SAMPLES = 5
SAMPLE_GAP_S = 0.2
START_GUARD_S = 60.0
STOP_GUARD_S = 30.0
POLL_S = 0.05
CARD_GUARD_S = 0.25  # per card, on top of START_GUARD_S: a hang guard, not a target
BASELINES = {
    "bare": "import sys",
    "imports": "import sys, bot.app",
}
READY = "ready"
DESCRIPTION = (
    "As an operator I want the export to include the archived invoices, so that the"
    " quarterly report matches the ledger. Acceptance: the CSV has one row per invoice,"
    " archived ones marked; totals equal the ledger's for the quarter."
)
MODEL = "claude-sonnet-4-5"


# --- reading memory ----------------------------------------------------------------------


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


async def sample_mib(pid: int) -> dict[str, float]:
    """The median VmRSS of a few samples and the last VmHWM, in MiB."""
    rss: list[float] = []
    status: dict[str, int] = {}
    for i in range(SAMPLES):
        if i:
            await asyncio.sleep(SAMPLE_GAP_S)
        status = proc_status_kib(pid)
        rss.append(status["VmRSS"] / 1024.0)
    return {"rss": statistics.median(rss), "hwm": status["VmHWM"] / 1024.0}


# --- child processes ---------------------------------------------------------------------


def _open_log(path: Path) -> BinaryIO:
    return path.open("wb")


@contextlib.asynccontextmanager
async def child(
    args: list[str],
    *,
    cwd: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    stdout: int = asyncio.subprocess.DEVNULL,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python args...`, stopped by its own pid on the way out: SIGTERM, then SIGKILL."""
    with _open_log(log_path) as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=stdout,
            stderr=log_file,
        )
    try:
        yield process
    finally:
        await stop(process)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_GUARD_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


async def wait_until(
    predicate: Callable[[], bool],
    process: asyncio.subprocess.Process,
    what: str,
    guard_s: float,
    log_path: Path,
) -> None:
    """Poll until `predicate` holds; fail at once if the process exits, or after `guard_s`."""
    deadline = time.monotonic() + guard_s
    while True:
        if predicate():
            return
        if process.returncode is not None:
            raise RuntimeError(f"exited {process.returncode} waiting for {what}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {guard_s:.0f} s:\n{tail(log_path)}")
        await asyncio.sleep(POLL_S)


# --- the baseline ------------------------------------------------------------------------


async def baseline_mib(root: Path, name: str) -> dict[str, float]:
    """RSS of `python -c` that imports BASELINES[name], says it is ready, and waits."""
    code = f"{BASELINES[name]}; print({READY!r}, flush=True); sys.stdin.read()"
    log_path = root / f"baseline-{name}.log"
    pipe = asyncio.subprocess.PIPE
    async with child(["-c", code], cwd=ROOT, log_path=log_path, stdout=pipe) as process:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), START_GUARD_S)
        if line.decode().strip() != READY:
            raise RuntimeError(f"baseline {name} did not start:\n{tail(log_path)}")
        await asyncio.sleep(SETTLE_S)
        return await sample_mib(process.pid)


# --- the store ---------------------------------------------------------------------------


def _task_rows(tasks: int, at: float) -> Iterator[tuple]:
    for n in range(1, tasks + 1):
        yield (
            n,
            PROJECT,
            f"issue-{n}",
            n,
            f"{PROJECT}-{n}",
            f"Export archived invoices, part {n}",
            DESCRIPTION,
            Stage.DEVELOPMENT,
            Status.ACTIVE,
            f"bench-{n}-export-archived-invoices",
            at - 3_600.0,
            at - 60.0,
        )


def _event_rows(tasks: int, at: float) -> Iterator[tuple]:
    steps = (
        ("created", None, "analysis/active", None, "telegram"),
        ("brd_ready", "analysis/active", "analysis/awaiting_approval", "status ready", None),
        ("approved", "analysis/awaiting_approval", "architecture/active", None, "operator"),
        ("advanced", "architecture/active", "development/active", "02-architecture.md", None),
    )
    for n in range(1, tasks + 1):
        for i, (kind, before, after, detail, actor) in enumerate(steps):
            yield (n, at - 3_600.0 + i * 600.0, kind, before, after, detail, actor)


def _run_rows(tasks: int, at: float) -> Iterator[tuple]:
    runs = (("analysis", "analyst", 0.41), ("architecture", "architect", 0.87))
    for n in range(1, tasks + 1):
        for i, (stage, role, cost) in enumerate(runs):
            started = at - 3_500.0 + i * 1_200.0
            usage = json.dumps({MODEL: {"cost_usd": cost, "input_tokens": 1_200}})
            yield (n, stage, role, started, started + 240.0, 240.0, cost, MODEL, usage)


def _bulk_insert(db: Path, tasks: int) -> None:
    at = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO tasks (id, project, tracker_issue_id, sequence_id, work_item, title,"
            " description, stage, status, branch, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _task_rows(tasks, at),
        )
        conn.executemany(
            "INSERT INTO events (task_id, at, kind, from_state, to_state, detail, actor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            _event_rows(tasks, at),
        )
        conn.executemany(
            "INSERT INTO agent_runs (task_id, stage, role, attempt, started_at, finished_at,"
            " duration_s, exit_code, timed_out, ok, input_tokens, output_tokens,"
            " cache_read_tokens, cache_creation_tokens, cost_usd, model, model_usage)"
            " VALUES (?, ?, ?, 1, ?, ?, ?, 0, 0, 1, 1200, 3400, 52000, 8000, ?, ?, ?)",
            _run_rows(tasks, at),
        )


async def build_store(db: Path, tasks: int) -> None:
    async with Store(db):
        pass
    if tasks:
        _bulk_insert(db, tasks)


def delivered_cards(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM cards WHERE chat_id = ? AND message_id IS NOT NULL", (CHAT,)
        ).fetchone()
    return int(count)


# --- conveyor run ------------------------------------------------------------------------


def conveyor_env(home: Path, remote: Path, sandbox: TelegramSandbox) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SANDBOX_"))}
    env.update(
        ORCH_DB_PATH=str(home / "conveyor.db"),
        ORCH_WORKDIR=str(home / "work"),
        ORCH_HTTP_HOST="127.0.0.1",
        ORCH_HTTP_PORT="0",
        ORCH_PROJECTS=json.dumps([{"key": PROJECT, "remote": str(remote)}]),
        ORCH_AGENT_COMMAND=f"{sys.executable} -m engine.sandbox.agent",
        ORCH_TELEGRAM_TOKEN=TOKEN,
        ORCH_TELEGRAM_API_BASE=sandbox.base_url,
        ORCH_TELEGRAM_CHAT_ID=str(CHAT),
        ORCH_TELEGRAM_ADMIN_IDS=str(ADMIN),
        ORCH_LOCALE="en",
        ORCH_TELEGRAM_PACE_S="0",
        ORCH_TELEGRAM_DEBOUNCE_S="0.05",
        ORCH_RECONCILE_GRACE_S="86400",
        SANDBOX_AGENT_STATE=str(home / "agent-state"),
    )
    return env


def long_polling(sandbox: TelegramSandbox) -> bool:
    return any(
        call.method == "getUpdates" and float(call.params.get("timeout") or 0) > 0
        for call in sandbox.calls
    )


async def conveyor_mib(root: Path, remote: Path, tasks: int, label: str) -> dict[str, Any]:
    """Start `conveyor run` over a store of `tasks` active tasks; its RSS once all is delivered."""
    home = root / label
    home.mkdir()
    db = home / "conveyor.db"
    await build_store(db, tasks)
    log_path = home / "conveyor.log"
    async with TelegramSandbox(TOKEN, enforce_limits=False) as sandbox:
        env = conveyor_env(home, remote, sandbox)
        args = ["-m", "bot.cli", "run"]
        async with child(args, cwd=home, log_path=log_path, env=env) as process:
            started = time.monotonic()
            await wait_until(
                lambda: long_polling(sandbox), process, "long poll", START_GUARD_S, log_path
            )
            await wait_until(
                lambda: sandbox.count("sendMessage", 200) >= tasks,
                process,
                f"{tasks} cards",
                START_GUARD_S + tasks * CARD_GUARD_S,
                log_path,
            )
            ready_s = time.monotonic() - started
            await asyncio.sleep(SETTLE_S)
            sample = await sample_mib(process.pid)
            sent = sandbox.count("sendMessage", 200)
    return {
        **sample,
        "ready_s": ready_s,
        "cards_sent": sent,
        "cards_saved": delivered_cards(db),
        "traceback_in_log": "Traceback" in log_path.read_text(errors="replace"),
    }


# --- the benchmark -----------------------------------------------------------------------


async def one_rep(root: Path, remote: Path, tasks: int) -> dict[str, Any]:
    async with asyncio.TaskGroup() as group:
        running = {
            "bare": group.create_task(baseline_mib(root, "bare")),
            "imports": group.create_task(baseline_mib(root, "imports")),
            "idle": group.create_task(conveyor_mib(root, remote, 0, "idle")),
            "loaded": group.create_task(conveyor_mib(root, remote, tasks, "loaded")),
        }
    return {name: task.result() for name, task in running.items()}


async def run(
    tasks: int = 1_000, reps: int = 3, log: Callable[[str], object] = print
) -> dict[str, Any]:
    reps_data: list[dict[str, Any]] = []
    for rep in range(reps):
        with tempfile.TemporaryDirectory(prefix="conveyor-bench-memory-") as tmp:
            root = Path(tmp)
            remote = await create_sample_remote(root / "remote.git")
            found = await one_rep(root, remote, tasks)
        reps_data.append(found)
        loaded = found["loaded"]
        log(
            f"  memory rep {rep + 1}/{reps}: bare {found['bare']['rss']:.1f},"
            f" imports {found['imports']['rss']:.1f}, idle {found['idle']['rss']:.1f}"
            f" (peak {found['idle']['hwm']:.1f}), {tasks} tasks {loaded['rss']:.1f}"
            f" (peak {loaded['hwm']:.1f}) MiB; {loaded['cards_saved']} cards"
            f" in {loaded['ready_s']:.1f} s"
        )

    def figure(kind: str, key: str = "rss") -> dict[str, Any]:
        return spread([r[kind][key] for r in reps_data])

    return {
        "tasks": tasks,
        "bare_mib": figure("bare"),
        "imports_mib": figure("imports"),
        "idle_mib": figure("idle"),
        "idle_peak_mib": figure("idle", "hwm"),
        "loaded_mib": figure("loaded"),
        "loaded_peak_mib": figure("loaded", "hwm"),
        "all_cards_delivered": all(
            r["loaded"]["cards_saved"] == tasks == r["loaded"]["cards_sent"] for r in reps_data
        ),
        "clean_logs": not any(
            r[kind]["traceback_in_log"] for r in reps_data for kind in ("idle", "loaded")
        ),
        "reps": reps_data,
    }


def rows(result: dict[str, Any]) -> list[Row]:
    imports = f"python importing bot.app {fmt_spread(result['imports_mib'], 1)} MiB"
    idle, loaded = result["idle_mib"], result["loaded_mib"]
    return [
        Row(
            "memory, RSS idle after start",
            f"{fmt_spread(idle, 1)} MiB",
            f"{imports}; bare python {result['bare_mib']['median']:.1f} MiB",
            f"≤ {IDLE_TARGET_MIB:.0f} MiB",
            idle["median"] <= IDLE_TARGET_MIB,
        ),
        Row(
            f"memory, RSS with {result['tasks']:,} active tasks and cards",
            f"{fmt_spread(loaded, 1)} MiB",
            imports,
            f"≤ {LOADED_TARGET_MIB:.0f} MiB, every card sent, no traceback",
            loaded["median"] <= LOADED_TARGET_MIB
            and result["all_cards_delivered"]
            and result["clean_logs"],
        ),
    ]


async def measure(quick: bool, log: Callable[[str], object] = print) -> dict[str, Any]:
    if quick:
        return await run(tasks=100, reps=1, log=log)
    return await run(log=log)
