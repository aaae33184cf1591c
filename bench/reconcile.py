"""Reconciler tick: wall time and rows read with 100 active tasks among 1,000 and 100,000 stored.

The system under test is the real `engine.reconciler` tick on a real `Engine`, over
a SQLite file created by `engine.store.Store` (so the migrations and indexes are
the engine's own) and filled by bulk SQL: `active` tasks in review, status active,
with no job, and the rest done, each with the succeeded jobs of its stages. The
tick reads `tasks` and `jobs` only (a red gate changes nothing), so events, agent
runs and cards are left empty.

Each active task has its worktree checked out (by the engine's `GitWorkspace`, as its
earlier stages would have left it) but no review report, so every gate is red: the
tick examines each task and reads its gate in the worktree, and nothing moves and no
agent runs. Plane is not configured and the grace period is zero, so no guard skips
a task. Both stores share one workdir, so every timed tick finds the same worktrees;
one untimed tick per store comes first.

The baseline is the 1,000-task tick, timed in the same run, in alternating order.
Rows read come from SQLite's own per-statement counters (the `sqlite_stmt`
virtual table: rows stepped in full table scans, virtual-machine steps, statements
run) on both of the store's connections, in one extra tick per store after the
timed ones.
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from bench.common import Row, fmt_spread, spread
from engine.config import Settings
from engine.runtime import Engine
from engine.sandbox.repo import create_sample_remote
from engine.stages import Stage, Status
from engine.store import Store

PROJECT = "BENCH"
TARGET_RATIO = 1.2
DONE_JOB_STAGES = ("analysis", "architecture", "development", "review", "testing", "deploy")
ACTIVE_JOB_STAGES = ("analysis", "architecture", "development", "review")
DESCRIPTION = (
    "As an operator I want the export to include the archived invoices, so that the"
    " quarterly report matches the ledger. Acceptance: the CSV has one row per invoice,"
    " archived ones marked; totals equal the ledger's for the quarter; the export of"
    " 50,000 invoices finishes within the request timeout; nothing else changes."
) * 2
INSERT_TASK = (
    "INSERT INTO tasks (id, project, tracker_issue_id, sequence_id, work_item, title,"
    " description, stage, status, branch, head_sha, merge_sha, created_at, updated_at,"
    " finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_JOB = (
    "INSERT INTO jobs (task_id, stage, state, claims, available_at, created_at, updated_at)"
    " VALUES (?, ?, 'succeeded', 1, ?, ?, ?)"
)
COUNTERS_SQL = "SELECT sql, nscan, nstep, run FROM sqlite_stmt"


# --- the store ---------------------------------------------------------------------------


def work_item(n: int) -> str:
    return f"{PROJECT}-{n}"


def branch(n: int) -> str:
    return f"bench-{n}-export-archived-invoices"


def _task_rows(stored: int, active: int, at: float) -> Iterator[tuple]:
    for n in range(1, stored + 1):
        done = n > active
        created = at - 86_400.0 - (stored - n) * 60.0
        yield (
            n,
            PROJECT,
            f"issue-{n}",
            n,
            work_item(n),
            f"Export archived invoices, part {n}",
            DESCRIPTION,
            Stage.DONE if done else Stage.REVIEW,
            Status.DONE if done else Status.ACTIVE,
            branch(n),
            f"{n:040x}" if done else None,
            f"{n + 1:040x}" if done else None,
            created,
            created + 3_600.0,
            created + 3_600.0 if done else None,
        )


def _job_rows(stored: int, active: int, at: float) -> Iterator[tuple]:
    for n in range(1, stored + 1):
        stages = DONE_JOB_STAGES if n > active else ACTIVE_JOB_STAGES
        for stage in stages:
            yield (n, stage, at, at, at)


def _bulk_insert(db: Path, stored: int, active: int) -> None:
    at = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        with conn:
            conn.executemany(INSERT_TASK, _task_rows(stored, active, at))
            conn.executemany(INSERT_JOB, _job_rows(stored, active, at))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def build_store(db: Path, stored: int, active: int) -> None:
    """A store as the engine creates it, then `stored` tasks of which `active` are in review."""
    async with Store(db):
        pass
    _bulk_insert(db, stored, active)


# --- the engine --------------------------------------------------------------------------


def engine_settings(db: Path, workdir: Path, remote: Path) -> Settings:
    return Settings(
        _env_file=None,
        db_path=db,
        workdir=workdir,
        projects=[{"key": PROJECT, "remote": str(remote)}],
        reconcile_plane_enabled=False,
        reconcile_skip_blocked_enabled=False,
        reconcile_grace_s=0,
    )


@contextlib.asynccontextmanager
async def engines(
    root: Path, sizes: tuple[int, ...], active: int, log: Callable[[str], object]
) -> AsyncIterator[dict[int, Engine]]:
    remote = await create_sample_remote(root / "remote.git")
    opened: dict[int, Engine] = {}
    async with contextlib.AsyncExitStack() as stack:
        for stored in sizes:
            db = root / f"tasks-{stored}.db"
            started = time.monotonic()
            await build_store(db, stored, active)
            took = time.monotonic() - started
            log(f"  reconcile: store of {stored:,} tasks built in {took:.1f} s")
            engine = Engine(engine_settings(db, root / "work", remote))
            opened[stored] = await stack.enter_async_context(engine)
        started = time.monotonic()
        await check_out_worktrees(opened[sizes[0]], remote, active)
        log(f"  reconcile: {active} worktrees checked out in {time.monotonic() - started:.1f} s")
        yield opened


async def check_out_worktrees(engine: Engine, remote: Path, active: int) -> None:
    """The active tasks' worktrees, as their earlier stages left them; both stores share them."""
    for n in range(1, active + 1):
        await engine.git.ensure_worktree(PROJECT, str(remote), "main", branch(n), work_item(n))


# --- one tick ----------------------------------------------------------------------------


@dataclass
class Tick:
    wall_ms: float
    examined: int
    unblocked: int
    started: int
    errors: int
    skipped: dict[str, int]

    @property
    def clean(self) -> bool:
        return not (self.unblocked or self.started or self.errors or self.skipped)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "clean": self.clean}


async def timed_tick(engine: Engine) -> Tick:
    started = time.perf_counter()
    report = await engine.reconciler.tick()
    wall_ms = (time.perf_counter() - started) * 1000.0
    return Tick(
        wall_ms,
        report.examined,
        report.unblocked,
        report.started,
        report.errors,
        dict(report.skipped),
    )


def _connections(store: Store) -> list[aiosqlite.Connection]:
    """The store's reader and writer: the tick reads on the one and records itself on the other."""
    return [conn for conn in (store._reader, store._writer) if conn is not None]


Counts = tuple[int, int, int]  # rows stepped in full scans, VM steps, runs


async def _statement_counters(conn: aiosqlite.Connection) -> dict[str, Counts]:
    totals: dict[str, Counts] = {}
    for sql, nscan, nstep, run in await conn.execute_fetchall(COUNTERS_SQL):
        if "sqlite_stmt" not in sql:
            totals[sql] = _plus(totals.get(sql, (0, 0, 0)), (nscan, nstep, run))
    return totals


def _plus(a: Counts, b: Counts) -> Counts:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _difference(before: dict[str, Counts], after: dict[str, Counts]) -> dict[str, Counts]:
    """What each statement did between two snapshots; a re-prepared one counts from zero."""
    done: dict[str, Counts] = {}
    for sql, counts in after.items():
        previous = before.get(sql, (0, 0, 0))
        if any(now < then for now, then in zip(counts, previous, strict=True)):
            previous = (0, 0, 0)
        if counts[2] > previous[2]:
            done[sql] = (counts[0] - previous[0], counts[1] - previous[1], counts[2] - previous[2])
    return done


def query_plan(db: Path, sql: str) -> list[str]:
    """SQLite's plan for a statement the tick ran; the plan does not depend on bound values."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        nulls = (None,) * sql.count("?")
        return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", nulls)]


async def counted_tick(engine: Engine) -> dict[str, Any]:
    """One tick with SQLite's statement counters read before and after it, on both connections."""
    connections = _connections(engine.store)
    before = [await _statement_counters(conn) for conn in connections]
    tick = await timed_tick(engine)
    after = [await _statement_counters(conn) for conn in connections]
    ran: dict[str, Counts] = {}
    for old, new in zip(before, after, strict=True):
        for sql, counts in _difference(old, new).items():
            ran[sql] = _plus(ran.get(sql, (0, 0, 0)), counts)
    total = (0, 0, 0)
    for counts in ran.values():
        total = _plus(total, counts)
    heaviest = max(ran, key=lambda sql: ran[sql][1])
    return {
        "full_scan_rows": total[0],
        "vm_steps": total[1],
        "statements": total[2],
        "examined": tick.examined,
        "heaviest": {
            "sql": heaviest,
            "full_scan_rows": ran[heaviest][0],
            "vm_steps": ran[heaviest][1],
            "runs": ran[heaviest][2],
            "plan": query_plan(engine.settings.db_path, heaviest),
        },
    }


# --- the benchmark -----------------------------------------------------------------------


async def run(
    sizes: tuple[int, int] = (1_000, 100_000),
    active: int = 100,
    reps: int = 21,
    log: Callable[[str], object] = print,
) -> dict[str, Any]:
    small, large = sizes
    walls: dict[int, list[float]] = {small: [], large: []}
    ticks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-reconcile-") as tmp:
        root = Path(tmp)
        async with engines(root, sizes, active, log) as opened:
            for stored in sizes:
                warm = await timed_tick(opened[stored])
                log(f"  reconcile: untimed first tick over {stored:,} {warm.wall_ms:.0f} ms")
            for rep in range(reps):
                order = sizes if rep % 2 == 0 else sizes[::-1]
                for stored in order:
                    tick = await timed_tick(opened[stored])
                    walls[stored].append(tick.wall_ms)
                    ticks.append({"stored": stored, "rep": rep, **tick.as_dict()})
                log(
                    f"  reconcile rep {rep + 1}/{reps}: {small:,} stored"
                    f" {walls[small][-1]:.1f} ms, {large:,} stored {walls[large][-1]:.1f} ms"
                )
            counted = {stored: await counted_tick(opened[stored]) for stored in sizes}
    for stored in sizes:
        c = counted[stored]
        log(
            f"  reconcile {stored:,} stored: {c['full_scan_rows']:,} rows in full scans,"
            f" {c['vm_steps']:,} VM steps, {c['statements']} statements; heaviest"
            f" {c['heaviest']['vm_steps']:,} VM steps: {' / '.join(c['heaviest']['plan'])}"
        )
    ratios = [b / a for a, b in zip(walls[small], walls[large], strict=True)]
    return {
        "sizes": list(sizes),
        "active": active,
        "small_ms": spread(walls[small]),
        "large_ms": spread(walls[large]),
        "ratio": spread(ratios),
        "rows_read": {str(stored): counted[stored] for stored in sizes},
        "ticks": ticks,
        "all_clean": all(t["clean"] and t["examined"] == active for t in ticks),
    }


def rows(result: dict[str, Any]) -> list[Row]:
    small, large = result["sizes"]
    active = result["active"]
    ratio = result["ratio"]
    read = {int(k): v for k, v in result["rows_read"].items()}
    met = ratio["median"] <= TARGET_RATIO and result["all_clean"]
    return [
        Row(
            f"reconciler tick, {active} active / {small:,} stored",
            f"{fmt_spread(result['small_ms'], 1)} ms",
            "(baseline)",
            "—",
            None,
        ),
        Row(
            f"reconciler tick, {active} active / {large:,} stored",
            f"{fmt_spread(result['large_ms'], 1)} ms",
            f"{small:,} stored {result['small_ms']['median']:.1f} ms",
            f"≤ {TARGET_RATIO} × baseline",
            met,
        ),
        Row(
            f"reconciler tick, ratio {large:,} / {small:,}",
            fmt_spread(ratio, 2),
            "1.00",
            f"≤ {TARGET_RATIO}",
            met,
        ),
        Row(
            "reconciler tick, rows stepped in full scans / VM steps",
            f"{read[large]['full_scan_rows']:,} / {read[large]['vm_steps']:,}",
            f"{small:,} stored {read[small]['full_scan_rows']:,} / {read[small]['vm_steps']:,}",
            "—",
            None,
        ),
    ]


async def measure(quick: bool, log: Callable[[str], object] = print) -> dict[str, Any]:
    if quick:
        return await run(sizes=(1_000, 10_000), active=100, reps=5, log=log)
    return await run(log=log)
