"""The console's commands as people see them in the chat: where the bot listens, what /help,
/queue and /task say, and that a long /task still fits in one Telegram message."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from bot.cards import CARD_TEXT_BUDGET
from bot.views import cut
from engine.pipeline import Change
from engine.sandbox.telegram import SandboxMessage, TelegramSandbox
from engine.stages import Stage, Status
from engine.store import Store, Task
from engine.templating import ROOT
from tests.test_telegram import (
    ADMIN,
    CHAT,
    STRANGER,
    Ops,
    console_settings,
    running_console,
)

OTHER_GROUP = -1009999
TELEGRAM_LIMIT = 4096


@pytest.fixture
async def sandbox() -> AsyncIterator[TelegramSandbox]:
    async with TelegramSandbox("4242:SANDBOX-TOKEN", group_per_minute=6000) as server:
        server.add_chat(OTHER_GROUP, "supergroup", "Another team")
        yield server


@pytest.fixture
async def ops(make_settings, sandbox: TelegramSandbox, agent_env) -> AsyncIterator[Ops]:
    async with running_console(console_settings(make_settings, sandbox), sandbox) as running:
        yield running


@pytest.fixture
async def quiet(make_settings, sandbox: TelegramSandbox, agent_env) -> AsyncIterator[Ops]:
    """The console without the worker: tasks stay where the test puts them."""
    settings = console_settings(make_settings, sandbox)
    async with running_console(settings, sandbox, worker=False) as running:
        yield running


async def ask(ops: Ops, text: str, expect: str, user: int = ADMIN) -> SandboxMessage:
    """Write `text` in the ops chat and wait for the bot's new message containing `expect`."""
    seen = {m.message_id for m in ops.sandbox.messages(CHAT)}
    ops.sandbox.send_user_message(CHAT, user, text)

    def answers() -> list[SandboxMessage]:
        return [
            m
            for m in ops.sandbox.messages(CHAT)
            if m.from_bot and m.message_id not in seen and expect in m.text
        ]

    await ops.sandbox.wait_for(lambda: bool(answers()))
    return answers()[0]


async def store_state(store: Store) -> dict[str, list[tuple]]:
    tables = ("tasks", "events", "jobs", "runtime_settings", "pending_replies", "cards")
    return {
        table: [tuple(row) for row in await store.fetchall(f"SELECT * FROM {table}")]
        for table in tables
    }


def bot_messages(ops: Ops, chat_id: int) -> list[int]:
    return [m.message_id for m in ops.sandbox.messages(chat_id) if m.from_bot]


# --- other chats -------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [ADMIN, OTHER_GROUP], ids=["admin's private chat", "other group"])
async def test_commands_and_presses_from_other_chats_are_ignored(ops: Ops, chat: int) -> None:
    task = await ops.start()
    task = await ops.until(task.id, Status.AWAITING_APPROVAL)
    card = await ops.card(task.id)
    # a copy of the card with its live buttons, in a chat the bot does not serve
    copy = await ops.console.bot.send_message(
        chat, "copy", reply_markup=(await ops.console.renderer.render(task, "edit")).markup
    )
    before = await store_state(ops.engine.store)
    ops_chat_before = bot_messages(ops, CHAT)
    other_chat_before = bot_messages(ops, chat)
    calls_before = len(ops.sandbox.calls)

    for text in ("/queue", "/new Drop the database", "/mode bump", "/task ORCH-001", "/help"):
        ops.sandbox.send_user_message(chat, ADMIN, text)
    query = ops.sandbox.press(chat, copy.message_id, ADMIN, button_text="Approve")
    await ops.sandbox.wait_for(ops.sandbox.updates_confirmed)
    # the ops chat is served after them, and the mode is still the one it was
    await ask(ops, "/mode", "Card mode: edit")
    await ops.publisher.idle()

    assert bot_messages(ops, chat) == other_chat_before
    assert bot_messages(ops, CHAT) == [*ops_chat_before, bot_messages(ops, CHAT)[-1]]
    assert query not in ops.sandbox.callback_answers()
    answered = [c for c in ops.sandbox.calls[calls_before:] if c.method == "answerCallbackQuery"]
    assert answered == []
    assert await store_state(ops.engine.store) == before
    assert (await ops.card(task.id)).message_id == card.message_id


async def test_help_and_start_answer_in_the_ops_chat(ops: Ops) -> None:
    help_text = await ask(ops, "/help", "Conveyor")
    assert "/queue" in help_text.text and "/task" in help_text.text
    assert "now: edit" in help_text.text
    start = await ask(ops, "/start", "Conveyor", user=STRANGER)
    assert "Each task has one live card in this chat." in start.text


async def test_usage_answers_with_angle_brackets_arrive_as_plain_text(quiet: Ops) -> None:
    answer = await ask(quiet, "/task NOPE-9", "No task NOPE-9")
    assert answer.text == "No task NOPE-9. Usage: /task <id or work item>"
    answer = await ask(quiet, "/new", "Usage")
    assert answer.text == "Usage: /new [PROJECT] <title>"
    assert [c for c in quiet.sandbox.calls if c.status == 400] == []


# --- /queue and /task --------------------------------------------------------------------


async def test_queue_shows_jobs_task_age_and_the_reconcilers_last_tick(quiet: Ops) -> None:
    task = await quiet.start()  # its analyst job stays queued: no worker runs
    async with quiet.engine.store.tx() as conn:
        await conn.execute(
            "UPDATE tasks SET created_at = created_at - 7200 WHERE id = ?", (task.id,)
        )
    report = await quiet.engine.reconciler.tick()

    queue = await ask(quiet, "/queue", "Queue")

    assert re.search(r"ORCH-001 · active · 2h00m · Add a greeting", queue.text), queue.text
    jobs = queue.text.split("Jobs", 1)[1]
    assert "ORCH-001 · Analysis · queued" in jobs
    tick = re.search(r"Reconciler: (\d\d:\d\d) · .* · examined (\d+)", queue.text)
    assert tick is not None, queue.text
    assert int(tick.group(2)) == report.examined
    assert "errors 0" in queue.text


async def test_task_shows_each_runs_duration_and_exit(ops: Ops, agent_env) -> None:
    agent_env(architect="crash")
    task = await ops.start()
    await ops.until(task.id, Status.AWAITING_APPROVAL)
    await ops.press(task.id, "Approve")
    await ops.until(task.id, Status.FAILED)

    details = await ask(ops, "/task ORCH-001", "Agent runs")

    runs = details.text.split("Agent runs", 1)[1].strip().splitlines()
    duration = r"\d+(\.\d)?s|\d+m\d\ds"
    assert re.fullmatch(rf"Analysis #1 · .* · ({duration}) · ok", runs[0]), runs
    failed = [line for line in runs if line.startswith("Architecture")]
    assert failed and len(failed) == len(
        [r for r in await ops.engine.store.agent_runs(task.id) if r.role == "architect"]
    )
    for line in failed:
        assert re.fullmatch(rf"Architecture #\d · .* · ({duration}) · exit 1", line), line


# --- a long /task --------------------------------------------------------------------------


CUT_TEMPLATES = ("card.html.j2", "queue.html.j2", "task.html.j2")
TAG = re.compile(r"<(/?)([a-z-]+)[^>]*>")


@pytest.mark.parametrize("name", CUT_TEMPLATES)
def test_templates_that_may_be_cut_close_every_tag_on_its_line(name: str) -> None:
    """`cut` relies on it: a line break is never inside a tag's element."""
    source = (ROOT / "templates" / "telegram" / name).read_text()
    for number, line in enumerate(source.splitlines(), 1):
        opened: list[str] = []
        for closing, tag in TAG.findall(line):
            if closing:
                assert opened and opened.pop() == tag, f"{name}:{number}: {line}"
            else:
                opened.append(tag)
        assert opened == [], f"{name}:{number} leaves <{opened[-1]}> open: {line}"


def test_cut_ends_at_a_line_break_with_a_mark() -> None:
    text = "<b>ORCH-1</b> · title\n<i>second line</i>\n<i>third line</i>"
    assert cut(text, len(text)) == text
    assert cut(text, len(text) - 1) == "<b>ORCH-1</b> · title\n<i>second line</i>\n…"
    assert cut(text, 25) == "<b>ORCH-1</b> · title\n…"


def test_cut_drops_the_markup_of_a_single_line_too_long_to_keep() -> None:
    line = "<b>ORCH-1</b> &amp; <i>a very long line</i>"
    assert cut(line, 24) == "ORCH-1 &amp; \n…"  # a half tag goes
    assert cut(line, 20) == "ORCH-1 \n…"  # and a half entity


async def reasons_near_the_card_budget(ops: Ops, task: Task) -> list[str]:
    """Escalation reasons whose card ends just past the budget /task keeps of it: cut by
    characters, these cards would lose the closing half of a tag in their last lines."""
    reasons = []
    for length in range(1, 601):
        reason = "&" * length  # each one is five characters of HTML
        shown = replace(task, status=Status.ESCALATED, status_reason=reason)
        card = await ops.console.renderer.render(shown, "edit")
        if CARD_TEXT_BUDGET < len(card.text) <= CARD_TEXT_BUDGET + 80:
            reasons.append(reason)
    assert reasons, "no reason makes the card long enough"
    return reasons


async def test_a_long_task_answer_is_cut_at_a_line_and_still_arrives(quiet: Ops) -> None:
    task = await quiet.start(title='Rework <&> the "R&D" <portal> ' * 8)
    for _ in range(20):  # many events: a long history
        for change in (
            Change("advanced", Stage.REVIEW, Status.ACTIVE, actor="@reviewer-on-duty (1234567)"),
            Change("rolled_back", Stage.DEVELOPMENT, Status.ACTIVE, actor="@gate (7654321)"),
        ):
            current = await quiet.engine.store.get_task(task.id)
            await quiet.engine.pipeline._transition(None, current, change)
    await quiet.publisher.idle()
    task = await quiet.engine.store.get_task(task.id)
    calls_before = len(quiet.sandbox.calls)

    answers = []
    for reason in await reasons_near_the_card_budget(quiet, task):
        async with quiet.engine.store.tx() as conn:
            await conn.execute(
                "UPDATE tasks SET status = 'escalated', status_reason = ? WHERE id = ?",
                (reason, task.id),
            )
        answers.append(await ask(quiet, "/task ORCH-001", "History"))

    refused = [c for c in quiet.sandbox.calls[calls_before:] if c.status == 400]
    assert refused == [], [c.response for c in refused]
    for answer in answers:
        assert len(answer.text) <= TELEGRAM_LIMIT and len(answer.html) <= TELEGRAM_LIMIT
        assert answer.text.startswith('ORCH-001 · Rework <&> the "R&D" <portal>')
        assert "\n…\n\nHistory" in answer.text  # the card was cut at a line break
