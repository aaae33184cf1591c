"""What a task cost and how long it took, per stage, computed from the store.

Cards, `/task`, the demo's closing table and the tracker's cost comment all
render from these figures; nothing keeps running totals in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.stages import HUMAN_HOLD, STAGES, Stage
from engine.store import AgentRun, Event, Store, Task


@dataclass
class StageFigures:
    stage: str
    runs: int = 0
    attempts: int = 0
    input_tokens: int | None = None  # full input: input + cache read + cache creation
    cached_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    model: str | None = None
    wall_s: float = 0.0
    failed_runs: int = 0
    _model_cost: dict[str, float] = field(default_factory=dict, repr=False)

    def add(self, run: AgentRun) -> None:
        self.runs += 1
        self.attempts = max(self.attempts, run.attempt)
        self.input_tokens = _plus(self.input_tokens, run.full_input)
        cached = _sum_known(run.cache_read_tokens, run.cache_creation_tokens)
        self.cached_tokens = _plus(self.cached_tokens, cached)
        self.output_tokens = _plus(self.output_tokens, run.output_tokens)
        self.cost_usd = _plus(self.cost_usd, run.cost_usd)
        self.wall_s += run.duration_s or 0.0
        if not run.ok:
            self.failed_runs += 1
        if run.model:
            self._model_cost[run.model] = self._model_cost.get(run.model, 0.0) + (run.cost_usd or 0)
            self.model = max(self._model_cost, key=self._model_cost.__getitem__)


@dataclass
class TaskFigures:
    stages: list[StageFigures]
    total: StageFigures
    wall_s: float | None
    agents_s: float
    waiting_s: float
    models: dict[str, dict] = field(default_factory=dict)


def _plus(a: float | None, b: float | None):
    if b is None:
        return a
    return b if a is None else a + b


def _sum_known(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def waiting_for_people(events: list[Event], until: float) -> float:
    """Seconds the task spent in a status where a person had to act."""
    hold = {status.value for status in HUMAN_HOLD}
    waiting, since = 0.0, None
    for event in events:
        status = (event.to_state or "").split("/")[-1]
        if status in hold and since is None:
            since = event.at
        elif status not in hold and since is not None:
            waiting += event.at - since
            since = None
    if since is not None:
        waiting += until - since
    return waiting


def figures(task: Task, runs: list[AgentRun], events: list[Event], at: float) -> TaskFigures:
    by_stage = {spec.stage.value: StageFigures(spec.stage.value) for spec in STAGES}
    total = StageFigures("total")
    models: dict[str, dict] = {}
    for run in runs:
        by_stage[run.stage].add(run)
        total.add(run)
        for name, usage in json.loads(run.model_usage or "{}").items():
            entry = models.setdefault(name, {"cost_usd": 0.0, "runs": 0})
            entry["cost_usd"] += usage.get("cost_usd") or 0.0
            entry["runs"] += 1
    end = task.finished_at or at
    return TaskFigures(
        stages=[f for f in by_stage.values() if f.stage != Stage.DONE],
        total=total,
        wall_s=end - task.created_at,
        agents_s=total.wall_s,
        waiting_s=waiting_for_people(events, end),
        models=models,
    )


async def task_figures(store: Store, task: Task, at: float) -> TaskFigures:
    return figures(task, await store.agent_runs(task.id), await store.events(task.id), at)
