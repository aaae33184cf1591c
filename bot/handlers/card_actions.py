"""Presses on a card's buttons: Approve, Reject, Retry, Answer."""

from __future__ import annotations

from aiogram import Router
from aiogram.types import CallbackQuery, ForceReply

from bot.callbacks import Action, CardAction
from bot.filters import actor_name, is_admin, only_ops_chat
from bot.publisher import CardPublisher
from bot.replies import ReplyKind, remember
from bot.texts import Texts
from engine.config import Settings
from engine.pipeline import Pipeline
from engine.store import Store

# actions that need words from the person first: the kind of reply and the prompt's template
ASK_FIRST: dict[Action, tuple[ReplyKind, str]] = {
    Action.REJECT: (ReplyKind.REJECT_REASON, "telegram/ask_reject_reason.html.j2"),
    Action.ANSWER: (ReplyKind.ANSWERS, "telegram/ask_answers.html.j2"),
}


async def on_card_action(
    query: CallbackQuery,
    callback_data: CardAction,
    settings: Settings,
    store: Store,
    pipeline: Pipeline,
    publisher: CardPublisher,
    texts: Texts,
) -> None:
    if not is_admin(query.from_user, settings):
        await query.answer(texts.gettext("Only operators can do this."), show_alert=True)
        return
    task = await store.get_task(callback_data.task_id)
    if task is None or await store.latest_event_id(task.id) != callback_data.version:
        await query.answer(texts.gettext("This card is outdated: the task has moved on."))
        if task is not None:
            publisher.schedule(task.id)
        return
    if callback_data.action in ASK_FIRST:
        kind, template = ASK_FIRST[callback_data.action]
        prompt = await publisher.send(
            texts.render(template, task=task, user=query.from_user),
            reply_markup=ForceReply(selective=True),
        )
        await remember(store, prompt.chat.id, prompt.message_id, query.from_user.id, kind, task.id)
        await query.answer()
        return
    actor = actor_name(query.from_user)
    act = {Action.APPROVE: pipeline.approve, Action.RETRY: pipeline.retry}[callback_data.action]
    outcome = await act(task.id, actor)
    if outcome.changed:
        await query.answer(texts.gettext("Done."))
    else:
        await query.answer(texts.gettext("This card is outdated: the task has moved on."))
        publisher.schedule(task.id)


def make_router() -> Router:
    router = only_ops_chat(Router(name="card_actions"))
    router.callback_query.register(on_card_action, CardAction.filter())
    return router
