"""Links people can open: to the forge and the tracker, left out when they would not work."""

from __future__ import annotations

import ipaddress
from urllib.parse import quote, urlsplit

from engine.config import Settings
from engine.store import Task

LOCAL_HOSTS = frozenset({"localhost", "localhost.localdomain", ""})


def public_base(url: str | None) -> str | None:
    """The URL without a trailing slash, or None when it is empty or points at loopback."""
    if not url:
        return None
    host = (urlsplit(url).hostname or "").lower()
    if host in LOCAL_HOSTS or host.endswith(".localhost"):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return url.rstrip("/")


def forge_branch_url(settings: Settings, task: Task) -> str | None:
    """The task branch in the forge's web view."""
    project = settings.project(task.project)
    base = public_base(settings.gitea_public_url)
    if base is None or project is None or not project.repo:
        return None
    return f"{base}/{project.repo}/src/branch/{quote(task.branch)}"


def forge_file_url(settings: Settings, task: Task, relpath: str) -> str | None:
    """The file on the task branch in the forge's web view."""
    branch = forge_branch_url(settings, task)
    return None if branch is None else f"{branch}/{quote(relpath)}"


def pull_request_url(settings: Settings, task: Task) -> str | None:
    """The task's pull request in the forge's web view (the forge's own URL may be internal)."""
    project = settings.project(task.project)
    base = public_base(settings.gitea_public_url)
    if base is None or project is None or not project.repo or task.pr_number is None:
        return None
    return f"{base}/{project.repo}/pulls/{task.pr_number}"


def tracker_issue_url(settings: Settings, task: Task) -> str | None:
    project = settings.project(task.project)
    base = public_base(settings.plane_web_url)
    if base is None or project is None or not project.plane_project_id:
        return None
    if not task.tracker_issue_id or not settings.plane_workspace:
        return None
    return (
        f"{base}/{settings.plane_workspace}/projects/{project.plane_project_id}"
        f"/issues/{task.tracker_issue_id}"
    )
