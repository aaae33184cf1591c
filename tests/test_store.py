"""The SQLite store: migrations, pragmas and the constraints that carry the invariants."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from engine import jobs
from engine.store import MIGRATIONS, Store


async def test_migrations_are_versioned_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with Store(path) as store:
        assert await store.schema_version() == len(MIGRATIONS)
    async with Store(path) as store:  # a second start applies nothing twice
        assert await store.schema_version() == len(MIGRATIONS)
        rows = await store.fetchall("SELECT version FROM schema_version")
        assert [row["version"] for row in rows] == list(range(1, len(MIGRATIONS) + 1))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    assert {
        "tasks",
        "jobs",
        "agent_runs",
        "events",
        "webhook_deliveries",
        "runtime_settings",
    } <= tables


async def _task(conn, tracker: str | None, work_item: str, branch: str) -> int:
    cursor = await conn.execute(
        "INSERT INTO tasks (project, tracker_issue_id, work_item, title, description, stage,"
        " status, branch, created_at, updated_at)"
        " VALUES ('P', ?, ?, 't', 'd', 'analysis', 'active', ?, 0, 0)",
        (tracker, work_item, branch),
    )
    return cursor.lastrowid


async def test_constraints_hold_one_task_per_issue_and_one_active_job(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.sqlite") as store:
        async with store.tx() as conn:
            task_id = await _task(conn, "issue-1", "P-001", "b1")
            assert await jobs.enqueue(conn, task_id, "analysis") is not None
            assert await jobs.enqueue(conn, task_id, "analysis") is None
        for tracker, item, branch in [
            ("issue-1", "P-002", "b2"),
            ("x", "P-001", "b3"),
            ("y", "P-003", "b1"),
        ]:
            with pytest.raises(sqlite3.IntegrityError):
                async with store.tx() as conn:
                    await _task(conn, tracker, item, branch)
        async with store.tx() as conn:  # tasks without a tracker issue do not collide
            await _task(conn, None, "P-004", "b4")
            await _task(conn, None, "P-005", "b5")


async def test_an_expired_lease_is_requeued_and_the_old_owner_cannot_finish(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.sqlite") as store:
        async with store.tx() as conn:
            task_id = await _task(conn, "i", "P-001", "b")
            await jobs.enqueue(conn, task_id, "analysis")
        queue = jobs.JobQueue(store, lease_s=0.01)
        stale = await queue.claim("dead-worker")
        assert stale is not None and stale.claims == 1
        import asyncio

        await asyncio.sleep(0.05)
        assert await queue.recover_expired() == [stale.id]
        fresh = await jobs.JobQueue(store, lease_s=60).claim("new-worker")
        assert fresh.id == stale.id and fresh.claims == 2
        with pytest.raises(jobs.LeaseLost):
            async with store.tx() as conn:
                await jobs.finish(conn, stale, "succeeded")
        async with store.tx() as conn:
            await jobs.finish(conn, fresh, "succeeded")


async def test_delayed_jobs_wait_for_their_time(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.sqlite") as store:
        async with store.tx() as conn:
            task_id = await _task(conn, "i", "P-001", "b")
            await jobs.enqueue(conn, task_id, "analysis", delay_s=3600)
        assert await jobs.JobQueue(store, 60).claim("w") is None


async def test_a_cancelled_transaction_leaves_the_store_usable(tmp_path: Path) -> None:
    import asyncio

    async with Store(tmp_path / "db.sqlite") as store:
        for attempt in range(30):  # cancel at every point of a transaction's life

            async def write() -> None:
                async with store.tx() as conn:
                    await conn.execute("INSERT INTO runtime_settings VALUES ('k', '1', 0)")
                    await asyncio.sleep(0)
                    await conn.execute("DELETE FROM runtime_settings WHERE key = 'k'")

            task = asyncio.create_task(write())
            for _ in range(attempt % 6):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await store.set_setting("mode", "edit")  # would fail inside a leftover transaction
        assert await store.get_setting("mode") == "edit"
        assert await store.fetchall("SELECT * FROM runtime_settings WHERE key = 'k'") == []


async def test_reads_of_one_row_of_many_never_hide_later_commits(tmp_path: Path) -> None:
    async with Store(tmp_path / "c.db") as store:
        for n in range(3):
            await store.set_setting(f"seed{n}", n)
        stop = asyncio.Event()

        async def reader() -> None:  # reads one row of many, as lookups do
            while not stop.is_set():
                await store.fetchone("SELECT key FROM runtime_settings")

        readers = [asyncio.create_task(reader()) for _ in range(2)]
        unseen = 0
        for n in range(200):
            await store.set_setting(f"k{n}", n)
            row = await store.fetchone("SELECT 1 FROM runtime_settings WHERE key = ?", (f"k{n}",))
            unseen += row is None
        stop.set()
        await asyncio.gather(*readers)
        assert unseen == 0


async def test_a_task_rests_only_when_no_job_is_queued_or_running(tmp_path: Path) -> None:
    async with Store(tmp_path / "db.sqlite") as store:
        async with store.tx() as conn:
            task_id = await _task(conn, "issue-1", "P-001", "b1")
            await jobs.enqueue(conn, task_id, "analysis")
        assert await store.resting_task(task_id) is None
        job = await jobs.JobQueue(store, lease_s=30).claim("worker")
        assert await store.resting_task(task_id) is None
        async with store.tx() as conn:
            await jobs.finish(conn, job, "succeeded", None)
        assert (await store.resting_task(task_id)).id == task_id
