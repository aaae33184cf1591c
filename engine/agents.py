"""Running the agent CLI (DESIGN §4): one subprocess per run, in the task's worktree.

`run_agent` returns an outcome for everything that can go wrong with the agent (bad
template, missing executable, crash, timeout, an error result); it never raises for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from engine.usage import Usage, parse_result

log = logging.getLogger(__name__)

DEFAULT_AGENT_COMMAND = "claude -p --output-format json --permission-mode acceptEdits"
PLACEHOLDERS = ("role", "stage", "workdir", "prompt_file", "work_item", "attempt")

# Conveyor's own settings and secrets share this prefix; the agent never inherits them.
_PRIVATE_ENV_PREFIX = "ORCH_"
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_SUCCESS_SUBTYPES = (None, "success")


@dataclass(frozen=True)
class AgentInvocation:
    command_template: str
    role: str
    stage: str
    workdir: Path
    prompt_file: Path
    work_item: str
    attempt: int
    artifacts_dir: Path
    timeout_s: float
    log_path: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def stderr_path(self) -> Path:
        return self.log_path.with_suffix(".stderr.log")


@dataclass(frozen=True)
class AgentOutcome:
    ok: bool
    exit_code: int | None
    timed_out: bool
    usage: Usage
    error: str | None
    duration_s: float
    log_path: Path


def build_argv(template: str, values: Mapping[str, str]) -> list[str]:
    """Split the template like shell words, then fill placeholders inside each word.

    Splitting first means a value (a path with spaces, a title) is always one argument
    and is never parsed as shell syntax. Placeholders missing from `values` stay literal.
    """
    words = shlex.split(template)
    if not words:
        raise ValueError("the agent command template is empty")

    def fill(match: re.Match[str]) -> str:
        return str(values.get(match.group(1), match.group(0)))

    return [_PLACEHOLDER_RE.sub(fill, word) for word in words]


def agent_env(inv: AgentInvocation, base: Mapping[str, str] | None = None) -> dict[str, str]:
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith(_PRIVATE_ENV_PREFIX)}
    env.update(
        ORCH_ROLE=inv.role,
        ORCH_STAGE=inv.stage,
        ORCH_WORK_ITEM=inv.work_item,
        ORCH_TASK_FILE=str(inv.prompt_file),
        ORCH_ARTIFACTS_DIR=str(inv.artifacts_dir),
        ORCH_ATTEMPT=str(inv.attempt),
    )
    env.update(inv.extra_env)
    return env


async def run_agent(
    inv: AgentInvocation, on_start: Callable[[int], Awaitable[None]] | None = None
) -> AgentOutcome:
    started = time.monotonic()

    def failed(error: str) -> AgentOutcome:
        return _outcome(inv, started, error=error)

    try:
        argv = build_argv(inv.command_template, _placeholder_values(inv))
    except ValueError as exc:
        return failed(f"bad agent command template: {exc}")
    if not inv.workdir.is_dir():
        return failed(f"workdir not found: {inv.workdir}")
    with contextlib.ExitStack() as files:
        try:
            stdio = _open_stdio(inv, files)
        except OSError as exc:
            return failed(f"cannot open {exc.filename}: {exc.strerror or exc}")
        try:
            proc = await _spawn(argv, inv, stdio)
        except FileNotFoundError:
            return failed(f"command not found: {argv[0]}")
        except PermissionError:
            return failed(f"permission denied: {argv[0]}")
        except OSError as exc:
            return failed(f"could not start {argv[0]}: {exc.strerror or exc}")
    # The child holds its own copies of the descriptors; ours are closed by now.
    timed_out = await _supervise(proc, inv.timeout_s, on_start)
    stdout = await asyncio.to_thread(_read_text, inv.log_path)
    usage = parse_result(stdout)
    error = _failure_reason(proc.returncode, timed_out, inv.timeout_s, usage)
    if error:
        log.warning("%s %s (%s) failed: %s", inv.work_item, inv.role, inv.stage, error)
    return _outcome(
        inv, started, error, exit_code=proc.returncode, timed_out=timed_out, usage=usage
    )


def _placeholder_values(inv: AgentInvocation) -> dict[str, str]:
    return {
        "role": inv.role,
        "stage": inv.stage,
        "workdir": str(inv.workdir),
        "prompt_file": str(inv.prompt_file),
        "work_item": inv.work_item,
        "attempt": str(inv.attempt),
    }


def _open_stdio(inv: AgentInvocation, files: contextlib.ExitStack) -> tuple[IO[bytes], ...]:
    inv.log_path.parent.mkdir(parents=True, exist_ok=True)
    inv.stderr_path.parent.mkdir(parents=True, exist_ok=True)
    return (
        files.enter_context(open(inv.prompt_file, "rb")),
        files.enter_context(open(inv.log_path, "wb")),
        files.enter_context(open(inv.stderr_path, "wb")),
    )


async def _spawn(
    argv: list[str], inv: AgentInvocation, stdio: tuple[IO[bytes], ...]
) -> asyncio.subprocess.Process:
    stdin, stdout, stderr = stdio
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=inv.workdir,
        env=agent_env(inv),
        start_new_session=True,
    )


async def _supervise(
    proc: asyncio.subprocess.Process,
    timeout_s: float,
    on_start: Callable[[int], Awaitable[None]] | None,
) -> bool:
    """Wait for the agent; True when it had to be killed for running past its timeout.

    Whatever interrupts the wait (a timeout, a cancelled job, a failing callback), the
    agent's whole process group is killed: nothing it started outlives the run.
    """
    try:
        if on_start is not None:
            await on_start(proc.pid)
        await asyncio.wait_for(proc.wait(), timeout=timeout_s)
        return False
    except TimeoutError:
        return True
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            await proc.wait()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _failure_reason(
    exit_code: int | None, timed_out: bool, timeout_s: float, usage: Usage
) -> str | None:
    if timed_out:
        return f"timed out after {timeout_s:g}s"
    if exit_code is not None and exit_code < 0:
        return f"killed by signal {_signal_name(-exit_code)}"
    if exit_code != 0:
        return f"exit code {exit_code}"
    if not usage.result_found:
        return "no result JSON on stdout"
    if usage.is_error is True or usage.subtype not in _SUCCESS_SUBTYPES:
        detail = usage.subtype if usage.subtype not in _SUCCESS_SUBTYPES else "is_error"
        return f"agent reported an error ({detail})"
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _outcome(
    inv: AgentInvocation,
    started: float,
    error: str | None,
    *,
    exit_code: int | None = None,
    timed_out: bool = False,
    usage: Usage | None = None,
) -> AgentOutcome:
    return AgentOutcome(
        ok=error is None,
        exit_code=exit_code,
        timed_out=timed_out,
        usage=usage if usage is not None else Usage(),
        error=error,
        duration_s=time.monotonic() - started,
        log_path=inv.log_path,
    )
