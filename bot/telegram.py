"""The Telegram side of the process: the aiogram bot, its dispatcher and the card publisher."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

from aiogram import Bot, Dispatcher
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode
from aiogram.exceptions import TelegramAPIError
from aiogram.types import BotCommand
from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web

from bot.cards import CardRenderer
from bot.handlers import get_routers
from bot.publisher import CardPublisher
from bot.texts import Texts
from engine.config import Settings
from engine.notifier import AlertKind
from engine.runtime import Engine

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/telegram"
POLL_RETRY_MAX_S = 60.0


class TelegramNotifier:
    """The engine's Notifier in Telegram: a change refreshes the card, an alert is a message."""

    def __init__(self, publisher: CardPublisher) -> None:
        self.publisher = publisher

    async def task_changed(self, task_id: int) -> None:
        self.publisher.schedule(task_id)

    async def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        self.publisher.alert(task_id, kind, detail)


def command_list(texts: Texts) -> list[BotCommand]:
    described = {
        "queue": texts.gettext("active tasks by stage, jobs, the reconciler"),
        "task": texts.gettext("a task's card, history and agent runs"),
        "new": texts.gettext("create a task here, without a tracker"),
        "mode": texts.gettext("how cards are updated"),
        "help": texts.gettext("what the bot does"),
    }
    return [BotCommand(command=name, description=text) for name, text in described.items()]


def build_bot(settings: Settings) -> Bot:
    assert settings.telegram_token is not None
    session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_base))
    return Bot(
        settings.telegram_token.get_secret_value(),
        session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML, link_preview_is_disabled=True),
    )


def webhook_secret(settings: Settings) -> str:
    """Telegram's secret_token for our webhook, derived from the bot token (never logged)."""
    assert settings.telegram_token is not None
    return hashlib.sha256(settings.telegram_token.get_secret_value().encode()).hexdigest()[:64]


class TelegramConsole:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        assert settings.telegram_chat_id is not None
        self.settings = settings
        self.engine = engine
        self.texts = Texts(settings.locale)
        self.bot = build_bot(settings)
        self.renderer = CardRenderer(engine.store, settings, self.texts)
        self.publisher = CardPublisher(
            self.bot,
            engine.store,
            self.renderer,
            self.texts,
            settings.telegram_chat_id,
            default_mode=settings.tracker_mode,
            pace_s=settings.telegram_pace_s,
            debounce_s=settings.telegram_debounce_s,
        )
        self.notifier = TelegramNotifier(self.publisher)
        self.dispatcher = Dispatcher()
        self.dispatcher.include_routers(*get_routers())
        self.dispatcher.workflow_data.update(
            settings=settings,
            store=engine.store,
            pipeline=engine.pipeline,
            publisher=self.publisher,
            renderer=self.renderer,
            texts=self.texts,
        )
        self._polling: asyncio.Task[None] | None = None

    def mount(self, app: web.Application) -> None:
        """In webhook mode, Telegram's updates arrive on the same HTTP server."""
        if self.settings.telegram_webhook_url:
            SimpleRequestHandler(
                self.dispatcher, self.bot, secret_token=webhook_secret(self.settings)
            ).register(app, path=WEBHOOK_PATH)

    async def start(self) -> None:
        self.publisher.start()
        await self.resync_cards()
        try:
            await self.bot.set_my_commands(command_list(self.texts))
        except TelegramAPIError as error:
            log.warning("could not set the bot's commands: %s", error.message)
        allowed = self.dispatcher.resolve_used_update_types()
        if self.settings.telegram_webhook_url:
            await self.bot.set_webhook(
                self.settings.telegram_webhook_url,
                secret_token=webhook_secret(self.settings),
                allowed_updates=allowed,
            )
            return
        with contextlib.suppress(TelegramAPIError):
            await self.bot.delete_webhook()
        self._polling = asyncio.create_task(self._poll(allowed), name="telegram-polling")

    async def _poll(self, allowed: list[str]) -> None:
        """Long polling that outlives Telegram being down (aiogram gives up when getMe fails)."""
        delay = 1.0
        while True:
            try:
                await self.dispatcher.start_polling(
                    self.bot, handle_signals=False, allowed_updates=allowed, close_bot_session=False
                )
                return
            except TelegramAPIError as error:
                log.warning("Telegram polling stopped: %s; retrying in %.0fs", error.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_RETRY_MAX_S)

    async def resync_cards(self) -> None:
        """Cards whose task changed after their last delivery (e.g. before a restart) are due."""
        rows = await self.engine.store.fetchall(
            "SELECT tasks.id FROM tasks LEFT JOIN cards ON cards.task_id = tasks.id"
            " WHERE cards.task_id IS NULL OR cards.updated_at < tasks.updated_at"
        )
        for row in rows:
            self.publisher.schedule(row["id"])

    async def stop(self) -> None:
        if self._polling is not None:
            with contextlib.suppress(RuntimeError):  # not started yet, or between retries
                await self.dispatcher.stop_polling()
            self._polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._polling
            self._polling = None
        await self.publisher.stop()
        await self.bot.session.close()
