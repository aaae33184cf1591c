"""`conveyor demo`: one sample task through every stage, against local stand-ins.

The sandbox servers play Telegram, Plane and Gitea over real HTTP, the scripted
sandbox agent plays every role (the reviewer asks for changes once, so a
rollback is visible), and the real bot keeps the task's card. A person moves the
sample issue to In Progress on the Plane board; the signed webhook starts the
task; the demo's operator reads the card in Telegram and presses Approve; the
Gitea CI reports on each head; the deploy merges the PR; the issue ends in Done.
Exits 0 when the task is done, the issue is in Done and the PR is merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bot.callbacks import Action, CardAction
from bot.console import ConsoleNotifier
from bot.telegram import TelegramConsole
from engine.api import add_routes
from engine.config import Settings
from engine.notifier import FanoutNotifier
from engine.runtime import Engine
from engine.sandbox.gitea import GiteaSandbox
from engine.sandbox.plane import PlaneSandbox
from engine.sandbox.telegram import TelegramSandbox
from engine.stages import ROLES, Status
from engine.store import Task, now
from engine.summary import task_figures
from engine.templating import text_environment
from engine.webhooks import MAX_BODY_BYTES

DEMO_PROJECT = "DEMO"
DEMO_REPO = ("demo", "service")
DEMO_TIMEOUT_S = 120.0
DEMO_TOKEN = "100001:DEMO-TOKEN"
OPERATOR_ID = 4242  # the demo's operator, an admin, in a private chat with the bot
PLANE_TOKEN = "plane_api_demo_conveyor"
GITEA_TOKEN = "gitea_demo_conveyor"
PLANE_SECRET = "plane_wh_demo"
GITEA_SECRET = "gitea_wh_demo"
TERMINAL = frozenset({Status.DONE, Status.FAILED, Status.ESCALATED, Status.CANCELLED})

SAMPLE_TITLE = "Add a greeting endpoint"
SAMPLE_DESCRIPTION = (
    "<p>As an operator I want <code>GET /hello</code> to answer with a greeting, so that the "
    "health of the service can be checked by a person.</p><p>Acceptance: the endpoint returns "
    "200 and a text that names the service.</p>"
)

SANDBOX_DEFAULTS = {"SANDBOX_AGENT_REVIEWER": "negative,ok"}


@dataclass
class World:
    """The stand-ins for the outside services, and the ids the demo made in them."""

    telegram: TelegramSandbox
    plane: PlaneSandbox
    gitea: GiteaSandbox
    project_id: str
    operator: str
    remote: Path


def bot_token(role: str) -> str:
    return f"plane_api_{role}_bot"


async def open_world(root: Path, stack: contextlib.AsyncExitStack) -> World:
    telegram = await stack.enter_async_context(TelegramSandbox(DEMO_TOKEN))
    plane = await stack.enter_async_context(
        PlaneSandbox(workspace="demo", api_token=PLANE_TOKEN, rate_limit=None)
    )
    gitea = await stack.enter_async_context(
        GiteaSandbox(root / "forge", token=GITEA_TOKEN, ci_state="success")
    )
    project_id = plane.create_project(DEMO_PROJECT, "Demo service")
    operator = plane.add_bot("plane_api_operator", "operator")
    for role in ROLES:
        plane.add_bot(bot_token(role), f"{role} (Conveyor)")
    remote = await gitea.create_repo(*DEMO_REPO)
    return World(telegram, plane, gitea, project_id, operator, remote)


def demo_settings(root: Path, world: World, locale: str) -> Settings:
    return Settings(
        _env_file=None,
        db_path=root / "conveyor.db",
        workdir=root / "work",
        locale=locale,
        projects=[
            {
                "key": DEMO_PROJECT,
                "remote": str(world.remote),
                "repo": "/".join(DEMO_REPO),
                "plane_project_id": world.project_id,
            }
        ],
        agent_command=f"{sys.executable} -m engine.sandbox.agent",
        agent_timeout_s=60,
        agent_retry_backoff_s=0.2,
        telegram_token=DEMO_TOKEN,
        telegram_api_base=world.telegram.base_url,
        telegram_chat_id=OPERATOR_ID,
        telegram_admin_ids=[OPERATOR_ID],
        telegram_debounce_s=0.5,
        plane_api_url=world.plane.base_url,
        plane_api_token=PLANE_TOKEN,
        plane_workspace="demo",
        plane_webhook_secret=PLANE_SECRET,
        gitea_url=world.gitea.base_url,
        gitea_token=GITEA_TOKEN,
        gitea_webhook_secret=GITEA_SECRET,
        **{f"plane_bot_{role}": bot_token(role) for role in ROLES},
    )


class DemoOperator:
    """Watches the chat like a person: prints the card when it changes, presses Approve."""

    def __init__(self, sandbox: TelegramSandbox, chat_id: int, env) -> None:
        self.sandbox = sandbox
        self.chat_id = chat_id
        self.env = env
        self.work_item: str | None = None
        self._shown: str | None = None
        self._pressed: set[str] = set()

    def card(self):
        if self.work_item is None:
            return None
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


async def serve(engine: Engine, telegram: TelegramConsole) -> web.AppRunner:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    add_routes(app, engine)
    engine.intake.mount(app)
    telegram.mount(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def run_demo(locale: str | None = None) -> int:
    locale = locale or os.environ.get("ORCH_LOCALE", "ru")
    for name, value in SANDBOX_DEFAULTS.items():
        os.environ.setdefault(name, value)
    root = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    os.environ.setdefault("SANDBOX_AGENT_STATE", str(root / "agent-state"))
    env = text_environment(locale)
    async with contextlib.AsyncExitStack() as stack:
        world = await open_world(root, stack)
        settings = demo_settings(root, world, locale)
        engine = await stack.enter_async_context(Engine(settings))
        telegram = TelegramConsole(settings, engine)
        engine.use_notifier(FanoutNotifier([ConsoleNotifier(engine.store, env), telegram.notifier]))
        runner = await serve(engine, telegram)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        world.plane.set_webhook(f"{url}/webhooks/plane", PLANE_SECRET)
        world.gitea.add_hook(*DEMO_REPO, f"{url}/webhooks/gitea", GITEA_SECRET)
        await telegram.start()
        engine.start_worker()
        try:
            outcome = await drive(engine, telegram, world, env)
        finally:
            await telegram.stop()
            await runner.cleanup()
    print(env.get_template("console/demo_end.txt.j2").render(**outcome, root=root))
    return 0 if outcome["status"] == Status.DONE and outcome["board"] and outcome["merged"] else 1


async def drive(engine: Engine, telegram: TelegramConsole, world: World, env) -> dict:
    issue = world.plane.create_issue(
        world.project_id, SAMPLE_TITLE, SAMPLE_DESCRIPTION, as_user=world.operator
    )
    world.plane.move_issue(issue["id"], "In Progress", via="web", as_user=world.operator)
    operator = DemoOperator(world.telegram, OPERATOR_ID, env)
    watcher = asyncio.create_task(operator.watch())
    try:
        task = await asyncio.wait_for(wait_for_task(engine, issue["id"]), DEMO_TIMEOUT_S)
        operator.work_item = task.work_item
        task = await asyncio.wait_for(
            engine.wait_settled(task.id, TERMINAL, idle_active=False), DEMO_TIMEOUT_S
        )
        await asyncio.wait_for(telegram.publisher.idle(), DEMO_TIMEOUT_S)
        await asyncio.wait_for(engine.tracker.idle(), DEMO_TIMEOUT_S)
        operator.look()
    except TimeoutError:
        print(f"demo: the task did not finish within {DEMO_TIMEOUT_S:.0f}s", file=sys.stderr)
        return {"status": "timeout", "board": None, "merged": False}
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
    pr = await world.gitea.pr(*DEMO_REPO, task.pr_number) if task.pr_number else {}
    return {
        "status": task.status,
        "board": world.plane.state_name(issue["id"]),
        "merged": bool(pr.get("merged")),
        "pr_url": task.pr_url,
        "comments": len(world.plane.comments(issue["id"])),
    }


async def wait_for_task(engine: Engine, issue_id: str) -> Task:
    while (task := await engine.store.task_by_tracker_issue(DEMO_PROJECT, issue_id)) is None:
        await asyncio.sleep(0.05)
    return task


async def second_developer_feedback(engine: Engine, task_id: int) -> str | None:
    """The must-fix lines of the developer's second prompt, as the agent read them."""
    runs = [r for r in await engine.store.agent_runs(task_id) if r.role == "developer"]
    if len(runs) < 2 or not runs[1].prompt_path:
        return None
    prompt = Path(runs[1].prompt_path).read_text(encoding="utf-8")
    lines = [line for line in prompt.splitlines() if line.startswith(("P0:", "P1:"))]
    return "\n".join(lines) or None
