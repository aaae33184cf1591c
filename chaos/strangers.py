"""Strangers: people and buttons that must not move anything, driven through the Bot API.

Three tasks wait for a person in the ops chat, one per kind of button: ORCH-001 awaits BRD
approval (Approve, Reject), ORCH-002 has the analyst's questions (Answer), ORCH-003 failed
(Retry). Then, round after round, through the sandbox Telegram server as real updates:

- presses of every button by a non-admin;
- commands from other chats (a group and a private chat), by a stranger and by an operator;
- acting commands (/new, /mode bump) by a non-admin in the ops chat;
- a non-admin's replies: to an operator's Reject prompt, to a card, and plain text;
- an operator's presses of outdated buttons: the card publisher is held while each task moves
  on and comes back to the same status, so the chat still shows the old buttons.

Each kind is measured on its own: digests of the store tables a press or a command could
change, and the Telegram calls it caused. Refusal answers (answerCallbackQuery, and "Only
operators can do this." in the ops chat) are counted apart; any other call is an effect.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaos.bounce import SetUp, task_of_issue, until_resting
from chaos.harness import (
    ADMIN,
    CHAT,
    POLLING,
    Outcome,
    Stack,
    agent_env,
    bounded,
    wait_until,
)
from engine.sandbox.telegram import Call
from engine.stages import Status
from engine.store import Store, Task

STRANGER = 7001
OTHER_GROUP = -1005551
REFUSAL = "Only operators can do this."
OUTDATED = "outdated"
# table -> the column that orders its rows
STATE_TABLES = {
    "tasks": "id",
    "events": "id",
    "jobs": "id",
    "agent_runs": "id",
    "pending_replies": "rowid",
    "runtime_settings": "key",
}
QUIET_S = 0.5
ACTION_TIMEOUT_S = 30


@dataclass
class Board:
    """The three waiting tasks and the cards (message ids) that show them."""

    approval: Task
    questions: Task
    failed: Task
    cards: dict[int, int] = field(default_factory=dict)

    def presses(self) -> list[tuple[Task, str]]:
        return [
            (self.approval, "Approve"),
            (self.approval, "Reject"),
            (self.questions, "Answer"),
            (self.failed, "Retry"),
        ]


@dataclass
class Kind:
    """What one kind of stranger action did, summed over its rounds."""

    name: str
    actions: int = 0
    refusals: Counter = field(default_factory=Counter)
    effects: Counter = field(default_factory=Counter)
    changed: list[str] = field(default_factory=list)
    answers: Counter = field(default_factory=Counter)


# --- measuring ------------------------------------------------------------------------------


async def _digests(store: Store) -> dict[str, str]:
    digests = {}
    for table, order in STATE_TABLES.items():
        rows = await store.fetchall(f"SELECT * FROM {table} ORDER BY {order}")
        digest = hashlib.sha256()
        for row in rows:
            digest.update(repr(tuple(row)).encode())
        digests[table] = f"{len(rows)}:{digest.hexdigest()}"
    return digests


def _traffic(calls: list[Call]) -> tuple[Counter, Counter]:
    """(refusals, effects) among the calls: a refusal is an answer to a press or the
    operators-only reply in the ops chat; every other non-polling call is an effect."""
    refusals: Counter = Counter()
    effects: Counter = Counter()
    for call in calls:
        if call.method in POLLING:
            continue
        if call.method == "answerCallbackQuery":
            refusals[call.method] += 1
        elif call.method == "sendMessage" and _refusal_text(call):
            refusals["sendMessage refusal"] += 1
        else:
            effects[f"{call.method} to {call.params.get('chat_id')}"] += 1
    return refusals, effects


def _refusal_text(call: Call) -> bool:
    text = str(call.params.get("text") or "")
    return text.strip() == REFUSAL and int(call.params.get("chat_id") or 0) == CHAT


async def _quiet(stack: Stack) -> None:
    """Every update fetched by the bot, then no new non-polling call for QUIET_S."""

    async def confirmed() -> bool:
        return stack.telegram.updates_confirmed()

    await wait_until(confirmed, "the bot to fetch every update", ACTION_TIMEOUT_S, 0.02)
    seen = -1
    deadline = time.monotonic() + ACTION_TIMEOUT_S
    while time.monotonic() < deadline:
        now = stack.telegram_traffic()
        if now == seen:
            return
        seen = now
        await asyncio.sleep(QUIET_S)


# one round of a kind: (actions taken, the query ids of its presses)
Act = Callable[[], tuple[int, list[str]]]


async def _measured(stack: Stack, kind: Kind, act: Act) -> None:
    """Run one round of a kind and add what it changed."""
    before = await _digests(stack.engine.store)
    start = len(stack.telegram.calls)
    actions, queries = act()
    if queries:

        async def answered() -> bool:
            return all(q in stack.telegram.callback_answers() for q in queries)

        await wait_until(answered, f"answers to {len(queries)} presses", ACTION_TIMEOUT_S, 0.02)
    await _quiet(stack)
    after = await _digests(stack.engine.store)
    refusals, effects = _traffic(stack.telegram.calls[start:])
    kind.actions += actions
    kind.refusals.update(refusals)
    kind.effects.update(effects)
    kind.changed += [table for table in STATE_TABLES if before[table] != after[table]]
    answers = stack.telegram.callback_answers()
    kind.answers.update(_answer_label(answers[q]) for q in queries)


def _answer_label(answer: dict) -> str:
    text = str(answer.get("text") or "")
    if text == REFUSAL:
        return "refused"
    return "outdated" if OUTDATED in text else f"other: {text[:40]!r}"


def _report(kind: Kind, expected_answer: str | None, outcome: Outcome) -> None:
    refusals = sum(kind.refusals.values())
    effects = sum(kind.effects.values())
    changed = sorted(set(kind.changed))
    outcome.figure(
        f"{kind.name}: {kind.actions} → {effects} effects"
        f" ({len(changed)} tables changed, {refusals} refusals)"
    )
    outcome.check(not changed, f"{kind.name} changed the store: {', '.join(changed)}")
    outcome.check(effects == 0, f"{kind.name} made Telegram calls: {dict(kind.effects)}")
    if expected_answer is not None:
        wrong = {label: n for label, n in kind.answers.items() if label != expected_answer}
        outcome.check(not wrong, f"{kind.name}: answers other than {expected_answer}: {wrong}")


# --- the board ------------------------------------------------------------------------------


async def _start(
    stack: Stack, root: Path, name: str, analyst: str, status: str, setup: SetUp
) -> Task:
    """A task from the board whose analyst behaves as `analyst`, resting at `status`."""
    with agent_env(root / "agent-state", analyst=analyst):
        issue_id = stack.issue(name)["id"]
        stack.move(issue_id, "In Progress")
        task = await task_of_issue(stack, issue_id, setup)
        return await until_resting(stack, task.id, status, setup=setup)


async def _card(stack: Stack, task: Task) -> int:
    async def sent() -> int | None:
        row = await stack.engine.store.fetchone(
            "SELECT message_id FROM cards WHERE task_id = ?", (task.id,)
        )
        return row["message_id"] if row and row["message_id"] else None

    return await wait_until(sent, f"the card of {task.work_item}", ACTION_TIMEOUT_S)


async def _board(stack: Stack, root: Path, setup: SetUp) -> Board:
    board = Board(
        approval=await _start(stack, root, "Approve me", "ok", Status.AWAITING_APPROVAL, setup),
        questions=await _start(stack, root, "Ask me", "negative", Status.NEEDS_INPUT, setup),
        failed=await _start(stack, root, "Break me", "crash", Status.FAILED, setup),
    )
    await stack.settle()
    for task in (board.approval, board.questions, board.failed):
        board.cards[task.id] = await _card(stack, task)
    return board


# --- the kinds of strangers -----------------------------------------------------------------


def _press_all(stack: Stack, board: Board, user: int) -> tuple[int, list[str]]:
    queries = [
        stack.telegram.press(CHAT, board.cards[task.id], user, button_text=label)
        for task, label in board.presses()
    ]
    return len(queries), queries


COMMANDS = ("/new Drop the database", "/mode bump", "/queue", "/task ORCH-001", "/help")
ACTING = ("/new Drop the database", "/mode bump", "/mode@conveyor_bot bump")


def _commands_elsewhere(stack: Stack) -> tuple[int, list[str]]:
    """A stranger in another group and in a private chat, and an operator in another group."""
    sent = 0
    for chat, user in ((OTHER_GROUP, STRANGER), (STRANGER, STRANGER), (OTHER_GROUP, ADMIN)):
        for text in COMMANDS:
            stack.telegram.send_user_message(chat, user, text)
            sent += 1
    return sent, []


def _acting_commands(stack: Stack) -> tuple[int, list[str]]:
    for text in ACTING:
        stack.telegram.send_user_message(CHAT, STRANGER, text)
    return len(ACTING), []


def _replies(stack: Stack, prompt: int, card: int) -> tuple[int, list[str]]:
    """A reason for someone else's Reject prompt, an answer to a card, a plain message."""
    stack.telegram.send_user_message(
        CHAT, STRANGER, "Rejected by a stranger", reply_to_message_id=prompt
    )
    stack.telegram.send_user_message(CHAT, STRANGER, "approve", reply_to_message_id=card)
    stack.telegram.send_user_message(CHAT, STRANGER, "Approve ORCH-001")
    return 3, []


async def _reject_prompt(stack: Stack, board: Board) -> int:
    """An operator presses Reject: the bot asks them for a reason (a ForceReply prompt)."""
    query = stack.telegram.press(CHAT, board.cards[board.approval.id], ADMIN, button_text="Reject")

    async def prompted() -> int | None:
        row = await stack.engine.store.fetchone(
            "SELECT prompt_message_id FROM pending_replies WHERE user_id = ?", (ADMIN,)
        )
        return row["prompt_message_id"] if row else None

    async def answered() -> bool:
        return query in stack.telegram.callback_answers()

    prompt = await wait_until(prompted, "the reject prompt", ACTION_TIMEOUT_S)
    await wait_until(answered, "the answer to the press", ACTION_TIMEOUT_S)
    await _quiet(stack)
    return prompt


async def _move_on(stack: Stack, root: Path, board: Board, setup: SetUp) -> None:
    """Each task leaves its status and comes back to it (a newer version), card not updated."""
    pipeline = stack.engine.pipeline
    steps = (
        (board.approval, "ok", lambda t: pipeline.reject(t.id, "Too vague", "chaos")),
        (board.questions, "negative", lambda t: pipeline.answer(t.id, "Use JSON", "chaos")),
        (board.failed, "crash", lambda t: pipeline.retry(t.id, "chaos")),
    )
    for task, analyst, act in steps:
        with agent_env(root / "agent-state", analyst=analyst):
            changed = await act(task)
            if not changed.changed:
                raise AssertionError(f"{task.work_item} did not move on: {changed.reason}")
            await until_resting(stack, task.id, task.status, setup=setup)
    await stack.engine.tracker.idle()


async def _outdated(stack: Stack, root: Path, board: Board, rounds: int, setup: SetUp) -> Kind:
    kind = Kind("outdated buttons pressed by an operator")
    publisher = stack.console.publisher
    await bounded(publisher.idle(), "the cards to be up to date", 60)
    await publisher.stop()
    try:
        await _move_on(stack, root, board, setup)
        for _ in range(rounds):
            await _measured(stack, kind, lambda: _press_all(stack, board, ADMIN))
    finally:
        publisher.start()
    await stack.settle()
    return kind


async def _run_kinds(stack: Stack, root: Path, rounds: int, outcome: Outcome) -> None:
    setup = SetUp()
    board = await _board(stack, root, setup)
    presses = Kind("non-admin presses")
    elsewhere = Kind("commands from other chats")
    acting = Kind("non-admin commands in the ops chat")
    replies = Kind("non-admin replies")

    for _ in range(rounds):
        await _measured(stack, presses, lambda: _press_all(stack, board, STRANGER))
        await _measured(stack, elsewhere, lambda: _commands_elsewhere(stack))
        await _measured(stack, acting, lambda: _acting_commands(stack))
    prompt = await _reject_prompt(stack, board)
    card = board.cards[board.approval.id]
    for _ in range(rounds):
        await _measured(stack, replies, lambda: _replies(stack, prompt, card))
    outdated = await _outdated(stack, root, board, rounds, setup)
    _report(presses, "refused", outcome)
    outcome.check(
        presses.refusals["answerCallbackQuery"] == presses.actions,
        f"{presses.actions} presses, {presses.refusals['answerCallbackQuery']} answered",
    )
    _report(elsewhere, None, outcome)
    _report(acting, None, outcome)
    outcome.check(
        acting.refusals["sendMessage refusal"] == acting.actions,
        f"{acting.actions} acting commands, {acting.refusals['sendMessage refusal']} refused",
    )
    _report(replies, None, outcome)
    _report(outdated, "outdated", outcome)
    if setup.repairs:
        outcome.figure(setup.figure())


async def run_strangers(root: Path, *, rounds: int) -> list[Outcome]:
    outcome = Outcome("strangers")
    started = time.monotonic()
    with agent_env(root / "agent-state"):
        stack = await Stack.open(root, ci_state=None, agent_max_attempts=1)
        try:
            await _run_kinds(stack, root, rounds, outcome)
        finally:
            await stack.close()
    outcome.seconds = time.monotonic() - started
    return [outcome]


async def run(root: Path, *, seed: int, quick: bool) -> list[Outcome]:
    """Every kind of stranger 10 rounds (2 quick); the seed is unused: nothing is random."""
    return await run_strangers(root, rounds=2 if quick else 10)
