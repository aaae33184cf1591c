"""`conveyor doctor`: check the configuration and each service it names.

Every check gives one line (ok, warn, FAIL, or skip when the service is not configured) and
never raises: a service that does not answer within a few seconds, or answers with an error,
is a failed line with the reason. The words are in `templates/console/doctor.txt.j2`; no
secret from the settings ever reaches the output.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from pydantic import SecretStr

from engine.config import ProjectConfig, Settings
from engine.git import run_git
from engine.gitea import GiteaClient
from engine.plane import PlaneClient, PlaneState
from engine.runtime import gitea_client, plane_client
from engine.templating import text_environment

if TYPE_CHECKING:
    from aiogram import Bot

TEMPLATE = "console/doctor.txt.j2"
CHECK_TIMEOUT_S = 5.0
# The guard around a whole check: a little longer than the timeouts inside it, so that their
# own, more precise, reasons win.
GUARD_TIMEOUT_S = CHECK_TIMEOUT_S + 1.0
REASON_LIMIT = 300
SQLITE_HEADER = b"SQLite format 3\x00"
STARTED_GROUP = "started"

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    """One line of the report; `what` and `detail` are codes the template turns into words."""

    status: Status
    what: str
    detail: str
    subject: str = ""  # the project key, for per-project checks
    args: dict[str, Any] = field(default_factory=dict)


async def run_doctor(settings: Settings) -> int:
    try:
        checks = await collect_checks(settings)
    except Exception as error:  # a bug here must still leave a line, not a traceback
        checks = [Check("fail", "doctor", "error", args={"reason": _reason(error)})]
    print(render(settings, checks), end="", flush=True)
    return 1 if any(check.status == "fail" for check in checks) else 0


def render(settings: Settings, checks: list[Check]) -> str:
    counted = [check for check in checks if check.status != "skip"]
    text = (
        text_environment(settings.locale)
        .get_template(TEMPLATE)
        .render(
            checks=checks,
            total=len(counted),
            failed=sum(check.status == "fail" for check in counted),
            warnings=sum(check.status == "warn" for check in counted),
        )
    )
    return scrub(text, secrets_of(settings))


# --- secrets ---------------------------------------------------------------------------------


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings, as is and URL-quoted, longest first."""
    values: set[str] = set()
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr) and value.get_secret_value():
            secret = value.get_secret_value()
            values.update({secret, quote(secret, safe="")})
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _reason(error: BaseException | str | None) -> str:
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}".rstrip(": ")
    lines = (" ".join(part.split()) for part in (error or "").splitlines())
    line = " | ".join(part for part in lines if part)
    return line if len(line) <= REASON_LIMIT else line[: REASON_LIMIT - 3] + "..."


# --- running the checks ----------------------------------------------------------------------


async def guarded(
    what: str,
    run: Callable[[], Awaitable[list[Check]]],
    subject: str = "",
    timeout_s: float | None = None,
) -> list[Check]:
    """Run one check with a timeout; whatever goes wrong becomes a failed line."""
    timeout_s = GUARD_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return await asyncio.wait_for(run(), timeout_s)
    except TimeoutError:
        return [Check("fail", what, "timeout", subject, {"seconds": f"{timeout_s:g}"})]
    except Exception as error:
        return [Check("fail", what, "error", subject, {"reason": _reason(error)})]


async def collect_checks(settings: Settings) -> list[Check]:
    """All checks, run concurrently, in a fixed order."""
    built: list[Check] = []
    plane = _client("plane", plane_client, settings, built)
    gitea = _client("gitea", gitea_client, settings, built)
    broken = {check.what for check in built}
    try:
        groups = [
            guarded("agent", lambda: _sync(check_agent(settings.agent_command))),
            guarded("database", lambda: asyncio.to_thread(check_database, settings.db_path)),
            *telegram_checks(settings),
            _sync(built + [c for c in service_checks(settings) if c.what not in broken]),
            *[
                guarded(what, run, project.key)
                for project in settings.projects
                for what, run in project_checks(settings, project, plane, gitea)
            ],
        ]
        if not settings.projects:
            groups.append(_sync([Check("fail", "projects", "no_projects")]))
        return [check for group in await asyncio.gather(*groups) for check in group]
    finally:
        for client in (plane, gitea):
            if client is not None:
                await guarded("close", lambda c=client: _closed(c))


def _client(
    what: str, build: Callable[[Settings], Any], settings: Settings, failures: list[Check]
) -> Any:
    """The service's client, or None (not configured, or a failed line when it cannot be
    built)."""
    try:
        return build(settings)
    except Exception as error:
        failures.append(Check("fail", what, "error", args={"reason": _reason(error)}))
        return None


async def _sync(checks: list[Check]) -> list[Check]:
    return checks


async def _closed(client: PlaneClient | GiteaClient) -> list[Check]:
    await client.aclose()
    return []


# --- the agent and the database --------------------------------------------------------------


def check_agent(command: str) -> list[Check]:
    try:
        argv = shlex.split(command)
    except ValueError as error:
        return [Check("fail", "agent", "agent_unparsable", args={"reason": _reason(str(error))})]
    if not argv:
        return [Check("fail", "agent", "agent_empty")]
    program = argv[0]
    found = shutil.which(program)
    if found is None and Path(program).expanduser().is_file():
        found = str(Path(program).expanduser())
    if found is None:
        return [Check("fail", "agent", "agent_missing", args={"name": program})]
    return [Check("ok", "agent", "agent_found", args={"path": found})]


def check_database(db_path: Path) -> list[Check]:
    """The folder is created if missing and must take a new file; an existing database file
    is only opened read-only, to see that it is one."""
    folder = db_path.parent
    args: dict[str, Any] = {"folder": str(folder), "file": str(db_path)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = _reason(error.strerror or str(error))
        return [Check("fail", "database", "folder_failed", args={**args, "reason": reason})]
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".conveyor-doctor-"):
            pass
    except OSError as error:
        reason = _reason(error.strerror or str(error))
        return [Check("fail", "database", "folder_readonly", args={**args, "reason": reason})]
    if not db_path.exists():
        return [Check("ok", "database", "folder_writable", args=args)]
    try:
        with db_path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        reason = _reason(error.strerror or str(error))
        return [Check("fail", "database", "database_unreadable", args={**args, "reason": reason})]
    if header and header != SQLITE_HEADER:
        return [Check("fail", "database", "database_foreign", args=args)]
    if not os.access(db_path, os.W_OK):
        return [Check("fail", "database", "database_readonly", args=args)]
    return [Check("ok", "database", "database_found", args=args)]


# --- Telegram --------------------------------------------------------------------------------


def telegram_checks(settings: Settings) -> list[Awaitable[list[Check]]]:
    if settings.telegram_token is None:
        return [_sync([Check("skip", "telegram_bot", "not_configured")])]
    chat = (
        Check("ok", "telegram_chat", "set_to", args={"value": settings.telegram_chat_id})
        if settings.telegram_chat_id is not None
        else Check("fail", "telegram_chat", "unset", args={"name": "ORCH_TELEGRAM_CHAT_ID"})
    )
    admins = (
        Check("ok", "telegram_admins", "count", args={"count": len(settings.telegram_admin_ids)})
        if settings.telegram_admin_ids
        else Check("fail", "telegram_admins", "unset", args={"name": "ORCH_TELEGRAM_ADMIN_IDS"})
    )
    # Imported here, before any timeout starts (aiogram takes seconds to import), and only
    # when Telegram is configured; a broken import is a failed line.
    try:
        from bot.telegram import build_bot
    except Exception as error:
        failed = Check("fail", "telegram_bot", "error", args={"reason": _reason(error)})
        return [_sync([failed, chat, admins])]
    check = guarded("telegram_bot", lambda: check_telegram_bot(settings, build_bot))
    return [check, _sync([chat, admins])]


async def check_telegram_bot(
    settings: Settings, build_bot: Callable[[Settings], Bot]
) -> list[Check]:
    bot = build_bot(settings)
    try:
        me = await bot.get_me(request_timeout=int(CHECK_TIMEOUT_S))
    finally:
        await bot.session.close()
    return [Check("ok", "telegram_bot", "bot_answers", args={"username": me.username or me.id})]


# --- Plane and Gitea settings ----------------------------------------------------------------


def service_checks(settings: Settings) -> list[Check]:
    plane = {
        "ORCH_PLANE_API_URL": settings.plane_api_url,
        "ORCH_PLANE_API_TOKEN": settings.plane_api_token,
        "ORCH_PLANE_WORKSPACE": settings.plane_workspace,
    }
    gitea = {"ORCH_GITEA_URL": settings.gitea_url, "ORCH_GITEA_TOKEN": settings.gitea_token}
    checks: list[Check] = []
    for service, variables, used_by, secret in (
        ("plane", plane, "plane_project_id", settings.plane_webhook_secret),
        ("gitea", gitea, "repo", settings.gitea_webhook_secret),
    ):
        missing = [name for name, value in variables.items() if not value]
        if len(missing) == len(variables):
            checks.append(Check("skip", service, "not_configured"))
            continue
        if missing:
            checks.append(Check("fail", service, "incomplete", args={"names": ", ".join(missing)}))
            continue
        if any(getattr(project, used_by) for project in settings.projects):
            checks.append(Check("ok", service, "configured"))
        else:
            checks.append(Check("warn", service, "unused", args={"field": used_by}))
        checks.append(webhook_secret_check(service, secret, settings.allow_unsigned_webhooks))
    return checks


def webhook_secret_check(service: str, secret: SecretStr | None, unsigned_ok: bool) -> Check:
    what = f"{service}_secret"
    if secret is not None and secret.get_secret_value():
        return Check("ok", what, "secret_set")
    if unsigned_ok:
        return Check("warn", what, "unsigned")
    return Check("fail", what, "unset", args={"name": f"ORCH_{service.upper()}_WEBHOOK_SECRET"})


# --- projects --------------------------------------------------------------------------------


def project_checks(
    settings: Settings,
    project: ProjectConfig,
    plane: PlaneClient | None,
    gitea: GiteaClient | None,
) -> list[tuple[str, Callable[[], Awaitable[list[Check]]]]]:
    checks: list[tuple[str, Callable[[], Awaitable[list[Check]]]]] = [
        ("remote", lambda: check_remote(project))
    ]
    if project.repo:
        repo = project.repo
        if gitea is None:
            checks.append(("gitea_repo", lambda: _sync([_service_off("gitea_repo", project)])))
        else:
            checks.append(("gitea_repo", lambda: check_gitea_repo(gitea, project, repo)))
    if project.plane_project_id:
        plane_id = project.plane_project_id
        if plane is None:
            checks.append(("plane_states", lambda: _sync([_service_off("plane_states", project)])))
        else:
            names = settings.plane_state_names
            checks.append(
                ("plane_states", lambda: check_plane_states(plane, project, plane_id, names))
            )
    return checks


def _service_off(what: str, project: ProjectConfig) -> Check:
    service = "Gitea" if what == "gitea_repo" else "Plane"
    return Check("warn", what, "service_off", project.key, {"service": service})


async def check_remote(project: ProjectConfig) -> list[Check]:
    branch = project.main_branch
    result = await run_git(
        "ls-remote", "--heads", project.remote, branch, timeout_s=CHECK_TIMEOUT_S
    )
    args: dict[str, Any] = {"branch": branch}
    if not result.ok:
        reason = _reason(result.err) or f"git exited with {result.code}"
        return [Check("fail", "remote", "unreachable", project.key, {**args, "reason": reason})]
    heads = {line.split("\t", 1)[-1].strip() for line in result.out.splitlines()}
    if f"refs/heads/{branch}" not in heads:
        return [Check("fail", "remote", "branch_missing", project.key, args)]
    return [Check("ok", "remote", "branch_found", project.key, args)]


async def check_gitea_repo(gitea: GiteaClient, project: ProjectConfig, repo: str) -> list[Check]:
    args: dict[str, Any] = {"repo": repo, "branch": project.main_branch}
    head = await gitea.branch_head(repo, project.main_branch)
    if not head.ok:
        return [Check("fail", "gitea_repo", "error", project.key, {"reason": _reason(head.error)})]
    if head.value is None:
        return [Check("fail", "gitea_repo", "gitea_missing", project.key, args)]
    return [
        Check("ok", "gitea_repo", "gitea_branch", project.key, {**args, "sha": head.value[:10]})
    ]


async def check_plane_states(
    plane: PlaneClient, project: ProjectConfig, plane_id: str, names: dict[str, str]
) -> list[Check]:
    listed = await plane.list_states(plane_id)
    if not listed.ok:
        reason = _reason(listed.error)
        return [Check("fail", "plane_states", "error", project.key, {"reason": reason})]
    states = listed.value or []
    found = Check("ok", "plane_states", "states_listed", project.key, {"count": len(states)})
    return [found, column_check(project.key, states, names)]


def column_check(key: str, states: list[PlaneState], names: dict[str, str]) -> Check:
    """Which configured board columns have no state (matched like the webhooks match them:
    by name, ignoring case). Only In Progress is required, and a state of the started group
    stands in for it; the other columns missing is a warning."""
    present = {state.name.casefold() for state in states}
    wanted = list(dict.fromkeys(names.values()))
    missing = [name for name in wanted if name.casefold() not in present]
    in_progress = names.get("in_progress", "")
    if in_progress in missing and not any(state.group == STARTED_GROUP for state in states):
        args = {"name": in_progress, "group": STARTED_GROUP, "names": ", ".join(missing)}
        return Check("fail", "plane_columns", "in_progress_missing", key, args)
    if missing:
        return Check("warn", "plane_columns", "columns_missing", key, {"names": ", ".join(missing)})
    return Check("ok", "plane_columns", "columns_present", key, {"count": len(wanted)})
