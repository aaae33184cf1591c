"""Durable job queue and the worker that drains it.

Jobs are at-least-once: a claimed job carries a lease its runner renews; a job
whose lease expired (its process died) is found and queued again. Terminal
writes are conditional on the claim (``state = 'running' AND owner = ?``), so a
runner that lost its lease cannot overwrite the rescued attempt; the pipeline
makes those writes in the same transaction as the transition they belong to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import aiosqlite

from engine.store import Job, Store, _build, now

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")


class LeaseLost(Exception):
    """The job is no longer ours (its lease expired and it was claimed again)."""


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def backoff_delay(base_s: float, failures: int) -> float:
    """Exponential backoff: base, 2×base, 4×base … capped at one hour."""
    return min(base_s * 2 ** max(failures - 1, 0), 3600.0)


async def enqueue(
    conn: aiosqlite.Connection, task_id: int, stage: str, delay_s: float = 0.0
) -> int | None:
    """Queue a job for the task inside the caller's transaction.

    Returns the job id, or None when the task already has a queued or running job
    (the partial unique index decides, not a read before the write).
    """
    at = now()
    cursor = await conn.execute(
        "INSERT INTO jobs (task_id, stage, state, available_at, created_at, updated_at)"
        " VALUES (?, ?, 'queued', ?, ?, ?)"
        " ON CONFLICT (task_id) WHERE state IN ('queued', 'running') DO NOTHING"
        " RETURNING id",
        (task_id, stage, at + delay_s, at, at),
    )
    row = await cursor.fetchone()
    return None if row is None else int(row[0])


async def finish(
    conn: aiosqlite.Connection, job: Job, state: str, error: str | None = None
) -> None:
    """Close a claimed job; raises LeaseLost when someone else holds it now."""
    cursor = await conn.execute(
        "UPDATE jobs SET state = ?, last_error = COALESCE(?, last_error), lease_until = NULL,"
        " updated_at = ?"
        " WHERE id = ? AND state = 'running' AND owner = ?",
        (state, error, now(), job.id, job.owner),
    )
    if cursor.rowcount != 1:
        raise LeaseLost(f"job {job.id} is no longer held by {job.owner}")


async def requeue(
    conn: aiosqlite.Connection, job: Job, delay_s: float, error: str | None, count_failure: bool
) -> None:
    """Put a claimed job back in the queue to run again after `delay_s`."""
    cursor = await conn.execute(
        "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL,"
        " failures = failures + ?, available_at = ?, last_error = ?, updated_at = ?"
        " WHERE id = ? AND state = 'running' AND owner = ?",
        (1 if count_failure else 0, now() + delay_s, error, now(), job.id, job.owner),
    )
    if cursor.rowcount != 1:
        raise LeaseLost(f"job {job.id} is no longer held by {job.owner}")


async def set_checkpoint(store: Store, job: Job, checkpoint: str) -> Job:
    """Record durably how far the claimed job got; raises LeaseLost when it is not ours."""
    async with store.tx() as conn:
        cursor = await conn.execute(
            "UPDATE jobs SET checkpoint = ?, updated_at = ?"
            " WHERE id = ? AND state = 'running' AND owner = ?",
            (checkpoint, now(), job.id, job.owner),
        )
        if cursor.rowcount != 1:
            raise LeaseLost(f"job {job.id} is no longer held by {job.owner}")
    return replace(job, checkpoint=checkpoint)


class JobQueue:
    def __init__(self, store: Store, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s

    async def claim(self, owner: str) -> Job | None:
        """Atomically take the oldest due job, or None."""
        at = now()
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET state = 'running', owner = ?, lease_until = ?,"
                " claims = claims + 1, updated_at = ?"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND available_at <= ?"
                "             ORDER BY available_at, id LIMIT 1)"
                " RETURNING *",
                (owner, at + self.lease_s, at, at),
            )
            row = await cursor.fetchone()
        return _build(Job, row)

    async def renew(self, job: Job) -> bool:
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ?"
                " WHERE id = ? AND state = 'running' AND owner = ?",
                (now() + self.lease_s, now(), job.id, job.owner),
            )
            return cursor.rowcount == 1

    async def recover_expired(self) -> list[int]:
        """Queue again every running job whose lease expired; stop their orphaned agents."""
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL,"
                " available_at = ?, updated_at = ?"
                " WHERE state = 'running' AND lease_until < ? RETURNING id",
                (now(), now(), now()),
            )
            recovered = [int(row[0]) for row in await cursor.fetchall()]
            if not recovered:
                return []
            marks = ",".join("?" for _ in recovered)
            cursor = await conn.execute(
                f"UPDATE agent_runs SET finished_at = ?, ok = 0,"
                f" error = 'interrupted: the worker running it stopped'"
                f" WHERE finished_at IS NULL AND job_id IN ({marks}) RETURNING pid",
                (now(), *recovered),
            )
            orphans = [row[0] for row in await cursor.fetchall() if row[0]]
        for pid in orphans:
            _kill_orphan_group(pid)
        log.warning("requeued %d job(s) whose lease expired: %s", len(recovered), recovered)
        return recovered

    async def requeue_own(self, owner: str) -> None:
        """On a clean stop, hand this worker's running jobs back to the queue at once."""
        async with self.store.tx() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL,"
                " available_at = ?, updated_at = ? WHERE state = 'running' AND owner = ?"
                " RETURNING id",
                (now(), now(), owner),
            )
            for (job_id,) in await cursor.fetchall():
                await conn.execute(
                    "UPDATE agent_runs SET finished_at = ?, ok = 0, error = 'interrupted: shutdown'"
                    " WHERE finished_at IS NULL AND job_id = ?",
                    (now(), job_id),
                )

    async def close_failed(self, job: Job, error: str) -> None:
        """Mark a claimed job failed on its own, without touching its task."""
        with contextlib.suppress(LeaseLost):
            async with self.store.tx() as conn:
                await finish(conn, job, "failed", error)

    async def counts(self) -> dict[str, int]:
        rows = await self.store.fetchall("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {row["state"]: int(row["n"]) for row in rows}


def _kill_orphan_group(pid: int) -> None:
    """Kill an agent left behind by a dead worker, if its process group still exists."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


JobHandler = Callable[[Job], Awaitable[None]]
CrashHandler = Callable[[Job, BaseException], Awaitable[None]]


class Worker:
    """Claims due jobs and runs them, at most `concurrency` at a time."""

    def __init__(
        self,
        queue: JobQueue,
        handler: JobHandler,
        on_crash: CrashHandler,
        concurrency: int,
        poll_s: float = 0.5,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.on_crash = on_crash
        self.concurrency = concurrency
        self.poll_s = poll_s
        self.owner = new_owner_id()
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        await self.queue.recover_expired()
        while not self._stopping:
            claimed = await self._fill_slots()
            if not claimed:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                await self.queue.recover_expired()

    async def _fill_slots(self) -> bool:
        claimed = False
        while len(self._running) < self.concurrency and not self._stopping:
            job = await self.queue.claim(self.owner)
            if job is None:
                break
            claimed = True
            task = asyncio.create_task(self._run_one(job), name=f"job-{job.id}")
            self._running.add(task)
            task.add_done_callback(self._on_done)
        return claimed

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self.wake()

    async def _run_one(self, job: Job) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job))
        try:
            await self.handler(job)
        except LeaseLost as error:
            log.warning("%s", error)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("job %s (task %s, %s) crashed", job.id, job.task_id, job.stage)
            await self._handle_crash(job, error)
        finally:
            heartbeat.cancel()

    async def _handle_crash(self, job: Job, error: Exception) -> None:
        """Let `on_crash` settle the job; if it fails too, close the job so it cannot loop."""
        try:
            await self.on_crash(job, error)
        except LeaseLost as lost:
            log.warning("%s", lost)
        except Exception:
            log.exception("the crash handler of job %s failed; closing the job", job.id)
            await self.queue.close_failed(job, f"crash handler failed after: {error!r}")

    async def _heartbeat(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self.queue.lease_s / 3)
            if not await self.queue.renew(job):
                log.warning("job %s lost its lease", job.id)
                return

    async def stop(self) -> None:
        """Stop claiming, cancel running jobs (their agents are killed) and requeue them."""
        self._stopping = True
        self.wake()
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await self.queue.requeue_own(self.owner)
