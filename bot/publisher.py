"""Delivers cards and alerts to the ops chat: one card per task, paced, coalesced.

Every change marks the task's card dirty; one sender loop per chat renders the
task's latest state from the store when the card is due and sends, edits or
bumps it, never faster than the chat's pace. A burst of transitions therefore
becomes one edit, a 429 waits its `retry_after` and tries again with the newest
state, and the latest state always reaches the card in the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from aiogram import Bot
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.types import Message

from bot.cards import CardRenderer, RenderedCard
from bot.texts import Texts
from engine.gates import report_relpath
from engine.links import forge_file_url, tracker_issue_url
from engine.metrics import COUNTERS
from engine.notifier import AlertKind
from engine.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

MODE_SETTING = "tracker_mode"
MODES = ("edit", "bump")
PRIVATE_CHAT_PACE_S = 1.0  # Telegram: about one message a second per chat
GROUP_CHAT_PACE_S = 3.0  # Telegram: about twenty messages a minute per group
TRANSIENT_RETRY_S = 5.0
MAX_ALERT_TRIES = 3


class EditOutcome(StrEnum):
    OK = "ok"
    NOT_MODIFIED = "not_modified"
    GONE = "gone"
    FAILED = "failed"


# Telegram's descriptions that mean the card no longer exists as something we can edit
GONE_MARKERS = ("message to edit not found", "message can't be edited", "message_id_invalid")


def classify_edit_error(error: TelegramAPIError) -> EditOutcome:
    message = error.message.lower()
    if isinstance(error, TelegramBadRequest):
        if "message is not modified" in message:
            return EditOutcome.NOT_MODIFIED
        if any(marker in message for marker in GONE_MARKERS):
            return EditOutcome.GONE
    return EditOutcome.FAILED


def count_call(method: str, outcome: str) -> None:
    COUNTERS.inc("conveyor_telegram_calls_total", method=method, outcome=outcome)


def default_pace(chat_id: int) -> float:
    return GROUP_CHAT_PACE_S if chat_id < 0 else PRIVATE_CHAT_PACE_S


@dataclass
class PendingAlert:
    task_id: int
    kind: AlertKind
    detail: str
    tries: int = 0


class CardPublisher:
    def __init__(
        self,
        bot: Bot,
        store: Store,
        renderer: CardRenderer,
        texts: Texts,
        chat_id: int,
        *,
        default_mode: str,
        pace_s: float | None = None,
        debounce_s: float = 1.0,
    ) -> None:
        self.bot = bot
        self.store = store
        self.renderer = renderer
        self.texts = texts
        self.chat_id = chat_id
        self.default_mode = default_mode
        self.pace_s = default_pace(chat_id) if pace_s is None else pace_s
        self.debounce_s = debounce_s
        self._due: dict[int, float] = {}  # task id -> when its card may be published
        self._alerts: deque[PendingAlert] = deque()
        self._wake = asyncio.Event()
        self._pace = asyncio.Lock()  # one message-producing call at a time, in pace order
        self._last_call = 0.0
        self._resume_at = 0.0  # no call before this: Telegram's retry_after
        self.retry_s = TRANSIENT_RETRY_S  # when a card or alert that failed transiently retries
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self.retry_after_waits = 0

    # --- what the notifier calls ---------------------------------------------------------

    def schedule(self, task_id: int) -> None:
        """Mark the task's card dirty; repeated calls before it is due coalesce."""
        self._due.setdefault(task_id, time.monotonic() + self.debounce_s)
        self._wake.set()

    def alert(self, task_id: int, kind: AlertKind, detail: str) -> None:
        self._alerts.append(PendingAlert(task_id, kind, detail))
        self._wake.set()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"cards-{self.chat_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def idle(self) -> None:
        """Wait until every pending card and alert has been delivered (for tests and the demo)."""
        while self._due or self._alerts or self._busy:
            await asyncio.sleep(0.02)

    async def mode(self) -> str:
        return await self.store.get_setting(MODE_SETTING) or self.default_mode

    async def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        await self.store.set_setting(MODE_SETTING, mode)

    # --- the sender loop -----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wait_for_work()
            self._busy = True
            try:
                if self._alerts:
                    await self._deliver_alert(self._alerts.popleft())
                else:
                    await self._publish_due()
            except Exception:
                log.exception("card delivery failed")
            finally:
                self._busy = False

    async def _wait_for_work(self) -> None:
        while True:
            if self._alerts:
                return
            if self._due:
                delay = min(self._due.values()) - time.monotonic()
                if delay <= 0:
                    return
            else:
                delay = None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _publish_due(self) -> None:
        task_id = min(self._due, key=self._due.__getitem__)
        del self._due[task_id]
        try:
            await self.publish(task_id)
        except TelegramRetryAfter as error:
            self._back_off(error)
            self._due[task_id] = time.monotonic()
        except TelegramAPIError as error:
            log.warning("card of task %s not delivered: %s", task_id, error.message)
            self._due.setdefault(task_id, time.monotonic() + self.retry_s)

    async def _deliver_alert(self, alert: PendingAlert) -> None:
        try:
            await self.send_alert(alert)
        except TelegramRetryAfter as error:
            self._back_off(error)
            self._alerts.appendleft(alert)
        except (TelegramNetworkError, TelegramServerError) as error:
            # Telegram is unreachable: nothing else gets through either; wait, then try again
            log.warning("alert %s for task %s waits: %s", alert.kind, alert.task_id, error.message)
            await asyncio.sleep(self.retry_s)
            self._alerts.appendleft(alert)
        except TelegramAPIError as error:
            alert.tries += 1
            log.warning("alert %s for task %s failed: %s", alert.kind, alert.task_id, error.message)
            if alert.tries < MAX_ALERT_TRIES:
                self._alerts.append(alert)

    def _back_off(self, error: TelegramRetryAfter) -> None:
        """Hold every paced call of the chat until Telegram's `retry_after` has passed."""
        self.retry_after_waits += 1
        log.info("Telegram asks to wait %ss", error.retry_after)
        self._resume_at = max(self._resume_at, time.monotonic() + error.retry_after)

    async def _paced(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        """Make one message-producing API call no sooner than the chat's pace allows.

        The sender loop and the replies to people share the chat's pace: the lock makes them
        take turns, so two calls are never closer than `pace_s`.
        """
        async with self._pace:
            wait = max(self._last_call + self.pace_s, self._resume_at) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                result = await call()
            except TelegramRetryAfter:
                count_call(method, "retry_after")
                raise
            except TelegramAPIError as error:
                count_call(method, classify_edit_error(error).value)
                raise
            finally:
                self._last_call = time.monotonic()
        count_call(method, "ok")
        return result

    # --- one card ------------------------------------------------------------------------

    async def publish(self, task_id: int) -> None:
        """Bring the task's card up to the task's latest state."""
        task = await self.store.get_task(task_id)
        if task is None:
            return
        mode = await self.mode()
        card = await self.store.fetchone(
            "SELECT message_id, render_hash FROM cards WHERE task_id = ?", (task_id,)
        )
        rendered = await self.renderer.render(task, mode)
        if card is not None and card["message_id"] and card["render_hash"] == rendered.digest:
            return
        as_of = task.updated_at  # the state the card shows, which resync_cards compares
        if card is None or not card["message_id"]:
            await self._send_card(task_id, rendered, as_of)
        elif mode == "bump":
            await self._delete_quietly(card["message_id"])
            await self._send_card(task_id, rendered, as_of)
        else:
            outcome = await self._edit_card(card["message_id"], rendered)
            if outcome is EditOutcome.GONE:
                await self._send_card(task_id, rendered, as_of)
            elif outcome is EditOutcome.FAILED:
                self._due.setdefault(task_id, time.monotonic() + self.retry_s)
            else:
                await self._save_card(task_id, card["message_id"], rendered.digest, as_of)

    async def _send_card(self, task_id: int, rendered: RenderedCard, as_of: float) -> None:
        message: Message = await self._paced(
            "sendMessage",
            lambda: self.bot.send_message(
                self.chat_id,
                rendered.text,
                reply_markup=rendered.markup,
                disable_notification=True,
            ),
        )
        await self._save_card(task_id, message.message_id, rendered.digest, as_of)

    async def _edit_card(self, message_id: int, rendered: RenderedCard) -> EditOutcome:
        try:
            await self._paced(
                "editMessageText",
                lambda: self.bot.edit_message_text(
                    text=rendered.text,
                    chat_id=self.chat_id,
                    message_id=message_id,
                    reply_markup=rendered.markup,
                ),
            )
        except TelegramRetryAfter:
            raise
        except TelegramAPIError as error:
            outcome = classify_edit_error(error)
            if outcome is EditOutcome.FAILED:
                log.warning("editing card %s failed: %s", message_id, error.message)
            return outcome
        return EditOutcome.OK

    async def _delete_quietly(self, message_id: int) -> None:
        try:
            await self.bot.delete_message(self.chat_id, message_id)
        except TelegramAPIError as error:
            count_call("deleteMessage", "failed")
            log.info("old card %s not deleted: %s", message_id, error.message)
        else:
            count_call("deleteMessage", "ok")

    async def _save_card(self, task_id: int, message_id: int, digest: str, as_of: float) -> None:
        async with self.store.tx() as conn:
            await conn.execute(
                "INSERT INTO cards (task_id, chat_id, message_id, render_hash, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET"
                " chat_id = excluded.chat_id, message_id = excluded.message_id,"
                " render_hash = excluded.render_hash, updated_at = excluded.updated_at",
                (task_id, self.chat_id, message_id, digest, as_of),
            )

    async def send(self, text: str, **kwargs) -> Message:
        """A reply to a person in the chat, paced like the cards; waits out a 429 and retries."""

        def call() -> Awaitable[Message]:
            return self.bot.send_message(self.chat_id, text, **kwargs)

        for _ in range(MAX_ALERT_TRIES):
            try:
                return await self._paced("sendMessage", call)
            except TelegramRetryAfter as error:
                self._back_off(error)
        return await self._paced("sendMessage", call)

    # --- alerts --------------------------------------------------------------------------

    async def send_alert(self, alert: PendingAlert) -> None:
        task = await self.store.get_task(alert.task_id)
        if task is None:
            return
        settings = self.renderer.settings
        text = self.texts.render(
            "telegram/alert.html.j2",
            task=task,
            kind=alert.kind.value,
            detail=alert.detail,
            brd_url=forge_file_url(settings, task, report_relpath(task.work_item, "brd_ready")),
            issue_url=tracker_issue_url(settings, task),
        )
        await self._paced("sendMessage", lambda: self.bot.send_message(self.chat_id, text))
