import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.usage import parse_result

STAGES = {
    "analyst": "analysis",
    "architect": "architecture",
    "developer": "development",
    "reviewer": "review",
    "tester": "testing",
    "deployer": "deploy",
}
PROMPT = "# Title\n\nAdd a greeting endpoint\n\n## Description\n\nSay hello.\n"


class Sandbox:
    """One worktree, one work item; each `run` is a real `python -m engine.sandbox.agent`."""

    def __init__(self, root: Path) -> None:
        self.worktree = root / "worktree"
        self.worktree.mkdir()
        self.artifacts = self.worktree / "docs" / "work-items" / "ORCH-7"
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("ORCH_", "SANDBOX_AGENT_"))
        }
        self.env["SANDBOX_AGENT_STATE"] = str(root / "state")

    def run(self, role: str, prompt: str = PROMPT, **env: str) -> subprocess.CompletedProcess:
        protocol = {
            "ORCH_ROLE": role,
            "ORCH_STAGE": STAGES[role],
            "ORCH_WORK_ITEM": "ORCH-7",
            "ORCH_ARTIFACTS_DIR": str(self.artifacts),
            "ORCH_TASK_FILE": str(self.worktree / ".task.md"),
            "ORCH_ATTEMPT": "1",
        }
        return subprocess.run(
            [sys.executable, "-m", "engine.sandbox.agent"],
            cwd=self.worktree,
            env={**self.env, **protocol, **env},
            input=prompt,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def report(self, name: str) -> tuple[dict, str]:
        text = (self.artifacts / name).read_text(encoding="utf-8")
        _, header, body = text.split("---\n", 2)
        return yaml.safe_load(header), body


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


def result_of(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.splitlines()[-1])


def test_reviewer_follows_its_script_and_repeats_the_last_step(sandbox):
    verdicts = []
    for _ in range(3):
        done = sandbox.run("reviewer", SANDBOX_AGENT_REVIEWER="negative,ok")
        assert done.returncode == 0, done.stderr
        frontmatter, body = sandbox.report("12-review.md")
        verdicts.append(frontmatter["verdict"])
        if frontmatter["verdict"] == "APPROVE":
            assert "## Findings" in body
            assert not [line for line in body.splitlines() if line.startswith(("P0:", "P1:"))]
    assert verdicts == ["REQUEST_CHANGES", "APPROVE", "APPROVE"]


def test_request_changes_names_the_developers_file(sandbox):
    sandbox.run("reviewer", SANDBOX_AGENT_REVIEWER="negative")
    _, body = sandbox.report("12-review.md")
    findings = body.split("## Findings", 1)[1].strip().splitlines()
    assert findings == [
        "P0: src/orch-7.txt does not validate empty input",
        "P1: src/orch-7.txt has no test for the error path",
        "P2: src/orch-7.txt could use a clearer name (nice to have)",
    ]


def test_tester_negative_report_holds_pytest_output(sandbox):
    done = sandbox.run("tester", SANDBOX_AGENT_TESTER="negative")
    assert done.returncode == 0
    frontmatter, body = sandbox.report("13-test-report.md")
    assert frontmatter == {"result": "FAIL"}
    lines = body.splitlines()
    failed = [line for line in lines if line.startswith("FAILED ")]
    assert failed == [
        "FAILED tests/test_orch_7.py::test_empty_input - AssertionError: "
        "empty input accepted by src/orch-7.txt"
    ]
    assert "=== 1 failed, 4 passed in 0.12s ===" in lines


def test_tester_positive_report(sandbox):
    sandbox.run("tester")
    frontmatter, body = sandbox.report("13-test-report.md")
    assert frontmatter == {"result": "PASS"}
    assert "5 passed in 0.10s" in body


def test_developer_appends_and_echoes_must_fix_lines(sandbox):
    assert sandbox.run("developer").returncode == 0
    rollback = (
        PROMPT + "\n## Must fix\n\n"
        "P0: src/orch-7.txt does not validate empty input\n"
        "- P1: src/orch-7.txt has no test for the error path\n"
        "P2: src/orch-7.txt could use a clearer name (nice to have)\n"
        "> FAILED tests/test_orch_7.py::test_empty_input - AssertionError: boom\n"
        "Not P0: this line does not start with a marker\n"
    )
    assert sandbox.run("developer", rollback).returncode == 0
    source = (sandbox.worktree / "src" / "orch-7.txt").read_text().splitlines()
    assert source == [
        "attempt 1: ORCH-7 change by the sandbox developer",
        "attempt 2: ORCH-7 change by the sandbox developer",
        "fixed: P0: src/orch-7.txt does not validate empty input",
        "fixed: P1: src/orch-7.txt has no test for the error path",
        "fixed: FAILED tests/test_orch_7.py::test_empty_input - AssertionError: boom",
    ]
    assert not sandbox.artifacts.exists()


def test_developer_file_can_be_chosen(sandbox):
    sandbox.run("developer", SANDBOX_AGENT_DEV_FILE="app/greeting.py")
    assert (sandbox.worktree / "app" / "greeting.py").read_text().startswith("attempt 1:")


def test_analyst_quotes_the_title_or_asks_questions(sandbox):
    sandbox.run("analyst", SANDBOX_AGENT_ANALYST="negative,ok")
    frontmatter, body = sandbox.report("01-brd.md")
    assert frontmatter == {"status": "needs_input"}
    assert "## Questions" in body
    sandbox.run("analyst", SANDBOX_AGENT_ANALYST="negative,ok")
    frontmatter, body = sandbox.report("01-brd.md")
    assert frontmatter == {"status": "ready"}
    assert "> Add a greeting endpoint" in body
    assert "## Acceptance criteria" in body


def test_architect_and_deployer(sandbox):
    sandbox.run("architect", SANDBOX_AGENT_ARCHITECT="negative")
    frontmatter, body = sandbox.report("02-architecture.md")
    assert frontmatter == {"status": "ready"} and body.strip()
    sandbox.run("deployer", SANDBOX_AGENT_DEPLOYER="negative,ok")
    assert sandbox.report("14-deploy-log.md")[0] == {"status": "FAILED"}
    sandbox.run("deployer", SANDBOX_AGENT_DEPLOYER="negative,ok")
    assert sandbox.report("14-deploy-log.md")[0] == {"status": "SUCCESS"}


def test_result_json_is_last_after_a_warning_and_deterministic(sandbox):
    first, second = sandbox.run("tester"), sandbox.run("tester")
    lines = first.stdout.splitlines()
    assert len(lines) == 2
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
    result = result_of(first)
    assert result["type"] == "result"
    assert (result["subtype"], result["is_error"]) == ("success", False)
    costs = [model["costUSD"] for model in result["modelUsage"].values()]
    assert list(result["modelUsage"]) == ["claude-opus-4-7", "claude-haiku-4-5"]
    assert costs[0] > costs[1]
    assert round(sum(costs), 6) == result["total_cost_usd"]
    assert result["usage"] == result_of(second)["usage"]
    assert result["total_cost_usd"] == result_of(second)["total_cost_usd"]
    usage = parse_result(first.stdout)
    assert (usage.model, usage.input_tokens, usage.cache_read_tokens) == ("opus-4-7", 18, 26_000)


def test_crash_consumes_its_step(sandbox):
    crashed = sandbox.run("reviewer", SANDBOX_AGENT_REVIEWER="crash,ok")
    assert crashed.returncode == 1
    assert crashed.stderr.strip()
    assert not sandbox.artifacts.exists()
    assert sandbox.run("reviewer", SANDBOX_AGENT_REVIEWER="crash,ok").returncode == 0
    assert sandbox.report("12-review.md")[0] == {"verdict": "APPROVE"}


def test_garbage_and_is_error(sandbox):
    garbage = sandbox.run("analyst", SANDBOX_AGENT_ANALYST="garbage,is_error")
    assert garbage.returncode == 0
    assert parse_result(garbage.stdout).result_found is False
    failed = sandbox.run("analyst", SANDBOX_AGENT_ANALYST="garbage,is_error")
    assert failed.returncode == 0
    assert (result_of(failed)["is_error"], result_of(failed)["subtype"]) == (
        True,
        "error_during_execution",
    )
    assert not sandbox.artifacts.exists()


def test_roles_and_work_items_count_separately(sandbox):
    sandbox.run("reviewer", SANDBOX_AGENT_REVIEWER="negative,ok")
    sandbox.run("tester", SANDBOX_AGENT_REVIEWER="negative,ok", SANDBOX_AGENT_TESTER="negative,ok")
    assert sandbox.report("13-test-report.md")[0] == {"result": "FAIL"}
    sandbox.run("reviewer", SANDBOX_AGENT_REVIEWER="negative,ok", ORCH_WORK_ITEM="ORCH-8")
    assert sandbox.report("12-review.md")[0] == {"verdict": "REQUEST_CHANGES"}


def test_prompt_falls_back_to_the_task_file(sandbox):
    (sandbox.worktree / ".task.md").write_text("# Title\nFrom the task file\n")
    sandbox.run("analyst", prompt="")
    assert "> From the task file" in sandbox.report("01-brd.md")[1]


def test_bad_setup_exits_2(sandbox):
    assert sandbox.run("reviewer", ORCH_ROLE="").returncode == 2
    unknown = sandbox.run("reviewer", SANDBOX_AGENT_REVIEWER="explode")
    assert unknown.returncode == 2
    assert "unknown step" in unknown.stderr
