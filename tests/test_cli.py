"""The `conveyor` command as a user runs it: config errors, the demo, doctor."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def conveyor(
    *args: str, cwd: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SANDBOX_"))}
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_missing_required_setting_names_the_variable(tmp_path: Path) -> None:
    result = conveyor("run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "conveyor: configuration error: ORCH_PROJECTS: is required"
    ]


def test_an_invalid_setting_names_the_variable_in_one_line(tmp_path: Path) -> None:
    result = conveyor(
        "run", cwd=tmp_path, ORCH_HTTP_PORT="eighty", ORCH_TELEGRAM_TOKEN="123:secret"
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "ORCH_HTTP_PORT" in line and "secret" not in line


def test_a_project_without_a_remote_is_refused(tmp_path: Path) -> None:
    result = conveyor("run", cwd=tmp_path, ORCH_PROJECTS=json.dumps([{"key": "ORCH"}]))
    assert result.returncode == 2
    assert "ORCH_PROJECTS[0].remote: is required" in result.stderr


def test_settings_are_read_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ORCH_HTTP_PORT=not-a-port\n")
    result = conveyor("doctor", cwd=tmp_path)
    assert result.returncode == 2 and "ORCH_HTTP_PORT" in result.stderr


async def test_doctor_checks_each_project_remote(tmp_path: Path, remote: Path) -> None:
    projects = [
        {"key": "GOOD", "remote": str(remote)},
        {"key": "BAD", "remote": str(tmp_path / "missing.git")},
    ]
    result = conveyor(
        "doctor",
        cwd=tmp_path,
        ORCH_PROJECTS=json.dumps(projects),
        ORCH_AGENT_COMMAND=f"{sys.executable} -m engine.sandbox.agent",
        ORCH_LOCALE="en",
    )
    assert result.returncode == 1
    assert "ok   project GOOD remote" in result.stdout
    assert "FAIL project BAD remote" in result.stdout


SUMMARY_HEADER = ["Stage", "Runs", "Att.", "Input", "(cached)", "Output", "Cost", "Model", "Time"]
SUMMARY_ROW = re.compile(
    r"^(?P<stage>\S+)\s+(?P<runs>\d+|—)\s+(?P<attempts>\d+|—)"
    r"\s+(?P<input>—|\S+ \(\S+\))\s+(?P<output>\S+)\s+(?P<cost>\S+)"
    r"\s+(?P<model>\S+)\s+(?P<time>\S+)$"
)
# The scripted agent's fixed usage per run, as the summary prints it: the reviewer asks for
# changes once, so review and development run twice.
EXPECTED_SUMMARY = {
    "Analysis": ("1", "1", "22k (22k)", "1.5k", "$0.21", "opus-4-7"),
    "Architecture": ("1", "1", "29k (29k)", "2.5k", "$0.34", "opus-4-7"),
    "Development": ("2", "2", "204k (204k)", "12k", "$1.74", "opus-4-7"),
    "Review": ("2", "2", "72k (72k)", "3.6k", "$0.58", "opus-4-7"),
    "Testing": ("1", "1", "31k (31k)", "1.2k", "$0.23", "opus-4-7"),
    "Staging": ("—", "—", "—", "—", "—", "—"),
    "Deploy": ("1", "1", "11k (11k)", "400", "$0.07", "opus-4-7"),
    "Total": ("8", "2", "369k (369k)", "21k", "$3.17", "opus-4-7"),
}
DURATION = re.compile(r"^(\d+\.\ds|\d+s|\d+m\d\ds|\d+h\d\dm)$")


def summary_rows(out: str) -> dict[str, dict[str, str]]:
    """The per-stage table the demo prints after the task is done, keyed by stage label."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Stage "))
    assert lines[header].split() == SUMMARY_HEADER
    rows = {}
    for line in lines[header + 1 : header + 1 + len(EXPECTED_SUMMARY)]:
        match = SUMMARY_ROW.match(line)
        assert match, f"not a summary row: {line!r}"
        rows[match["stage"]] = match.groupdict()
    return rows


def assert_summary(out: str) -> None:
    rows = summary_rows(out)
    assert list(rows) == list(EXPECTED_SUMMARY)
    for stage, expected in EXPECTED_SUMMARY.items():
        row = rows[stage]
        columns = ("runs", "attempts", "input", "output", "cost", "model")
        assert tuple(row[name] for name in columns) == expected, stage
        assert DURATION.match(row["time"]) or row["time"] == row["runs"] == "—", row


def test_demo_runs_one_task_to_done_with_a_visible_rollback(tmp_path: Path) -> None:
    result = conveyor("demo", "--locale", "en", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "gate green, advanced" in out and "gate red, rolled back" in out
    assert "P0:" in out  # the must-fix text, shown at the rollback and in the second prompt
    assert "The second developer prompt carries" in out
    assert_summary(out)
    assert "card in Telegram" in out and "🏁" in out  # the card, as the operator saw it
    assert "Plane issue: Done · pull request: merged" in out  # the board and the forge agree
    assert out.rstrip().splitlines()[-1].startswith("done ✔")


def test_demo_speaks_russian_by_default(tmp_path: Path) -> None:
    result = conveyor("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ревью" in result.stdout and "Разработка" in result.stdout
