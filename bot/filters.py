"""Where the bot listens (the ops chat only) and who may act (ORCH_TELEGRAM_ADMIN_IDS)."""

from __future__ import annotations

from aiogram import Router
from aiogram.filters import BaseFilter
from aiogram.types import CallbackQuery, Message, User

from engine.config import Settings


def is_admin(user: User | None, settings: Settings) -> bool:
    return user is not None and user.id in settings.telegram_admin_ids


def actor_name(user: User) -> str:
    """How events record a person: @username when there is one, with the Telegram id."""
    name = f"@{user.username}" if user.username else user.full_name
    return f"{name} ({user.id})"


def event_chat_id(event: Message | CallbackQuery) -> int | None:
    """The chat a message was written in, or the chat of the message whose button was pressed."""
    if isinstance(event, Message):
        return event.chat.id
    return event.message.chat.id if event.message is not None else None


class InOpsChat(BaseFilter):
    """Passes only updates from ORCH_TELEGRAM_CHAT_ID; everything elsewhere is ignored."""

    async def __call__(self, event: Message | CallbackQuery, settings: Settings) -> bool:
        return event_chat_id(event) == settings.telegram_chat_id


def only_ops_chat(router: Router) -> Router:
    """Make the router deaf to messages and button presses from any other chat."""
    router.message.filter(InOpsChat())
    router.callback_query.filter(InOpsChat())
    return router
