"""`conveyor doctor`: check the configuration and each service it names."""

from __future__ import annotations

import shlex
import shutil

from engine.config import Settings
from engine.git import run_git


async def run_doctor(settings: Settings) -> int:
    checks: list[tuple[str, bool, str]] = []
    argv = shlex.split(settings.agent_command)
    found = bool(argv) and shutil.which(argv[0]) is not None
    checks.append(("agent command", found, argv[0] if argv else "empty"))
    if not settings.projects:
        checks.append(("projects", False, "ORCH_PROJECTS lists no project"))
    for project in settings.projects:
        result = await run_git("ls-remote", "--heads", project.remote, project.main_branch)
        ok = result.ok and bool(result.out.strip())
        detail = f"{project.main_branch} found" if ok else "remote or main branch not reachable"
        checks.append((f"project {project.key} remote", ok, detail))
    try:
        settings.db_path.parent.mkdir(parents=True, exist_ok=True)
        checks.append(("database folder", True, str(settings.db_path.parent)))
    except OSError as error:
        checks.append(("database folder", False, error.strerror or str(error)))
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1
