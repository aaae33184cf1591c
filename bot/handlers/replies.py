"""Answers to the bot's ForceReply prompts: a reject reason, answers, a new task's description."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.types import Message

from bot.filters import actor_name, is_admin
from bot.replies import ReplyKind, take
from bot.texts import Texts
from engine.config import Settings
from engine.pipeline import Pipeline
from engine.store import Store


async def on_reply(
    message: Message, settings: Settings, store: Store, pipeline: Pipeline, texts: Texts
) -> None:
    if not is_admin(message.from_user, settings):
        return
    pending = await take(
        store, message.chat.id, message.reply_to_message.message_id, message.from_user.id
    )
    if pending is None:
        return
    actor = actor_name(message.from_user)
    text = message.text.strip()
    if pending.kind is ReplyKind.NEW_DESCRIPTION:
        project, _, title = (pending.payload or "").partition("\n")
        outcome = await pipeline.start_task(project, title, text, actor=actor)
        if outcome.created:
            await message.reply(texts.gettext("Task %(id)s created.", id=outcome.task.work_item))
        else:
            await message.reply(texts.gettext("Not started: %(reason)s", reason=outcome.reason))
        return
    act = {ReplyKind.REJECT_REASON: pipeline.reject, ReplyKind.ANSWERS: pipeline.answer}
    outcome = await act[pending.kind](pending.task_id, text, actor)
    if not outcome.changed:
        await message.reply(texts.gettext("Nothing changed: the task has moved on."))


def make_router() -> Router:
    router = Router(name="replies")
    router.message.register(on_reply, F.reply_to_message, F.text)
    return router
