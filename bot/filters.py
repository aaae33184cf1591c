"""Who may act: only the operators listed in ORCH_TELEGRAM_ADMIN_IDS."""

from __future__ import annotations

from aiogram.types import User

from engine.config import Settings


def is_admin(user: User | None, settings: Settings) -> bool:
    return user is not None and user.id in settings.telegram_admin_ids


def actor_name(user: User) -> str:
    """How events record a person: @username when there is one, with the Telegram id."""
    name = f"@{user.username}" if user.username else user.full_name
    return f"{name} ({user.id})"
