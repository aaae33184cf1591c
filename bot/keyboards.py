"""The card's inline buttons, chosen by the task's status."""

from __future__ import annotations

from aiogram.types import InlineKeyboardMarkup
from aiogram.utils.keyboard import InlineKeyboardBuilder

from bot.callbacks import Action, CardAction
from bot.texts import Texts
from engine.stages import Status
from engine.store import Task

BUTTONS: dict[str, tuple[Action, ...]] = {
    Status.AWAITING_APPROVAL: (Action.APPROVE, Action.REJECT),
    Status.NEEDS_INPUT: (Action.ANSWER,),
    Status.ESCALATED: (Action.RETRY,),
    Status.FAILED: (Action.RETRY,),
}


def button_label(texts: Texts, action: Action) -> str:
    labels = {
        Action.APPROVE: texts.gettext("Approve"),
        Action.REJECT: texts.gettext("Reject"),
        Action.RETRY: texts.gettext("Retry"),
        Action.ANSWER: texts.gettext("Answer"),
    }
    return labels[action]


def card_keyboard(texts: Texts, task: Task, version: int) -> InlineKeyboardMarkup | None:
    actions = BUTTONS.get(task.status, ())
    if not actions:
        return None
    builder = InlineKeyboardBuilder()
    for action in actions:
        builder.button(
            text=button_label(texts, action),
            callback_data=CardAction(action=action, task_id=task.id, version=version),
        )
    builder.adjust(len(actions))
    return builder.as_markup()
