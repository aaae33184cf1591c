"""The reconciler: lost webhooks never leave a task stuck, and stopped tasks stay stopped."""

from __future__ import annotations

import asyncio

from bot.telegram import TelegramConsole
from engine.runtime import Engine
from engine.sandbox.telegram import TelegramSandbox
from engine.stages import Stage, Status
from tests.conftest import HANG_GUARD_S, RecordingNotifier, settle, start
from tests.test_telegram import TOKEN, console_settings
from tests.test_webhooks import Board, open_board

NOT_POLLING = ("getUpdates", "getMe", "setMyCommands", "deleteWebhook")


def telegram_traffic(sandbox: TelegramSandbox) -> int:
    return len([call for call in sandbox.calls if call.method not in NOT_POLLING])


async def test_an_escalated_task_stays_still_over_a_hundred_ticks(make_settings, agent_env) -> None:
    """The bounce incident: CI green, a reviewer that always requests changes, the cap reached."""
    agent_env(reviewer="negative")
    async with TelegramSandbox(TOKEN, group_per_minute=6000) as sandbox:
        settings = console_settings(make_settings, sandbox, reconcile_grace_s=0)
        notifier = RecordingNotifier()
        engine = Engine(settings, notifier)
        notifier.engine = engine
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        async with engine:
            await console.start()
            engine.start_worker()
            try:
                task = await start(engine)
                await _approve_when_ready(engine, task.id)
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
                assert all(r.skipped["escalated"] == 1 and r.unblocked == 0 for r in reports)
            finally:
                await console.stop()


async def _approve_when_ready(engine: Engine, task_id: int) -> None:
    async def loop() -> None:
        while (await engine.store.get_task(task_id)).status != Status.AWAITING_APPROVAL:
            await asyncio.sleep(0.05)
        await engine.pipeline.approve(task_id, actor="test")

    await asyncio.wait_for(loop(), HANG_GUARD_S)


async def _to_development_waiting_for_ci(board: Board) -> tuple[dict, int]:
    issue = board.issue()
    board.move(issue["id"], "In Progress")
    task = await board.task_of(issue["id"])
    await board.until(task.id, Status.AWAITING_APPROVAL)
    board.move(issue["id"], "Approved")
    task = await board.until(task.id, Status.ACTIVE, stage=Stage.DEVELOPMENT)
    await board.settle()
    await board.engine.tracker.idle()
    return issue, task.id


async def lose_a_green_status(board: Board, head: str) -> None:
    """CI turns green on the head, but the status webhook is lost on the way."""
    await board.settle()
    board.gitea.drop_rate(1.0)
    await board.gitea.set_status("team", "app", head, "success")
    await board.settle()
    board.gitea.drop_rate(0.0)


async def _frozen_over_ticks(board: Board, task_id: int, ticks: int = 100) -> list:
    runs = len(await board.engine.store.agent_runs(task_id))
    events = len(await board.engine.store.events(task_id))
    reports = [await board.engine.reconciler.tick() for _ in range(ticks)]
    assert len(await board.engine.store.agent_runs(task_id)) == runs
    assert len(await board.engine.store.events(task_id)) == events
    return reports


async def test_a_task_a_person_holds_in_plane_is_left_alone(
    tmp_path, make_settings, agent_env
) -> None:
    board, close = await open_board(
        tmp_path, make_settings, RecordingNotifier(), ci_state=None, reconcile_grace_s=0
    )
    try:
        for held in ("Blocked", "Needs Input"):
            issue, task_id = await _to_development_waiting_for_ci(board)
            board.move(issue["id"], held)
            await board.settle()
            head = (await board.engine.store.get_task(task_id)).head_sha
            await lose_a_green_status(board, head)

            reports = await _frozen_over_ticks(board, task_id)
            assert all(r.skipped["held_by_person"] == 1 for r in reports)
            assert (await board.engine.store.get_task(task_id)).stage == Stage.DEVELOPMENT

            board.move(issue["id"], "In Progress")  # the person lets go
            await board.settle()
            report = await board.engine.reconciler.tick()
            assert report.unblocked == 1
            moved = [e for e in await board.engine.store.events(task_id) if e.actor == "reconciler"]
            assert moved[0].from_state == "development/active"
            await board.until(task_id, Status.DONE)
    finally:
        await close()


async def test_a_plane_outage_during_the_tick_skips_conservatively(
    tmp_path, make_settings, agent_env
) -> None:
    board, close = await open_board(
        tmp_path, make_settings, RecordingNotifier(), ci_state=None, reconcile_grace_s=0
    )
    try:
        issue, task_id = await _to_development_waiting_for_ci(board)
        head = (await board.engine.store.get_task(task_id)).head_sha
        await lose_a_green_status(board, head)
        port = int(board.plane.base_url.rsplit(":", 1)[1])
        await board.plane.stop()

        reports = await _frozen_over_ticks(board, task_id, ticks=5)
        assert all(r.skipped["tracker_unreachable"] == 1 and r.errors >= 1 for r in reports)

        await board.plane.start(port=port)
        assert (await board.engine.reconciler.tick()).unblocked == 1
    finally:
        await close()


async def test_lost_webhooks_of_every_kind_still_bring_every_task_to_done(
    tmp_path, make_settings, agent_env
) -> None:
    board, close = await open_board(
        tmp_path, make_settings, RecordingNotifier(), ci_state="success", reconcile_grace_s=0
    )
    try:
        board.plane.drop_rate(0.4, seed=7)
        board.gitea.drop_rate(0.4, seed=11)
        issues = [board.issue(name=f"Feature {n}") for n in range(4)]
        for issue in issues:
            board.move(issue["id"], "In Progress")

        async def drive() -> None:
            while True:
                await board.settle()
                await board.engine.reconciler.tick()
                tasks = await board.engine.store.list_tasks()
                for task in tasks:
                    if task.status == Status.AWAITING_APPROVAL:
                        issue_id = task.tracker_issue_id
                        if board.plane.state_name(issue_id) != "Approved":
                            board.move(issue_id, "Approved")
                if len(tasks) == len(issues) and all(t.status == Status.DONE for t in tasks):
                    return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(drive(), HANG_GUARD_S)
        assert sum(d.outcome == "dropped" for d in board.plane.deliveries) > 0
        assert sum(d.dropped for d in board.gitea.deliveries) > 0
        for task in await board.engine.store.list_tasks():
            events = await board.engine.store.events(task.id)
            moves = [(e.kind, e.from_state, e.to_state) for e in events]
            assert len(moves) == len(set(moves)), f"{task.work_item} moved twice: {moves}"
            assert [e.kind for e in events].count("done") == 1
            assert [e.kind for e in events].count("created") == 1
        assert len(await board.engine.store.list_tasks()) == len(issues)
    finally:
        await close()


async def test_the_scheduler_ticks_and_records_the_last_tick(make_settings, agent_env) -> None:
    async with Engine(make_settings(reconcile_interval_s=0.2)) as engine:
        await engine.start_reconciler()
        try:

            async def ticked() -> dict:
                while (tick := await engine.store.get_setting("reconciler_last_tick")) is None:
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


async def test_a_red_gate_changes_nothing_and_a_green_one_advances_once(
    make_settings, notifier, agent_env, tmp_path
) -> None:
    import sys

    flag = tmp_path / "ci-green"
    check = [
        sys.executable,
        "-c",
        f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)",
    ]
    projects = [{"key": "ORCH", "remote": str(tmp_path / "remote.git"), "check_command": check}]
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


async def test_the_card_says_the_reconciler_moved_the_task(
    make_settings, agent_env, tmp_path
) -> None:
    import sys

    from bot.cards import CardRenderer
    from bot.texts import Texts

    flag = tmp_path / "ci-green"
    check = [
        sys.executable,
        "-c",
        f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)",
    ]
    projects = [{"key": "ORCH", "remote": str(tmp_path / "remote.git"), "check_command": check}]
    notifier = RecordingNotifier()
    engine = Engine(make_settings(projects=projects, reconcile_grace_s=0, locale="en"), notifier)
    notifier.engine = engine
    async with engine:
        engine.start_worker()
        task = await settle(engine, (await start(engine)).id)
        flag.write_text("green")
        await engine.reconciler.tick()
        task = await engine.store.get_task(task.id)
        card = await CardRenderer(engine.store, engine.settings, Texts("en")).render(task, "edit")
        assert "moved on by the reconciler" in card.text
