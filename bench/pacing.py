"""Telegram pacing: a burst of card updates into one group chat under Telegram's limits.

The system under test is the real console: `bot.telegram.TelegramConsole` (aiogram over
HTTP) and its `CardPublisher`, against the sandbox Bot API server `engine.sandbox.telegram`
with a group chat's limits at Telegram's values (20 messages a rolling minute; 429 with
`retry_after` beyond that). The engine's store is real; no worker runs, so nothing but the
benchmark moves the tasks.

Each task is created (the first transition) and then moved through nine more transitions
(the path of `tests/test_telegram.py`, a review bounce included, ending in `done`), stage by
stage across all tasks, as fast as the store takes them: ten events per task. The clock
starts before the first task is created and stops when every task's single card in the chat
shows exactly the HTML the renderer makes of the task's final state in the store.

It runs twice: with the console's default pacing (one message per 3 s in a group) and with
`ORCH_TELEGRAM_PACE_S=0`, where only Telegram's 429s hold the publisher back, so that the
retry path is exercised too. A 429 is *unhandled* when its task's card never reached the
final state; every exception the publisher logs counts as one as well.

Baseline: the floor the limits allow, not a measured run: each task needs one sendMessage
(plus one per alert), and at 20 a rolling minute the n-th message cannot go out before
60 s x floor((n - 1) / 20).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bench.common import Row
from bot.telegram import TelegramConsole
from engine.config import Settings
from engine.notifier import AlertKind, Notifier
from engine.pipeline import Change
from engine.runtime import Engine
from engine.sandbox.telegram import Call, SandboxMessage, TelegramSandbox
from engine.stages import Stage, Status
from engine.store import Task

TOKEN = "4242:BENCH-PACING"
CHAT = -1009876  # a supergroup, like a team's ops chat
ADMIN = 42
GROUP_PER_MINUTE = 20  # Telegram: about twenty messages a minute per group
MINUTE_S = 60.0
TARGET_SLACK_S = 10.0
WAIT_MARGIN_S = 90.0  # how long past the target the benchmark keeps waiting for the cards
IDLE_GUARD_S = 75.0  # longer than one retry_after of a group window
POLL_S = 0.1
Log = Callable[[str], object]
CARD_METHODS = ("sendMessage", "editMessageText", "deleteMessage")
VARIANTS: dict[str, float | None] = {"paced": None, "unpaced": 0.0}

# After "created": nine transitions, so ten events per task (the path of tests/test_telegram.py)
PATH = [
    Change("advanced", Stage.ARCHITECTURE, Status.ACTIVE),
    Change("advanced", Stage.DEVELOPMENT, Status.ACTIVE),
    Change("advanced", Stage.REVIEW, Status.ACTIVE),
    Change("rolled_back", Stage.DEVELOPMENT, Status.ACTIVE, "P0: fix it", developer_retries=1),
    Change("advanced", Stage.REVIEW, Status.ACTIVE),
    Change("advanced", Stage.TESTING, Status.ACTIVE),
    Change("advanced", Stage.DEPLOY_STAGING, Status.ACTIVE),
    Change("advanced", Stage.DEPLOY, Status.ACTIVE),
    # finished: the card's wall time is fixed from here on, so the final text is too
    Change("done", Stage.DONE, Status.DONE, finished=True),
]
TRANSITIONS_PER_TASK = 1 + len(PATH)


def target_s(tasks: int) -> float:
    """The issue's bound: ceil(tasks / 20) minutes + 10 s."""
    return math.ceil(tasks / GROUP_PER_MINUTE) * MINUTE_S + TARGET_SLACK_S


def floor_s(messages: int) -> float:
    """The earliest the last of `messages` can go out at 20 messages a rolling minute."""
    return MINUTE_S * ((max(messages, 1) - 1) // GROUP_PER_MINUTE)


class CountingNotifier:
    """Passes everything to the console and counts the alerts (each one is a sendMessage)."""

    def __init__(self, inner: Notifier) -> None:
        self.inner = inner
        self.alerts = 0

    async def task_changed(self, task_id: int) -> None:
        await self.inner.task_changed(task_id)

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        self.alerts += 1
        await self.inner.alert(task_id, kind, detail)


class ErrorCounter(logging.Handler):
    """Counts what the publisher logs at ERROR: the exceptions its sender loop caught."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def console_settings(root: Path, base_url: str, pace_s: float | None) -> Settings:
    return Settings(
        _env_file=None,
        db_path=root / "conveyor.db",
        workdir=root / "work",
        projects=[{"key": "ORCH", "remote": str(root / "remote.git")}],
        telegram_token=TOKEN,
        telegram_api_base=base_url,
        telegram_chat_id=CHAT,
        telegram_admin_ids=[ADMIN],
        telegram_pace_s=pace_s,
        locale="en",
        reconcile_enabled=False,
    )


@contextlib.asynccontextmanager
async def running_console(
    pace_s: float | None,
) -> AsyncIterator[tuple[TelegramSandbox, Engine, TelegramConsole, CountingNotifier]]:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-pacing-") as tmp:
        async with TelegramSandbox(TOKEN, group_per_minute=GROUP_PER_MINUTE) as sandbox:
            settings = console_settings(Path(tmp), sandbox.base_url, pace_s)
            async with Engine(settings) as engine:
                console = TelegramConsole(settings, engine)
                counting = CountingNotifier(console.notifier)
                engine.use_notifier(counting)
                try:
                    await console.start()
                    yield sandbox, engine, console, counting
                finally:
                    await console.stop()


async def burst(engine: Engine, count: int) -> list[Task]:
    """Create the tasks, then move all of them one step at a time through PATH.

    The moves go through the pipeline's one transition method, as tests/test_telegram.py
    does: the same event rows and notifications as a real run, without the agents.
    """
    tasks = []
    for n in range(count):
        outcome = await engine.pipeline.start_task(
            "ORCH", f"Task {n}", "Body.", tracker_issue_id=f"pacing-{n}"
        )
        assert outcome.task is not None, outcome.reason
        tasks.append(outcome.task)
    for change in PATH:
        for task in tasks:
            current = await engine.store.get_task(task.id)
            assert current is not None
            moved = await engine.pipeline._transition(None, current, change)
            assert moved, f"{task.work_item} did not move to {change.stage}"
    return [await engine.store.get_task(task.id) for task in tasks]


async def final_cards(console: TelegramConsole, tasks: list[Task]) -> dict[str, str]:
    """Work item -> the HTML of the card the renderer makes of the task's state now."""
    mode = await console.publisher.mode()
    return {task.work_item: (await console.renderer.render(task, mode)).text for task in tasks}


def cards_in_chat(sandbox: TelegramSandbox) -> dict[str, list[SandboxMessage]]:
    """Work item -> the visible messages that are its card (their text starts with it)."""
    found: dict[str, list[SandboxMessage]] = {}
    for message in sandbox.messages(CHAT):
        found.setdefault(message.text.split(" ", 1)[0], []).append(message)
    return found


def final_items(sandbox: TelegramSandbox, expected: dict[str, str]) -> set[str]:
    """The work items whose one card in the chat shows exactly their final state."""
    cards = cards_in_chat(sandbox)
    return {
        item
        for item, html in expected.items()
        if [message.html for message in cards.get(item, [])] == [html]
    }


async def wait_until_final(
    sandbox: TelegramSandbox, expected: dict[str, str], deadline: float
) -> float | None:
    """Poll the chat until every card is final; the monotonic time it was, or None."""
    while time.monotonic() < deadline:
        if len(final_items(sandbox, expected)) == len(expected):
            return time.monotonic()
        await asyncio.sleep(POLL_S)
    return None


def call_work_item(sandbox: TelegramSandbox, call: Call) -> str | None:
    """Which task's card a sendMessage or editMessageText was about."""
    if call.method == "sendMessage":
        text = str(call.params.get("text", ""))
        return text.removeprefix("<b>").split("</b>", 1)[0] if text.startswith("<b>") else None
    message_id = call.params.get("message_id")
    for message in sandbox.messages(CHAT):
        if message.message_id == message_id:
            return message.text.split(" ", 1)[0]
    return None


def rate_limit_figures(sandbox: TelegramSandbox, final: set[str]) -> dict[str, Any]:
    limited = [call for call in sandbox.calls if call.status == 429]
    lost = [call for call in limited if call_work_item(sandbox, call) not in final]
    return {
        "received_429": len(limited),
        "retry_after_s": sorted({_retry_after(call) for call in limited} - {None}),
        "429_card_not_final": len(lost),
    }


def _retry_after(call: Call) -> int | None:
    return (call.response or {}).get("parameters", {}).get("retry_after")


def call_figures(sandbox: TelegramSandbox) -> dict[str, Any]:
    by_method = Counter(call.method for call in sandbox.calls)
    ok = Counter(call.method for call in sandbox.calls if call.status == 200)
    return {
        "calls_by_method": dict(by_method),
        "card_calls": sum(by_method[method] for method in CARD_METHODS),
        "sent_ok": ok["sendMessage"],
        "edited_ok": ok["editMessageText"],
    }


async def run_variant(name: str, tasks: int, log: Log = print) -> dict[str, Any]:
    errors = ErrorCounter()
    publisher_log = logging.getLogger("bot.publisher")
    publisher_log.addHandler(errors)
    try:
        async with running_console(VARIANTS[name]) as (sandbox, engine, console, counting):
            started = time.monotonic()
            done = await burst(engine, tasks)
            burst_s = time.monotonic() - started
            expected = await final_cards(console, done)
            deadline = started + target_s(tasks) + WAIT_MARGIN_S
            finished = await wait_until_final(sandbox, expected, deadline)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(console.publisher.idle(), IDLE_GUARD_S)
            final = final_items(sandbox, expected)
            stable = expected == await final_cards(console, done)
            events = await engine.store.fetchone(
                "SELECT COUNT(*) AS n FROM events WHERE task_id IS NOT NULL"
            )
            result = {
                "variant": name,
                "pace_s": console.publisher.pace_s,
                "tasks": tasks,
                "transitions": events["n"],
                "burst_s": burst_s,
                "final_s": None if finished is None else finished - started,
                "final_cards": len(final),
                "final_stable": stable,
                "alerts": counting.alerts,
                "retried_429": console.publisher.retry_after_waits,
                "exceptions": errors.count,
                **call_figures(sandbox),
                **rate_limit_figures(sandbox, final),
            }
    finally:
        publisher_log.removeHandler(errors)
    result["unhandled_429"] = result["429_card_not_final"] + result["exceptions"]
    log(_line(result))
    return result


def _line(r: dict[str, Any]) -> str:
    final = "never" if r["final_s"] is None else f"{r['final_s']:.1f} s"
    return (
        f"  pacing {r['variant']:8s} (pace {r['pace_s']:g} s): {r['tasks']} tasks,"
        f" {r['transitions']} transitions in {r['burst_s']:.1f} s; all cards final after {final};"
        f" {r['card_calls']} card calls ({r['sent_ok']} sent, {r['edited_ok']} edited),"
        f" 429: {r['received_429']} received, {r['retried_429']} waited,"
        f" {r['unhandled_429']} unhandled"
        + ("" if r["final_stable"] else "; WARNING: the final render changed during the run")
    )


async def run(tasks: int, log: Log = print) -> dict[str, Any]:
    variants = {name: await run_variant(name, tasks, log) for name in VARIANTS}
    return {
        "tasks": tasks,
        "transitions_per_task": TRANSITIONS_PER_TASK,
        "group_per_minute": GROUP_PER_MINUTE,
        "target_s": target_s(tasks),
        "variants": variants,
    }


def _sound(r: dict[str, Any]) -> bool:
    """No unhandled 429, every card final, one sendMessage per card and per alert."""
    return (
        r["unhandled_429"] == 0
        and r["final_s"] is not None
        and r["final_cards"] == r["tasks"]
        and r["sent_ok"] == r["tasks"] + r["alerts"]
    )


def _measured(r: dict[str, Any]) -> str:
    final = "not final" if r["final_s"] is None else f"final {r['final_s']:.1f} s"
    return (
        f"{final}; {r['card_calls']} calls ({r['sent_ok']} send, {r['edited_ok']} edit);"
        f" 429 {r['received_429']} got / {r['retried_429']} retried / {r['unhandled_429']} lost"
    )


def rows(result: dict[str, Any]) -> list[Row]:
    tasks, limit = result["tasks"], result["target_s"]
    out = []
    for name, r in result["variants"].items():
        sends = r["tasks"] + r["alerts"]
        timed = name == "paced"  # the console's default; unpaced is there for the 429 path
        bound = f"final ≤ {limit:.0f} s, " if timed else ""
        target = f"{bound}0 unhandled 429, sendMessage = {sends}"
        met = _sound(r) and (not timed or r["final_s"] <= limit)
        out.append(
            Row(
                f"Telegram pacing {tasks}×{result['transitions_per_task']}, {name}"
                f" (pace {r['pace_s']:g} s)",
                _measured(r),
                f"limits' floor {floor_s(sends):.0f} s ({sends} sends at {GROUP_PER_MINUTE}/min)",
                target,
                met,
            )
        )
    return out


async def measure(quick: bool, log: Log = print) -> dict[str, Any]:
    return await run(tasks=5 if quick else 50, log=log)
