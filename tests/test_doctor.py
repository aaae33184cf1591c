"""`conveyor doctor` as a user runs it, against the sandbox servers started here."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.doctor import Check, column_check, guarded
from engine.plane import PlaneState
from engine.sandbox.gitea import GiteaSandbox
from engine.sandbox.plane import PlaneSandbox
from engine.sandbox.telegram import TelegramSandbox

TELEGRAM_TOKEN = "123456:TG-secret-token-value"
PLANE_TOKEN = "plane-secret-token-value"
GITEA_TOKEN = "gitea-secret-token-value"
PLANE_HOOK_SECRET = "plane-hook-secret-value"
GITEA_HOOK_SECRET = "gitea-hook-secret-value"
SECRETS = (TELEGRAM_TOKEN, PLANE_TOKEN, GITEA_TOKEN, PLANE_HOOK_SECRET, GITEA_HOOK_SECRET)
SANDBOX_AGENT = f"{sys.executable} -m engine.sandbox.agent"


@dataclass
class Doctor:
    code: int
    out: str
    err: str

    def line(self, label: str) -> str:
        """The one line for a check, by its label ("project ORCH remote")."""
        found = [line for line in self.out.splitlines() if line[5:].startswith(label + ":")]
        assert len(found) == 1, f"{label!r} in:\n{self.out}"
        return found[0]

    def status(self, label: str) -> str:
        return self.line(label)[:4].strip()

    def check_lines(self) -> list[str]:
        return self.out.strip().splitlines()[:-1]  # the last line is the verdict


@dataclass
class Services:
    telegram: TelegramSandbox
    plane: PlaneSandbox
    gitea: GiteaSandbox
    plane_project: str
    remote: Path

    def env(self, tmp_path: Path, **overrides: str) -> dict[str, str]:
        project = {
            "key": "ORCH",
            "remote": str(self.remote),
            "repo": "acme/app",
            "plane_project_id": self.plane_project,
        }
        env = {
            "ORCH_LOCALE": "en",
            "ORCH_PROJECTS": json.dumps([project]),
            "ORCH_AGENT_COMMAND": SANDBOX_AGENT,
            "ORCH_DB_PATH": str(tmp_path / "data" / "conveyor.db"),
            "ORCH_TELEGRAM_TOKEN": TELEGRAM_TOKEN,
            "ORCH_TELEGRAM_API_BASE": self.telegram.base_url,
            "ORCH_TELEGRAM_CHAT_ID": "-1001",
            "ORCH_TELEGRAM_ADMIN_IDS": "42,43",
            "ORCH_PLANE_API_URL": self.plane.base_url or "",
            "ORCH_PLANE_API_TOKEN": PLANE_TOKEN,
            "ORCH_PLANE_WORKSPACE": "acme",
            "ORCH_PLANE_WEBHOOK_SECRET": PLANE_HOOK_SECRET,
            "ORCH_GITEA_URL": self.gitea.base_url,
            "ORCH_GITEA_TOKEN": GITEA_TOKEN,
            "ORCH_GITEA_WEBHOOK_SECRET": GITEA_HOOK_SECRET,
        }
        env.update(overrides)
        return {name: value for name, value in env.items() if value != ""}


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    async with (
        TelegramSandbox(TELEGRAM_TOKEN) as telegram,
        PlaneSandbox("acme", PLANE_TOKEN, rate_limit=None) as plane,
        GiteaSandbox(tmp_path / "gitea", GITEA_TOKEN, watch=False) as gitea,
    ):
        plane_project = plane.create_project("ORCH", "Conveyor")
        remote = await gitea.create_repo("acme", "app")
        yield Services(telegram, plane, gitea, plane_project, remote)


async def doctor(cwd: Path, env: dict[str, str]) -> Doctor:
    """`python -m bot.cli doctor` in a clean environment, without blocking the sandboxes."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SANDBOX_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "doctor",
        cwd=cwd,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    result = Doctor(proc.returncode or 0, out.decode(), err.decode())
    for secret in SECRETS:
        assert secret not in result.out and secret not in result.err, "a secret was printed"
    return result


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ALL_CHECKS = (
    "agent command",
    "database folder",
    "Telegram bot",
    "Telegram chat",
    "Telegram admins",
    "Plane settings",
    "Plane webhook secret",
    "Gitea settings",
    "Gitea webhook secret",
    "project ORCH remote",
    "project ORCH Gitea repository",
    "project ORCH Plane states",
    "project ORCH Plane columns",
)


async def test_everything_configured_and_reachable_passes(
    tmp_path: Path, services: Services
) -> None:
    result = await doctor(tmp_path, services.env(tmp_path))
    assert result.code == 0, result.out + result.err
    for label in ALL_CHECKS:
        assert result.status(label) == "ok", result.out
    assert len(result.check_lines()) == len(ALL_CHECKS)
    assert "@conveyor_bot" in result.line("Telegram bot")
    assert "branch main found" in result.line("project ORCH remote")
    head = await services.gitea.branch_sha("acme", "app", "main")
    assert head and head[:10] in result.line("project ORCH Gitea repository")
    assert result.out.rstrip().splitlines()[-1] == f"all checks passed: {len(ALL_CHECKS)}"
    assert (tmp_path / "data").is_dir() and not (tmp_path / "data" / "conveyor.db").exists()


async def test_a_wrong_telegram_token_fails_that_line_with_the_reason(
    tmp_path: Path, services: Services
) -> None:
    wrong = "123456:not-the-token"
    result = await doctor(tmp_path, services.env(tmp_path, ORCH_TELEGRAM_TOKEN=wrong))
    assert result.code == 1
    line = result.line("Telegram bot")
    assert line.startswith("FAIL") and "Unauthorized" in line
    assert wrong not in result.out + result.err
    assert all(result.status(label) == "ok" for label in ALL_CHECKS if label != "Telegram bot")


async def test_plane_down_fails_its_line_and_the_others_still_print(
    tmp_path: Path, services: Services
) -> None:
    plane_url = f"http://127.0.0.1:{closed_port()}"
    result = await doctor(tmp_path, services.env(tmp_path, ORCH_PLANE_API_URL=plane_url))
    assert result.code == 1
    line = result.line("project ORCH Plane states")
    assert line.startswith("FAIL") and "unreachable" in line
    assert "Plane columns" not in result.out  # nothing to compare the columns with
    for label in ("Telegram bot", "project ORCH remote", "project ORCH Gitea repository"):
        assert result.status(label) == "ok"
    assert result.out.rstrip().splitlines()[-1].startswith("checks failed: 1 of")


async def test_a_project_whose_remote_does_not_exist_fails(
    tmp_path: Path, services: Services
) -> None:
    projects = [
        {"key": "ORCH", "remote": str(services.remote)},
        {"key": "GONE", "remote": str(tmp_path / "missing.git")},
        {"key": "TRUNK", "remote": str(services.remote), "main_branch": "trunk"},
        {"key": "NOREPO", "remote": str(services.remote), "repo": "acme/missing"},
    ]
    env = services.env(tmp_path, ORCH_PROJECTS=json.dumps(projects))
    result = await doctor(tmp_path, env)
    assert result.code == 1
    assert result.status("project ORCH remote") == "ok"
    gone = result.line("project GONE remote")
    assert gone.startswith("FAIL") and "not reachable" in gone
    trunk = result.line("project TRUNK remote")
    assert trunk.startswith("FAIL") and "no branch trunk" in trunk
    assert result.status("project NOREPO Gitea repository") == "FAIL"


async def test_unreachable_services_fail_without_printing_a_secret(tmp_path: Path) -> None:
    port = closed_port()
    project = {"key": "ORCH", "remote": str(tmp_path / "x.git"), "repo": "a/b"}
    env = {
        "ORCH_LOCALE": "en",
        "ORCH_PROJECTS": json.dumps([{**project, "plane_project_id": "p1"}]),
        "ORCH_AGENT_COMMAND": SANDBOX_AGENT,
        "ORCH_DB_PATH": str(tmp_path / "conveyor.db"),
        "ORCH_TELEGRAM_TOKEN": TELEGRAM_TOKEN,
        "ORCH_TELEGRAM_API_BASE": f"http://127.0.0.1:{port}",
        "ORCH_TELEGRAM_CHAT_ID": "-1001",
        "ORCH_TELEGRAM_ADMIN_IDS": "42",
        "ORCH_PLANE_API_URL": f"http://127.0.0.1:{port}",
        "ORCH_PLANE_API_TOKEN": PLANE_TOKEN,
        "ORCH_PLANE_WORKSPACE": "acme",
        "ORCH_PLANE_WEBHOOK_SECRET": PLANE_HOOK_SECRET,
        "ORCH_GITEA_URL": f"http://127.0.0.1:{port}",
        "ORCH_GITEA_TOKEN": GITEA_TOKEN,
        "ORCH_GITEA_WEBHOOK_SECRET": GITEA_HOOK_SECRET,
    }
    result = await doctor(tmp_path, env)
    assert result.code == 1
    for label in (
        "Telegram bot",
        "project ORCH remote",
        "project ORCH Gitea repository",
        "project ORCH Plane states",
    ):
        assert result.status(label) == "FAIL", result.out
        assert len(result.line(label)) > len(label) + 10  # a reason, not just the label


async def test_a_service_that_never_answers_fails_within_seconds(
    tmp_path: Path, services: Services
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    silent = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    env = services.env(tmp_path, ORCH_PLANE_API_URL=silent, ORCH_TELEGRAM_API_BASE=silent)
    started = asyncio.get_running_loop().time()
    try:
        result = await doctor(tmp_path, env)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert asyncio.get_running_loop().time() - started < 20
    assert result.code == 1
    assert result.status("Telegram bot") == "FAIL"
    assert "no answer within" in result.line("project ORCH Plane states")
    assert result.status("project ORCH Gitea repository") == "ok"


async def test_missing_board_columns_warn_but_pass(tmp_path: Path, services: Services) -> None:
    bare = services.plane.create_project("BARE", "Bare board", conveyor_states=False)
    project = {"key": "ORCH", "remote": str(services.remote), "plane_project_id": bare}
    project["repo"] = "acme/app"
    result = await doctor(tmp_path, services.env(tmp_path, ORCH_PROJECTS=json.dumps([project])))
    assert result.code == 0, result.out
    line = result.line("project ORCH Plane columns")
    assert line.startswith("warn") and "Architecture" in line and "Needs Input" in line
    assert "In Progress" not in line and "Done" not in line  # Plane's default states
    assert "warnings: 1" in result.out.splitlines()[-1]


async def test_webhook_secrets_are_required_unless_unsigned_is_allowed(
    tmp_path: Path, services: Services
) -> None:
    unset = {"ORCH_PLANE_WEBHOOK_SECRET": "", "ORCH_GITEA_WEBHOOK_SECRET": ""}
    refused = await doctor(tmp_path, services.env(tmp_path, **unset))
    assert refused.code == 1
    assert "ORCH_PLANE_WEBHOOK_SECRET is not set" in refused.line("Plane webhook secret")
    assert refused.status("Gitea webhook secret") == "FAIL"
    env = services.env(tmp_path, ORCH_ALLOW_UNSIGNED_WEBHOOKS="true", **unset)
    allowed = await doctor(tmp_path, env)
    assert allowed.code == 0, allowed.out
    assert allowed.status("Plane webhook secret") == "warn"
    assert "ORCH_ALLOW_UNSIGNED_WEBHOOKS=true" in allowed.line("Gitea webhook secret")


async def test_telegram_needs_a_chat_and_admins(tmp_path: Path, services: Services) -> None:
    env = services.env(tmp_path, ORCH_TELEGRAM_CHAT_ID="", ORCH_TELEGRAM_ADMIN_IDS="")
    result = await doctor(tmp_path, env)
    assert result.code == 1
    assert result.status("Telegram bot") == "ok"
    assert "ORCH_TELEGRAM_CHAT_ID is not set" in result.line("Telegram chat")
    assert "ORCH_TELEGRAM_ADMIN_IDS is not set" in result.line("Telegram admins")


async def test_unconfigured_services_are_skipped(tmp_path: Path, remote: Path) -> None:
    env = {
        "ORCH_LOCALE": "en",
        "ORCH_PROJECTS": json.dumps([{"key": "ORCH", "remote": str(remote)}]),
        "ORCH_AGENT_COMMAND": SANDBOX_AGENT,
    }
    result = await doctor(tmp_path, env)
    assert result.code == 0, result.out
    for label in ("Telegram bot", "Plane settings", "Gitea settings"):
        assert result.status(label) == "skip"
    assert "webhook secret" not in result.out


async def test_a_missing_agent_command_fails(tmp_path: Path, remote: Path) -> None:
    env = {
        "ORCH_LOCALE": "en",
        "ORCH_PROJECTS": json.dumps([{"key": "ORCH", "remote": str(remote)}]),
        "ORCH_AGENT_COMMAND": "no-such-agent-binary --flag",
    }
    result = await doctor(tmp_path, env)
    assert result.code == 1
    assert "no-such-agent-binary" in result.line("agent command")
    assert "--flag" not in result.out


async def test_an_existing_database_is_only_read(tmp_path: Path, remote: Path) -> None:
    db = tmp_path / "data" / "conveyor.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    before = (db.read_bytes(), db.stat().st_mtime_ns, sorted(os.listdir(db.parent)))
    env = {
        "ORCH_LOCALE": "en",
        "ORCH_PROJECTS": json.dumps([{"key": "ORCH", "remote": str(remote)}]),
        "ORCH_AGENT_COMMAND": SANDBOX_AGENT,
        "ORCH_DB_PATH": str(db),
    }
    result = await doctor(tmp_path, env)
    assert result.code == 0, result.out
    assert "is a database" in result.line("database folder")
    assert (db.read_bytes(), db.stat().st_mtime_ns, sorted(os.listdir(db.parent))) == before
    db.write_text("not a database")
    foreign = await doctor(tmp_path, env)
    assert foreign.code == 1 and "not an SQLite database" in foreign.line("database folder")


def test_in_progress_without_a_started_state_fails() -> None:
    names = {"in_progress": "In Progress", "done": "Done", "review": "Review"}
    states = [PlaneState("1", "Todo", "unstarted"), PlaneState("2", "Done", "completed")]
    check = column_check("ORCH", states, names)
    assert check.status == "fail" and check.args["name"] == "In Progress"
    started = [*states, PlaneState("3", "Doing", "started")]
    assert column_check("ORCH", started, names).status == "warn"
    every = [*started, PlaneState("4", "in progress", "started"), PlaneState("5", "REVIEW", "x")]
    assert column_check("ORCH", every, names).status == "ok"


async def test_a_check_that_hangs_or_raises_becomes_a_failed_line() -> None:
    async def hangs() -> list[Check]:
        await asyncio.sleep(30)
        return []

    async def raises() -> list[Check]:
        raise RuntimeError("boom\nsecond line")

    (slow,) = await guarded("remote", hangs, "ORCH", timeout_s=0.05)
    assert (slow.status, slow.detail, slow.subject) == ("fail", "timeout", "ORCH")
    (broken,) = await guarded("remote", raises, "ORCH")
    assert broken.status == "fail" and broken.args["reason"] == "RuntimeError: boom | second line"
