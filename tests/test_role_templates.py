"""The role prompts: complete, strict, and in step with the gates that read their reports."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pytest

from engine.gates import (
    REPORT_FILES,
    VERDICT_TABLES,
    GateVerdict,
    artifacts_dir,
    evaluate_file_gate,
    extract_findings,
)
from engine.stages import ROLES, STAGES

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
WI = "ORCH-001"
ROLE_SPECS = {spec.role: spec for spec in STAGES if spec.role}

DESCRIPTION = (
    'Add a `/healthz` endpoint.\n\n## Details\nIt returns 200 and {"ok": true}.\n'
    "Literal braces {{ not_a_variable }} stay as they are."
)
MUST_FIX = (
    "P0: app/web.py:12 — /healthz returns 500 when the DB is down\n"
    "- P1: tests/test_web.py:3 — no test for the error path\n"
    "```\nFAILED tests/test_web.py::test_health - assert 500 == 200\n```"
)


@dataclass(frozen=True)
class Feedback:
    kind: str
    text: str
    source: str
    report: str | None


ROLLBACK = Feedback("rollback", MUST_FIX, "review", f"docs/work-items/{WI}/12-review.md")


def environments() -> dict[str, jinja2.Environment]:
    loader = jinja2.FileSystemLoader(TEMPLATES)
    return {
        "plain": jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined),
        "engine": jinja2.Environment(
            loader=loader,
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        ),
    }


def context(role: str, **overrides: object) -> dict[str, object]:
    spec = ROLE_SPECS[role]
    values: dict[str, object] = {
        "role": role,
        "stage": spec.stage.value,
        "work_item": WI,
        "title": "Add a health endpoint",
        "description": DESCRIPTION,
        "branch": "orch-001-add-a-health-endpoint",
        "main_branch": "main",
        "attempt": 1,
        "artifacts_dir": f"docs/work-items/{WI}",
        "report_file": None if role == "developer" else REPORT_FILES.get(spec.gate or ""),
        "check_command": "make check",
        "feedback": None,
    }
    values.update(overrides)
    return values


def render(role: str, env: str = "engine", **overrides: object) -> str:
    template = environments()[env].get_template(f"roles/{role}.md.j2")
    return template.render(**context(role, **overrides))


def example_frontmatters(prompt: str) -> list[str]:
    """The frontmatter examples the prompt shows: fenced blocks that start with `---`."""
    return re.findall(r"^```markdown\n(---\n.*?\n---\n)```$", prompt, re.MULTILINE | re.DOTALL)


def mentioned_values(prompt: str, field: str) -> set[str]:
    """Every VALUE in `field: VALUE` (or `field: A|B`) the prompt mentions."""
    found = re.findall(rf"\b{field}: ([A-Za-z_|-]+)", prompt)
    return {value for group in found for value in group.split("|")}


ROLE_CASES = [
    pytest.param(role, env, feedback, id=f"{role}-{env}-{'rollback' if feedback else 'fresh'}")
    for role in ROLES
    for env in ("engine", "plain")
    for feedback in (None, ROLLBACK)
]


def test_every_role_has_a_template_and_nothing_else_does() -> None:
    names = {path.name for path in (TEMPLATES / "roles").glob("*.md.j2")}
    assert names - {"_common.md.j2"} == {f"{role}.md.j2" for role in ROLES}


@pytest.mark.parametrize(("role", "env", "feedback"), ROLE_CASES)
def test_prompt_has_the_task_and_the_rules(role: str, env: str, feedback: Feedback | None) -> None:
    prompt = render(role, env, feedback=feedback)
    assert f"{WI}: Add a health endpoint" in prompt
    assert DESCRIPTION in prompt
    assert "orch-001-add-a-health-endpoint" in prompt
    assert f"docs/work-items/{WI}/" in prompt
    assert "`make check`" in prompt
    assert "git commit" in prompt and ".task.md" in prompt
    if feedback is None:
        assert MUST_FIX not in prompt and "⚠" not in prompt
    else:
        assert MUST_FIX in prompt
        assert f"[`{feedback.report}`]({feedback.report})" in prompt
        assert "the review stage" in prompt


@pytest.mark.parametrize(("role", "env", "feedback"), ROLE_CASES)
def test_prompt_names_the_exact_report_and_field(
    role: str, env: str, feedback: Feedback | None
) -> None:
    prompt = render(role, env, feedback=feedback)
    gate = ROLE_SPECS[role].gate
    if gate not in REPORT_FILES:  # the developer: its gate is the check command
        assert REPORT_FILES["brd_ready"] in prompt
        assert REPORT_FILES["architecture_ready"] in prompt
        return
    assert f"docs/work-items/{WI}/{REPORT_FILES[gate]}" in prompt
    table = VERDICT_TABLES.get(gate)
    if table is not None:
        assert f"`{table.fields[0]}`" in prompt


@pytest.mark.parametrize("role", [r for r in ROLES if ROLE_SPECS[r].gate in VERDICT_TABLES])
def test_prompt_values_are_the_gate_values(role: str) -> None:
    """Every `field: VALUE` the prompt mentions is a value of the gate's table, spelled as there."""
    prompt = render(role)
    table = VERDICT_TABLES[ROLE_SPECS[role].gate or ""]
    for field in table.fields:
        assert mentioned_values(prompt, field) <= table.positive | table.negative, field
    primary = mentioned_values(prompt, table.fields[0])
    assert primary & table.positive, "no positive value shown"
    assert primary & table.negative, "no negative value shown"


@pytest.mark.parametrize(
    ("role", "values"),
    [
        pytest.param(
            "analyst", ("status: ready", "status: needs_input", "## Questions"), id="analyst"
        ),
        pytest.param("reviewer", ("verdict: APPROVE", "verdict: REQUEST_CHANGES"), id="reviewer"),
        pytest.param("tester", ("result: PASS", "result: FAIL"), id="tester"),
        pytest.param("deployer", ("status: SUCCESS|DEPLOYED|FAILED",), id="deployer"),
    ],
)
def test_prompt_spells_the_values(role: str, values: tuple[str, ...]) -> None:
    prompt = render(role)
    table = VERDICT_TABLES[ROLE_SPECS[role].gate or ""]
    for text in values:
        assert text in prompt
        if ": " in text:
            for value in text.split(": ", 1)[1].split("|"):
                assert value in table.positive | table.negative


@pytest.mark.parametrize("role", [r for r in ROLES if ROLE_SPECS[r].gate in VERDICT_TABLES])
def test_example_frontmatter_passes_through_the_real_gate(tmp_path: Path, role: str) -> None:
    """Copying an example from the prompt into the report gives the verdict it promises."""
    gate = ROLE_SPECS[role].gate or ""
    examples = example_frontmatters(render(role))
    assert len(examples) >= 2
    path = artifacts_dir(tmp_path, WI) / REPORT_FILES[gate]
    path.parent.mkdir(parents=True)
    verdicts = []
    for example in examples:
        path.write_text(example + "\n# Report\n", encoding="utf-8")
        verdicts.append(evaluate_file_gate(gate, tmp_path, WI).verdict)
    assert verdicts[0] is GateVerdict.PASS
    assert set(verdicts[1:]) == {GateVerdict.NEEDS_INPUT if role == "analyst" else GateVerdict.FAIL}


def test_reviewer_finding_format_is_what_the_gate_extracts() -> None:
    prompt = render("reviewer")
    assert "`P0: <file>:<line> — <problem>`" in prompt
    for level in ("P0", "P1", "P2", "P3"):
        assert level in prompt
    example = re.search(r"^## Findings\n(?:P\d: .*\n)+", prompt, re.MULTILINE)
    assert example is not None
    assert extract_findings(example.group(0)).splitlines() == [
        "P0: <file>:<line> — <problem>",
        "P1: <file>:<line> — <problem>",
    ]


def test_developer_prompt_on_rollback_and_without_check_command() -> None:
    prompt = render("developer", feedback=ROLLBACK, check_command=None)
    assert "rework" in prompt and MUST_FIX in prompt
    assert "None" not in prompt
    assert "`make check`" not in prompt


@pytest.mark.parametrize("role", ROLES)
def test_no_check_command_renders_cleanly(role: str) -> None:
    prompt = render(role, check_command=None)
    assert "None" not in prompt.replace("`None.`", "")


@pytest.mark.parametrize(
    ("kind", "source", "report"),
    [
        pytest.param("rejection", "human", None, id="rejection"),
        pytest.param("answers", "human", None, id="answers"),
    ],
)
def test_analyst_gets_the_human_text_verbatim(kind: str, source: str, report: str | None) -> None:
    text = "Scope it to the API only.\n  Keep the CLI as is.\n"
    prompt = render("analyst", feedback=Feedback(kind, text, source, report), attempt=2)
    assert text.rstrip("\n") in prompt
    assert "⚠" in prompt
    assert "run 2 of the `analysis` stage" in prompt


def test_feedback_with_backtick_fences_stays_verbatim() -> None:
    text = "````\nquad\n````\n```\ntriple\n```"
    prompt = render("developer", feedback=Feedback("rollback", text, "testing", None))
    assert f"`````text\n{text}\n`````" in prompt


def test_a_missing_variable_fails_loudly() -> None:
    values = context("reviewer")
    del values["feedback"]
    template = environments()["engine"].get_template("roles/reviewer.md.j2")
    with pytest.raises(jinja2.UndefinedError):
        template.render(**values)
