"""Answers to the bot's ForceReply prompts: a reject reason, answers, a new task's description."""

from __future__ import annotations

from aiogram import F, Router
from aiogram.types import Message, ReplyParameters

from bot.filters import actor_name, is_admin, only_ops_chat
from bot.publisher import CardPublisher
from bot.replies import ReplyKind, take
from bot.texts import Texts
from engine.config import Settings
from engine.pipeline import Pipeline
from engine.store import Store


async def on_reply(
    message: Message,
    settings: Settings,
    store: Store,
    pipeline: Pipeline,
    publisher: CardPublisher,
    texts: Texts,
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
            answer = texts.gettext("Task %(id)s created.", id=outcome.task.work_item)
        else:
            answer = texts.gettext("Not started: %(reason)s", reason=outcome.reason)
        await reply(publisher, message, answer)
        return
    act = {ReplyKind.REJECT_REASON: pipeline.reject, ReplyKind.ANSWERS: pipeline.answer}
    outcome = await act[pending.kind](pending.task_id, text, actor)
    if not outcome.changed:
        await reply(publisher, message, texts.gettext("Nothing changed: the task has moved on."))


async def reply(publisher: CardPublisher, message: Message, text: str) -> None:
    """A plain-text answer to the person's message, paced with the cards."""
    await publisher.send(
        text,
        parse_mode=None,
        reply_parameters=ReplyParameters(
            message_id=message.message_id, allow_sending_without_reply=True
        ),
    )


def make_router() -> Router:
    router = only_ops_chat(Router(name="replies"))
    router.message.register(on_reply, F.reply_to_message, F.text)
    return router
