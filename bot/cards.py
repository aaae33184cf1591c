"""What a task's card says, rendered from the store."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from aiogram.types import InlineKeyboardMarkup

from bot.keyboards import card_keyboard
from bot.texts import Texts
from engine.config import Settings
from engine.gates import report_relpath
from engine.links import forge_file_url, pull_request_url, tracker_issue_url
from engine.reconciler import ACTOR as RECONCILER_ACTOR
from engine.stages import STAGES, Stage, Status, stage_index
from engine.store import Event, Store, Task, now
from engine.summary import StageFigures, task_figures

TELEGRAM_TEXT_LIMIT = 4096
CARD_TEXT_BUDGET = 3500  # well under the limit: the card links to /task for the rest

# the mark of the stage a task is at, by the task's status
CURRENT_STAGE_MARK: dict[str, str] = {
    Status.ACTIVE: "running",
    Status.AWAITING_APPROVAL: "waiting",
    Status.NEEDS_INPUT: "waiting",
    Status.BLOCKED: "waiting",
    Status.ESCALATED: "failed",
    Status.FAILED: "failed",
    Status.CANCELLED: "failed",
    Status.DONE: "done",
}
BRD_VERDICTS = ("approved", "rejected")


@dataclass(frozen=True)
class StageRow:
    stage: str
    mark: str
    figures: StageFigures


@dataclass(frozen=True)
class RenderedCard:
    text: str
    markup: InlineKeyboardMarkup | None
    version: int

    @property
    def digest(self) -> str:
        markup = self.markup.model_dump_json(exclude_none=True) if self.markup else ""
        return hashlib.sha256(json.dumps([self.text, markup]).encode()).hexdigest()


def stage_mark(stage: Stage, task: Task) -> str:
    if task.status == Status.DONE:
        return "done"
    position, current = stage_index(stage), stage_index(Stage(task.stage))
    if position < current:
        return "done"
    if position > current:
        return "pending"
    return CURRENT_STAGE_MARK[task.status]


def brd_review(events: list[Event]) -> dict | None:
    """The last human verdict on the BRD, with how long the BRD waited for it."""
    ready_at = None
    review = None
    for event in events:
        if event.kind == "brd_ready":
            ready_at = event.at
        elif event.kind in BRD_VERDICTS:
            waited = event.at - ready_at if ready_at is not None else None
            review = {"verdict": event.kind, "actor": event.actor, "at": event.at, "waited": waited}
    return review


def last_reconciled(events: list[Event]) -> Event | None:
    """The reconciler's move, when it is the task's latest."""
    moves = [e for e in events if e.kind == "advanced"]
    return moves[-1] if moves and moves[-1].actor == RECONCILER_ACTOR else None


class CardRenderer:
    def __init__(self, store: Store, settings: Settings, texts: Texts) -> None:
        self.store = store
        self.settings = settings
        self.texts = texts

    async def context(self, task: Task, mode: str) -> dict:
        events = await self.store.events(task.id)
        figures = await task_figures(self.store, task, now())
        by_stage = {row.stage: row for row in figures.stages}
        rows = [
            StageRow(spec.stage.value, stage_mark(spec.stage, task), by_stage[spec.stage.value])
            for spec in STAGES
            if spec.stage is not Stage.DONE
        ]
        return {
            "task": task,
            "rows": rows,
            "figures": figures,
            "review": brd_review(events),
            "reconciled": last_reconciled(events),
            "mode": mode,
            "brd_url": forge_file_url(
                self.settings, task, report_relpath(task.work_item, "brd_ready")
            ),
            "issue_url": tracker_issue_url(self.settings, task),
            "pr_url": pull_request_url(self.settings, task),
            "clock": clock,
        }

    async def render(self, task: Task, mode: str) -> RenderedCard:
        version = await self.store.latest_event_id(task.id)
        text = self.texts.render("telegram/card.html.j2", **await self.context(task, mode))
        return RenderedCard(text, card_keyboard(self.texts, task, version), version)


def clock(ts: float | None) -> str:
    return "—" if ts is None else time.strftime("%H:%M", time.localtime(ts))
