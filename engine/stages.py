"""The stage table of DESIGN §2, as data.

Everything that decides "what comes after this stage" or "what happens on red"
reads these tables; nothing else in the engine spells the order of stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    ANALYSIS = "analysis"
    ARCHITECTURE = "architecture"
    DEVELOPMENT = "development"
    REVIEW = "review"
    TESTING = "testing"
    DEPLOY_STAGING = "deploy-staging"
    DEPLOY = "deploy"
    DONE = "done"


class Status(StrEnum):
    ACTIVE = "active"
    AWAITING_APPROVAL = "awaiting_approval"
    NEEDS_INPUT = "needs_input"
    ESCALATED = "escalated"
    FAILED = "failed"
    BLOCKED = "blocked"
    DONE = "done"
    CANCELLED = "cancelled"


class OnRed(StrEnum):
    """What a red exit gate does to the task."""

    HUMAN = "human"  # analysis: the BRD waits for a person (or the analyst asks questions)
    AGENT_FAILURE = "agent_failure"  # rerun under the agent failure policy
    STAY = "stay"  # wait; the reconciler re-evaluates later
    ROLLBACK = "rollback"  # back to development with the must-fix text; developer retries +1


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    role: str | None
    gate: str | None
    on_red: OnRed | None
    # Verdict reports are removed before the stage's agent runs, so a gate can only
    # ever read what this run wrote, never a stale verdict from an earlier pass.
    fresh_report: bool = False


STAGES: tuple[StageSpec, ...] = (
    StageSpec(Stage.ANALYSIS, "analyst", "brd_ready", OnRed.HUMAN),
    StageSpec(Stage.ARCHITECTURE, "architect", "architecture_ready", OnRed.AGENT_FAILURE),
    StageSpec(Stage.DEVELOPMENT, "developer", "ci_green", OnRed.STAY),
    StageSpec(Stage.REVIEW, "reviewer", "review_approved", OnRed.ROLLBACK, fresh_report=True),
    StageSpec(Stage.TESTING, "tester", "tests_passed", OnRed.ROLLBACK, fresh_report=True),
    StageSpec(Stage.DEPLOY_STAGING, None, "staging_ready", OnRed.ROLLBACK),
    StageSpec(Stage.DEPLOY, "deployer", "deploy_succeeded", OnRed.ROLLBACK, fresh_report=True),
    StageSpec(Stage.DONE, None, None, None),
)

SPECS: dict[Stage, StageSpec] = {spec.stage: spec for spec in STAGES}

# stage -> the stage its green gate leads to
STAGE_TRANSITIONS: dict[Stage, Stage] = {
    STAGES[i].stage: STAGES[i + 1].stage for i in range(len(STAGES) - 1)
}

# stage -> where a red gate sends the task back to
ROLLBACK_TARGET: dict[Stage, Stage] = {
    spec.stage: Stage.DEVELOPMENT for spec in STAGES if spec.on_red is OnRed.ROLLBACK
}

GATES: dict[Stage, str] = {spec.stage: spec.gate for spec in STAGES if spec.gate}

ROLES: tuple[str, ...] = tuple(spec.role for spec in STAGES if spec.role)

# Statuses in which a person, not the pipeline, must act next.
HUMAN_HOLD: frozenset[Status] = frozenset(
    {Status.AWAITING_APPROVAL, Status.NEEDS_INPUT, Status.ESCALATED, Status.BLOCKED}
)
FINISHED: frozenset[Status] = frozenset({Status.DONE, Status.CANCELLED})


def next_stage(stage: Stage) -> Stage:
    return STAGE_TRANSITIONS[stage]


def stage_index(stage: Stage) -> int:
    return [spec.stage for spec in STAGES].index(stage)
