"""The bot's routers; handlers call engine methods and hold no pipeline rules."""

from __future__ import annotations

from aiogram import Router

from bot.handlers import card_actions, commands, replies


def get_routers() -> list[Router]:
    """Fresh routers for one dispatcher (a router can belong to one dispatcher only)."""
    return [commands.make_router(), card_actions.make_router(), replies.make_router()]
