"""ForceReply prompts that wait for a person's answer, kept in the store across restarts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.store import Store, now


class ReplyKind(StrEnum):
    REJECT_REASON = "reject_reason"
    ANSWERS = "answers"
    NEW_DESCRIPTION = "new_description"


@dataclass(frozen=True)
class PendingReply:
    kind: ReplyKind
    task_id: int | None
    payload: str | None


async def remember(
    store: Store,
    chat_id: int,
    prompt_message_id: int,
    user_id: int,
    kind: ReplyKind,
    task_id: int | None = None,
    payload: str | None = None,
) -> None:
    async with store.tx() as conn:
        await conn.execute(
            "INSERT OR REPLACE INTO pending_replies (chat_id, prompt_message_id, user_id, kind,"
            " task_id, payload, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (chat_id, prompt_message_id, user_id, kind, task_id, payload, now()),
        )


async def take(
    store: Store, chat_id: int, prompt_message_id: int, user_id: int
) -> PendingReply | None:
    """The prompt this message answers, if it was asked of this user; consumed once."""
    async with store.tx() as conn:
        cursor = await conn.execute(
            "DELETE FROM pending_replies WHERE chat_id = ? AND prompt_message_id = ?"
            " AND user_id = ? RETURNING kind, task_id, payload",
            (chat_id, prompt_message_id, user_id),
        )
        row = await cursor.fetchone()
    return None if row is None else PendingReply(ReplyKind(row[0]), row[1], row[2])
