"""The operator console end to end: aiogram over HTTP against the sandbox Bot API server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiogram.exceptions import TelegramBadRequest

from bot.callbacks import Action, CardAction
from bot.cards import CardRenderer
from bot.publisher import CardPublisher
from bot.telegram import TelegramConsole
from bot.texts import Texts
from engine.config import Settings
from engine.pipeline import Change
from engine.runtime import Engine
from engine.sandbox.telegram import SandboxMessage, TelegramSandbox
from engine.stages import Stage, Status
from engine.store import Task
from tests.conftest import HANG_GUARD_S

TOKEN = "4242:SANDBOX-TOKEN"
CHAT = -1001234  # a supergroup, like a team's ops chat
ADMIN = 42
STRANGER = 7


@dataclass
class Ops:
    engine: Engine
    console: TelegramConsole
    sandbox: TelegramSandbox

    @property
    def publisher(self) -> CardPublisher:
        return self.console.publisher

    async def start(self, title: str = "Add a greeting", issue: str = "issue-1") -> Task:
        outcome = await self.engine.pipeline.start_task(
            "ORCH", title, "Return a greeting from GET /hello.", tracker_issue_id=issue
        )
        assert outcome.task is not None
        return outcome.task

    async def card(self, task_id: int) -> SandboxMessage:
        await self.publisher.idle()
        row = await self.engine.store.fetchone(
            "SELECT message_id FROM cards WHERE task_id = ?", (task_id,)
        )
        assert row is not None, "the task has no card"
        (message,) = [m for m in self.sandbox.messages(CHAT) if m.message_id == row["message_id"]]
        return message

    async def until(self, task_id: int, *statuses: str, delivered: bool = True) -> Task:
        """Wait for the task to rest in one of `statuses` and, unless told not to, its card."""

        async def loop() -> Task:
            while True:
                task = await self.engine.store.resting_task(task_id)
                if task is not None and task.status in statuses:
                    if delivered:
                        await self.publisher.idle()
                    return task
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(loop(), HANG_GUARD_S)

    async def press(self, task_id: int, label: str, user: int = ADMIN) -> str:
        card = await self.card(task_id)
        query = self.sandbox.press(CHAT, card.message_id, user, button_text=label)
        await self.sandbox.wait_for(lambda: query in self.sandbox.callback_answers())
        return self.sandbox.callback_answers()[query].get("text", "")

    def cards_of(self, work_item: str) -> list[SandboxMessage]:
        return [m for m in self.sandbox.messages(CHAT) if m.text.startswith(work_item + " ")]


@pytest.fixture
async def sandbox() -> AsyncIterator[TelegramSandbox]:
    async with TelegramSandbox(TOKEN, group_per_minute=6000, private_per_second=100) as server:
        yield server


def console_settings(make_settings, sandbox: TelegramSandbox, **overrides):
    values = dict(
        telegram_token=TOKEN,
        telegram_api_base=sandbox.base_url,
        telegram_chat_id=CHAT,
        telegram_admin_ids=[ADMIN],
        telegram_pace_s=0.01,
        telegram_debounce_s=0.05,
        locale="en",
    )
    values.update(overrides)
    return make_settings(**values)


@contextlib.asynccontextmanager
async def running_console(
    settings: Settings, sandbox: TelegramSandbox, *, worker: bool = True
) -> AsyncIterator[Ops]:
    """The engine and the console on `settings`; without the worker no agent ever runs."""
    engine = Engine(settings)
    console = TelegramConsole(settings, engine)
    engine.use_notifier(console.notifier)
    async with engine:
        await console.start()
        if worker:
            engine.start_worker()
        try:
            yield Ops(engine, console, sandbox)
        finally:
            await console.stop()


@pytest.fixture
async def ops(make_settings, sandbox: TelegramSandbox, agent_env) -> AsyncIterator[Ops]:
    async with running_console(console_settings(make_settings, sandbox), sandbox) as running:
        yield running


async def test_one_card_per_task_through_a_whole_run(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    card = await ops.card(task.id)
    assert [text for text, _ in card.buttons()] == ["Approve", "Reject"]
    assert "BRD is waiting for your review" in card.text

    assert await ops.press(task.id, "Approve") == "Done."
    task = await ops.until(task.id, Status.DONE)

    (card,) = ops.cards_of("ORCH-001")
    assert card.buttons() == []
    assert "🏁" in card.text and "deployed" in card.text
    assert card.text.count("✅") == 7  # every stage up to deploy is done
    assert "opus-4-7" in card.text
    assert "BRD: approved · @" in card.text or "BRD: approved · " in card.text
    # the card was sent once and edited afterwards; the only other message is the BRD alert
    messages = ops.sandbox.messages(CHAT)
    assert len(messages) == 2
    alert = next(m for m in messages if m is not card)
    assert "BRD ready for approval" in alert.text and not alert.disable_notification
    assert card.disable_notification
    sends = [c for c in ops.sandbox.calls if c.method == "sendMessage"]
    assert len(sends) == 2
    assert ops.sandbox.count("editMessageText") >= 2


async def test_approve_advances_once_even_with_the_trackers_approval_after_it(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    await ops.press(task.id, "Approve")
    tracker = await ops.engine.pipeline.approve(task.id, actor="plane")
    assert not tracker.changed
    await ops.until(task.id, Status.DONE)
    kinds = [e.kind for e in await ops.engine.store.events(task.id)]
    assert kinds.count("approved") == 1
    architects = [r for r in await ops.engine.store.agent_runs(task.id) if r.role == "architect"]
    assert len(architects) == 1


async def test_a_stranger_cannot_press_and_nothing_changes(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    before = await ops.engine.store.events(task.id)

    answer = await ops.press(task.id, "Approve", user=STRANGER)

    assert answer == "Only operators can do this."
    assert (await ops.engine.store.get_task(task.id)).status == Status.AWAITING_APPROVAL
    assert await ops.engine.store.events(task.id) == before


async def test_an_outdated_card_press_changes_nothing(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    old_card = await ops.card(task.id)
    old_data = dict(old_card.buttons())["Approve"]
    # the chat falls behind (the card keeps its old buttons) while the BRD is rejected in
    # the tracker and the analyst writes a new one
    await ops.publisher.stop()
    await ops.engine.pipeline.reject(task.id, "Too vague.", actor="plane")
    await ops.until(task.id, Status.AWAITING_APPROVAL, delivered=False)
    events_before = await ops.engine.store.events(task.id)

    query = ops.sandbox.press(CHAT, old_card.message_id, ADMIN, data=old_data)
    await ops.sandbox.wait_for(lambda: query in ops.sandbox.callback_answers())

    assert "outdated" in ops.sandbox.callback_answers()[query]["text"]
    assert await ops.engine.store.events(task.id) == events_before


async def test_reject_asks_for_a_reason_and_the_analyst_gets_it(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    await ops.press(task.id, "Reject")
    await ops.sandbox.wait_for(
        lambda: any("Why is the BRD" in m.text for m in ops.sandbox.messages(CHAT))
    )
    prompt = next(m for m in ops.sandbox.messages(CHAT) if "Why is the BRD" in m.text)
    assert prompt.force_reply
    # a stranger's reply is ignored; the operator's reply is the reason
    ops.sandbox.send_user_message(CHAT, STRANGER, "Ship it", reply_to_message_id=prompt.message_id)
    ops.sandbox.send_user_message(
        CHAT, ADMIN, "The error page is missing.", reply_to_message_id=prompt.message_id
    )
    await _wait_runs(ops, task.id, "analyst", 2)
    task = await ops.until(task.id, Status.AWAITING_APPROVAL)
    runs = [r for r in await ops.engine.store.agent_runs(task.id) if r.role == "analyst"]
    from pathlib import Path

    assert "The error page is missing." in Path(runs[1].prompt_path).read_text()
    assert "Ship it" not in Path(runs[1].prompt_path).read_text()
    rejected = [e for e in await ops.engine.store.events(task.id) if e.kind == "rejected"]
    assert len(rejected) == 1 and rejected[0].actor.endswith(f"({ADMIN})")


async def _wait_runs(ops: Ops, task_id: int, role: str, count: int) -> None:
    async def loop() -> None:
        while (
            len([r for r in await ops.engine.store.agent_runs(task_id) if r.role == role]) < count
        ):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), HANG_GUARD_S)


async def test_retry_on_an_escalated_task(ops: Ops, agent_env) -> None:
    agent_env(reviewer="negative")
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    await ops.press(task.id, "Approve")
    await ops.until(task.id, Status.ESCALATED)
    card = await ops.card(task.id)
    assert [text for text, _ in card.buttons()] == ["Retry"]
    assert "developer retries reached 3" in card.text

    agent_env(reviewer="ok")
    assert await ops.press(task.id, "Retry") == "Done."
    task = await ops.until(task.id, Status.DONE)
    retried = [e for e in await ops.engine.store.events(task.id) if e.kind == "retried"]
    assert retried[0].actor.endswith(f"({ADMIN})")
    assert len(ops.cards_of("ORCH-001")) == 1


async def test_retry_on_a_failed_task_reruns_the_failed_stage(ops: Ops, agent_env) -> None:
    agent_env(architect="crash")
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    await ops.press(task.id, "Approve")
    await ops.until(task.id, Status.FAILED)
    assert "exit code 1" in (await ops.card(task.id)).text
    alerts = [m for m in ops.sandbox.messages(CHAT) if "Agent failed" in m.text]
    assert len(alerts) == 1

    agent_env(architect="ok")
    await ops.press(task.id, "Retry")
    await ops.until(task.id, Status.DONE)


async def test_bump_mode_keeps_exactly_one_card_per_task(ops: Ops) -> None:
    ops.sandbox.send_user_message(CHAT, ADMIN, "/mode bump")
    await ops.sandbox.wait_for(
        lambda: any("Card mode: bump" in m.text for m in ops.sandbox.messages(CHAT))
    )
    assert await ops.engine.store.get_setting("tracker_mode") == "bump"
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    await ops.press(task.id, "Approve")
    await ops.until(task.id, Status.DONE)

    assert len(ops.cards_of("ORCH-001")) == 1
    # replaying the call log: a card is deleted before its successor is sent
    visible: set[int] = set()
    card_ids: set[int] = set()
    for call in ops.sandbox.calls:
        if call.method == "sendMessage" and str(call.params["text"]).startswith("<b>ORCH-001</b>"):
            assert not (visible & card_ids), "two cards of one task were visible at once"
            card_ids.add(call.result["message_id"])
            visible.add(call.result["message_id"])
        elif call.method == "deleteMessage" and call.status == 200:
            visible.discard(int(call.params["message_id"]))
    assert ops.sandbox.count("editMessageText") == 0
    assert len(card_ids) > 2  # each update moved the card to the bottom


async def test_a_deleted_card_is_sent_again_once(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    card = await ops.card(task.id)
    await ops.console.bot.delete_message(CHAT, card.message_id)  # someone removed it

    await ops.engine.pipeline.approve(task.id, actor="plane")
    await ops.until(task.id, Status.DONE)

    cards = ops.cards_of("ORCH-001")
    assert len(cards) == 1 and cards[0].message_id != card.message_id
    card_sends = [
        c
        for c in ops.sandbox.calls
        if c.method == "sendMessage" and str(c.params["text"]).startswith("<b>ORCH-001</b>")
    ]
    assert len(card_sends) == 2  # the first card and its one replacement


async def test_not_modified_never_creates_a_second_card(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    card = await ops.card(task.id)
    async with ops.engine.store.tx() as conn:  # forget what was sent: the next edit is identical
        await conn.execute("UPDATE cards SET render_hash = NULL WHERE task_id = ?", (task.id,))
    await ops.publisher.publish(task.id)
    assert ops.sandbox.calls[-1].method == "editMessageText"
    assert "not modified" in ops.sandbox.calls[-1].response["description"]
    assert [m.message_id for m in ops.cards_of("ORCH-001")] == [card.message_id]


async def test_new_creates_a_task_from_telegram(ops: Ops) -> None:
    ops.sandbox.send_user_message(CHAT, ADMIN, "/new Add a logout button")
    await ops.sandbox.wait_for(
        lambda: any("New task «Add a logout button»" in m.text for m in ops.sandbox.messages(CHAT))
    )
    prompt = next(m for m in ops.sandbox.messages(CHAT) if "New task" in m.text)
    ops.sandbox.send_user_message(
        CHAT,
        ADMIN,
        "A button in the header that ends the session.",
        reply_to_message_id=prompt.message_id,
    )

    async def created():
        while not await ops.engine.store.list_tasks():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(created(), HANG_GUARD_S)
    (task,) = await ops.engine.store.list_tasks()
    assert task.tracker_issue_id is None and task.title == "Add a logout button"
    assert task.description == "A button in the header that ends the session."
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    assert len(ops.cards_of(task.work_item)) == 1


async def test_queue_and_task_commands(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    ops.sandbox.send_user_message(CHAT, STRANGER, "/queue")
    await ops.sandbox.wait_for(
        lambda: any(m.text.startswith("Queue") for m in ops.sandbox.messages(CHAT))
    )
    queue = next(m for m in ops.sandbox.messages(CHAT) if m.text.startswith("Queue"))
    assert "ORCH-001 · awaiting approval" in queue.text and "Analysis" in queue.text

    ops.sandbox.send_user_message(CHAT, STRANGER, "/task ORCH-001")
    await ops.sandbox.wait_for(lambda: any("History" in m.text for m in ops.sandbox.messages(CHAT)))
    details = next(m for m in ops.sandbox.messages(CHAT) if "History" in m.text)
    assert "BRD ready, waiting for approval" in details.text
    assert "Analysis #1" in details.text and "$0.21" in details.text


async def test_queue_stays_under_the_telegram_limit(ops: Ops) -> None:
    from bot.views import queue_text

    for n in range(120):
        await ops.engine.pipeline.start_task(
            "ORCH", "A long title " * 8, "Body.", tracker_issue_id=f"bulk-{n}"
        )
    text = await queue_text(ops.engine.store, ops.console.texts)
    assert len(text) <= 4096
    assert "more" in text


async def test_a_burst_of_fifty_tasks_ends_with_every_card_final(make_settings, agent_env) -> None:
    """50 tasks x 10 transitions into one group chat with Telegram's limits enforced."""
    async with TelegramSandbox(TOKEN, group_per_minute=600) as sandbox:
        settings = console_settings(make_settings, sandbox, telegram_pace_s=0.08)
        engine = Engine(settings)
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        async with engine:
            await console.start()
            try:
                tasks = []
                for n in range(50):
                    outcome = await engine.pipeline.start_task(
                        "ORCH", f"Task {n}", "Body.", tracker_issue_id=f"burst-{n}"
                    )
                    tasks.append(outcome.task)
                for stage in PATH:
                    for task in tasks:
                        task = await engine.store.get_task(task.id)
                        await engine.pipeline._transition(None, task, Change(*stage))
                await asyncio.wait_for(console.publisher.idle(), HANG_GUARD_S)
                for task in tasks:
                    cards = [
                        m for m in sandbox.messages(CHAT) if m.text.startswith(task.work_item + " ")
                    ]
                    assert len(cards) == 1, task.work_item
                    assert "🏁" in cards[0].text, task.work_item
                assert sandbox.count("sendMessage", 200) == 50
                assert console.publisher.retry_after_waits == sandbox.rate_limited
            finally:
                await console.stop()


PATH = [
    ("advanced", Stage.ARCHITECTURE, Status.ACTIVE),
    ("advanced", Stage.DEVELOPMENT, Status.ACTIVE),
    ("advanced", Stage.REVIEW, Status.ACTIVE),
    ("rolled_back", Stage.DEVELOPMENT, Status.ACTIVE),
    ("advanced", Stage.REVIEW, Status.ACTIVE),
    ("advanced", Stage.TESTING, Status.ACTIVE),
    ("advanced", Stage.DEPLOY_STAGING, Status.ACTIVE),
    ("advanced", Stage.DEPLOY, Status.ACTIVE),
    ("done", Stage.DONE, Status.DONE),
]


async def test_rate_limited_cards_wait_and_still_reach_their_final_state(
    make_settings, agent_env
) -> None:
    private_chat = 5150
    async with TelegramSandbox(TOKEN, private_per_second=1.0) as sandbox:
        settings = console_settings(
            make_settings, sandbox, telegram_chat_id=private_chat, telegram_pace_s=0.0
        )
        engine = Engine(settings)
        console = TelegramConsole(settings, engine)
        engine.use_notifier(console.notifier)
        async with engine:
            await console.start()
            try:
                tasks = [
                    (
                        await engine.pipeline.start_task(
                            "ORCH", f"T{n}", "B.", tracker_issue_id=str(n)
                        )
                    ).task
                    for n in range(6)
                ]
                for stage in PATH[:3]:
                    for task in tasks:
                        task = await engine.store.get_task(task.id)
                        await engine.pipeline._transition(None, task, Change(*stage))
                await asyncio.wait_for(console.publisher.idle(), HANG_GUARD_S)
                assert sandbox.rate_limited >= 1
                assert console.publisher.retry_after_waits == sandbox.rate_limited
                for task in tasks:
                    (card,) = [
                        m
                        for m in sandbox.messages(private_chat)
                        if m.text.startswith(task.work_item + " ")
                    ]
                    assert "🔄 Review" in card.text
            finally:
                await console.stop()


async def test_cards_render_in_russian_and_english_from_one_template(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    task = await ops.engine.store.get_task(task.id)
    texts = {loc: Texts(loc) for loc in ("ru", "en")}
    cards = {
        loc: await CardRenderer(ops.engine.store, ops.engine.settings, t).render(task, "edit")
        for loc, t in texts.items()
    }
    assert "Анализ" in cards["ru"].text and "Ревью" in cards["ru"].text
    assert "Analysis" in cards["en"].text and "Review" in cards["en"].text
    assert [b.text for b in cards["ru"].markup.inline_keyboard[0]] == ["Одобрить", "Отклонить"]
    assert [b.text for b in cards["en"].markup.inline_keyboard[0]] == ["Approve", "Reject"]
    assert cards["ru"].text.count("\n") == cards["en"].text.count("\n")


def test_callback_data_fits_in_64_bytes() -> None:
    packed = CardAction(action=Action.APPROVE, task_id=2**40, version=2**40).pack()
    assert len(packed.encode()) <= 64


async def test_edit_errors_are_classified(ops: Ops) -> None:
    from bot.publisher import EditOutcome, classify_edit_error

    bot = ops.console.bot
    sent = await bot.send_message(CHAT, "x")
    await bot.edit_message_text("y", chat_id=CHAT, message_id=sent.message_id)
    with pytest.raises(TelegramBadRequest) as same:
        await bot.edit_message_text("y", chat_id=CHAT, message_id=sent.message_id)
    assert classify_edit_error(same.value) is EditOutcome.NOT_MODIFIED
    await bot.delete_message(CHAT, sent.message_id)
    with pytest.raises(TelegramBadRequest) as gone:
        await bot.edit_message_text("z", chat_id=CHAT, message_id=sent.message_id)
    assert classify_edit_error(gone.value) is EditOutcome.GONE
