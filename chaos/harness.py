"""What every fault class shares: the sandbox stack in-process, `conveyor run` as a
subprocess, signing, bounded waiting and fingerprints of store tables.

All traffic stays on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bot.telegram import TelegramConsole
from engine.api import add_routes
from engine.config import Settings
from engine.runtime import Engine
from engine.sandbox.gitea import GiteaSandbox
from engine.sandbox.plane import PlaneSandbox
from engine.sandbox.telegram import TelegramSandbox
from engine.store import Store
from engine.webhooks import MAX_BODY_BYTES

SANDBOX_AGENT = f"{sys.executable} -m engine.sandbox.agent"
PLANE_TOKEN = "plane_api_conveyor"
PLANE_SECRET = "plane_wh_chaos_secret"
GITEA_TOKEN = "gitea_conveyor"
GITEA_SECRET = "gitea_wh_chaos_secret"
TELEGRAM_TOKEN = "4242:CHAOS-TOKEN"
CHAT = -1004242  # the ops chat, a supergroup
ADMIN = 42
HUMAN_TOKEN = "plane_api_alice"
DESCRIPTION = "<p>Return a <b>greeting</b> from GET /hello.</p>"
# Telegram calls that are the bot's own polling, not something it says
POLLING = frozenset({"getUpdates", "getMe", "setMyCommands", "deleteWebhook", "getWebhookInfo"})
AGENT_ROLES = ("ANALYST", "ARCHITECT", "DEVELOPER", "REVIEWER", "TESTER", "DEPLOYER")


class ChaosTimeout(AssertionError):
    """A bounded wait ran out: the fault class fails instead of hanging the suite."""


@dataclass
class Outcome:
    """One fault class: a line of figures and the invariants that did not hold."""

    name: str
    figures: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def figure(self, text: str) -> None:
        self.figures.append(text)

    def check(self, condition: bool, failure: str) -> bool:
        if not condition:
            self.failures.append(failure)
        return condition

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        text = f"{verdict} {self.name:<18} " + "; ".join(self.figures)
        text += f" · {self.seconds:.0f}s"
        for failure in self.failures[:8]:
            text += f"\n     ✗ {failure}"
        if len(self.failures) > 8:
            text += f"\n     ✗ … and {len(self.failures) - 8} more"
        return text


# --- waiting --------------------------------------------------------------------------------


async def wait_until(
    predicate: Callable[[], Awaitable[Any]], what: str, timeout_s: float, step_s: float = 0.1
) -> Any:
    """Poll an async predicate until it returns something truthy, at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise ChaosTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(step_s)


async def bounded(awaitable: Awaitable[Any], what: str, timeout_s: float) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise ChaosTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}") from None


# --- signing --------------------------------------------------------------------------------


def hex_hmac(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def plane_headers(body: bytes, event: str = "issue", delivery: str | None = None) -> dict:
    return {
        "Content-Type": "application/json",
        "X-Plane-Event": event,
        "X-Plane-Delivery": delivery or str(uuid.uuid4()),
        "X-Plane-Signature": hex_hmac(PLANE_SECRET, body),
    }


def gitea_headers(body: bytes, event_type: str, delivery: str | None = None) -> dict:
    group = "pull_request" if event_type.startswith("pull_request") else event_type
    return {
        "Content-Type": "application/json",
        "X-Gitea-Event": group,
        "X-Gitea-Event-Type": event_type,
        "X-Gitea-Delivery": delivery or str(uuid.uuid4()),
        "X-Gitea-Signature": hex_hmac(GITEA_SECRET, body),
    }


def state_change(issue: dict, field: str = "state_id", actor: str = "alice") -> bytes:
    """The webhook body Plane sends when an issue's state changes (the full issue inside)."""
    payload = {
        "event": "issue",
        "action": "updated",
        "webhook_id": str(uuid.uuid4()),
        "workspace_id": str(uuid.uuid4()),
        "data": issue,
        "activity": {
            "field": field,
            "old_value": None,
            "new_value": issue["state"]["id"],
            "actor": {"id": "u-" + actor, "display_name": actor},
        },
    }
    return json.dumps(payload).encode()


# --- the store ------------------------------------------------------------------------------


async def table_digest(store: Store, table: str) -> tuple[int, str]:
    """(rows, sha256 of every column of every row in id order) of a store table."""
    rows = await store.fetchall(f"SELECT * FROM {table} ORDER BY id")
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(tuple(row)).encode())
    return len(rows), digest.hexdigest()


def merge_commits(remote: Path, branch: str = "main") -> list[str]:
    """Subjects of the merge commits on a bare repository's branch."""
    out = subprocess.run(
        ["git", "--git-dir", str(remote), "log", "--merges", "--format=%s", branch],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.splitlines()


# --- environment ----------------------------------------------------------------------------


@contextlib.contextmanager
def agent_env(state_dir: Path, **roles: str) -> Iterator[None]:
    """The scripted agent's behaviour for agents this process starts; restored afterwards."""
    keys = ["SANDBOX_AGENT_STATE", "SANDBOX_AGENT_DELAY_S"] + [
        f"SANDBOX_AGENT_{role}" for role in AGENT_ROLES
    ]
    saved = {key: os.environ.get(key) for key in keys}
    for key in keys:
        os.environ.pop(key, None)
    os.environ["SANDBOX_AGENT_STATE"] = str(state_dir)
    for role, steps in roles.items():
        os.environ[f"SANDBOX_AGENT_{role.upper()}"] = steps
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the whole stack in this process --------------------------------------------------------


@dataclass
class Stack:
    """Plane, Gitea and Telegram sandboxes, the engine, its Telegram console and its HTTP
    server (webhooks, /healthz), wired like `conveyor run` wires them."""

    root: Path
    plane: PlaneSandbox
    gitea: GiteaSandbox
    telegram: TelegramSandbox
    engine: Engine
    console: TelegramConsole
    runner: web.AppRunner
    url: str
    project_id: str
    human: str
    remote: Path
    session: aiohttp.ClientSession

    @classmethod
    async def open(cls, root: Path, *, ci_state: str | None = "success", **overrides: Any) -> Stack:
        root.mkdir(parents=True, exist_ok=True)
        plane = PlaneSandbox(
            workspace="acme", api_token=PLANE_TOKEN, rate_limit=None, retry_backoff_s=0.0
        )
        await plane.start()
        project_id = plane.create_project("ORCH", "Orchestrator")
        human = plane.add_bot(HUMAN_TOKEN, "alice")
        gitea = GiteaSandbox(root / "forge", token=GITEA_TOKEN, ci_state=ci_state)
        await gitea.start()
        remote = await gitea.create_repo("team", "app")
        telegram = TelegramSandbox(TELEGRAM_TOKEN, group_per_minute=60_000, private_per_second=1000)
        await telegram.start()
        values: dict[str, Any] = dict(
            _env_file=None,
            db_path=root / "conveyor.db",
            workdir=root / "work",
            projects=[
                {
                    "key": "ORCH",
                    "remote": str(remote),
                    "repo": "team/app",
                    "plane_project_id": project_id,
                }
            ],
            agent_command=SANDBOX_AGENT,
            agent_timeout_s=120,
            agent_retry_backoff_s=0,
            job_lease_s=30,
            plane_api_url=plane.base_url,
            plane_api_token=PLANE_TOKEN,
            plane_workspace="acme",
            plane_webhook_secret=PLANE_SECRET,
            gitea_url=gitea.base_url,
            gitea_token=GITEA_TOKEN,
            gitea_webhook_secret=GITEA_SECRET,
            gitea_public_url="https://git.example.com",
            telegram_token=TELEGRAM_TOKEN,
            telegram_api_base=telegram.base_url,
            telegram_chat_id=CHAT,
            telegram_admin_ids=[ADMIN],
            telegram_pace_s=0.0,
            telegram_debounce_s=0.05,
            locale="en",
            reconcile_grace_s=0,
        )
        values.update(overrides)
        settings = Settings(**values)
        engine = Engine(settings)
        await engine.open()
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        add_routes(app, engine)
        engine.intake.mount(app)
        console.mount(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        plane.set_webhook(f"{url}/webhooks/plane", PLANE_SECRET)
        gitea.add_hook("team", "app", f"{url}/webhooks/gitea", GITEA_SECRET)
        await console.start()
        engine.start_worker()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        return cls(
            root,
            plane,
            gitea,
            telegram,
            engine,
            console,
            runner,
            url,
            project_id,
            human,
            remote,
            session,
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.session.close()
        with contextlib.suppress(Exception):
            await self.runner.cleanup()
        with contextlib.suppress(Exception):
            await bounded(self.console.stop(), "the Telegram console to stop", 30)
        with contextlib.suppress(Exception):
            await bounded(self.engine.close(), "the engine to stop", 60)
        with contextlib.suppress(Exception):
            await self.gitea.stop()
        with contextlib.suppress(Exception):
            await self.plane.stop()
        with contextlib.suppress(Exception):
            await self.telegram.stop()

    # --- a person on the board ------------------------------------------------------------

    def issue(self, name: str, state: str = "Backlog") -> dict:
        return self.plane.create_issue(
            self.project_id, name, DESCRIPTION, state, as_user=self.human
        )

    def move(self, issue_id: str, state: str) -> None:
        self.plane.move_issue(issue_id, state, via="web", as_user=self.human)

    # --- quiet ----------------------------------------------------------------------------

    async def settle(self, timeout_s: float = 120) -> None:
        """Every queued delivery sent and processed, the board and the chat up to date."""

        async def quiet() -> None:
            for _ in range(3):  # a processed delivery may cause another; go round a few times
                await self.plane.drain()
                await self.gitea.drain()
                await self.engine.intake.idle()
                await self.engine.tracker.idle()
                await self.console.publisher.idle()

        await bounded(quiet(), "the stack to settle", timeout_s)

    # --- HTTP -----------------------------------------------------------------------------

    async def post(self, source: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        async with self.session.post(
            f"{self.url}/webhooks/{source}", data=body, headers=headers
        ) as response:
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, {}

    # --- Telegram -------------------------------------------------------------------------

    def card_sends(self) -> dict[str, int]:
        """Work item -> cards sent for it (sendMessage answered 200 whose text is a card)."""
        counts: dict[str, int] = {}
        for call in self.telegram.calls:
            if call.method != "sendMessage" or call.status != 200:
                continue
            text = (call.result or {}).get("text", "")
            head = text.split(" ", 1)[0]
            if head.startswith("ORCH-"):
                counts[head] = counts.get(head, 0) + 1
        return counts

    def telegram_traffic(self) -> int:
        return sum(1 for call in self.telegram.calls if call.method not in POLLING)


# --- `conveyor run` as a subprocess ---------------------------------------------------------


def conveyor_env(root: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SANDBOX_"))}
    env.update(
        ORCH_DB_PATH=str(root / "conveyor.db"),
        ORCH_WORKDIR=str(root / "work"),
        ORCH_HTTP_HOST="127.0.0.1",
        ORCH_HTTP_PORT=str(port),
        ORCH_AGENT_COMMAND=SANDBOX_AGENT,
        ORCH_AGENT_RETRY_BACKOFF_S="0",
        SANDBOX_AGENT_STATE=str(root / "agent-state"),
    )
    env.update(extra)
    return env


class Conveyor:
    """`conveyor run` started, killed and started again on the same store and port."""

    def __init__(self, root: Path, env: dict[str, str], port: int) -> None:
        self.root = root
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = root / "conveyor.log"

    def spawn(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "run"],
                env=self.env,
                cwd=self.root,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.starts += 1
        return self.process

    async def healthy(self, session: aiohttp.ClientSession, timeout_s: float = 60) -> None:
        async def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"conveyor run exited with {self.process.returncode}; log: {self.log_tail()}"
                )
            try:
                async with session.get(f"{self.url}/healthz") as response:
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_until(answers, "conveyor run to answer /healthz", timeout_s, step_s=0.05)

    async def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.process.wait, 30)

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL if it does not stop within 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            await self.kill()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_group(pid: int) -> None:
    """Stop an agent left behind (its own process group), by its id."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
