"""How cards and alerts reach the ops chat: pacing, coalescing, Telegram failing for a while,
notifying alerts beside silent cards, and the finished card's PR link."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiogram.exceptions import TelegramServerError

from engine.pipeline import Change
from engine.sandbox.telegram import Call, SandboxMessage, TelegramSandbox
from engine.stages import Status
from engine.store import Task
from tests.test_telegram import (
    ADMIN,
    CHAT,
    PATH,
    TOKEN,
    Ops,
    console_settings,
    running_console,
)

PACE_S = 0.2
MESSAGE_METHODS = ("sendMessage", "editMessageText")


@pytest.fixture
async def sandbox() -> AsyncIterator[TelegramSandbox]:
    async with TelegramSandbox(TOKEN, group_per_minute=6000) as server:
        yield server


@pytest.fixture
async def ops(make_settings, sandbox: TelegramSandbox, agent_env) -> AsyncIterator[Ops]:
    async with running_console(console_settings(make_settings, sandbox), sandbox) as running:
        running.publisher.retry_s = 0.1
        yield running


@pytest.fixture
async def quiet(make_settings, sandbox: TelegramSandbox, agent_env) -> AsyncIterator[Ops]:
    """The console without the worker: tasks move only when the test moves them."""
    settings = console_settings(make_settings, sandbox)
    async with running_console(settings, sandbox, worker=False) as running:
        yield running


async def move(ops: Ops, task: Task, *changes: tuple) -> Task:
    for change in changes:
        current = await ops.engine.store.get_task(task.id)
        assert await ops.engine.pipeline._transition(None, current, Change(*change))
    return await ops.engine.store.get_task(task.id)


async def card_message_id(ops: Ops, task: Task) -> int:
    row = await ops.engine.store.fetchone(
        "SELECT message_id FROM cards WHERE task_id = ?", (task.id,)
    )
    return row["message_id"]


def card_calls(sandbox: TelegramSandbox, method: str, message_id: int | None = None) -> list[Call]:
    """The calls of `method` that carried a card (edits: of that message)."""
    return [
        c
        for c in sandbox.calls
        if c.method == method
        and str(c.params.get("text", "")).startswith("<b>ORCH-")
        and (message_id is None or c.params.get("message_id") == message_id)
    ]


# --- pacing --------------------------------------------------------------------------------


async def test_cards_and_command_replies_share_the_chats_pace(
    make_settings, sandbox: TelegramSandbox, agent_env
) -> None:
    settings = console_settings(make_settings, sandbox, telegram_pace_s=PACE_S)
    async with running_console(settings, sandbox, worker=False) as ops:
        tasks = [await ops.start(f"Task {n}", issue=f"issue-{n}") for n in range(3)]
        for n in range(3):
            ops.sandbox.send_user_message(CHAT, ADMIN, "/queue")
            for task in tasks:
                await move(ops, task, PATH[n])
        await ops.sandbox.wait_for(
            lambda: sum(m.text.startswith("Queue") for m in ops.sandbox.messages(CHAT)) == 3
        )
        await ops.publisher.idle()

    made = sorted(
        (c for c in ops.sandbox.calls if c.method in MESSAGE_METHODS and c.status == 200),
        key=lambda call: call.at,
    )
    assert len(made) >= 3 + 3 + 1  # the replies, the cards, at least one edit
    gaps = [later.at - earlier.at for earlier, later in zip(made, made[1:], strict=False)]
    too_close = [round(gap, 3) for gap in gaps if gap < PACE_S * 0.95]
    assert too_close == [], f"calls closer than the pace of {PACE_S}s: {too_close}"


# --- edit mode: Telegram failing for a while -------------------------------------------------


async def test_failing_edits_never_make_a_second_card_and_the_card_gets_there(ops: Ops) -> None:
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    first = await card_message_id(ops, task)
    ops.sandbox.fail_next("editMessageText", 500, "Internal Server Error", times=3)

    assert (await ops.engine.pipeline.approve(task.id, actor="plane")).changed
    await ops.until(task.id, Status.DONE)

    assert ops.sandbox.count("editMessageText", 500) == 3
    assert len(card_calls(ops.sandbox, "sendMessage")) == 1
    (card,) = ops.cards_of("ORCH-001")
    assert card.message_id == first == await card_message_id(ops, task)
    assert "🏁" in card.text and card.buttons() == []


# --- bump mode: a failed delete, a failed send -------------------------------------------------


@pytest.fixture
async def bumping(make_settings, sandbox: TelegramSandbox, agent_env) -> AsyncIterator[Ops]:
    """Bump mode with the sender loop stopped: each test publishes the card itself."""
    settings = console_settings(make_settings, sandbox, tracker_mode="bump")
    async with running_console(settings, sandbox, worker=False) as running:
        yield running


async def first_card(ops: Ops) -> tuple[Task, int]:
    task = await ops.start()
    await ops.publisher.idle()
    await ops.publisher.stop()
    return task, await card_message_id(ops, task)


async def test_bump_sends_the_new_card_when_the_old_one_cannot_be_deleted(bumping: Ops) -> None:
    task, old = await first_card(bumping)
    await move(bumping, task, PATH[0])
    bumping.sandbox.fail_next("deleteMessage", 400, "Bad Request: message can't be deleted")

    await bumping.publisher.publish(task.id)

    new = await card_message_id(bumping, task)
    assert new != old
    shown = {m.message_id: m for m in bumping.cards_of("ORCH-001")}
    assert set(shown) == {old, new}  # the documented trade-off: the old card stays
    assert "🔄 Architecture" in shown[new].text and "🔄 Analysis" in shown[old].text


async def test_bump_keeps_the_card_when_the_new_one_is_not_sent(bumping: Ops) -> None:
    task, old = await first_card(bumping)
    await move(bumping, task, PATH[0])
    bumping.sandbox.fail_next("sendMessage", 500, "Internal Server Error")

    with pytest.raises(TelegramServerError):
        await bumping.publisher.publish(task.id)
    assert await card_message_id(bumping, task) == old  # not repointed

    await move(bumping, task, PATH[1])  # a later update
    await bumping.publisher.publish(task.id)

    (card,) = bumping.cards_of("ORCH-001")
    assert card.message_id == await card_message_id(bumping, task) != old
    assert "🔄 Development" in card.text


# --- coalescing ------------------------------------------------------------------------------


async def test_a_burst_of_transitions_is_one_edit_showing_the_latest_state(quiet: Ops) -> None:
    task = await quiet.start()
    await quiet.publisher.idle()
    card = await card_message_id(quiet, task)
    # the burst lands while the card waits for its turn
    await quiet.publisher.stop()
    await move(quiet, task, *PATH)
    quiet.publisher.start()
    await quiet.publisher.idle()

    (edit,) = card_calls(quiet.sandbox, "editMessageText", card)
    assert edit.status == 200
    (shown,) = quiet.cards_of("ORCH-001")
    assert shown.message_id == card and "🏁" in shown.text


# --- alerts: notifying messages for what needs a person --------------------------------------


def sent_as(sandbox: TelegramSandbox, message: SandboxMessage) -> Call:
    """The sendMessage call that put `message` in the chat."""
    (call,) = [
        c
        for c in sandbox.calls
        if c.method == "sendMessage"
        and c.status == 200
        and c.result["message_id"] == message.message_id
        and c.params["chat_id"] == message.chat_id
    ]
    return call


@pytest.mark.parametrize(
    ("role", "steps", "approve", "rests_in", "title"),
    [
        ("analyst", "negative", False, Status.NEEDS_INPUT, "The analyst needs answers"),
        ("reviewer", "negative", True, Status.ESCALATED, "Escalated: developer retries exhausted"),
        ("deployer", "negative,ok", True, Status.DONE, "Deploy failed"),
    ],
    ids=["needs input", "escalation", "deploy failure"],
)
async def test_what_needs_a_person_notifies_and_card_updates_are_silent(
    ops: Ops, agent_env, role: str, steps: str, approve: bool, rests_in: str, title: str
) -> None:
    agent_env(**{role: steps})
    task = await ops.start()
    if approve:
        await ops.until(task.id, Status.AWAITING_APPROVAL)
        await ops.press(task.id, "Approve")
    await ops.until(task.id, rests_in)

    (alert,) = [m for m in ops.sandbox.messages(CHAT) if m.from_bot and title in m.text]
    assert "ORCH-001" in alert.text and not alert.disable_notification
    assert not sent_as(ops.sandbox, alert).params.get("disable_notification")
    sent_cards = card_calls(ops.sandbox, "sendMessage")
    assert len(sent_cards) == 1 and sent_cards[0].params["disable_notification"] is True
    (card,) = ops.cards_of("ORCH-001")
    assert card.disable_notification


# --- the finished card's PR link ---------------------------------------------------------------


def project_with_repo(remote: Path) -> list[dict]:
    return [
        {
            "key": "ORCH",
            "remote": str(remote),
            "check_command": [sys.executable, "check.py"],
            "repo": "team/app",
        }
    ]


@pytest.mark.parametrize(
    ("public_url", "link"),
    [
        ("https://git.example.com/", '<a href="https://git.example.com/team/app/pulls/7">PR</a>'),
        ("http://127.0.0.1:3000", None),
    ],
    ids=["public forge", "loopback forge"],
)
async def test_the_finished_card_links_the_pull_request(
    make_settings, remote: Path, sandbox: TelegramSandbox, agent_env, public_url, link
) -> None:
    settings = console_settings(
        make_settings, sandbox, projects=project_with_repo(remote), gitea_public_url=public_url
    )
    async with running_console(settings, sandbox, worker=False) as ops:
        task = await ops.start()
        async with ops.engine.store.tx() as conn:  # no forge runs here: the PR is given
            await conn.execute("UPDATE tasks SET pr_number = 7 WHERE id = ?", (task.id,))
        await move(ops, task, *PATH)
        await ops.publisher.idle()
        (card,) = ops.cards_of("ORCH-001")

    assert "🏁" in card.text
    if link is None:
        assert "/pulls/" not in card.html and "PR" not in card.text
    else:
        assert link in card.html
