"""The prompt an agent reads: its role's instructions rendered for one task."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import jinja2

from engine.config import ProjectConfig
from engine.gates import ARTIFACTS_ROOT
from engine.store import Task


@dataclass(frozen=True)
class Feedback:
    """Text a person or a gate left for the next run of `stage`, embedded verbatim."""

    stage: str
    kind: str  # rollback | rejection | answers
    source: str  # the stage whose gate was red, or "human"
    text: str
    report: str | None

    @classmethod
    def of(cls, task: Task) -> Feedback | None:
        """The task's pending feedback when it is meant for the stage the task is at."""
        if task.feedback_stage != task.stage or not task.feedback_text:
            return None
        return cls(
            stage=task.feedback_stage,
            kind=task.feedback_kind or "rollback",
            source=task.feedback_source or "",
            text=task.feedback_text,
            report=task.feedback_report,
        )


def render_prompt(
    env: jinja2.Environment,
    *,
    role: str,
    task: Task,
    project: ProjectConfig,
    attempt: int,
    report_file: str | None,
    feedback: Feedback | None,
) -> str:
    return env.get_template(f"roles/{role}.md.j2").render(
        role=role,
        stage=task.stage,
        work_item=task.work_item,
        title=task.title,
        description=task.description,
        branch=task.branch,
        main_branch=project.main_branch,
        attempt=attempt,
        artifacts_dir=f"{ARTIFACTS_ROOT}/{task.work_item}",
        report_file=report_file,
        check_command=shlex.join(project.check_command) if project.check_command else None,
        feedback=feedback,
    )
