"""A tick reads the active tasks only, however many finished or person-held ones are stored."""

from __future__ import annotations

from itertools import cycle, islice

from engine.reconciler import IDLE_ACTIVE_TASKS, TickReport
from engine.runtime import Engine
from engine.stages import Stage, Status
from engine.store import Store, now

ACTIVE = 100
STORED = 10_000
RESTING = (
    Status.DONE,
    Status.CANCELLED,
    Status.ESCALATED,
    Status.FAILED,
    Status.AWAITING_APPROVAL,
    Status.NEEDS_INPUT,
    Status.BLOCKED,
)
STAGES = (Stage.ARCHITECTURE, Stage.DEVELOPMENT, Stage.REVIEW, Stage.TESTING)


async def store_tasks(store: Store, first: int, statuses: list[str]) -> None:
    """Insert tasks numbered from `first` in one transaction, idle for an hour."""
    idle_since = now() - 3600
    rows = [
        (f"ORCH-{n:05d}", f"orch-{n:05d}", stage, status, idle_since)
        for n, stage, status in zip(
            range(first, first + len(statuses)), cycle(STAGES), statuses, strict=False
        )
    ]
    async with store.tx() as conn:
        await conn.executemany(
            "INSERT INTO tasks (project, work_item, title, description, stage, status, branch,"
            " created_at, updated_at) VALUES ('ORCH', ?, 'A task', 'Do it.', ?, ?, ?, ?, ?)",
            [(item, stage, status, branch, at, at) for item, branch, stage, status, at in rows],
        )


async def counted_tick(engine: Engine) -> tuple[TickReport, int]:
    """A tick and the SQLite virtual-machine steps the store's reads took during it (a full
    scan of the tasks table costs several steps per stored row)."""
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    reader = engine.store._reader  # the connection every store read goes through
    await reader.set_progress_handler(step, 1)
    try:
        report = await engine.reconciler.tick()
    finally:
        await reader.set_progress_handler(None, 1)
    return report, steps


async def test_a_tick_over_ten_thousand_tasks_reads_only_the_hundred_active(make_settings) -> None:
    async with Engine(make_settings(reconcile_grace_s=0)) as engine:
        await store_tasks(engine.store, 1, [Status.ACTIVE] * ACTIVE)
        alone, steps_alone = await counted_tick(engine)
        resting = list(islice(cycle(RESTING), STORED - ACTIVE))
        await store_tasks(engine.store, ACTIVE + 1, resting)
        among, steps_among = await counted_tick(engine)

        stored = await engine.store.fetchone("SELECT COUNT(*) AS n FROM tasks")
        assert stored["n"] == STORED
        assert alone.examined == among.examined == ACTIVE
        assert among.errors == 0 and among.unblocked == 0
        # reading 9,900 more rows would at least double the steps of the small store
        assert steps_among < 1.2 * steps_alone, (steps_alone, steps_among)
        plan = await engine.store.fetchall(f"EXPLAIN QUERY PLAN {IDLE_ACTIVE_TASKS}", ("active",))
        details = [row["detail"] for row in plan]
        assert any(d.startswith("SEARCH tasks USING INDEX") for d in details), details
        assert not any(d.startswith("SCAN tasks") for d in details), details
