"""The quality gates of DESIGN §3, one row per case."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.gates import (
    ARTIFACTS_ROOT,
    OUTPUT_TAIL_CHARS,
    REPORT_FILES,
    TRUNCATED,
    VERDICT_TABLES,
    GateResult,
    GateVerdict,
    artifacts_dir,
    ci_green_local,
    evaluate_file_gate,
    extract_failure_excerpt,
    extract_findings,
    read_frontmatter,
    report_relpath,
)
from engine.stages import GATES

WI = "ORCH-001"
PASS, FAIL, NEEDS_INPUT = GateVerdict.PASS, GateVerdict.FAIL, GateVerdict.NEEDS_INPUT
MISSING = None  # as a report text: the file is not written at all


@dataclass(frozen=True)
class Case:
    gate: str
    text: str | bytes | None
    verdict: GateVerdict
    reason: str = ""
    must_fix: tuple[str, ...] = ()
    not_in_must_fix: tuple[str, ...] = ()


def fm(fields: str, body: str = "") -> str:
    return f"---\n{fields}\n---\n{body}"


REVIEW_FINDINGS = """# Review

## Summary
P0: this line is outside Findings and must not be quoted

## Findings
- P0: app/auth.py:42 — token compared with ==
* P1: app/api.py:88 — KeyError on missing title
P2: app/util.py:3 — naming
P3: README.md:1 — typo

## Notes
P1: also outside Findings
"""

PYTEST_FAILURE = """## Output
```
tests/test_a.py::test_ok PASSED
tests/test_a.py::test_sum FAILED
E       assert 3 == 4
FAILED tests/test_a.py::test_sum - assert 3 == 4
=== 1 failed, 4 passed in 0.12s ===
```
"""

CASES = [
    # --- brd_ready (01-brd.md, status) ---
    pytest.param(
        Case("brd_ready", fm("status: ready", "# BRD\n"), PASS, "status ready"), id="brd-ready"
    ),
    pytest.param(Case("brd_ready", fm("status: '  READY '"), PASS), id="brd-ready-case-space"),
    pytest.param(
        Case(
            "brd_ready",
            fm("status: needs_input", "## Summary\nx\n\n## Questions\n1. Which DB?\n2. SLA?\n"),
            NEEDS_INPUT,
            "needs_input",
            must_fix=("1. Which DB?", "2. SLA?"),
            not_in_must_fix=("## Summary", "## Questions"),
        ),
        id="brd-needs-input-questions",
    ),
    pytest.param(
        Case("brd_ready", fm("status: needs_input"), NEEDS_INPUT, must_fix=("Questions",)),
        id="brd-needs-input-without-questions",
    ),
    pytest.param(Case("brd_ready", fm("status: draft"), FAIL, "unknown status"), id="brd-unknown"),
    pytest.param(Case("brd_ready", MISSING, FAIL, "01-brd.md is missing"), id="brd-missing-file"),
    pytest.param(Case("brd_ready", "", FAIL, "01-brd.md is empty"), id="brd-empty-file"),
    pytest.param(Case("brd_ready", " \n\t\n", FAIL, "is empty"), id="brd-whitespace-file"),
    pytest.param(Case("brd_ready", fm("status:"), FAIL, "missing or empty"), id="brd-empty-field"),
    pytest.param(
        Case("brd_ready", fm("status: ''"), FAIL, "missing or empty"), id="brd-blank-field"
    ),
    pytest.param(Case("brd_ready", fm("title: x"), FAIL, "missing or empty"), id="brd-no-field"),
    pytest.param(
        Case("brd_ready", "# BRD\nstatus: ready\n", FAIL, "no frontmatter"), id="brd-no-frontmatter"
    ),
    pytest.param(
        Case("brd_ready", "intro\n---\nstatus: ready\n---\n", FAIL, "no frontmatter"),
        id="brd-frontmatter-not-first",
    ),
    pytest.param(
        Case("brd_ready", "---\nstatus: ready\n", FAIL, "not closed"), id="brd-unclosed-frontmatter"
    ),
    pytest.param(Case("brd_ready", "---\n---\nbody", FAIL, "empty"), id="brd-empty-frontmatter"),
    pytest.param(
        Case("brd_ready", fm("status: [ready"), FAIL, "bad YAML in frontmatter"), id="brd-bad-yaml"
    ),
    pytest.param(
        Case("brd_ready", fm("- status: ready"), FAIL, "not a mapping"), id="brd-frontmatter-list"
    ),
    pytest.param(
        Case("brd_ready", fm("just a string"), FAIL, "not a mapping"), id="brd-frontmatter-scalar"
    ),
    pytest.param(
        Case("brd_ready", fm("status: !!python/object/apply:os.system ['true']"), FAIL, "bad YAML"),
        id="brd-unsafe-yaml-tag",
    ),
    pytest.param(Case("brd_ready", fm("Status: ready"), PASS), id="brd-field-name-case"),
    pytest.param(Case("brd_ready", "\ufeff" + fm("status: ready"), PASS), id="brd-utf8-bom"),
    pytest.param(
        Case("brd_ready", b"---\nstatus: ready\n---\n\xff\xfe latin-1 \xe9\n", PASS),
        id="brd-bad-encoding-in-body",
    ),
    # --- architecture_ready (02-architecture.md, exists and non-empty) ---
    pytest.param(Case("architecture_ready", "# Design\n", PASS), id="arch-present"),
    pytest.param(Case("architecture_ready", MISSING, FAIL, "is missing"), id="arch-missing"),
    pytest.param(Case("architecture_ready", "", FAIL, "is empty"), id="arch-empty"),
    pytest.param(Case("architecture_ready", "  \n\n ", FAIL, "is empty"), id="arch-whitespace"),
    # --- review_approved (12-review.md, verdict) ---
    *[
        pytest.param(
            Case("review_approved", fm(f"verdict: {v}"), PASS, v.strip()), id=f"review-{v}"
        )
        for v in ("APPROVE", "APPROVED", "LGTM", "approve", " Lgtm ")
    ],
    *[
        pytest.param(
            Case(
                "review_approved",
                fm(f"verdict: {v}", REVIEW_FINDINGS),
                FAIL,
                f"verdict {v}",
                must_fix=(
                    "- P0: app/auth.py:42 — token compared with ==",
                    "* P1: app/api.py:88 — KeyError on missing title",
                ),
                not_in_must_fix=("P2:", "P3:", "outside Findings"),
            ),
            id=f"review-{v}",
        )
        for v in ("REQUEST_CHANGES", "CHANGES_REQUESTED", "REJECTED", "request_changes")
    ],
    pytest.param(
        Case("review_approved", fm("verdict: Request changes"), FAIL, "verdict"),
        id="review-request-changes-spaced",
    ),
    pytest.param(
        Case(
            "review_approved",
            fm("verdict: REQUEST_CHANGES", "## Findings\nP2: a.py:1 — nit\n"),
            FAIL,
            must_fix=("without P0/P1 findings", f"{ARTIFACTS_ROOT}/{WI}/12-review.md"),
        ),
        id="review-changes-without-p0-p1",
    ),
    pytest.param(
        Case("review_approved", fm("verdict: MAYBE"), FAIL, "unknown verdict"), id="review-unknown"
    ),
    pytest.param(
        Case("review_approved", fm("verdict: true"), FAIL, "unknown verdict"), id="review-bool"
    ),
    pytest.param(Case("review_approved", fm("verdict: 42"), FAIL, "unknown"), id="review-number"),
    pytest.param(
        Case("review_approved", fm("verdict: [APPROVE]"), FAIL, "unknown"), id="review-list-value"
    ),
    pytest.param(
        Case("review_approved", fm("verdict: {a: 1}"), FAIL, "unknown"), id="review-mapping-value"
    ),
    pytest.param(
        Case("review_approved", fm("verdict: REQUEST_CHANGES", "verdict: APPROVE\nLGTM"), FAIL),
        id="review-prose-approve-ignored",
    ),
    pytest.param(
        Case("review_approved", "verdict: APPROVE\n", FAIL, "no frontmatter"),
        id="review-no-frontmatter",
    ),
    pytest.param(
        Case("review_approved", MISSING, FAIL, "12-review.md is missing"), id="review-missing"
    ),
    pytest.param(
        Case("review_approved", fm("verdict:"), FAIL, "missing or empty"), id="review-empty"
    ),
    # --- tests_passed (13-test-report.md; result, verdict, status of equal rank) ---
    *[
        pytest.param(Case("tests_passed", fm(f"{f}: {v}"), PASS, v), id=f"tests-{f}-{v}")
        for f in ("result", "verdict", "status")
        for v in ("PASS", "PASSED", "GREEN", "READY-TO-DEPLOY")
    ],
    *[
        pytest.param(
            Case("tests_passed", fm(f"{f}: {v}", PYTEST_FAILURE), FAIL, f"{f} {v}"),
            id=f"tests-{f}-{v}",
        )
        for f in ("result", "verdict", "status")
        for v in ("FAIL", "FAILED", "BLOCKED", "ERROR", "RED")
    ],
    pytest.param(Case("tests_passed", fm("result: PASS"), PASS), id="tests-only-result-pass"),
    pytest.param(Case("tests_passed", fm("result: passed"), PASS), id="tests-lowercase"),
    pytest.param(Case("tests_passed", fm("status: ready-to-deploy"), PASS), id="tests-ready-lower"),
    pytest.param(
        Case(
            "tests_passed", fm("verdict: BLOCKED", "=== 23 passed in 1.0s ===\n"), FAIL, "BLOCKED"
        ),
        id="tests-blocked-despite-23-passed-in-body",
    ),
    pytest.param(
        Case("tests_passed", fm("result: PASS\nstatus: FAILED"), FAIL, "status FAILED"),
        id="tests-negative-in-any-field-wins",
    ),
    pytest.param(
        Case("tests_passed", fm("result: GREEN\nverdict: PASSED\nstatus: RED"), FAIL, "status RED"),
        id="tests-negative-wins-over-two-positives",
    ),
    pytest.param(
        Case("tests_passed", fm("result: ''\nverdict: PASSED"), PASS), id="tests-empty-and-positive"
    ),
    pytest.param(
        Case("tests_passed", fm("result: PASS\nstatus: done"), PASS),
        id="tests-unknown-and-positive",
    ),
    pytest.param(
        Case("tests_passed", fm("result: maybe", "1 failed"), FAIL, "unknown result"),
        id="tests-unknown-only",
    ),
    pytest.param(
        Case("tests_passed", fm("result:\nverdict:\nstatus:"), FAIL, "missing or empty"),
        id="tests-all-fields-empty",
    ),
    pytest.param(
        Case("tests_passed", fm("summary: 23 passed", "23 passed"), FAIL, "missing or empty"),
        id="tests-no-field",
    ),
    pytest.param(Case("tests_passed", fm("result: true"), FAIL, "unknown"), id="tests-bool"),
    pytest.param(Case("tests_passed", fm("result: 1"), FAIL, "unknown"), id="tests-number"),
    pytest.param(Case("tests_passed", fm("result: 2024-01-01"), FAIL, "unknown"), id="tests-date"),
    pytest.param(
        Case("tests_passed", "result: PASS\n=== 23 passed in 1.0s ===\n", FAIL, "no frontmatter"),
        id="tests-no-frontmatter",
    ),
    pytest.param(Case("tests_passed", MISSING, FAIL, "is missing"), id="tests-missing"),
    pytest.param(
        Case(
            "tests_passed",
            fm("result: FAILED", PYTEST_FAILURE),
            FAIL,
            must_fix=(
                "FAILED tests/test_a.py::test_sum - assert 3 == 4",
                "E       assert 3 == 4",
                "=== 1 failed, 4 passed in 0.12s ===",
            ),
            not_in_must_fix=("test_ok PASSED",),
        ),
        id="tests-failure-excerpt",
    ),
    pytest.param(
        Case(
            "tests_passed",
            fm("result: FAIL", "It broke in the login form.\n"),
            FAIL,
            must_fix=("login",),
        ),
        id="tests-fail-prose-only",
    ),
    # --- deploy_succeeded (14-deploy-log.md, status) ---
    *[
        pytest.param(Case("deploy_succeeded", fm(f"status: {v}"), PASS, v), id=f"deploy-{v}")
        for v in ("SUCCESS", "DEPLOYED", "success")
    ],
    pytest.param(
        Case(
            "deploy_succeeded",
            fm("status: FAILED", "## Steps\nok\n## Failure\nhealth check returned 502\n"),
            FAIL,
            "status FAILED",
            must_fix=("health check returned 502",),
        ),
        id="deploy-FAILED",
    ),
    pytest.param(
        Case("deploy_succeeded", fm("status: pending"), FAIL, "unknown status"), id="deploy-unknown"
    ),
    pytest.param(Case("deploy_succeeded", MISSING, FAIL, "is missing"), id="deploy-missing"),
    pytest.param(
        Case("deploy_succeeded", fm("status:"), FAIL, "missing or empty"), id="deploy-empty-field"
    ),
]


def write_report(worktree: Path, gate: str, text: str | bytes) -> Path:
    path = artifacts_dir(worktree, WI) / REPORT_FILES[gate]
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", CASES)
def test_file_gate(tmp_path: Path, case: Case) -> None:
    if case.text is not None:
        write_report(tmp_path, case.gate, case.text)
    result = evaluate_file_gate(case.gate, tmp_path, WI)
    assert result.verdict is case.verdict, result
    assert result.passed is (case.verdict is PASS)
    assert case.reason in result.reason
    assert "\n" not in result.reason
    for text in case.must_fix:
        assert text in result.must_fix
    for text in case.not_in_must_fix:
        assert text not in result.must_fix
    expected_report = None if case.text is None else report_relpath(WI, case.gate)
    assert result.report == expected_report


def test_report_files_cover_every_file_gate_of_the_stage_table() -> None:
    computed = {"ci_green", "staging_ready"}
    assert set(REPORT_FILES) == set(GATES.values()) - computed
    assert set(VERDICT_TABLES) == set(REPORT_FILES) - {"architecture_ready"}


def test_paths() -> None:
    assert report_relpath(WI, "review_approved") == "docs/work-items/ORCH-001/12-review.md"
    assert artifacts_dir(Path("/w"), WI) == Path("/w/docs/work-items/ORCH-001")


@pytest.mark.parametrize(
    ("gate", "worktree_setup", "reason"),
    [
        pytest.param("nope", None, "unknown gate", id="unknown-gate"),
        pytest.param("review_approved", "dir", "not a file", id="report-is-a-directory"),
        pytest.param("review_approved", "file-as-parent", "cannot read", id="parent-is-a-file"),
    ],
)
def test_file_gate_never_raises(
    tmp_path: Path, gate: str, worktree_setup: str | None, reason: str
) -> None:
    if worktree_setup == "dir":
        (artifacts_dir(tmp_path, WI) / "12-review.md").mkdir(parents=True)
    elif worktree_setup == "file-as-parent":
        (tmp_path / "docs").write_text("not a directory")
    result = evaluate_file_gate(gate, tmp_path, WI)
    assert result.verdict is FAIL
    assert reason in result.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_report_is_red(tmp_path: Path) -> None:
    path = write_report(tmp_path, "review_approved", fm("verdict: APPROVE"))
    path.chmod(0)
    try:
        result = evaluate_file_gate("review_approved", tmp_path, WI)
    finally:
        path.chmod(0o644)
    assert result.verdict is FAIL
    assert "cannot read 12-review.md" in result.reason


# --- read_frontmatter --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fields", "body", "error"),
    [
        pytest.param("---\na: 1\n---\nbody\n", {"a": 1}, "body\n", None, id="ok"),
        pytest.param("---  \na: x\n---\r\nb", {"a": "x"}, "b", None, id="trailing-space-crlf"),
        pytest.param("no\n", None, "no\n", "no frontmatter", id="none"),
        pytest.param("", None, "", "no frontmatter", id="empty"),
        pytest.param("---\na: [\n---\nb", None, "b", "bad YAML in frontmatter", id="bad-yaml"),
        pytest.param("---\n- a\n---\n", None, "", "not a mapping", id="list"),
    ],
)
def test_read_frontmatter(text: str, fields: dict | None, body: str, error: str | None) -> None:
    got_fields, got_body, got_error = read_frontmatter(text)
    assert got_fields == fields
    assert got_body == body
    if error is None:
        assert got_error is None
    else:
        assert got_error is not None and error in got_error


# --- extract_findings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            REVIEW_FINDINGS,
            "- P0: app/auth.py:42 — token compared with ==\n"
            "* P1: app/api.py:88 — KeyError on missing title",
            id="section-only",
        ),
        pytest.param(
            "## Findings\nP0: a.py:1 — x\nP1: b.py:2 — y\nP2: c.py:3 — z\n",
            "P0: a.py:1 — x\nP1: b.py:2 — y",
            id="plain",
        ),
        pytest.param(
            "## Findings\n  - P1: a.py:1 — indented\n1. P0: b.py:2 — numbered\n",
            "- P1: a.py:1 — indented\n1. P0: b.py:2 — numbered",
            id="bullets",
        ),
        pytest.param(
            "## Findings\n**P0**: a.py:1 — bold\n**P1:** b.py:2 — bold colon\n",
            "**P0**: a.py:1 — bold\n**P1:** b.py:2 — bold colon",
            id="bold",
        ),
        pytest.param("## Findings\np1: a.py:1 — lower\n", "p1: a.py:1 — lower", id="lowercase"),
        pytest.param(
            "## Findings\nP10: a.py:1 — not a level\nThe P0: inline mention\n",
            "",
            id="not-findings",
        ),
        pytest.param(
            "## Findings\n```\n## not a heading\n```\nP1: a.py:1 — after fence\n",
            "P1: a.py:1 — after fence",
            id="heading-inside-fence",
        ),
        pytest.param(
            "Review.\nP0: a.py:1 — no section\nP3: b\n",
            "P0: a.py:1 — no section",
            id="no-findings-section",
        ),
        pytest.param("## Findings\nNone.\n", "", id="none"),
        pytest.param("## Findings\n\n## Notes\nP1: a.py:1 — elsewhere\n", "", id="empty-section"),
    ],
)
def test_extract_findings(body: str, expected: str) -> None:
    assert extract_findings(body) == expected


# --- extract_failure_excerpt -------------------------------------------------------------

TRACEBACK = """Running checks
Traceback (most recent call last):
  File "app.py", line 1, in <module>
    main()
  File "app.py", line 9, in main
    raise ValueError("bad config")
ValueError: bad config

All done
"""


def test_failure_excerpt_pytest() -> None:
    excerpt = extract_failure_excerpt(PYTEST_FAILURE)
    assert excerpt.splitlines() == [
        "tests/test_a.py::test_sum FAILED",
        "E       assert 3 == 4",
        "FAILED tests/test_a.py::test_sum - assert 3 == 4",
        "=== 1 failed, 4 passed in 0.12s ===",
    ]


@pytest.mark.parametrize(
    "line",
    [
        "FAIL: test_login (tests.test_auth.AuthTest)",
        "--- FAIL: TestParse (0.00s)",
        "ERROR tests/test_db.py - sqlite3.OperationalError",
        "AssertionError: expected 200, got 500",
        "FAILED (failures=1)",
        "2 failed, 10 passed in 3.01s",
    ],
)
def test_failure_excerpt_keeps_failure_lines(line: str) -> None:
    assert line in extract_failure_excerpt(f"ok line\n{line}\nanother ok line\n")


def test_failure_excerpt_traceback_tail() -> None:
    excerpt = extract_failure_excerpt(TRACEBACK)
    assert "Traceback (most recent call last):" in excerpt
    assert 'raise ValueError("bad config")' in excerpt
    assert "ValueError: bad config" in excerpt
    assert "All done" not in excerpt and "Running checks" not in excerpt


def test_failure_excerpt_nothing_failed() -> None:
    assert extract_failure_excerpt("All good.\n=== 5 passed in 0.1s ===\n") == (
        "=== 5 passed in 0.1s ==="
    )
    assert extract_failure_excerpt("") == ""


@pytest.mark.parametrize("limit", [60, 500, 2000])
def test_failure_excerpt_truncation(limit: int) -> None:
    failures = "".join(
        f"FAILED tests/test_{i}.py::test_case_{i} - assert {i} == 0\n" for i in range(300)
    )
    summary = "=== 300 failed in 9.99s ==="
    excerpt = extract_failure_excerpt(failures + summary + "\n", limit=limit)
    assert len(excerpt) <= limit
    assert TRUNCATED in excerpt
    if limit >= 500:
        assert excerpt.startswith("FAILED tests/test_0.py::test_case_0")
        assert excerpt.endswith(summary)


def test_failure_excerpt_under_limit_is_untouched() -> None:
    assert TRUNCATED not in extract_failure_excerpt(PYTEST_FAILURE, limit=2000)


def test_test_report_must_fix_is_truncated(tmp_path: Path) -> None:
    body = "".join(f"FAILED t.py::test_{i} - x\n" for i in range(1000))
    write_report(tmp_path, "tests_passed", fm("result: FAIL", body))
    result = evaluate_file_gate("tests_passed", tmp_path, WI)
    assert result.verdict is FAIL
    assert len(result.must_fix) <= 2000
    assert "FAILED t.py::test_0 - x" in result.must_fix


# --- ci_green_local ----------------------------------------------------------------------


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def ci(worktree: Path, command: list[str] | None, timeout_s: float = 60) -> GateResult:
    return asyncio.run(ci_green_local(worktree, command, timeout_s=timeout_s))


@pytest.mark.parametrize(
    ("command", "verdict", "reason", "must_fix"),
    [
        pytest.param(None, PASS, "no CI configured", "", id="none-configured"),
        pytest.param([], PASS, "no CI configured", "", id="empty-command"),
        pytest.param(py("print('all good')"), PASS, "passed", "", id="exit-0"),
        pytest.param(
            py("import sys; print('3 failed'); print('boom', file=sys.stderr); sys.exit(1)"),
            FAIL,
            "exited with code 1",
            "3 failed\nboom",
            id="exit-1-output-tail",
        ),
        pytest.param(
            ["conveyor-no-such-executable-xyz"],
            FAIL,
            "check command not found: conveyor-no-such-executable-xyz",
            "",
            id="missing-executable",
        ),
        pytest.param(
            py("import pathlib, sys; sys.exit(0 if pathlib.Path('marker').exists() else 2)"),
            PASS,
            "passed",
            "",
            id="runs-in-worktree",
        ),
    ],
)
def test_ci_green_local(
    tmp_path: Path, command: list[str] | None, verdict: GateVerdict, reason: str, must_fix: str
) -> None:
    (tmp_path / "marker").write_text("x")
    result = ci(tmp_path, command)
    assert result.verdict is verdict, result
    assert reason in result.reason
    assert must_fix in result.must_fix
    assert result.report is None


def test_ci_green_local_output_tail(tmp_path: Path) -> None:
    result = ci(tmp_path, py("import sys; print('x' * 20000); print('THE-END'); sys.exit(3)"))
    assert result.verdict is FAIL
    assert result.must_fix.endswith("THE-END")
    assert TRUNCATED in result.must_fix
    assert len(result.must_fix) <= OUTPUT_TAIL_CHARS


def test_ci_green_local_missing_worktree(tmp_path: Path) -> None:
    result = ci(tmp_path / "gone", py("pass"))
    assert result.verdict is FAIL
    assert "gone" in result.reason


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead, only not reaped yet


def test_ci_green_local_timeout_kills_the_process_group(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    result = ci(tmp_path, py(code), timeout_s=1)
    assert result.verdict is FAIL
    assert "timed out after 1s" in result.reason
    assert result.must_fix.startswith("child ")
    child = int(result.must_fix.split()[1])
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child)
