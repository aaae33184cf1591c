"""The reconciler: lost webhooks never leave a task stuck, and stopped tasks stay stopped.

The tracker side and the whole stack live in test_reconciler_board.py and
test_reconciler_bounce.py; the scale test in test_reconciler_scale.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from bot.cards import clock
from bot.telegram import TelegramConsole
from engine.api import add_routes
from engine.config import Settings
from engine.jobs import JobQueue
from engine.reconciler import TICK_SETTING
from engine.runtime import Engine
from engine.sandbox.telegram import SandboxMessage, TelegramSandbox
from engine.stages import Stage, Status
from engine.store import Task
from tests.conftest import HANG_GUARD_S, settle, start
from tests.test_telegram import ADMIN, CHAT, TOKEN, console_settings

NOT_POLLING = ("getUpdates", "getMe", "setMyCommands", "deleteWebhook")
RECONCILER_LINE = "moved on by the reconciler"


def telegram_traffic(sandbox: TelegramSandbox) -> int:
    return len([call for call in sandbox.calls if call.method not in NOT_POLLING])


def cards_of(sandbox: TelegramSandbox, task: Task) -> list[SandboxMessage]:
    return [m for m in sandbox.messages(CHAT) if m.text.startswith(task.work_item + " ")]


def local_ci(tmp_path: Path) -> tuple[list[dict], Path]:
    """A project whose CI (its check command) is green once the returned file exists."""
    flag = tmp_path / "ci-green"
    check = [
        sys.executable,
        "-c",
        f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)",
    ]
    return [{"key": "ORCH", "remote": str(tmp_path / "remote.git"), "check_command": check}], flag


@contextlib.asynccontextmanager
async def console_engine(settings: Settings) -> AsyncIterator[tuple[Engine, TelegramConsole]]:
    """The engine with its Telegram console and worker running, as `conveyor run` has them."""
    engine = Engine(settings)
    console = TelegramConsole(settings, engine)
    engine.use_notifier(console.notifier)
    async with engine:
        await console.start()
        engine.start_worker()
        try:
            yield engine, console
        finally:
            await console.stop()


async def approve_when_ready(engine: Engine, task_id: int) -> None:
    async def loop() -> None:
        while (await engine.store.get_task(task_id)).status != Status.AWAITING_APPROVAL:
            await asyncio.sleep(0.05)
        await engine.pipeline.approve(task_id, actor="test")

    await asyncio.wait_for(loop(), HANG_GUARD_S)


async def idle_in_development(engine: Engine) -> Task:
    """A task approved by a person and resting in development, its CI red."""
    task = await start(engine)
    await approve_when_ready(engine, task.id)
    task = await settle(engine, task.id)
    assert (task.stage, task.status) == (Stage.DEVELOPMENT, Status.ACTIVE)
    return task


async def test_an_escalated_task_stays_still_over_a_hundred_ticks(make_settings, agent_env) -> None:
    """The bounce incident: CI green, a reviewer that always requests changes, the cap reached."""
    agent_env(reviewer="negative")
    async with TelegramSandbox(TOKEN, group_per_minute=6000) as sandbox:
        settings = console_settings(make_settings, sandbox, reconcile_grace_s=0)
        async with console_engine(settings) as (engine, console):
            task = await start(engine)
            await approve_when_ready(engine, task.id)
            task = await settle(engine, task.id)
            assert task.status == Status.ESCALATED
            await console.publisher.idle()
            runs = len(await engine.store.agent_runs(task.id))
            events = len(await engine.store.events(task.id))
            calls = telegram_traffic(sandbox)

            reports = [await engine.reconciler.tick() for _ in range(100)]

            await console.publisher.idle()
            assert len(await engine.store.agent_runs(task.id)) == runs
            assert len(await engine.store.events(task.id)) == events
            assert telegram_traffic(sandbox) == calls
            assert all(r.examined == 0 and r.unblocked == 0 for r in reports)


async def test_a_red_gate_changes_nothing_and_a_green_one_advances_once(
    make_settings, notifier, agent_env, tmp_path
) -> None:
    projects, flag = local_ci(tmp_path)
    engine = Engine(make_settings(projects=projects, reconcile_grace_s=0), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)
        assert (task.stage, task.status) == (Stage.DEVELOPMENT, Status.ACTIVE)
        events = len(await engine.store.events(task.id))
        changes = len(notifier.changed)
        for _ in range(5):
            assert (await engine.reconciler.tick()).unblocked == 0
        assert len(await engine.store.events(task.id)) == events
        assert len(notifier.changed) == changes  # no notification, so no card edit

        flag.write_text("green")
        reports = [await engine.reconciler.tick() for _ in range(3)]
        assert [r.unblocked for r in reports] == [1, 0, 0]
        task = await settle(engine, task.id)
        assert task.status == Status.DONE
        by_reconciler = [e for e in await engine.store.events(task.id) if e.actor == "reconciler"]
        assert len(by_reconciler) == 1 and by_reconciler[0].to_state == "review/active"


async def test_the_card_is_edited_silently_to_say_the_reconciler_moved_the_task(
    make_settings, agent_env, tmp_path
) -> None:
    projects, flag = local_ci(tmp_path)
    async with TelegramSandbox(TOKEN, group_per_minute=6000) as sandbox:
        settings = console_settings(make_settings, sandbox, projects=projects, reconcile_grace_s=0)
        async with console_engine(settings) as (engine, console):
            task = await idle_in_development(engine)
            await console.publisher.idle()
            (card,) = cards_of(sandbox, task)
            seen = len(sandbox.calls)

            flag.write_text("green")
            assert (await engine.reconciler.tick()).unblocked == 1

            def said_by_an_edit() -> bool:
                return any(
                    call.method == "editMessageText"
                    and call.params.get("message_id") == card.message_id
                    and RECONCILER_LINE in call.params.get("text", "")
                    for call in sandbox.calls[seen:]
                )

            await sandbox.wait_for(said_by_an_edit, HANG_GUARD_S)
            assert [m.message_id for m in cards_of(sandbox, task)] == [card.message_id]
            assert card.disable_notification


async def test_the_grace_and_its_per_stage_override_decide_when_a_task_is_touched(
    make_settings, notifier, agent_env, tmp_path
) -> None:
    projects, flag = local_ci(tmp_path)
    graces = [
        ({"reconcile_grace_s": 3600}, "grace"),
        ({"reconcile_grace_s": 0, "reconcile_stage_grace_s": {"development": 3600}}, "grace"),
        ({"reconcile_grace_s": 3600, "reconcile_stage_grace_s": {"review": 0}}, "grace"),
        ({"reconcile_grace_s": 3600, "reconcile_stage_grace_s": {"development": 0}}, None),
    ]
    engine = Engine(make_settings(projects=projects), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)
    flag.write_text("green")
    for overrides, skipped in graces:  # the process started again with each setting
        async with Engine(make_settings(projects=projects, **overrides)) as restarted:
            report = await restarted.reconciler.tick()
        assert report.examined == 1
        assert (report.skipped["grace"], report.unblocked) == ((1, 0) if skipped else (0, 1))
    async with Engine(make_settings(projects=projects)) as engine:
        assert (await engine.store.get_task(task.id)).stage == Stage.REVIEW


async def test_a_task_without_its_worktree_is_skipped_and_nothing_is_created(
    make_settings, notifier, agent_env, tmp_path
) -> None:
    """The pre-evaluation is read-only: no clone, no worktree, no branch checkout."""
    projects, flag = local_ci(tmp_path)
    engine = Engine(make_settings(projects=projects, reconcile_grace_s=0), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)
        worktree = engine.git.worktree_dir("ORCH", task.work_item)
        shutil.rmtree(worktree)
        flag.write_text("green")
        events = len(await engine.store.events(task.id))

        report = await engine.reconciler.tick()

        assert report.examined == 1 and report.unblocked == 0 and report.errors == 0
        assert not worktree.exists()
        assert len(await engine.store.events(task.id)) == events


async def test_expired_leases_are_recovered_before_the_first_tick(make_settings) -> None:
    async with Engine(make_settings(reconcile_interval_s=3600)) as engine:
        task = await start(engine)
        orphan = await JobQueue(engine.store, lease_s=0).claim("a-worker-that-died")
        assert orphan is not None and orphan.task_id == task.id
        await engine.start_reconciler()
        try:

            async def first_tick() -> dict:
                while (tick := await engine.store.get_setting(TICK_SETTING)) is None:
                    await asyncio.sleep(0.05)
                return tick

            tick = await asyncio.wait_for(first_tick(), HANG_GUARD_S)
        finally:
            engine.reconciler.stop()
        job = await engine.store.fetchone("SELECT * FROM jobs WHERE id = ?", (orphan.id,))
        assert job["state"] == "queued" and job["owner"] is None
        assert job["updated_at"] <= tick["at"]


async def test_the_scheduler_ticks_and_records_the_last_tick(make_settings, agent_env) -> None:
    async with Engine(make_settings(reconcile_interval_s=0.2)) as engine:
        await engine.start_reconciler()
        try:

            async def ticked() -> dict:
                while (tick := await engine.store.get_setting(TICK_SETTING)) is None:
                    await asyncio.sleep(0.05)
                return tick

            tick = await asyncio.wait_for(ticked(), HANG_GUARD_S)
            assert {"at", "duration_s", "examined", "unblocked", "skipped", "errors"} <= set(tick)
        finally:
            engine.reconciler.stop()


async def test_the_kill_switch_leaves_the_scheduler_off(make_settings) -> None:
    async with Engine(make_settings(reconcile_enabled=False)) as engine:
        await engine.start_reconciler()
        assert engine.reconciler.scheduler is None


async def metrics(engine: Engine) -> str:
    app = web.Application()
    add_routes(app, engine)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            return await response.text()
    finally:
        await runner.cleanup()


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name + labels) + r" (\S+)$"
    found = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
    return found[0] if found else 0.0


async def test_queue_shows_the_last_tick_and_metrics_count_it(
    make_settings, agent_env, tmp_path
) -> None:
    projects, _ = local_ci(tmp_path)
    async with TelegramSandbox(TOKEN, group_per_minute=6000) as sandbox:
        settings = console_settings(
            make_settings,
            sandbox,
            projects=projects,
            reconcile_grace_s=0,
            reconcile_stage_grace_s={"development": 3600},
        )
        async with console_engine(settings) as (engine, _):
            await idle_in_development(engine)
            before = await metrics(engine)
            report = await engine.reconciler.tick()
            after = await metrics(engine)

            sandbox.send_user_message(CHAT, ADMIN, "/queue")
            await sandbox.wait_for(
                lambda: any(m.text.startswith("Queue") for m in sandbox.messages(CHAT))
            )
            queue = next(m for m in sandbox.messages(CHAT) if m.text.startswith("Queue"))
            line = next(row for row in queue.text.splitlines() if row.startswith("Reconciler"))
            assert line.startswith(f"Reconciler: {clock(report.at)} · ")
            for shown in ("s · examined 1", "unblocked 0", "grace 1", "errors 0"):
                assert shown in line, line

    def grew(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    assert grew("conveyor_reconciler_ticks_total") == 1
    assert grew("conveyor_reconciler_examined_total") == 1
    assert grew("conveyor_reconciler_skipped_total", '{guard="grace"}') == 1
    assert grew("conveyor_reconciler_unblocked_total") == 0
    assert grew("conveyor_reconciler_errors_total") == 0
    assert grew("conveyor_reconciler_tick_seconds_total") > 0
    assert "# TYPE conveyor_reconciler_examined_total counter" in after
