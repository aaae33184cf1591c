"""/start, /help, /queue, /task, /mode, /new; answers go through the publisher's pacing."""

from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command, CommandObject, CommandStart
from aiogram.types import ForceReply, Message, ReplyParameters

from bot.cards import CardRenderer
from bot.filters import is_admin, only_ops_chat
from bot.publisher import MODES, CardPublisher
from bot.replies import ReplyKind, remember
from bot.texts import Texts
from bot.views import queue_text, task_text
from engine.config import Settings
from engine.store import Store


async def on_help(message: Message, publisher: CardPublisher, texts: Texts) -> None:
    await publisher.send(texts.render("telegram/help.html.j2", mode=await publisher.mode()))


async def on_queue(message: Message, store: Store, publisher: CardPublisher, texts: Texts) -> None:
    await publisher.send(await queue_text(store, texts))


async def on_task(
    message: Message,
    command: CommandObject,
    store: Store,
    renderer: CardRenderer,
    publisher: CardPublisher,
    texts: Texts,
) -> None:
    ref = (command.args or "").strip()
    task = await store.find_task(ref) if ref else None
    if task is None:
        text = texts.gettext("No task %(ref)s. Usage: /task <id or work item>", ref=ref)
        await publisher.send(text, parse_mode=None)
        return
    await publisher.send(await task_text(store, renderer, texts, task, await publisher.mode()))


async def on_mode(
    message: Message,
    command: CommandObject,
    settings: Settings,
    publisher: CardPublisher,
    texts: Texts,
) -> None:
    wanted = (command.args or "").strip().lower()
    if wanted:
        if not is_admin(message.from_user, settings):
            await publisher.send(texts.gettext("Only operators can do this."))
            return
        if wanted not in MODES:
            await publisher.send(texts.gettext("Usage: /mode edit|bump"))
            return
        await publisher.set_mode(wanted)
    await publisher.send(texts.gettext("Card mode: %(mode)s", mode=await publisher.mode()))


async def on_new(
    message: Message,
    command: CommandObject,
    settings: Settings,
    store: Store,
    publisher: CardPublisher,
    texts: Texts,
) -> None:
    if not is_admin(message.from_user, settings):
        await publisher.send(texts.gettext("Only operators can do this."))
        return
    title = (command.args or "").strip()
    if not title or not settings.projects:
        await publisher.send(texts.gettext("Usage: /new [PROJECT] <title>"), parse_mode=None)
        return
    project, _, rest = title.partition(" ")
    if settings.project(project) is None or not rest.strip():
        project, rest = settings.projects[0].key, title
    prompt = await publisher.send(
        texts.render("telegram/ask_description.html.j2", title=rest.strip()),
        reply_markup=ForceReply(selective=True),
        # selective: the prompt opens for the author of the message it replies to
        reply_parameters=ReplyParameters(message_id=message.message_id),
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
    router = only_ops_chat(Router(name="commands"))
    router.message.register(on_help, CommandStart())
    router.message.register(on_help, Command("help"))
    router.message.register(on_queue, Command("queue"))
    router.message.register(on_task, Command("task"))
    router.message.register(on_mode, Command("mode"))
    router.message.register(on_new, Command("new"))
    return router
