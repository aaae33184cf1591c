"""Staging: the staging hook on the validated tree, then the health check.

The hook is an argument list (no shell) run with BUILD_CONTEXT set to the
validated worktree and GIT_SHA to the validated head, so it never recomputes
either. Success needs both: the hook exited 0 and the health check answered 2xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from pathlib import Path

import httpx

from engine.config import ENV_PREFIX, Settings
from engine.gates import GateResult, GateVerdict

OUTPUT_TAIL_CHARS = 3000


def hook_env(worktree: Path, sha: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(BUILD_CONTEXT=str(worktree), GIT_SHA=sha)
    return env


async def run_hook(
    command: str, worktree: Path, sha: str, timeout_s: float
) -> tuple[int | None, str]:
    """Run the hook; returns its exit code (None on timeout or when it cannot start) and output."""
    try:
        argv = shlex.split(command)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=worktree,
            env=hook_env(worktree, sha),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except (OSError, ValueError) as error:
        return None, f"the hook cannot start: {error}"
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError) as error:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(error, asyncio.CancelledError):
            raise
        return None, f"the hook ran longer than {timeout_s:g}s and was stopped"
    return proc.returncode, output.decode(errors="replace")


async def health_check(url: str, tries: int, interval_s: float) -> tuple[bool, str]:
    last = "no answer"
    async with httpx.AsyncClient(timeout=10) as client:
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(interval_s)
            try:
                response = await client.get(url)
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}"
                continue
            if response.is_success:
                return True, f"health check answered {response.status_code}"
            last = f"HTTP {response.status_code}"
    return False, f"health check failed {tries} times (last: {last})"


async def run_staging(settings: Settings, worktree: Path, sha: str) -> GateResult:
    if not settings.deploy_staging_hook:
        return GateResult(GateVerdict.PASS, "no staging hook configured")
    code, output = await run_hook(
        settings.deploy_staging_hook, worktree, sha, settings.deploy_hook_timeout_s
    )
    tail = output[-OUTPUT_TAIL_CHARS:]
    if code != 0:
        reason = (
            f"staging hook failed ({'exit code ' + str(code) if code is not None else 'no exit'})"
        )
        return GateResult(GateVerdict.FAIL, reason, f"{reason}; its output ends with:\n{tail}")
    if settings.healthcheck_url:
        healthy, detail = await health_check(
            settings.healthcheck_url, settings.healthcheck_tries, settings.healthcheck_interval_s
        )
        if not healthy:
            return GateResult(
                GateVerdict.FAIL, detail, f"{detail}; the staging hook's output ends with:\n{tail}"
            )
        return GateResult(GateVerdict.PASS, f"staging hook ok at {sha[:10]}; {detail}")
    return GateResult(GateVerdict.PASS, f"staging hook ok at {sha[:10]}")
