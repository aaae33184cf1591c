"""SQLite state: schema, migrations and the queries the engine runs.

One writer connection behind a lock, every write transaction opened with
``BEGIN IMMEDIATE`` (a deferred BEGIN that later writes can fail with
SQLITE_BUSY regardless of busy_timeout), and a separate reader connection that
sees only committed rows (WAL). Uniqueness lives in constraints, not in
read-then-write code.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import aiosqlite

BUSY_TIMEOUT_MS = 10_000

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            project TEXT NOT NULL,
            tracker_issue_id TEXT,
            sequence_id INTEGER,
            work_item TEXT NOT NULL,
            title TEXT NOT NULL,
            description TEXT NOT NULL,
            stage TEXT NOT NULL,
            status TEXT NOT NULL,
            status_reason TEXT,
            developer_retries INTEGER NOT NULL DEFAULT 0,
            branch TEXT NOT NULL,
            head_sha TEXT,
            merge_sha TEXT,
            feedback_stage TEXT,
            feedback_kind TEXT,
            feedback_source TEXT,
            feedback_text TEXT,
            feedback_report TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL,
            UNIQUE (project, tracker_issue_id),
            UNIQUE (project, work_item),
            UNIQUE (project, branch)
        )""",
        "CREATE INDEX tasks_status ON tasks (status, stage)",
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            task_id INTEGER NOT NULL REFERENCES tasks (id),
            stage TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            claims INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            available_at REAL NOT NULL,
            lease_until REAL,
            owner TEXT,
            last_error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        # at most one queued-or-running job per task
        """CREATE UNIQUE INDEX jobs_one_active_per_task ON jobs (task_id)
            WHERE state IN ('queued', 'running')""",
        "CREATE INDEX jobs_ready ON jobs (state, available_at)",
        """CREATE TABLE agent_runs (
            id INTEGER PRIMARY KEY,
            task_id INTEGER NOT NULL REFERENCES tasks (id),
            job_id INTEGER REFERENCES jobs (id),
            stage TEXT NOT NULL,
            role TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            duration_s REAL,
            pid INTEGER,
            exit_code INTEGER,
            timed_out INTEGER,
            ok INTEGER,
            error TEXT,
            input_tokens INTEGER,
            output_tokens INTEGER,
            cache_read_tokens INTEGER,
            cache_creation_tokens INTEGER,
            cost_usd REAL,
            model TEXT,
            model_usage TEXT,
            log_path TEXT,
            prompt_path TEXT
        )""",
        "CREATE INDEX agent_runs_task ON agent_runs (task_id, id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            task_id INTEGER REFERENCES tasks (id),
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT,
            detail TEXT,
            actor TEXT
        )""",
        "CREATE INDEX events_task ON events (task_id, id)",
        """CREATE TABLE webhook_deliveries (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            delivery_id TEXT,
            content_key TEXT,
            event TEXT,
            received_at REAL NOT NULL,
            processed_at REAL,
            payload BLOB,
            UNIQUE (source, delivery_id),
            UNIQUE (source, content_key)
        )""",
        """CREATE TABLE runtime_settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ),
    (
        # one live card per task: the row is the task's pointer to its message
        """CREATE TABLE cards (
            task_id INTEGER PRIMARY KEY REFERENCES tasks (id),
            chat_id INTEGER NOT NULL,
            message_id INTEGER,
            render_hash TEXT,
            updated_at REAL NOT NULL
        )""",
        # a ForceReply prompt waiting for a person's answer (a reject reason, a description)
        """CREATE TABLE pending_replies (
            chat_id INTEGER NOT NULL,
            prompt_message_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            kind TEXT NOT NULL,
            task_id INTEGER REFERENCES tasks (id),
            payload TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (chat_id, prompt_message_id)
        )""",
    ),
    (
        "ALTER TABLE tasks ADD COLUMN pr_number INTEGER",
        "ALTER TABLE tasks ADD COLUMN pr_url TEXT",
        "ALTER TABLE webhook_deliveries ADD COLUMN outcome TEXT",
        "CREATE INDEX tasks_head ON tasks (project, head_sha)",
        "CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (processed_at)",
        # how far the tracker and forge have been told about each task (outbound sync)
        """CREATE TABLE tracker_sync (
            task_id INTEGER PRIMARY KEY REFERENCES tasks (id),
            event_id INTEGER NOT NULL DEFAULT 0,
            run_id INTEGER NOT NULL DEFAULT 0,
            summary_posted INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL DEFAULT 0,
            last_error TEXT,
            updated_at REAL NOT NULL
        )""",
    ),
    (
        # one merge at a time per repository: the lease names its holder and when it was taken
        """CREATE TABLE merge_leases (
            repo TEXT PRIMARY KEY,
            task_id INTEGER NOT NULL REFERENCES tasks (id),
            acquired_at REAL NOT NULL,
            fence INTEGER NOT NULL
        )""",
        "CREATE INDEX merge_leases_task ON merge_leases (task_id)",
        # the head the merge gate re-tested: the only commit that may be merged
        "ALTER TABLE tasks ADD COLUMN tested_sha TEXT",
    ),
    (
        # how far a job got in a step that must not run twice ("merging": the deployer's
        # verdict was green and the merge began), so a rerun resumes there
        "ALTER TABLE jobs ADD COLUMN checkpoint TEXT",
    ),
)


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class Task:
    id: int
    project: str
    tracker_issue_id: str | None
    sequence_id: int | None
    work_item: str
    title: str
    description: str
    stage: str
    status: str
    status_reason: str | None
    developer_retries: int
    branch: str
    head_sha: str | None
    merge_sha: str | None
    feedback_stage: str | None
    feedback_kind: str | None
    feedback_source: str | None
    feedback_text: str | None
    feedback_report: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    pr_number: int | None
    pr_url: str | None
    tested_sha: str | None

    @property
    def state(self) -> str:
        return f"{self.stage}/{self.status}"


@dataclass(frozen=True)
class Job:
    id: int
    task_id: int
    stage: str
    state: str
    claims: int
    failures: int
    available_at: float
    lease_until: float | None
    owner: str | None
    last_error: str | None
    created_at: float
    updated_at: float
    checkpoint: str | None


@dataclass(frozen=True)
class Event:
    id: int
    task_id: int | None
    at: float
    kind: str
    from_state: str | None
    to_state: str | None
    detail: str | None
    actor: str | None


@dataclass(frozen=True)
class AgentRun:
    id: int
    task_id: int
    job_id: int | None
    stage: str
    role: str
    attempt: int
    started_at: float
    finished_at: float | None
    duration_s: float | None
    pid: int | None
    exit_code: int | None
    timed_out: int | None
    ok: int | None
    error: str | None
    input_tokens: int | None
    output_tokens: int | None
    cache_read_tokens: int | None
    cache_creation_tokens: int | None
    cost_usd: float | None
    model: str | None
    model_usage: str | None
    log_path: str | None
    prompt_path: str | None

    @property
    def full_input(self) -> int | None:
        parts = (self.input_tokens, self.cache_read_tokens, self.cache_creation_tokens)
        return None if all(p is None for p in parts) else sum(p or 0 for p in parts)


def _build(cls: type, row: aiosqlite.Row | None) -> Any:
    if row is None:
        return None
    return cls(**{f.name: row[f.name] for f in fields(cls)})


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> Store:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._migrate()
        self._reader = await self._connect()
        return self

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA synchronous=FULL")
        return conn

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _migrate(self) -> None:
        async with self.tx() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            cursor = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            (current,) = await cursor.fetchone()
            for version, statements in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, now()),
                )

    async def schema_version(self) -> int:
        row = await self.fetchone("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
        return int(row["v"])

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: serialised in-process by the lock, across processes by SQLite."""
        assert self._writer is not None, "store is not open"
        async with self._lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                yield self._writer
            except BaseException:
                await asyncio.shield(self._rollback())
                raise
            try:
                await asyncio.shield(self._writer.execute("COMMIT"))
            except asyncio.CancelledError:
                raise
            except BaseException:
                await asyncio.shield(self._rollback())
                raise

    async def _rollback(self) -> None:
        """Roll back whatever transaction is open, even one whose BEGIN was cancelled mid-way.

        aiosqlite runs statements in order on one thread, so a statement queued now runs
        after a cancelled BEGIN has finished; only then is `in_transaction` reliable.
        """
        assert self._writer is not None
        await self._writer.execute("SELECT 1")
        if self._writer.in_transaction:
            await self._writer.execute("ROLLBACK")

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """Every row, read in one step on the reader's thread. Reads that interleave on the
        one reader connection (a cursor left open between awaits) share a read snapshot,
        and a read could then miss a commit that finished before it began."""
        assert self._reader is not None, "store is not open"
        return list(await self._reader.execute_fetchall(sql, params))

    # --- tasks -----------------------------------------------------------------------------

    async def get_task(self, task_id: int) -> Task | None:
        return _build(Task, await self.fetchone("SELECT * FROM tasks WHERE id = ?", (task_id,)))

    async def find_task(self, ref: str) -> Task | None:
        """A task by numeric id or by work item id (case-insensitive)."""
        if ref.isdigit():
            return await self.get_task(int(ref))
        row = await self.fetchone(
            "SELECT * FROM tasks WHERE work_item = ? COLLATE NOCASE ORDER BY id LIMIT 1", (ref,)
        )
        return _build(Task, row)

    async def task_by_tracker_issue(self, project: str, tracker_issue_id: str) -> Task | None:
        row = await self.fetchone(
            "SELECT * FROM tasks WHERE project = ? AND tracker_issue_id = ?",
            (project, tracker_issue_id),
        )
        return _build(Task, row)

    async def list_tasks(self, statuses: Iterable[str] | None = None) -> list[Task]:
        if statuses is None:
            rows = await self.fetchall("SELECT * FROM tasks ORDER BY id")
        else:
            wanted = list(statuses)
            marks = ",".join("?" for _ in wanted)
            rows = await self.fetchall(
                f"SELECT * FROM tasks WHERE status IN ({marks}) ORDER BY id", wanted
            )
        return [_build(Task, row) for row in rows]

    async def resting_task(self, task_id: int) -> Task | None:
        """The task while it has no queued or running job, else None; one statement, so the
        row and the jobs are read in one snapshot (a transition that finishes a job and
        moves the task in between cannot be half seen)."""
        row = await self.fetchone(
            "SELECT * FROM tasks WHERE id = ? AND NOT EXISTS (SELECT 1 FROM jobs"
            " WHERE jobs.task_id = tasks.id AND jobs.state IN ('queued', 'running'))",
            (task_id,),
        )
        return _build(Task, row)

    async def has_active_job(self, task_id: int) -> bool:
        row = await self.fetchone(
            "SELECT 1 FROM jobs WHERE task_id = ? AND state IN ('queued', 'running')", (task_id,)
        )
        return row is not None

    async def active_jobs(self) -> list[aiosqlite.Row]:
        """Queued and running jobs with their task's work item, oldest first."""
        return await self.fetchall(
            "SELECT jobs.id, jobs.stage, jobs.state, jobs.available_at, jobs.failures,"
            " jobs.created_at, tasks.work_item FROM jobs JOIN tasks ON tasks.id = jobs.task_id"
            " WHERE jobs.state IN ('queued', 'running') ORDER BY jobs.id"
        )

    # --- events ----------------------------------------------------------------------------

    @staticmethod
    async def add_event(
        conn: aiosqlite.Connection,
        task_id: int | None,
        kind: str,
        from_state: str | None = None,
        to_state: str | None = None,
        detail: str | None = None,
        actor: str | None = None,
    ) -> int:
        cursor = await conn.execute(
            "INSERT INTO events (task_id, at, kind, from_state, to_state, detail, actor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (task_id, now(), kind, from_state, to_state, detail, actor),
        )
        return int(cursor.lastrowid)

    async def latest_event_id(self, task_id: int) -> int:
        """The task's version: the id of its newest event (0 before any)."""
        row = await self.fetchone(
            "SELECT COALESCE(MAX(id), 0) AS v FROM events WHERE task_id = ?", (task_id,)
        )
        return int(row["v"])

    async def events(self, task_id: int) -> list[Event]:
        rows = await self.fetchall("SELECT * FROM events WHERE task_id = ? ORDER BY id", (task_id,))
        return [_build(Event, row) for row in rows]

    # --- agent runs ------------------------------------------------------------------------

    async def agent_runs(self, task_id: int) -> list[AgentRun]:
        rows = await self.fetchall(
            "SELECT * FROM agent_runs WHERE task_id = ? ORDER BY id", (task_id,)
        )
        return [_build(AgentRun, row) for row in rows]

    async def unfinished_runs(self) -> list[AgentRun]:
        rows = await self.fetchall("SELECT * FROM agent_runs WHERE finished_at IS NULL")
        return [_build(AgentRun, row) for row in rows]

    # --- runtime settings ------------------------------------------------------------------

    async def get_setting(self, key: str) -> Any:
        row = await self.fetchone("SELECT value FROM runtime_settings WHERE key = ?", (key,))
        return None if row is None else json.loads(row["value"])

    async def set_setting(self, key: str, value: Any) -> None:
        async with self.tx() as conn:
            await conn.execute(
                "INSERT INTO runtime_settings (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, json.dumps(value), now()),
            )


def is_unique_violation(error: sqlite3.IntegrityError, *columns: str) -> bool:
    """True when the IntegrityError is a UNIQUE failure on exactly these columns."""
    message = str(error)
    if not message.startswith("UNIQUE constraint failed"):
        return False
    failed = {part.strip().split(".")[-1] for part in message.split(":", 1)[1].split(",")}
    return failed == set(columns)
