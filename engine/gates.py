"""Deterministic quality gates (DESIGN §3).

A gate reads only the YAML frontmatter of the report an agent wrote, never its
prose: "23 passed" in a body must not turn a red report green. The body is read
only to quote the must-fix text (findings, failure lines) back to the developer.
Gates never raise; every problem becomes a red result with a one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml

ARTIFACTS_ROOT = "docs/work-items"

# A report bigger than this is read only up to here; the frontmatter is at the top.
MAX_REPORT_BYTES = 1_000_000
OUTPUT_TAIL_CHARS = 3000
BODY_TAIL_CHARS = 2000
TRACEBACK_TAIL_LINES = 6
TRUNCATED = "[… truncated …]"


class GateVerdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NEEDS_INPUT = "needs_input"
    WAIT = "wait"  # could not be judged now (a remote did not answer): ask again later


@dataclass(frozen=True)
class GateResult:
    verdict: GateVerdict
    reason: str
    must_fix: str = ""
    report: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict is GateVerdict.PASS


# gate name -> report file name: the single source of truth for these names.
REPORT_FILES: dict[str, str] = {
    "brd_ready": "01-brd.md",
    "architecture_ready": "02-architecture.md",
    "review_approved": "12-review.md",
    "tests_passed": "13-test-report.md",
    "deploy_succeeded": "14-deploy-log.md",
}


@dataclass(frozen=True)
class VerdictTable:
    """The frontmatter fields a gate reads and the values it knows.

    All fields have equal rank: a negative value in any of them wins, otherwise
    one positive value is enough.
    """

    fields: tuple[str, ...]
    positive: frozenset[str]
    negative: frozenset[str]


# One table per gate that reads a verdict; a gate in REPORT_FILES but not here only
# needs its file to exist and be non-empty (architecture_ready).
VERDICT_TABLES: dict[str, VerdictTable] = {
    "brd_ready": VerdictTable(
        fields=("status",),
        positive=frozenset({"ready"}),
        negative=frozenset({"needs_input"}),
    ),
    "review_approved": VerdictTable(
        fields=("verdict",),
        positive=frozenset({"APPROVE", "APPROVED", "LGTM"}),
        negative=frozenset({"REQUEST_CHANGES", "CHANGES_REQUESTED", "REJECTED"}),
    ),
    "tests_passed": VerdictTable(
        fields=("result", "verdict", "status"),
        positive=frozenset({"PASS", "PASSED", "GREEN", "READY-TO-DEPLOY"}),
        negative=frozenset({"FAIL", "FAILED", "BLOCKED", "ERROR", "RED"}),
    ),
    "deploy_succeeded": VerdictTable(
        fields=("status",),
        positive=frozenset({"SUCCESS", "DEPLOYED"}),
        negative=frozenset({"FAILED"}),
    ),
}

# What a negative value means, when it is not a plain red.
NEGATIVE_VERDICT: dict[str, GateVerdict] = {"brd_ready": GateVerdict.NEEDS_INPUT}


def artifacts_dir(worktree: Path, work_item: str) -> Path:
    return Path(worktree) / ARTIFACTS_ROOT / work_item


def report_relpath(work_item: str, gate: str) -> str:
    return f"{ARTIFACTS_ROOT}/{work_item}/{REPORT_FILES[gate]}"


# --- frontmatter -------------------------------------------------------------------------


def read_frontmatter(text: str) -> tuple[dict | None, str, str | None]:
    """Split a report into (fields, body, error); exactly one of fields / error is None."""
    lines = text.removeprefix("\ufeff").splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return None, text, "no frontmatter"
    close = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if close is None:
        return None, text, "frontmatter is not closed (no second `---` line)"
    body = "".join(lines[close + 1 :])
    try:
        data = yaml.safe_load("".join(lines[1:close]))
    except Exception as exc:  # yaml.YAMLError, and anything else a hostile file provokes
        return None, body, f"bad YAML in frontmatter: {_one_line(str(exc))}"
    if data is None:
        return None, body, "frontmatter is empty"
    if not isinstance(data, dict):
        return None, body, f"frontmatter is not a mapping (got {type(data).__name__})"
    return data, body, None


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _field(fields: dict, name: str) -> object:
    if name in fields:
        return fields[name]
    for key, value in fields.items():
        if str(key).strip().casefold() == name:
            return value
    return None


def _display(value: object) -> str:
    """The value as one line of text; containers are named, not expanded (alias bombs)."""
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple | set):
        return f"<{type(value).__name__}>"
    return _one_line(str(value), 80)


def _norm(value: str) -> str:
    """Case-, space- and separator-insensitive form: "Request changes" == "REQUEST_CHANGES"."""
    return re.sub(r"[\s_-]+", "_", value.strip().casefold())


def _in(value: str, table: frozenset[str]) -> bool:
    return _norm(value) in {_norm(entry) for entry in table}


# --- file gates --------------------------------------------------------------------------


def evaluate_file_gate(gate: str, worktree: Path, work_item: str) -> GateResult:
    try:
        return _evaluate(gate, Path(worktree), work_item)
    except Exception as exc:  # the last line of "gates never raise"
        return GateResult(GateVerdict.FAIL, f"gate {gate} crashed: {_one_line(repr(exc))}")


def _evaluate(gate: str, worktree: Path, work_item: str) -> GateResult:
    name = REPORT_FILES.get(gate)
    if name is None:
        return GateResult(GateVerdict.FAIL, f"unknown gate {gate!r}")
    text, error = _read_report(artifacts_dir(worktree, work_item) / name)
    if text is None:
        return GateResult(GateVerdict.FAIL, error or f"{name} is unreadable")
    return evaluate_report_text(gate, text, work_item)


def evaluate_report_text(gate: str, text: str, work_item: str) -> GateResult:
    """Judge a report's text read from elsewhere (e.g. the remote's main); never raises."""
    name = REPORT_FILES.get(gate)
    if name is None:
        return GateResult(GateVerdict.FAIL, f"unknown gate {gate!r}")
    relpath = report_relpath(work_item, gate)
    if not text.strip():
        return GateResult(GateVerdict.FAIL, f"{name} is empty", report=relpath)
    table = VERDICT_TABLES.get(gate)
    if table is None:
        return GateResult(GateVerdict.PASS, f"{name} is present", report=relpath)
    fields, body, error = read_frontmatter(text)
    if fields is None:
        return GateResult(GateVerdict.FAIL, f"{name}: {error}", report=relpath)
    return _judge(gate, table, fields, body, relpath)


def _read_report(path: Path) -> tuple[str | None, str | None]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REPORT_BYTES)
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except IsADirectoryError:
        return None, f"{path.name} is a directory, not a file"
    except OSError as exc:
        return None, f"cannot read {path.name}: {exc.strerror or exc}"
    # A stray byte in the prose must not hide a valid frontmatter.
    return data.decode("utf-8", errors="replace"), None


def _judge(gate: str, table: VerdictTable, fields: dict, body: str, relpath: str) -> GateResult:
    name = REPORT_FILES[gate]
    present = [(f, v) for f in table.fields if (v := _display(_field(fields, f)))]
    if not present:
        names = ", ".join(f"`{f}`" for f in table.fields)
        reason = f"{name}: field {names} is missing or empty"
        return GateResult(GateVerdict.FAIL, reason, report=relpath)
    negatives = [f"{f} {v}" for f, v in present if _in(v, table.negative)]
    positives = [f"{f} {v}" for f, v in present if _in(v, table.positive)]
    if positives and not negatives:
        return GateResult(GateVerdict.PASS, f"{name}: {', '.join(positives)}", report=relpath)
    if negatives:
        detail = ", ".join(negatives)
        verdict = NEGATIVE_VERDICT.get(gate, GateVerdict.FAIL)
    else:
        detail = ", ".join(f"unknown {f} {v!r}" for f, v in present)
        verdict = GateVerdict.FAIL
    must_fix = _MUST_FIX[gate](body, relpath, detail)
    return GateResult(verdict, f"{name}: {detail}", must_fix, relpath)


def _brd_must_fix(body: str, relpath: str, detail: str) -> str:
    return section(body, "Questions") or (
        f"The analyst needs input ({detail}) but wrote no `## Questions` section; read {relpath}"
    )


def _review_must_fix(body: str, relpath: str, detail: str) -> str:
    return extract_findings(body) or (
        f"The review requested changes ({detail}) without P0/P1 findings;"
        f" read the full report: {relpath}"
    )


def _tests_must_fix(body: str, relpath: str, detail: str) -> str:
    return (
        extract_failure_excerpt(body)
        or _tail(body.strip(), BODY_TAIL_CHARS)
        or (f"The test report is red ({detail}) and shows no output; read {relpath}")
    )


def _deploy_must_fix(body: str, relpath: str, detail: str) -> str:
    return _tail(body.strip(), BODY_TAIL_CHARS) or (
        f"The deploy is red ({detail}) and the log has no details; read {relpath}"
    )


_MUST_FIX: dict[str, Callable[[str, str, str], str]] = {
    "brd_ready": _brd_must_fix,
    "review_approved": _review_must_fix,
    "tests_passed": _tests_must_fix,
    "deploy_succeeded": _deploy_must_fix,
}


# --- reading report bodies ---------------------------------------------------------------

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every markdown heading outside fenced code."""
    found, in_fence = [], False
    for index, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (match := _HEADING.match(line)):
            found.append((index, len(match.group(1)), match.group(2).rstrip(":").strip()))
    return found


def section(body: str, title: str) -> str | None:
    """The text under the first heading called `title`, up to the next heading of its level
    or higher; None when there is no such heading."""
    lines = body.splitlines()
    headings = _headings(lines)
    for position, (index, level, name) in enumerate(headings):
        if name.casefold() == title.casefold():
            end = next((i for i, lv, _ in headings[position + 1 :] if lv <= level), len(lines))
            return "\n".join(lines[index + 1 : end]).strip()
    return None


# "P0: ...", "- P1: ...", "* P0: ...", "1. P1: ...", "**P0**: ...", "**P1:** ...", "[P0]: ..."
_FINDING = re.compile(
    r"^\s*(?:[-*+]\s+|\d+[.)]\s+)?(?:\*\*|__)?\[?(P[0-3])\]?(?:\*\*|__)?\s*:", re.IGNORECASE
)
BLOCKING_SEVERITIES = frozenset({"P0", "P1"})


def extract_findings(body: str) -> str:
    """The P0/P1 lines of `## Findings` (of the whole body when there is no such section)."""
    scope = section(body, "Findings")
    scope = body if scope is None else scope
    kept = [
        line.strip()
        for line in scope.splitlines()
        if (match := _FINDING.match(line)) and match.group(1).upper() in BLOCKING_SEVERITIES
    ]
    return "\n".join(kept)


_FAILURE_LINES = (
    re.compile(r"\b(?:FAILED|ERROR)\b"),  # pytest "FAILED t::x", "t::x FAILED [ 20%]", unittest
    re.compile(r"\bFAIL\b"),  # unittest "FAIL: test_x", go "--- FAIL:", jest "FAIL src/x"
    re.compile(r"^E\s{2,}\S"),  # pytest assertion detail
    re.compile(r"^\s*Traceback \(most recent call last\)"),
    re.compile(r"\b\w*(?:Error|Exception)\b(?::|\s*$)"),  # AssertionError: ..., ValueError
)
_SUMMARY_LINES = (
    re.compile(r"^\s*=+ .*\b\d+ (?:failed|passed|errors?|skipped)\b.* =+\s*$"),
    re.compile(r"^\s*\d+ (?:failed|passed|errors?)\b.*\bin \d+(?:\.\d+)?s\b"),
)


def extract_failure_excerpt(body: str, limit: int = 2000) -> str:
    """The lines of a test report that show what failed, ending with the summary line.

    Over `limit` characters, failure lines are cut (with a marker) before the summary is.
    """
    lines = [line.rstrip() for line in body.splitlines()]
    picked = {i for i, line in enumerate(lines) if any(p.search(line) for p in _FAILURE_LINES)}
    picked |= _traceback_tail(lines)
    summary = [i for i, line in enumerate(lines) if any(p.match(line) for p in _SUMMARY_LINES)]
    failures = _unique(lines[i] for i in sorted(picked - set(summary)))
    return _fit(failures, _unique(lines[i] for i in summary), limit)


def _traceback_tail(lines: list[str]) -> set[int]:
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("Traceback (")]
    if not starts:
        return set()
    end = next((i for i in range(starts[-1], len(lines)) if not lines[i].strip()), len(lines))
    return set(range(max(starts[-1], end - TRACEBACK_TAIL_LINES), end))


def _unique(lines: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(line for line in lines if line.strip()))


def _fit(failures: list[str], summary: list[str], limit: int) -> str:
    whole = "\n".join(failures + summary)
    if len(whole) <= limit:
        return whole
    tail = "\n".join(summary)
    budget = limit - len(TRUNCATED) - len(tail) - 2
    if budget <= 0:
        return _clip(whole, limit)
    head = "\n".join(failures)[:budget]
    head = head.rsplit("\n", 1)[0] if "\n" in head else head
    return "\n".join(part for part in (head, TRUNCATED, tail) if part)


def _clip(text: str, limit: int) -> str:
    keep = max(limit - len(TRUNCATED) - 1, 0)
    return (text[:keep] + "\n" + TRUNCATED)[:limit]


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = max(limit - len(TRUNCATED) - 1, 0)
    return (TRUNCATED + "\n" + text[len(text) - keep :])[-limit:]


# --- ci_green, local check command -------------------------------------------------------

_KILL_GRACE_S = 5.0


async def ci_green_local(
    worktree: Path, check_command: list[str] | None, timeout_s: float = 600
) -> GateResult:
    """Run the project's check command (an argument list, no shell) in the worktree."""
    if not check_command:
        return GateResult(GateVerdict.PASS, "no CI configured")
    shown = _one_line(shlex.join(check_command), 120)
    try:
        return await _run_check(Path(worktree), check_command, shown, timeout_s)
    except Exception as exc:  # gates never raise
        reason = f"check command `{shown}` crashed: {_one_line(str(exc))}"
        return GateResult(GateVerdict.FAIL, reason)


async def _run_check(
    worktree: Path, command: list[str], shown: str, timeout_s: float
) -> GateResult:
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            cwd=worktree,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
    except FileNotFoundError as exc:
        if exc.filename not in (None, command[0]):  # the worktree itself is gone
            return GateResult(GateVerdict.FAIL, f"cannot run check command in {exc.filename}")
        return GateResult(GateVerdict.FAIL, f"check command not found: {command[0]}")
    except PermissionError:
        return GateResult(GateVerdict.FAIL, f"check command is not executable: {command[0]}")
    except OSError as exc:
        return GateResult(GateVerdict.FAIL, f"cannot run check command `{shown}`: {exc}")
    output = bytearray()
    reader = asyncio.create_task(_collect(proc.stdout, output))
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        _kill_group(proc)
        await _settle(proc, reader)
        tail = _output_tail(output)
        return GateResult(
            GateVerdict.FAIL, f"check command `{shown}` timed out after {timeout_s:g}s", tail
        )
    finally:
        if proc.returncode is None:  # cancelled: leave nothing running
            _kill_group(proc)
            reader.cancel()
    await _settle(proc, reader)
    tail = _output_tail(output)
    if proc.returncode == 0:
        return GateResult(GateVerdict.PASS, f"check command `{shown}` passed")
    return GateResult(GateVerdict.FAIL, f"check command `{shown}` {_exit(proc.returncode)}", tail)


async def _collect(stream: asyncio.StreamReader | None, sink: bytearray) -> None:
    keep = OUTPUT_TAIL_CHARS * 4  # bytes; enough for the character tail in any UTF-8
    while stream is not None and (chunk := await stream.read(65536)):
        sink += chunk
        if len(sink) > 2 * keep:
            del sink[:-keep]


async def _settle(proc: asyncio.subprocess.Process, reader: asyncio.Task) -> None:
    """Let the output reader finish; a grandchild holding the pipe open must not hang us."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader, _KILL_GRACE_S)  # cancels the reader on timeout
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), _KILL_GRACE_S)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _output_tail(output: bytearray) -> str:
    return _tail(output.decode("utf-8", errors="replace").strip(), OUTPUT_TAIL_CHARS)


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"
