"""`conveyor demo`: one sample task through every stage, against local stand-ins.

A bare git repository plays the remote, the scripted sandbox agent plays every
role (the reviewer asks for changes once, so a rollback is visible), the
sandbox Bot API server plays Telegram, and the real bot keeps the task's card
there. The demo's operator reads the card and presses Approve on it, through a
callback query, as a person would. Exits 0 when the task reaches done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from bot.callbacks import Action, CardAction
from bot.console import ConsoleNotifier
from bot.telegram import TelegramConsole
from engine.config import Settings
from engine.notifier import FanoutNotifier
from engine.runtime import Engine
from engine.sandbox.repo import create_sample_remote
from engine.sandbox.telegram import TelegramSandbox
from engine.stages import Status
from engine.store import now
from engine.summary import task_figures
from engine.templating import text_environment

DEMO_PROJECT = "DEMO"
DEMO_TIMEOUT_S = 120.0
DEMO_TOKEN = "100001:DEMO-TOKEN"
OPERATOR_ID = 4242  # the demo's operator, an admin, in a private chat with the bot
TERMINAL = frozenset({Status.DONE, Status.FAILED, Status.ESCALATED, Status.CANCELLED})

SAMPLE_TITLE = "Add a greeting endpoint"
SAMPLE_DESCRIPTION = (
    "As an operator I want GET /hello to answer with a greeting, so that the health of the "
    "service can be checked by a person.\n\nAcceptance: the endpoint returns 200 and a text "
    "that names the service."
)

SANDBOX_DEFAULTS = {"SANDBOX_AGENT_REVIEWER": "negative,ok"}


def demo_settings(root: Path, remote: Path, locale: str, telegram_base: str) -> Settings:
    return Settings(
        _env_file=None,
        db_path=root / "conveyor.db",
        workdir=root / "work",
        locale=locale,
        projects=[
            {
                "key": DEMO_PROJECT,
                "remote": str(remote),
                "check_command": [sys.executable, "check.py"],
            }
        ],
        agent_command=f"{sys.executable} -m engine.sandbox.agent",
        agent_timeout_s=60,
        agent_retry_backoff_s=0.2,
        telegram_token=DEMO_TOKEN,
        telegram_api_base=telegram_base,
        telegram_chat_id=OPERATOR_ID,
        telegram_admin_ids=[OPERATOR_ID],
        telegram_debounce_s=0.5,
    )


class DemoOperator:
    """Watches the chat like a person: prints the card when it changes, presses Approve."""

    def __init__(self, sandbox: TelegramSandbox, chat_id: int, work_item: str, env) -> None:
        self.sandbox = sandbox
        self.chat_id = chat_id
        self.work_item = work_item
        self.env = env
        self._shown: str | None = None
        self._pressed: set[str] = set()

    def card(self):
        cards = [
            m for m in self.sandbox.messages(self.chat_id) if m.text.startswith(self.work_item)
        ]
        return cards[-1] if cards else None

    def look(self) -> None:
        card = self.card()
        if card is None:
            return
        if card.text != self._shown:
            self._shown = card.text
            print(self.env.get_template("console/card.txt.j2").render(text=card.text), flush=True)
        for _label, data in card.buttons():
            action = CardAction.unpack(data)
            if action.action is Action.APPROVE and data not in self._pressed:
                self._pressed.add(data)
                self.sandbox.press(
                    self.chat_id, card.message_id, OPERATOR_ID, data=data, username="operator"
                )

    async def watch(self) -> None:
        while True:
            self.look()
            await asyncio.sleep(0.1)


async def run_demo(locale: str | None = None) -> int:
    locale = locale or os.environ.get("ORCH_LOCALE", "ru")
    for name, value in SANDBOX_DEFAULTS.items():
        os.environ.setdefault(name, value)
    root = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    os.environ.setdefault("SANDBOX_AGENT_STATE", str(root / "agent-state"))
    remote = await create_sample_remote(root / "remote.git")
    env = text_environment(locale)
    async with TelegramSandbox(DEMO_TOKEN) as sandbox:
        settings = demo_settings(root, remote, locale, sandbox.base_url)
        engine = Engine(settings)
        async with engine:
            telegram = TelegramConsole(settings, engine)
            console = ConsoleNotifier(engine.store, env)
            engine.use_notifier(FanoutNotifier([console, telegram.notifier]))
            await telegram.start()
            engine.start_worker()
            try:
                status = await drive(engine, telegram, sandbox, env)
            finally:
                await telegram.stop()
    print(env.get_template("console/demo_end.txt.j2").render(status=status, root=root))
    return 0 if status == Status.DONE else 1


async def drive(engine: Engine, telegram: TelegramConsole, sandbox, env) -> str:
    outcome = await engine.pipeline.start_task(
        DEMO_PROJECT,
        SAMPLE_TITLE,
        SAMPLE_DESCRIPTION,
        tracker_issue_id="demo-1",
        sequence_id=1,
        actor="demo-tracker",
    )
    assert outcome.task is not None, outcome.reason
    operator = DemoOperator(sandbox, OPERATOR_ID, outcome.task.work_item, env)
    watcher = asyncio.create_task(operator.watch())
    try:
        task = await asyncio.wait_for(
            engine.wait_settled(outcome.task.id, TERMINAL), DEMO_TIMEOUT_S
        )
        await asyncio.wait_for(telegram.publisher.idle(), DEMO_TIMEOUT_S)
        operator.look()
    except TimeoutError:
        print(f"demo: the task did not finish within {DEMO_TIMEOUT_S:.0f}s", file=sys.stderr)
        return "timeout"
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    figures = await task_figures(engine.store, task, now())
    print(
        env.get_template("console/summary.txt.j2").render(
            work_item=task.work_item,
            title=task.title,
            status=task.status,
            figures=figures,
            merge_sha=task.merge_sha,
        )
    )
    excerpt = await second_developer_feedback(engine, task.id)
    if excerpt:
        print(env.get_template("console/demo_feedback.txt.j2").render(excerpt=excerpt))
    return task.status


async def second_developer_feedback(engine: Engine, task_id: int) -> str | None:
    """The must-fix lines of the developer's second prompt, as the agent read them."""
    runs = [r for r in await engine.store.agent_runs(task_id) if r.role == "developer"]
    if len(runs) < 2 or not runs[1].prompt_path:
        return None
    prompt = Path(runs[1].prompt_path).read_text(encoding="utf-8")
    lines = [line for line in prompt.splitlines() if line.startswith(("P0:", "P1:"))]
    return "\n".join(lines) or None
