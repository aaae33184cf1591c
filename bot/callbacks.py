"""Callback data of the card's buttons, packed by aiogram's factory (at most 64 bytes)."""

from __future__ import annotations

from enum import StrEnum

from aiogram.filters.callback_data import CallbackData


class Action(StrEnum):
    APPROVE = "a"
    REJECT = "r"
    RETRY = "t"
    ANSWER = "q"


class CardAction(CallbackData, prefix="c"):
    """A press on a card: which task, which action, and the task version the card showed.

    The version is the id of the task's newest event when the card was rendered; a
    press whose version is no longer the newest came from an outdated card.
    """

    action: Action
    task_id: int
    version: int
