"""A scripted stand-in for Claude Code: `python -m engine.sandbox.agent`.

It speaks the agent protocol of DESIGN §4 (environment in, artifacts in the worktree,
a Claude-Code-shaped result JSON last on stdout) and follows a script set per role:

    SANDBOX_AGENT_<ROLE>     comma-separated steps, one consumed per run of that role for
                             the work item; the last one repeats. Default "ok".
                             Steps: ok, negative, crash, hang, garbage, is_error, vanish
                             (deletes its own worktree, as a runaway `rm -rf` would, and
                             reports success).
    SANDBOX_AGENT_STATE      directory holding the run counters (default: a folder in the
                             temp dir named from the worktree's real path).
    SANDBOX_AGENT_DELAY_S    seconds to sleep before doing anything (default 0).
    SANDBOX_AGENT_DEV_FILE   the developer's source file, relative to the worktree
                             (default src/<work item lowercased>.txt). A line "TODO <WORK-ITEM>"
                             in it is replaced by the change; without one the change is
                             appended. When the prompt lists conflicting files, the developer
                             first merges origin/<main> and keeps both sides of each conflict.
    SANDBOX_AGENT_DEPLOY_LOG_ON_MAIN  when set, the deployer lands its log on the remote's
                             main through a commit of its own instead of the worktree.

Stdlib only, and deterministic: the same script gives the same files and the same usage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STEPS = ("ok", "negative", "crash", "hang", "garbage", "is_error", "vanish")
HANG_S = 3600.0
MAIN_MODEL = "claude-opus-4-7"
SMALL_MODEL = "claude-haiku-4-5"
MUST_FIX_PREFIXES = ("P0:", "P1:", "FAILED")


@dataclass(frozen=True)
class RoleUsage:
    input_tokens: int
    cache_read: int
    cache_creation: int
    output_tokens: int
    cost_micro_usd: int  # integer micro-dollars, so the per-model split adds up exactly
    num_turns: int
    duration_ms: int


USAGE_BY_ROLE: dict[str, RoleUsage] = {
    "analyst": RoleUsage(12, 18_000, 4_000, 1_500, 210_000, 4, 41_000),
    "architect": RoleUsage(15, 24_000, 5_000, 2_500, 340_000, 6, 63_000),
    "developer": RoleUsage(40, 90_000, 12_000, 6_000, 870_000, 18, 184_000),
    "reviewer": RoleUsage(20, 30_000, 6_000, 1_800, 290_000, 7, 52_000),
    "tester": RoleUsage(18, 26_000, 5_000, 1_200, 230_000, 9, 77_000),
    "deployer": RoleUsage(8, 9_000, 2_000, 400, 70_000, 3, 21_000),
}
DEFAULT_USAGE = RoleUsage(10, 1_000, 500, 100, 20_000, 1, 5_000)
# The small model's share of every run: a fixed token count and a fifth of the cost.
SMALL_MODEL_INPUT, SMALL_MODEL_OUTPUT = 300, 120


@dataclass(frozen=True)
class Run:
    role: str
    stage: str
    work_item: str
    attempt: str
    artifacts_dir: Path
    prompt: str
    run_number: int  # 1 for the first run of this role for this work item

    @property
    def dev_file(self) -> str:
        default = f"src/{self.work_item.lower()}.txt"
        return os.environ.get("SANDBOX_AGENT_DEV_FILE") or default

    def write_report(self, name: str, frontmatter: dict[str, str], body: str) -> str:
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        header = "".join(f"{key}: {value}\n" for key, value in frontmatter.items())
        (self.artifacts_dir / name).write_text(f"---\n{header}---\n\n{body}", encoding="utf-8")
        return name


# ----------------------------------------------------------------------------- artifacts


def analyst(run: Run, positive: bool) -> str:
    title = prompt_title(run.prompt)
    if not positive:
        body = (
            f"# BRD {run.work_item}: {title}\n\n"
            "## Questions\n\n"
            "1. Which users must be able to use this feature?\n"
            "2. What should happen when the input is empty?\n"
        )
        return run.write_report("01-brd.md", {"status": "needs_input"}, body)
    body = (
        f"# BRD {run.work_item}: {title}\n\n"
        f"## Goal\n\n> {title}\n\n"
        f"## Scope\n\n- In: the change described in the task {run.work_item}.\n"
        "- Out: anything the task does not mention.\n\n"
        "## Acceptance criteria\n\n"
        f"1. {title}: works for a valid input.\n"
        "2. An empty input is rejected with a clear error.\n"
    )
    return run.write_report("01-brd.md", {"status": "ready"}, body)


def architect(run: Run, positive: bool) -> str:
    body = (
        f"# Architecture {run.work_item}\n\n"
        f"## Components\n\n- `{run.dev_file}`: the change itself.\n\n"
        "## Risks\n\n- None beyond the acceptance criteria of the BRD.\n"
    )
    return run.write_report("02-architecture.md", {"status": "ready"}, body)


def developer(run: Run, positive: bool) -> str:
    if "Conflicting files:" in run.prompt:
        merge_main_keeping_both_sides(main_branch(run.prompt))
    path = Path(run.dev_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"attempt {run.run_number}: {run.work_item} change by the sandbox developer"]
    lines += [f"fixed: {line}" for line in must_fix_lines(run.prompt)]
    change = "".join(f"{line}\n" for line in lines)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    marker = f"TODO {run.work_item}\n"
    if marker in text:
        path.write_text(text.replace(marker, change, 1), encoding="utf-8")
    else:
        with path.open("a", encoding="utf-8") as source:
            source.write(change)
    return run.dev_file


def main_branch(prompt: str) -> str:
    found = re.search(r"main branch is `([^`]+)`", prompt)
    return found.group(1) if found else "main"


def git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    identity = ("-c", "user.name=Sandbox Agent", "-c", "user.email=agent@localhost")
    return subprocess.run(
        ["git", *identity, *args], cwd=cwd, capture_output=True, text=True, check=False
    )


CONFLICT_MARKERS = ("<<<<<<< ", "=======", ">>>>>>> ")


def merge_main_keeping_both_sides(main: str) -> None:
    """Merge the remote's main into the branch; resolve each conflict by keeping both sides.

    The merge is left uncommitted: Conveyor commits what the agent leaves behind.
    """
    git("fetch", "--quiet", "origin")
    merged = git("merge", "--no-commit", "--no-ff", f"origin/{main}")
    if merged.returncode == 0:
        return
    conflicted = git("diff", "--name-only", "--diff-filter=U").stdout.split()
    for name in conflicted:
        path = Path(name)
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if not line.startswith(CONFLICT_MARKERS)
        ]
        path.write_text("".join(kept), encoding="utf-8")
        git("add", name)


def reviewer(run: Run, positive: bool) -> str:
    if positive:
        findings = "None.\n"
        return run.write_report("12-review.md", {"verdict": "APPROVE"}, review_body(run, findings))
    findings = (
        f"P0: {run.dev_file} does not validate empty input\n"
        f"P1: {run.dev_file} has no test for the error path\n"
        f"P2: {run.dev_file} could use a clearer name (nice to have)\n"
    )
    return run.write_report(
        "12-review.md", {"verdict": "REQUEST_CHANGES"}, review_body(run, findings)
    )


def review_body(run: Run, findings: str) -> str:
    return f"# Review {run.work_item}\n\n## Findings\n\n{findings}"


def tester(run: Run, positive: bool) -> str:
    if positive:
        body = f"# Test report {run.work_item}\n\n```\n5 passed in 0.10s\n```\n"
        return run.write_report("13-test-report.md", {"result": "PASS"}, body)
    test_file = f"tests/test_{slug(run.work_item)}.py"
    body = (
        f"# Test report {run.work_item}\n\n## Output\n\n```\n"
        f"{test_file} ..F..\n"
        f"FAILED {test_file}::test_empty_input - AssertionError: "
        f"empty input accepted by {run.dev_file}\n"
        "=== 1 failed, 4 passed in 0.12s ===\n```\n"
    )
    return run.write_report("13-test-report.md", {"result": "FAIL"}, body)


def deployer(run: Run, positive: bool) -> str:
    if positive:
        body = f"# Deploy {run.work_item}\n\nDeployed; health check answered 200.\n"
        status = "SUCCESS"
    else:
        body = f"# Deploy {run.work_item}\n\nHealth check failed: HTTP 503 after 3 tries.\n"
        status = "FAILED"
    if os.environ.get("SANDBOX_AGENT_DEPLOY_LOG_ON_MAIN"):
        return land_on_main(run, "14-deploy-log.md", f"---\nstatus: {status}\n---\n\n{body}")
    return run.write_report("14-deploy-log.md", {"status": status}, body)


def land_on_main(run: Run, name: str, text: str) -> str:
    """Commit a report straight onto the remote's main, as a deployer's own change would."""
    remote = git("remote", "get-url", "origin").stdout.strip()
    main = main_branch(run.prompt)
    relative = run.artifacts_dir.resolve().relative_to(Path.cwd().resolve()) / name
    with tempfile.TemporaryDirectory(prefix="sandbox-deployer-") as scratch:
        clone = Path(scratch)
        git("clone", "--quiet", "--branch", main, remote, str(clone))
        target = clone / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        git("add", str(relative), cwd=clone)
        git("commit", "--quiet", "-m", f"{run.work_item} deploy log", cwd=clone)
        git("push", "--quiet", "origin", f"HEAD:refs/heads/{main}", cwd=clone)
    return f"{name} on {main}"


# role -> writer(run, positive) returning what it wrote; architect and developer have no
# negative outcome, so they ignore `positive`.
WRITERS: dict[str, Callable[[Run, bool], str]] = {
    "analyst": analyst,
    "architect": architect,
    "developer": developer,
    "reviewer": reviewer,
    "tester": tester,
    "deployer": deployer,
}


# ----------------------------------------------------------------------------- prompt


def prompt_title(prompt: str) -> str:
    """The first line of the prompt's title section, else its first heading or line."""
    lines = [line.strip() for line in prompt.splitlines()]
    for i, line in enumerate(lines):
        label = line.lstrip("#").strip().rstrip(":").lower()
        if line.lower().startswith("title:") and line[6:].strip():
            return line[6:].strip()
        if line.startswith("#") and label == "title":
            following = [text for text in lines[i + 1 :] if text]
            if following:
                return following[0].lstrip("#").strip()
    for line in lines:
        if line:
            return line.lstrip("#").strip() or "untitled"
    return "untitled"


def must_fix_lines(prompt: str) -> list[str]:
    """Lines of the prompt that start with P0:, P1: or FAILED (bullets and quotes allowed)."""
    found = []
    for line in prompt.splitlines():
        text = line.strip().lstrip(">-*` \t").strip()
        if text.startswith(MUST_FIX_PREFIXES):
            found.append(text)
    return found


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


# ----------------------------------------------------------------------------- state


def state_dir() -> Path:
    configured = os.environ.get("SANDBOX_AGENT_STATE")
    if configured:
        return Path(configured)
    digest = hashlib.sha1(os.path.realpath(os.getcwd()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"conveyor-sandbox-agent-{digest}"


def count_run(work_item: str, role: str) -> int:
    """Record one more run of `role` for `work_item` and return its number (1-based)."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    counter = directory / f"{slug(work_item)}--{slug(role)}.count"
    try:
        previous = int(counter.read_text().strip() or 0)
    except (OSError, ValueError):
        previous = 0
    scratch = counter.with_suffix(f".tmp{os.getpid()}")
    scratch.write_text(str(previous + 1))
    scratch.replace(counter)
    return previous + 1


def step_for(role: str, run_number: int) -> str:
    script = os.environ.get(f"SANDBOX_AGENT_{role.upper()}", "") or "ok"
    steps = [step.strip().lower() for step in script.split(",") if step.strip()] or ["ok"]
    return steps[min(run_number, len(steps)) - 1]


# ----------------------------------------------------------------------------- output


def result_json(run: Run, text: str, *, is_error: bool = False) -> str:
    usage = USAGE_BY_ROLE.get(run.role, DEFAULT_USAGE)
    small_micro = usage.cost_micro_usd // 5
    main_micro = usage.cost_micro_usd - small_micro
    seed = f"{run.work_item}/{run.role}/{run.run_number}".encode()
    result = {
        "type": "result",
        "subtype": "error_during_execution" if is_error else "success",
        "is_error": is_error,
        "result": text,
        "session_id": hashlib.sha1(seed).hexdigest()[:32],
        "num_turns": usage.num_turns,
        "duration_ms": usage.duration_ms,
        "duration_api_ms": usage.duration_ms * 4 // 5,
        "total_cost_usd": usd(usage.cost_micro_usd),
        "usage": {
            "input_tokens": usage.input_tokens,
            "cache_creation_input_tokens": usage.cache_creation,
            "cache_read_input_tokens": usage.cache_read,
            "output_tokens": usage.output_tokens,
        },
        "modelUsage": {
            MAIN_MODEL: model_entry(
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read,
                usage.cache_creation,
                main_micro,
            ),
            SMALL_MODEL: model_entry(SMALL_MODEL_INPUT, SMALL_MODEL_OUTPUT, 0, 0, small_micro),
        },
        "permission_denials": [],
        "stop_reason": "end_turn",
    }
    return json.dumps(result)


def model_entry(
    input_tokens: int, output_tokens: int, cache_read: int, cache_creation: int, micro_usd: int
) -> dict[str, int | float]:
    return {
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "cacheReadInputTokens": cache_read,
        "cacheCreationInputTokens": cache_creation,
        "costUSD": usd(micro_usd),
        "contextWindow": 200_000,
    }


def usd(micro_usd: int) -> float:
    return round(micro_usd / 1_000_000, 6)


def finish(run: Run, text: str, *, is_error: bool = False) -> int:
    # Real CLIs sometimes print a notice before the result; the engine must look past it.
    print("sandbox agent: note: this is the scripted stand-in, not Claude Code")
    print(result_json(run, text, is_error=is_error), flush=True)
    return 0


# ----------------------------------------------------------------------------- main


def read_prompt() -> str:
    prompt = sys.stdin.read()
    task_file = os.environ.get("ORCH_TASK_FILE")
    if not prompt and task_file and Path(task_file).is_file():
        prompt = Path(task_file).read_text(encoding="utf-8", errors="replace")
    return prompt


def load_run() -> Run:
    role = os.environ["ORCH_ROLE"].strip().lower()
    work_item = os.environ.get("ORCH_WORK_ITEM", "").strip() or "UNKNOWN"
    artifacts = os.environ.get("ORCH_ARTIFACTS_DIR") or f"docs/work-items/{work_item}"
    return Run(
        role=role,
        stage=os.environ.get("ORCH_STAGE", ""),
        work_item=work_item,
        attempt=os.environ.get("ORCH_ATTEMPT", "1"),
        artifacts_dir=Path(artifacts),
        prompt=read_prompt(),
        run_number=count_run(work_item, role),
    )


def perform(run: Run, step: str) -> int:
    if step == "crash":
        print(
            f"sandbox agent: {run.role} crashed on purpose (run {run.run_number})", file=sys.stderr
        )
        return 1
    if step == "hang":
        time.sleep(HANG_S)
        return 0
    if step == "garbage":
        print("sandbox agent: this run prints no result at all\nnot json: <<<>>>")
        return 0
    if step == "is_error":
        return finish(run, f"{run.role} could not finish its work", is_error=True)
    if step == "vanish":
        shutil.rmtree(Path.cwd())
        return finish(run, f"{run.role} deleted its worktree")
    writer = WRITERS.get(run.role)
    wrote = writer(run, step != "negative") if writer else "nothing"
    summary = f"{run.role} ({run.stage}) run {run.run_number}, attempt {run.attempt}"
    return finish(run, f"{summary}: wrote {wrote}")


def delay_s() -> float:
    try:
        return max(0.0, float(os.environ.get("SANDBOX_AGENT_DELAY_S") or 0))
    except ValueError:
        return 0.0


def main() -> int:
    if not os.environ.get("ORCH_ROLE", "").strip():
        print("sandbox agent: ORCH_ROLE is not set", file=sys.stderr)
        return 2
    run = load_run()
    step = step_for(run.role, run.run_number)
    if step not in STEPS:
        print(f"sandbox agent: unknown step {step!r}; known: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    time.sleep(delay_s())
    return perform(run, step)


if __name__ == "__main__":
    sys.exit(main())
