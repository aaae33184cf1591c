"""/start, /help, /queue, /task, /mode, /new."""

from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import ForceReply, Message

from bot.cards import CardRenderer
from bot.filters import is_admin
from bot.publisher import MODES, CardPublisher
from bot.replies import ReplyKind, remember
from bot.texts import Texts
from bot.views import queue_text, task_text
from engine.config import Settings
from engine.store import Store


def in_ops_chat_or_admin(message: Message, settings: Settings) -> bool:
    """Read commands answer in the ops chat, or to an operator anywhere."""
    return message.chat.id == settings.telegram_chat_id or is_admin(message.from_user, settings)


def responder(message: Message, publisher: CardPublisher):
    """Answers in the ops chat go through the card publisher's pacing; elsewhere directly."""
    return publisher.send if message.chat.id == publisher.chat_id else message.answer


async def on_help(message: Message, publisher: CardPublisher, texts: Texts) -> None:
    answer = responder(message, publisher)
    await answer(texts.render("telegram/help.html.j2", mode=await publisher.mode()))


async def on_queue(
    message: Message, settings: Settings, store: Store, publisher: CardPublisher, texts: Texts
) -> None:
    if not in_ops_chat_or_admin(message, settings):
        return
    await responder(message, publisher)(await queue_text(store, texts))


async def on_task(
    message: Message,
    command: CommandObject,
    settings: Settings,
    store: Store,
    renderer: CardRenderer,
    publisher: CardPublisher,
    texts: Texts,
) -> None:
    if not in_ops_chat_or_admin(message, settings):
        return
    answer = responder(message, publisher)
    ref = (command.args or "").strip()
    task = await store.find_task(ref) if ref else None
    if task is None:
        await answer(texts.gettext("No task %(ref)s. Usage: /task <id or work item>", ref=ref))
        return
    await answer(await task_text(store, renderer, texts, task, await publisher.mode()))


async def on_mode(
    message: Message,
    command: CommandObject,
    settings: Settings,
    publisher: CardPublisher,
    texts: Texts,
) -> None:
    answer = responder(message, publisher)
    wanted = (command.args or "").strip().lower()
    if wanted:
        if not is_admin(message.from_user, settings):
            await answer(texts.gettext("Only operators can do this."))
            return
        if wanted not in MODES:
            await answer(texts.gettext("Usage: /mode edit|bump"))
            return
        await publisher.set_mode(wanted)
    await answer(texts.gettext("Card mode: %(mode)s", mode=await publisher.mode()))


async def on_new(
    message: Message,
    command: CommandObject,
    settings: Settings,
    store: Store,
    publisher: CardPublisher,
    texts: Texts,
) -> None:
    answer = responder(message, publisher)
    if not is_admin(message.from_user, settings):
        await answer(texts.gettext("Only operators can do this."))
        return
    title = (command.args or "").strip()
    if not title or not settings.projects:
        await answer(texts.gettext("Usage: /new [PROJECT] <title>"))
        return
    project, _, rest = title.partition(" ")
    if settings.project(project) is None or not rest.strip():
        project, rest = settings.projects[0].key, title
    prompt = await answer(
        texts.render("telegram/ask_description.html.j2", title=rest.strip()),
        reply_markup=ForceReply(selective=True),
        reply_to_message_id=message.message_id,  # selective: the prompt opens for its author
    )
    await remember(
        store,
        prompt.chat.id,
        prompt.message_id,
        message.from_user.id,
        ReplyKind.NEW_DESCRIPTION,
        payload=f"{project}\n{rest.strip()}",
    )


def make_router() -> Router:
    router = Router(name="commands")
    router.message.register(on_help, CommandStart())
    router.message.register(on_help, Command("help"))
    router.message.register(on_queue, Command("queue"))
    router.message.register(on_task, Command("task"))
    router.message.register(on_mode, Command("mode"))
    router.message.register(on_new, Command("new"))
    return router
