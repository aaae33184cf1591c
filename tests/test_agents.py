import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from engine.agents import (
    DEFAULT_AGENT_COMMAND,
    PLACEHOLDERS,
    AgentInvocation,
    build_argv,
    run_agent,
)
from engine.usage import Usage

SANDBOX = f"{shlex.quote(sys.executable)} -m engine.sandbox.agent"
VALUES = {
    "role": "reviewer",
    "stage": "review",
    "workdir": "/work trees/ORCH-1",
    "prompt_file": "/work trees/ORCH-1/.task.md",
    "work_item": "ORCH-1",
    "attempt": "2",
}


# ----------------------------------------------------------------------------- build_argv


@pytest.mark.parametrize(
    "template, argv",
    [
        ("claude -p --output-format json", ["claude", "-p", "--output-format", "json"]),
        ("agent --role {role} --stage={stage}", ["agent", "--role", "reviewer", "--stage=review"]),
        (
            "agent {workdir} {prompt_file}",
            ["agent", "/work trees/ORCH-1", "/work trees/ORCH-1/.task.md"],
        ),
        ("agent '{work_item} try {attempt}'", ["agent", "ORCH-1 try 2"]),
        ('agent "a b" c\\ d', ["agent", "a b", "c d"]),
        ("agent '$(rm -rf /)' ; ls | cat", ["agent", "$(rm -rf /)", ";", "ls", "|", "cat"]),
        (
            "agent {other} {{role}} {ROLE} {role",
            ["agent", "{other}", "{reviewer}", "{ROLE}", "{role"],
        ),
    ],
)
def test_build_argv(template, argv):
    assert build_argv(template, VALUES) == argv


def test_values_are_not_split_or_substituted_again():
    values = {**VALUES, "work_item": "$(touch x) {stage}; echo"}
    assert build_argv("agent {work_item}", values) == ["agent", "$(touch x) {stage}; echo"]


def test_missing_values_stay_literal():
    assert build_argv("agent {role} {attempt}", {"role": "tester"}) == [
        "agent",
        "tester",
        "{attempt}",
    ]


@pytest.mark.parametrize("template", ["", "   ", "\n"])
def test_empty_template_is_an_error(template):
    with pytest.raises(ValueError):
        build_argv(template, VALUES)


def test_default_command_and_placeholders():
    assert build_argv(DEFAULT_AGENT_COMMAND, VALUES)[:2] == ["claude", "-p"]
    assert PLACEHOLDERS == ("role", "stage", "workdir", "prompt_file", "work_item", "attempt")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    path = tmp_path / "worktree"
    path.mkdir()
    (path / ".task.md").write_text("# Title\nAdd a greeting\n", encoding="utf-8")
    return path


def invocation(
    worktree: Path,
    role: str = "analyst",
    *,
    template: str = SANDBOX,
    timeout_s: float = 60,
    env: dict[str, str] | None = None,
) -> AgentInvocation:
    stages = {"analyst": "analysis", "reviewer": "review", "developer": "development"}
    return AgentInvocation(
        command_template=template,
        role=role,
        stage=stages.get(role, role),
        workdir=worktree,
        prompt_file=worktree / ".task.md",
        work_item="ORCH-1",
        attempt=1,
        artifacts_dir=worktree / "docs" / "work-items" / "ORCH-1",
        timeout_s=timeout_s,
        log_path=worktree.parent / "logs" / f"{role}-1.log",
        extra_env={"SANDBOX_AGENT_STATE": str(worktree.parent / "state"), **(env or {})},
    )


def sandbox(worktree: Path, role: str, steps: str, **kwargs) -> AgentInvocation:
    return invocation(worktree, role, env={f"SANDBOX_AGENT_{role.upper()}": steps}, **kwargs)


def python_command(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


def same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.samefile(a, b)


def alive(pid: int) -> bool:
    """A zombie counts as dead: it runs nothing, it only waits for its parent to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ----------------------------------------------------------------------------- run_agent


async def test_ok_run_parses_usage_and_writes_the_artifact(worktree):
    pids: list[int] = []

    async def on_start(pid: int) -> None:
        pids.append(pid)

    inv = invocation(worktree, "analyst")
    outcome = await run_agent(inv, on_start=on_start)
    assert outcome.ok is True, outcome.error
    assert (outcome.exit_code, outcome.timed_out, outcome.error) == (0, False, None)
    assert outcome.usage.result_found is True
    assert outcome.usage.input_tokens == 12
    assert outcome.usage.full_input == 12 + 18_000 + 4_000
    assert outcome.usage.cost_usd == pytest.approx(0.21)
    assert outcome.usage.model == "opus-4-7"
    assert outcome.duration_s > 0
    assert len(pids) == 1 and pids[0] > 0
    brd = (inv.artifacts_dir / "01-brd.md").read_text()
    assert brd.startswith("---\nstatus: ready\n---\n")
    assert "Add a greeting" in brd
    assert outcome.log_path == inv.log_path
    log = inv.log_path.read_text()
    assert log.splitlines()[0].startswith("sandbox agent:")
    assert json.loads(log.splitlines()[-1])["type"] == "result"
    assert inv.log_path.with_suffix(".stderr.log").exists()


async def test_crash(worktree):
    inv = sandbox(worktree, "reviewer", "crash")
    outcome = await run_agent(inv)
    assert (outcome.ok, outcome.exit_code, outcome.timed_out) == (False, 1, False)
    assert outcome.error == "exit code 1"
    assert "crashed" in inv.log_path.with_suffix(".stderr.log").read_text()
    assert not (inv.artifacts_dir / "12-review.md").exists()


async def test_garbage_gives_no_usage(worktree):
    outcome = await run_agent(sandbox(worktree, "tester", "garbage"))
    assert (outcome.ok, outcome.exit_code) == (False, 0)
    assert outcome.error == "no result JSON on stdout"
    assert outcome.usage == Usage()


async def test_is_error_result_is_a_failure_even_with_exit_0(worktree):
    outcome = await run_agent(sandbox(worktree, "developer", "is_error"))
    assert (outcome.ok, outcome.exit_code) == (False, 0)
    assert outcome.error == "agent reported an error (error_during_execution)"
    assert outcome.usage.is_error is True
    assert outcome.usage.cost_usd == pytest.approx(0.87)


async def test_hang_is_killed_with_its_process_group(worktree):
    pids: list[int] = []

    async def on_start(pid: int) -> None:
        pids.append(pid)

    outcome = await run_agent(sandbox(worktree, "deployer", "hang", timeout_s=1.5), on_start)
    assert outcome.timed_out is True
    assert outcome.ok is False
    assert outcome.error == "timed out after 1.5s"
    assert outcome.usage == Usage()
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)


async def test_timeout_kills_grandchildren_too(worktree):
    pid_file = worktree.parent / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(3600)\n"
    )
    outcome = await run_agent(invocation(worktree, template=python_command(code), timeout_s=1.5))
    assert outcome.timed_out is True
    assert wait_dead(int(pid_file.read_text()))


async def test_cancelled_run_kills_the_agent(worktree):
    started = asyncio.Event()
    pids: list[int] = []

    async def on_start(pid: int) -> None:
        pids.append(pid)
        started.set()

    task = asyncio.create_task(run_agent(sandbox(worktree, "tester", "hang"), on_start))
    await asyncio.wait_for(started.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)


async def test_missing_executable_is_an_outcome(worktree):
    outcome = await run_agent(invocation(worktree, template="no-such-agent-cli-xyz -p {role}"))
    assert outcome.ok is False
    assert outcome.error == "command not found: no-such-agent-cli-xyz"
    assert (outcome.exit_code, outcome.timed_out, outcome.usage) == (None, False, Usage())


@pytest.mark.parametrize(
    "change, error",
    [
        ({"command_template": "  "}, "bad agent command template"),
        ({"command_template": "agent 'unbalanced"}, "bad agent command template"),
        ({"workdir": Path("/nonexistent/worktree")}, "workdir not found"),
        ({"prompt_file": Path("/nonexistent/.task.md")}, "cannot open /nonexistent/.task.md"),
    ],
)
async def test_setup_problems_are_outcomes(worktree, change, error):
    outcome = await run_agent(replace(invocation(worktree), **change))
    assert outcome.ok is False
    assert outcome.error.startswith(error)


async def test_orch_settings_are_hidden_from_the_agent(worktree, monkeypatch):
    monkeypatch.setenv("ORCH_TELEGRAM_TOKEN", "123:secret")
    monkeypatch.setenv("ORCH_PLANE_API_TOKEN", "plane-secret")
    monkeypatch.setenv("CONVEYOR_TEST_VISIBLE", "yes")
    code = "import json, os, sys; print(json.dumps({'env': dict(os.environ), 'argv': sys.argv}))"
    template = python_command(code) + " {role} {stage} {work_item} {attempt}"
    inv = invocation(worktree, "reviewer", template=template, env={"EXTRA": "1"})
    outcome = await run_agent(inv)
    seen = json.loads(inv.log_path.read_text())
    env = seen["env"]
    assert "ORCH_TELEGRAM_TOKEN" not in env
    assert "ORCH_PLANE_API_TOKEN" not in env
    assert "secret" not in inv.log_path.read_text()
    assert env["CONVEYOR_TEST_VISIBLE"] == "yes"
    assert env["EXTRA"] == "1"
    assert env["ORCH_ROLE"] == "reviewer"
    assert env["ORCH_STAGE"] == "review"
    assert env["ORCH_WORK_ITEM"] == "ORCH-1"
    assert env["ORCH_TASK_FILE"] == str(worktree / ".task.md")
    assert env["ORCH_ARTIFACTS_DIR"] == str(worktree / "docs" / "work-items" / "ORCH-1")
    assert env["ORCH_ATTEMPT"] == "1"
    assert seen["argv"][1:] == ["reviewer", "review", "ORCH-1", "1"]
    assert outcome.error == "no result JSON on stdout"


async def test_agent_runs_in_the_worktree_with_the_prompt_on_stdin(worktree):
    code = "import os, sys; print(os.getcwd()); print(sys.stdin.read())"
    inv = invocation(worktree, template=python_command(code))
    await run_agent(inv)
    cwd, prompt = inv.log_path.read_text().split("\n", 1)
    assert same_path(cwd, worktree)
    assert prompt.startswith("# Title\nAdd a greeting\n")
