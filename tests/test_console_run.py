"""The Telegram console as it runs: `conveyor run` by long polling, webhook mode, alert links,
and cards brought up to date after a restart, all against the sandbox Bot API server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bot.telegram import WEBHOOK_PATH, TelegramConsole, webhook_secret
from engine.config import Settings
from engine.runtime import Engine
from engine.sandbox.telegram import SandboxMessage, TelegramSandbox
from engine.stages import Stage, Status
from engine.store import Store, Task
from tests.conftest import HANG_GUARD_S, SANDBOX_AGENT

TOKEN = "4242:SANDBOX-TOKEN"
CHAT = -1001234  # the ops chat, a supergroup
ADMIN = 42
STRANGER = 7
EXIT_GUARD_S = 30.0  # `conveyor run` must stop well within this after SIGTERM
WEBHOOK_URL = "https://conveyor.example.com/webhooks/telegram"


# --- helpers ------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_conveyor(
    tmp_path: Path, remote: Path, sandbox: TelegramSandbox, **extra_env: str
) -> subprocess.Popen:
    """`conveyor run` in long-polling mode against the sandbox; its log goes to a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SANDBOX_"))}
    env.update(
        ORCH_DB_PATH=str(tmp_path / "conveyor.db"),
        ORCH_WORKDIR=str(tmp_path / "work"),
        ORCH_HTTP_PORT=str(free_port()),
        ORCH_PROJECTS=json.dumps(
            [{"key": "ORCH", "remote": str(remote), "check_command": [sys.executable, "check.py"]}]
        ),
        ORCH_AGENT_COMMAND=SANDBOX_AGENT,
        ORCH_AGENT_RETRY_BACKOFF_S="0",
        ORCH_TELEGRAM_TOKEN=TOKEN,
        ORCH_TELEGRAM_API_BASE=sandbox.base_url,
        ORCH_TELEGRAM_CHAT_ID=str(CHAT),
        ORCH_TELEGRAM_ADMIN_IDS=f"{ADMIN},43",
        ORCH_LOCALE="en",
        ORCH_TELEGRAM_PACE_S="0.01",
        ORCH_TELEGRAM_DEBOUNCE_S="0.05",
        SANDBOX_AGENT_STATE=str(tmp_path / "agent-state"),
        **extra_env,
    )
    with open(tmp_path / "conveyor.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "run"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def log_tail(tmp_path: Path, lines: int = 40) -> str:
    path = tmp_path / "conveyor.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


async def exit_code(process: subprocess.Popen, timeout: float = EXIT_GUARD_S) -> int | None:
    """Wait for the process without blocking the loop (the sandbox serves it from this loop)."""
    try:
        return await asyncio.to_thread(process.wait, timeout)
    except subprocess.TimeoutExpired:
        return None


async def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        if await exit_code(process) is None:
            process.kill()
            await asyncio.to_thread(process.wait)


async def wait_until(predicate: Callable, what: str):
    """Poll an async predicate until it returns something truthy; a hang guard, not a timing."""

    async def loop():
        while not (result := await predicate()):
            await asyncio.sleep(0.05)
        return result

    try:
        return await asyncio.wait_for(loop(), HANG_GUARD_S)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def bot_messages(sandbox: TelegramSandbox) -> list[SandboxMessage]:
    return [m for m in sandbox.messages(CHAT) if m.from_bot]


def cards_of(sandbox: TelegramSandbox, work_item: str) -> list[SandboxMessage]:
    return [m for m in bot_messages(sandbox) if m.text.startswith(work_item + " ")]


async def say(
    sandbox: TelegramSandbox,
    user: int,
    text: str,
    expect: str,
    *,
    reply_to_message_id: int | None = None,
) -> SandboxMessage:
    """Send a message as `user` and wait for the bot's new message containing `expect`."""
    seen = {m.message_id for m in sandbox.messages(CHAT)}
    sandbox.send_user_message(CHAT, user, text, reply_to_message_id=reply_to_message_id)

    def answers() -> list[SandboxMessage]:
        return [m for m in bot_messages(sandbox) if m.message_id not in seen and expect in m.text]

    await sandbox.wait_for(lambda: bool(answers()), timeout=HANG_GUARD_S)
    return answers()[0]


def long_polls(sandbox: TelegramSandbox) -> list:
    return [
        c
        for c in sandbox.calls
        if c.method == "getUpdates" and float(c.params.get("timeout") or 0) > 0
    ]


async def create_task_in_chat(sandbox: TelegramSandbox, title: str, description: str) -> None:
    prompt = await say(sandbox, ADMIN, f"/new {title}", f"New task «{title}»")
    assert prompt.force_reply
    await say(sandbox, ADMIN, description, "created.", reply_to_message_id=prompt.message_id)


async def job_states(store: Store, task_id: int) -> list[str]:
    rows = await store.fetchall("SELECT state FROM jobs WHERE task_id = ? ORDER BY id", (task_id,))
    return [row["state"] for row in rows]


async def stop_console(console: TelegramConsole) -> None:
    await asyncio.wait_for(console.stop(), HANG_GUARD_S)  # a hang guard


@pytest.fixture
async def sandbox() -> AsyncIterator[TelegramSandbox]:
    async with TelegramSandbox(TOKEN, group_per_minute=6000, private_per_second=100) as server:
        yield server


def console_settings(make_settings, sandbox: TelegramSandbox, **overrides) -> Settings:
    values = dict(
        telegram_token=TOKEN,
        telegram_api_base=sandbox.base_url,
        telegram_chat_id=CHAT,
        telegram_admin_ids=[ADMIN],
        telegram_pace_s=0.01,
        telegram_debounce_s=0.05,
        locale="en",
    )
    values.update(overrides)
    return make_settings(**values)


async def until(engine: Engine, task_id: int, *statuses: str) -> Task:
    async def settled():
        task = await engine.store.resting_task(task_id)
        return task if task is not None and task.status in statuses else None

    return await wait_until(settled, f"task {task_id} to reach {statuses}")


# --- 1. `conveyor run` by long polling ----------------------------------------------------


async def test_conveyor_run_serves_the_console_by_long_polling_and_stops_on_sigterm(
    tmp_path: Path, remote: Path, sandbox: TelegramSandbox, agent_env
) -> None:
    process = spawn_conveyor(tmp_path, remote, sandbox)
    try:
        async with Store(tmp_path / "conveyor.db") as store:
            await sandbox.wait_for(lambda: bool(long_polls(sandbox)), timeout=HANG_GUARD_S)
            assert sandbox.webhook_url == ""

            queue = await say(sandbox, ADMIN, "/queue", "Queue")
            assert "No active tasks." in queue.text

            refused = await say(sandbox, STRANGER, "/mode bump", "Only operators can do this.")
            assert refused.text == "Only operators can do this."
            assert await store.get_setting("tracker_mode") is None
            await say(sandbox, ADMIN, "/mode bump", "Card mode: bump")
            assert await store.get_setting("tracker_mode") == "bump"

            await create_task_in_chat(
                sandbox, "Add a logout button", "A button in the header that ends the session."
            )
            (task,) = await store.list_tasks()
            assert task.title == "Add a logout button" and task.tracker_issue_id is None
            assert task.description == "A button in the header that ends the session."

            def awaiting_card() -> bool:
                return any(
                    "awaiting approval" in c.text
                    and [label for label, _ in c.buttons()] == ["Approve", "Reject"]
                    for c in cards_of(sandbox, task.work_item)
                )

            await sandbox.wait_for(awaiting_card, timeout=HANG_GUARD_S)
            (card,) = cards_of(sandbox, task.work_item)
            assert (await store.get_task(task.id)).status == Status.AWAITING_APPROVAL
            queue = await say(sandbox, ADMIN, "/queue", "Queue")
            assert f"{task.work_item} · awaiting approval" in queue.text

            query = sandbox.press(CHAT, card.message_id, ADMIN, button_text="Approve")
            await sandbox.wait_for(
                lambda: query in sandbox.callback_answers(), timeout=HANG_GUARD_S
            )
            assert sandbox.callback_answers()[query].get("text") == "Done."

            def final_card() -> bool:
                return any(
                    "🏁" in c.text and not c.buttons() for c in cards_of(sandbox, task.work_item)
                )

            await sandbox.wait_for(final_card, timeout=HANG_GUARD_S)
            assert (await store.get_task(task.id)).status == Status.DONE
            assert len(cards_of(sandbox, task.work_item)) == 1
            kinds = [e.kind for e in await store.events(task.id)]
            assert kinds.count("approved") == 1 and kinds.count("done") == 1

            process.send_signal(signal.SIGTERM)
            code = await exit_code(process)
            assert code == 0, f"exit code {code}; log:\n{log_tail(tmp_path)}"
    finally:
        await stop_process(process)
    assert "Traceback" not in log_tail(tmp_path, 10_000), log_tail(tmp_path)


async def test_sigterm_hands_a_running_agents_job_back_to_the_queue(
    tmp_path: Path, remote: Path, sandbox: TelegramSandbox, agent_env
) -> None:
    process = spawn_conveyor(tmp_path, remote, sandbox, SANDBOX_AGENT_DELAY_S="120")
    try:
        async with Store(tmp_path / "conveyor.db") as store:
            await sandbox.wait_for(lambda: bool(long_polls(sandbox)), timeout=HANG_GUARD_S)
            await create_task_in_chat(sandbox, "Take your time", "An analyst that runs long.")
            (task,) = await store.list_tasks()

            async def agent_started():
                runs = await store.agent_runs(task.id)
                return runs and runs[0].pid and runs[0]

            run = await wait_until(agent_started, "the analyst to start")
            assert process_alive(run.pid)
            assert await job_states(store, task.id) == ["running"]

            process.send_signal(signal.SIGTERM)
            code = await exit_code(process)
            assert code == 0, f"exit code {code}; log:\n{log_tail(tmp_path)}"

            assert await job_states(store, task.id) == ["queued"]
            assert not process_alive(run.pid), "the agent outlived `conveyor run`"
            (run,) = await store.agent_runs(task.id)
            assert run.finished_at is not None and not run.ok
            assert "interrupted" in (run.error or "")
            task = await store.get_task(task.id)
            assert (task.stage, task.status) == (Stage.ANALYSIS, Status.ACTIVE)
    finally:
        await stop_process(process)
    assert "Traceback" not in log_tail(tmp_path, 10_000), log_tail(tmp_path)


# --- 2. webhook mode ----------------------------------------------------------------------


def queue_update(update_id: int, user_id: int = ADMIN, text: str = "/queue") -> dict:
    return {
        "update_id": update_id,
        "message": {
            "message_id": 1000 + update_id,
            "date": int(time.time()),
            "chat": {"id": CHAT, "type": "supergroup", "title": "Ops"},
            "from": {"id": user_id, "is_bot": False, "first_name": "Ann", "username": "ann"},
            "text": text,
            "entities": [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}],
        },
    }


async def test_webhook_mode_takes_updates_on_the_http_server(
    make_settings, sandbox: TelegramSandbox, agent_env
) -> None:
    settings = console_settings(make_settings, sandbox, telegram_webhook_url=WEBHOOK_URL)
    secret = webhook_secret(settings)
    async with Engine(settings) as engine:
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        app = web.Application()
        console.mount(app)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await console.start()
            try:
                (set_webhook,) = [c for c in sandbox.calls if c.method == "setWebhook"]
                assert set_webhook.status == 200
                assert set_webhook.params["url"] == WEBHOOK_URL
                assert set_webhook.params["secret_token"] == secret
                assert sandbox.webhook_url == WEBHOOK_URL

                for headers in ({"X-Telegram-Bot-Api-Secret-Token": "wrong"}, {}):
                    refused = await client.post(WEBHOOK_PATH, json=queue_update(1), headers=headers)
                    assert refused.status == 401

                accepted = await client.post(
                    WEBHOOK_PATH,
                    json=queue_update(2),
                    headers={"X-Telegram-Bot-Api-Secret-Token": secret},
                )
                assert accepted.status == 200
                await sandbox.wait_for(
                    lambda: any(m.text.startswith("Queue") for m in bot_messages(sandbox)),
                    timeout=HANG_GUARD_S,
                )
                await console.publisher.idle()
            finally:
                await stop_console(console)
        (reply,) = bot_messages(sandbox)
        assert reply.text.startswith("Queue") and "No active tasks." in reply.text
        assert sandbox.count("sendMessage") == 1  # the refused updates got no answer
        assert sandbox.count("getUpdates") == 0


# --- 3. links in the BRD-ready alert ------------------------------------------------------


def project_with_links(remote: Path) -> list[dict]:
    return [
        {
            "key": "ORCH",
            "remote": str(remote),
            "check_command": [sys.executable, "check.py"],
            "repo": "team/app",
            "plane_project_id": "p-uuid",
        }
    ]


async def brd_alert(settings: Settings, sandbox: TelegramSandbox) -> tuple[Task, SandboxMessage]:
    """Run a task to its BRD approval; the alert it raised, as the chat shows it."""
    async with Engine(settings) as engine:
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        await console.start()
        engine.start_worker()
        try:
            outcome = await engine.pipeline.start_task(
                "ORCH", "Add a greeting", "Return a greeting.", tracker_issue_id="issue-1"
            )
            task = await until(engine, outcome.task.id, Status.AWAITING_APPROVAL)
            await asyncio.wait_for(console.publisher.idle(), HANG_GUARD_S)
        finally:
            await stop_console(console)
    alerts = [m for m in bot_messages(sandbox) if "BRD ready for approval" in m.text]
    assert len(alerts) == 1, [m.text for m in bot_messages(sandbox)]
    return task, alerts[0]


async def test_brd_alert_links_to_the_brd_in_the_forge_and_to_the_plane_issue(
    make_settings, remote: Path, sandbox: TelegramSandbox, agent_env
) -> None:
    settings = console_settings(
        make_settings,
        sandbox,
        projects=project_with_links(remote),
        gitea_public_url="https://git.example.com/",
        plane_web_url="https://plane.example.com",
        plane_workspace="acme",
    )
    task, alert = await brd_alert(settings, sandbox)

    brd = f"docs/work-items/{task.work_item}/01-brd.md"
    brd_url = f"https://git.example.com/team/app/src/branch/{task.branch}/{brd}"
    issue_url = "https://plane.example.com/acme/projects/p-uuid/issues/issue-1"
    assert f'<a href="{brd_url}">' in alert.html, alert.html
    assert f'<a href="{issue_url}">' in alert.html, alert.html
    # the link points at a file that is on the task branch in the remote
    shown = subprocess.run(
        ["git", "--git-dir", str(remote), "show", f"{task.branch}:{brd}"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "status: ready" in shown.stdout, shown.stderr
    (card,) = cards_of(sandbox, task.work_item)
    assert f'<a href="{brd_url}">' in card.html and f'<a href="{issue_url}">' in card.html


@pytest.mark.parametrize(
    ("forge", "plane"),
    [
        ("http://127.0.0.1:3000", "http://localhost"),
        ("http://[::1]:3000/", "http://plane.localhost:8000"),
    ],
)
async def test_brd_alert_leaves_out_links_to_loopback_addresses(
    make_settings, remote: Path, sandbox: TelegramSandbox, agent_env, forge: str, plane: str
) -> None:
    settings = console_settings(
        make_settings,
        sandbox,
        projects=project_with_links(remote),
        gitea_public_url=forge,
        plane_web_url=plane,
        plane_workspace="acme",
    )
    task, alert = await brd_alert(settings, sandbox)

    assert task.work_item in alert.text
    assert "<a " not in alert.html and "01-brd.md" not in alert.html, alert.html
    assert "Tracker issue" not in alert.text
    (card,) = cards_of(sandbox, task.work_item)
    assert "<a " not in card.html, card.html


# --- 4. cards after a restart -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["edit", "bump"])
async def test_a_restarted_console_brings_stale_cards_up_to_date(
    make_settings, sandbox: TelegramSandbox, agent_env, mode: str
) -> None:
    settings = console_settings(make_settings, sandbox, tracker_mode=mode)
    async with Engine(settings) as engine:
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        await console.start()
        engine.start_worker()
        try:
            outcome = await engine.pipeline.start_task(
                "ORCH", "Add a greeting", "Return a greeting.", tracker_issue_id="issue-1"
            )
            task = await until(engine, outcome.task.id, Status.AWAITING_APPROVAL)
            await asyncio.wait_for(console.publisher.idle(), HANG_GUARD_S)
        finally:
            await stop_console(console)  # the console goes down; the engine keeps working
        (stale,) = cards_of(sandbox, task.work_item)
        assert [label for label, _ in stale.buttons()] == ["Approve", "Reject"]

        assert (await engine.pipeline.approve(task.id, actor="plane")).changed
        await until(engine, task.id, Status.DONE)
    (card,) = cards_of(sandbox, task.work_item)
    assert card.message_id == stale.message_id and card.buttons(), "the card moved while down"
    calls = ("sendMessage", "editMessageText", "deleteMessage")
    before = {method: sandbox.count(method, 200) for method in calls}

    async with Engine(settings) as engine:  # the process starts again on the same store
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        await console.start()
        try:
            await asyncio.wait_for(console.publisher.idle(), HANG_GUARD_S)
        finally:
            await stop_console(console)

    (card,) = cards_of(sandbox, task.work_item)  # still exactly one card
    assert "🏁" in card.text and card.buttons() == []
    assert "BRD: approved · plane" in card.text
    made = {method: sandbox.count(method, 200) - before[method] for method in calls}
    if mode == "edit":  # edited in place
        assert card.message_id == stale.message_id
        assert made == {"sendMessage": 0, "editMessageText": 1, "deleteMessage": 0}
    else:  # bump: the stale card deleted, the fresh one sent at the bottom
        assert card.message_id != stale.message_id
        assert made == {"sendMessage": 1, "editMessageText": 0, "deleteMessage": 1}
