"""The Telegram sandbox, driven by the real aiogram client over real HTTP."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.filters import CommandStart
from aiogram.filters.callback_data import CallbackData
from aiogram.types import (
    BotCommand,
    CallbackQuery,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
)
from aiogram.utils.keyboard import InlineKeyboardBuilder

from engine.sandbox.telegram import TelegramSandbox, parse_html

ROOT = Path(__file__).resolve().parent.parent
CHAT = 42  # a private chat with the operator
GROUP = -100500
OPERATOR = 7


class CardAction(CallbackData, prefix="c"):
    action: str
    task_id: int


def make_bot(sandbox: TelegramSandbox, token: str | None = None) -> Bot:
    session = AiohttpSession(api=TelegramAPIServer.from_base(sandbox.base_url))
    return Bot(
        token or sandbox.token,
        session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML),
    )


def card_keyboard(task_id: int) -> InlineKeyboardMarkup:
    builder = InlineKeyboardBuilder()
    builder.button(text="Approve", callback_data=CardAction(action="approve", task_id=task_id))
    builder.button(text="Reject", callback_data=CardAction(action="reject", task_id=task_id))
    builder.button(text="Open", url="https://plane.example/ORCH-1")
    builder.adjust(2, 1)
    return builder.as_markup()


@pytest.fixture
async def sandbox() -> AsyncIterator[TelegramSandbox]:
    async with TelegramSandbox() as server:
        yield server


@pytest.fixture
async def bot(sandbox: TelegramSandbox) -> AsyncIterator[Bot]:
    async with make_bot(sandbox) as client:
        yield client


async def test_get_me_describes_the_bot(bot: Bot) -> None:
    me = await bot.get_me()
    assert (me.id, me.is_bot, me.username) == (123456, True, "conveyor_bot")
    assert me.can_join_groups is True


async def test_send_message_shows_visible_text_and_buttons(
    sandbox: TelegramSandbox, bot: Bot
) -> None:
    sent = await bot.send_message(
        CHAT, "<b>ORCH-1</b> &lt;analysis&gt; &amp; <i>review</i>", reply_markup=card_keyboard(1)
    )

    assert sent.text == "ORCH-1 <analysis> & review"
    assert [entity.type for entity in sent.entities or []] == ["bold", "italic"]
    assert sent.from_user is not None and sent.from_user.is_bot
    [message] = sandbox.messages(CHAT)
    assert message.message_id == sent.message_id
    assert message.text == "ORCH-1 <analysis> & review"
    assert message.html == "<b>ORCH-1</b> &lt;analysis&gt; &amp; <i>review</i>"
    assert message.buttons() == [("Approve", "c:approve:1"), ("Reject", "c:reject:1"), ("Open", "")]
    assert message.from_bot and not message.edited


async def test_message_ids_increase_per_chat(sandbox: TelegramSandbox, bot: Bot) -> None:
    first = await bot.send_message(CHAT, "one")
    second = await bot.send_message(CHAT, "two")
    other = await bot.send_message(43, "elsewhere")
    assert (first.message_id, second.message_id, other.message_id) == (1, 2, 1)


async def test_edit_message_text_changes_the_card(sandbox: TelegramSandbox, bot: Bot) -> None:
    sent = await bot.send_message(CHAT, "<b>ORCH-1</b> analysis", reply_markup=card_keyboard(1))

    edited = await bot.edit_message_text(
        "<b>ORCH-1</b> design",
        chat_id=CHAT,
        message_id=sent.message_id,
        reply_markup=card_keyboard(1),
    )

    assert isinstance(edited, Message) and edited.text == "ORCH-1 design"
    assert edited.edit_date is not None
    [message] = sandbox.messages(CHAT)
    assert (message.text, message.edited) == ("ORCH-1 design", True)
    assert message.buttons()[0] == ("Approve", "c:approve:1")


async def test_edit_without_markup_removes_the_keyboard(sandbox: TelegramSandbox, bot: Bot) -> None:
    sent = await bot.send_message(CHAT, "card", reply_markup=card_keyboard(1))
    await bot.edit_message_text("card, done", chat_id=CHAT, message_id=sent.message_id)
    assert sandbox.messages(CHAT)[0].buttons() == []


async def test_identical_edit_is_not_modified(bot: Bot) -> None:
    sent = await bot.send_message(CHAT, "<b>same</b>", reply_markup=card_keyboard(1))
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_text(
            "<b>same</b>", chat_id=CHAT, message_id=sent.message_id, reply_markup=card_keyboard(1)
        )


async def test_same_text_with_other_formatting_is_a_modification(bot: Bot) -> None:
    sent = await bot.send_message(CHAT, "same")
    edited = await bot.edit_message_text("<b>same</b>", chat_id=CHAT, message_id=sent.message_id)
    assert isinstance(edited, Message) and edited.text == "same"


async def test_edit_reply_markup_has_the_same_semantics(sandbox: TelegramSandbox, bot: Bot) -> None:
    sent = await bot.send_message(CHAT, "card", reply_markup=card_keyboard(1))
    await bot.edit_message_reply_markup(chat_id=CHAT, message_id=sent.message_id)
    assert sandbox.messages(CHAT)[0].reply_markup is None
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_reply_markup(chat_id=CHAT, message_id=sent.message_id)
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_reply_markup(chat_id=CHAT, message_id=999)


async def test_editing_a_deleted_message_is_not_found(bot: Bot) -> None:
    sent = await bot.send_message(CHAT, "card")
    assert await bot.delete_message(CHAT, sent.message_id) is True
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_text("new", chat_id=CHAT, message_id=sent.message_id)


async def test_a_users_message_cannot_be_edited(sandbox: TelegramSandbox, bot: Bot) -> None:
    typed = sandbox.send_user_message(CHAT, OPERATOR, "hello")
    with pytest.raises(TelegramBadRequest, match="message can't be edited"):
        await bot.edit_message_text("hacked", chat_id=CHAT, message_id=typed.message_id)


async def test_delete_twice_is_not_found(sandbox: TelegramSandbox, bot: Bot) -> None:
    sent = await bot.send_message(CHAT, "card")
    await bot.delete_message(CHAT, sent.message_id)
    assert sandbox.messages(CHAT) == []
    with pytest.raises(TelegramBadRequest, match="message to delete not found"):
        await bot.delete_message(CHAT, sent.message_id)


async def test_delete_messages_skips_missing_ones(sandbox: TelegramSandbox, bot: Bot) -> None:
    kept = await bot.send_message(CHAT, "kept")
    gone = await bot.send_message(CHAT, "gone")
    assert await bot.delete_messages(CHAT, [gone.message_id, 999]) is True
    assert [m.message_id for m in sandbox.messages(CHAT)] == [kept.message_id]


async def test_the_length_limit_counts_visible_characters(bot: Bot) -> None:
    fits = await bot.send_message(CHAT, "<b>" + "a" * 4095 + "</b>&amp;")
    assert fits.text is not None and len(fits.text) == 4096
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(CHAT, "<i>" + "a" * 4097 + "</i>")
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.edit_message_text("a" * 4097, chat_id=CHAT, message_id=fits.message_id)


async def test_empty_text_is_rejected(bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="message text is empty"):
        await bot.send_message(CHAT, "<b>  </b>")


@pytest.mark.parametrize(
    ("html", "detail"),
    [
        ("<x>hi</x>", 'Unsupported start tag "x" at byte offset 0'),
        ("a < b", 'Unsupported start tag "" at byte offset 2'),
        ("<b>bold", 'Can\'t find end tag corresponding to start tag "b"'),
        ("<b><i>x</b></i>", 'Unmatched end tag at byte offset 7, expected "</i>", found "</b>"'),
        ("плохо</b>", "Unexpected end tag at byte offset 10"),
    ],
)
async def test_broken_html_cannot_be_parsed(bot: Bot, html: str, detail: str) -> None:
    with pytest.raises(TelegramBadRequest) as caught:
        await bot.send_message(CHAT, html)
    assert caught.value.message == f"Bad Request: can't parse entities: {detail}"


def test_parse_html_counts_offsets_in_utf16_units() -> None:
    text, entities = parse_html('😀 <b>x</b> <a href="https://e.x/?a=1&amp;b=2">y</a> &#128512;')
    assert text == "😀 x y 😀"
    assert entities == [
        {"type": "bold", "offset": 3, "length": 1},
        {"type": "text_link", "offset": 5, "length": 1, "url": "https://e.x/?a=1&b=2"},
    ]


async def test_callback_data_is_limited_to_64_bytes(sandbox: TelegramSandbox, bot: Bot) -> None:
    def keyboard(data: str) -> InlineKeyboardMarkup:
        return InlineKeyboardMarkup(
            inline_keyboard=[[InlineKeyboardButton(text="x", callback_data=data)]]
        )

    await bot.send_message(CHAT, "fits", reply_markup=keyboard("я" * 32))  # 64 bytes
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        await bot.send_message(CHAT, "too much", reply_markup=keyboard("x" * 65))
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        await bot.send_message(CHAT, "too much", reply_markup=keyboard("я" * 33))  # 66 bytes
    assert [m.text for m in sandbox.messages(CHAT)] == ["fits"]


async def test_group_limit_raises_retry_after() -> None:
    async with TelegramSandbox(group_per_minute=5) as sandbox, make_bot(sandbox) as bot:
        sent = [await bot.send_message(GROUP, f"update {n}") for n in range(5)]

        with pytest.raises(TelegramRetryAfter) as caught:
            await bot.edit_message_text("changed", chat_id=GROUP, message_id=sent[0].message_id)

        assert 1 <= caught.value.retry_after <= 60
        assert f"Too Many Requests: retry after {caught.value.retry_after}" in str(caught.value)
        assert sandbox.rate_limited == 1
        assert sandbox.count("editMessageText", 429) == 1
        assert sandbox.messages(GROUP)[0].text == "update 0"  # the limited call changed nothing
        assert await bot.delete_message(GROUP, sent[1].message_id) is True  # deletes are free
        assert await bot.send_message(CHAT, "another chat has its own window")


async def test_private_chats_allow_a_short_burst_then_free_up() -> None:
    async with TelegramSandbox(private_per_second=5) as sandbox, make_bot(sandbox) as bot:
        for n in range(3):
            await bot.send_message(CHAT, f"burst {n}")
        with pytest.raises(TelegramRetryAfter) as caught:
            await bot.send_message(CHAT, "one too many")
        assert caught.value.retry_after >= 1
        await asyncio.sleep(3 / 5 + 0.05)  # the sliding window (3 messages in 0.6 s) frees up
        await bot.send_message(CHAT, "after the window")
        assert [m.text for m in sandbox.messages(CHAT)][-1] == "after the window"
        assert sandbox.rate_limited == 1


async def test_retry_after_can_be_fixed() -> None:
    async with (
        TelegramSandbox(group_per_minute=1, retry_after_s=7) as sandbox,
        make_bot(sandbox) as bot,
    ):
        await bot.send_message(GROUP, "first")
        with pytest.raises(TelegramRetryAfter) as caught:
            await bot.send_message(GROUP, "second")
    assert caught.value.retry_after == 7


async def test_limits_can_be_switched_off() -> None:
    async with TelegramSandbox(enforce_limits=False) as sandbox, make_bot(sandbox) as bot:
        for n in range(10):
            await bot.send_message(CHAT, str(n))
        assert sandbox.rate_limited == 0


async def test_get_updates_long_polls_until_a_user_writes(
    sandbox: TelegramSandbox, bot: Bot
) -> None:
    poll = asyncio.create_task(bot.get_updates(timeout=10))
    await sandbox.wait_for(lambda: sandbox.count("getUpdates") == 1)
    await asyncio.sleep(0.05)
    assert not poll.done()

    sandbox.send_user_message(CHAT, OPERATOR, "/queue", username="operator")
    [update] = await asyncio.wait_for(poll, 5)

    assert update.message is not None and update.message.text == "/queue"
    assert update.message.from_user is not None and update.message.from_user.id == OPERATOR
    assert [e.type for e in update.message.entities or []] == ["bot_command"]
    confirmed = await bot.get_updates(offset=update.update_id + 1, timeout=0)
    assert confirmed == []


async def test_get_updates_times_out_empty(bot: Bot) -> None:
    assert await bot.get_updates(timeout=1) == []


async def test_a_second_poller_terminates_the_first(sandbox: TelegramSandbox, bot: Bot) -> None:
    first = asyncio.create_task(bot.get_updates(timeout=10))
    await sandbox.wait_for(lambda: sandbox.count("getUpdates") == 1)
    second = asyncio.create_task(bot.get_updates(timeout=10))
    with pytest.raises(TelegramConflictError, match="terminated by other getUpdates request"):
        await asyncio.wait_for(first, 5)
    sandbox.send_user_message(CHAT, OPERATOR, "hi")
    assert len(await asyncio.wait_for(second, 5)) == 1


async def test_polling_conflicts_with_a_webhook(bot: Bot) -> None:
    await bot.set_webhook("https://conveyor.example/tg/webhook")
    assert (await bot.get_webhook_info()).url == "https://conveyor.example/tg/webhook"
    with pytest.raises(TelegramConflictError, match="webhook is active"):
        await bot.get_updates()
    assert await bot.delete_webhook(drop_pending_updates=True) is True
    assert await bot.get_updates(timeout=0) == []


async def test_a_press_reaches_the_dispatcher_and_is_answered_once(
    sandbox: TelegramSandbox, bot: Bot
) -> None:
    pressed: list[CardAction] = []
    router = Router()

    @router.callback_query(CardAction.filter(F.action == "approve"))
    async def approve(query: CallbackQuery, callback_data: CardAction) -> None:
        pressed.append(callback_data)
        await query.answer("Approved")

    dp = Dispatcher()
    dp.include_router(router)
    card = await bot.send_message(CHAT, "card", reply_markup=card_keyboard(12))

    query_id = sandbox.press(CHAT, card.message_id, OPERATOR, button_text="Approve")
    [update] = await bot.get_updates(timeout=0)
    await dp.feed_update(bot, update)

    assert update.callback_query is not None and update.callback_query.id == query_id
    assert pressed == [CardAction(action="approve", task_id=12)]
    assert sandbox.callback_answers()[query_id]["text"] == "Approved"
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(query_id)


async def test_press_rejects_a_missing_button(sandbox: TelegramSandbox, bot: Bot) -> None:
    card = await bot.send_message(CHAT, "card", reply_markup=card_keyboard(1))
    with pytest.raises(ValueError, match="no button"):
        sandbox.press(CHAT, card.message_id, OPERATOR, data="c:retry:1")
    with pytest.raises(ValueError, match="no button"):
        sandbox.press(CHAT, card.message_id, OPERATOR, button_text="Open")  # a URL button
    with pytest.raises(ValueError, match="no message"):
        sandbox.press(CHAT, 999, OPERATOR, data="c:approve:1")


async def test_polling_handles_start_and_a_button_end_to_end(
    sandbox: TelegramSandbox, bot: Bot
) -> None:
    router = Router()

    @router.message(CommandStart())
    async def start(message: Message) -> None:
        await message.answer("<b>Conveyor</b> is ready", reply_markup=card_keyboard(5))

    @router.callback_query(CardAction.filter())
    async def act(query: CallbackQuery, callback_data: CardAction) -> None:
        await query.answer(f"{callback_data.action} #{callback_data.task_id}", show_alert=True)

    dp = Dispatcher()
    dp.include_router(router)
    polling = asyncio.create_task(
        dp.start_polling(bot, handle_signals=False, close_bot_session=False, polling_timeout=1)
    )
    try:
        sandbox.send_user_message(CHAT, OPERATOR, "/start")
        await sandbox.wait_for(lambda: len(sandbox.messages(CHAT)) == 2)
        reply = sandbox.messages(CHAT)[-1]
        assert (reply.from_bot, reply.text) == (True, "Conveyor is ready")

        query_id = sandbox.press(CHAT, reply.message_id, OPERATOR, data="c:reject:5")
        await sandbox.wait_for(lambda: query_id in sandbox.callback_answers())
        assert sandbox.callback_answers()[query_id] == {
            "text": "reject #5",
            "show_alert": True,
        }
    finally:
        await dp.stop_polling()
        await asyncio.wait_for(polling, 10)


async def test_replies_and_force_reply(sandbox: TelegramSandbox, bot: Bot) -> None:
    prompt = await bot.send_message(CHAT, "Why reject?", reply_markup=ForceReply())
    assert sandbox.messages(CHAT)[0].force_reply
    answer = sandbox.send_user_message(
        CHAT, OPERATOR, "flaky tests", reply_to_message_id=prompt.message_id
    )
    [update] = await bot.get_updates(timeout=0)
    assert update.message is not None and update.message.reply_to_message is not None
    assert update.message.reply_to_message.message_id == prompt.message_id

    echoed = await bot.send_message(
        CHAT, "noted", reply_parameters=ReplyParameters(message_id=answer.message_id)
    )
    assert echoed.reply_to_message is not None
    assert sandbox.messages(CHAT)[-1].reply_to_message_id == answer.message_id
    with pytest.raises(TelegramBadRequest, match="message to be replied not found"):
        await bot.send_message(CHAT, "x", reply_parameters=ReplyParameters(message_id=999))


async def test_commands_chat_and_member(bot: Bot) -> None:
    commands = [
        BotCommand(command="queue", description="Queue"),
        BotCommand(command="task", description="Task"),
    ]
    assert await bot.set_my_commands(commands) is True
    assert [c.command for c in await bot.get_my_commands()] == ["queue", "task"]
    assert await bot.delete_my_commands() is True
    assert await bot.get_my_commands() == []
    assert await bot.send_chat_action(GROUP, "typing") is True
    chat = await bot.get_chat(GROUP)
    assert (chat.id, chat.type) == (GROUP, "supergroup")
    member = await bot.get_chat_member(GROUP, OPERATOR)
    assert member.status == "administrator"


async def test_a_wrong_token_is_unauthorized(sandbox: TelegramSandbox) -> None:
    async with make_bot(sandbox, token="999:WRONG") as intruder:
        with pytest.raises(TelegramUnauthorizedError):
            await intruder.get_me()
    assert sandbox.count("getMe", 401) == 1


async def test_raw_requests_json_get_and_unknown_method(sandbox: TelegramSandbox) -> None:
    api = f"{sandbox.base_url}/bot{sandbox.token}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/sendMessage", json={"chat_id": CHAT, "text": "json"}) as r:
            assert r.status == 200 and (await r.json())["result"]["text"] == "json"
        async with http.get(f"{api}/getMe") as r:
            assert (await r.json())["result"]["username"] == "conveyor_bot"
        async with http.post(
            f"{api}/sendmessage", data={"chat_id": str(CHAT), "text": "lower"}
        ) as r:
            assert r.status == 200
        async with http.post(f"{api}/launchRocket") as r:
            assert r.status == 404
            assert await r.json() == {"ok": False, "error_code": 404, "description": "Not Found"}
        multipart = aiohttp.FormData()
        multipart.add_field("chat_id", str(CHAT))
        multipart.add_field("text", "<b>multipart</b>")
        multipart.add_field("parse_mode", "HTML")
        multipart.add_field(
            "reply_markup", '{"inline_keyboard": [[{"text": "A", "callback_data": "a"}]]}'
        )
        multipart.add_field("document", b"ignored", filename="card.txt")  # forces multipart
        async with http.post(f"{api}/sendMessage", data=multipart) as r:
            assert r.status == 200 and (await r.json())["result"]["reply_markup"]
        bad_markup = {"chat_id": str(CHAT), "text": "x", "reply_markup": "{not json"}
        async with http.post(f"{api}/sendMessage", data=bad_markup) as r:
            assert r.status == 400
    assert [m.text for m in sandbox.messages(CHAT)] == ["json", "lower", "multipart"]
    assert sandbox.messages(CHAT)[-1].buttons() == [("A", "a")]


async def test_http_control_endpoints(sandbox: TelegramSandbox, bot: Bot) -> None:
    card = await bot.send_message(GROUP, "<b>card</b>", reply_markup=card_keyboard(3))
    chats = f"{sandbox.base_url}/sandbox/chats/{GROUP}"
    async with aiohttp.ClientSession() as http:
        async with http.get(chats) as r:
            [shown] = (await r.json())["messages"]
        assert (shown["message_id"], shown["text"], shown["html"]) == (
            card.message_id,
            "card",
            "<b>card</b>",
        )
        assert shown["buttons"][0] == ["Approve", "c:approve:3"]

        typed = {"user_id": OPERATOR, "text": "/task 3"}
        async with http.post(f"{chats}/messages", json=typed) as r:
            assert r.status == 200 and (await r.json())["message"]["text"] == "/task 3"

        press = {"message_id": card.message_id, "user_id": OPERATOR, "button_text": "Reject"}
        async with http.post(f"{chats}/press", json=press) as r:
            query_id = (await r.json())["callback_query_id"]
        async with http.post(f"{chats}/press", json={**press, "button_text": "Nope"}) as r:
            assert r.status == 400 and "no button" in (await r.json())["error"]

        async with http.get(f"{sandbox.base_url}/sandbox/calls") as r:
            methods = [call["method"] for call in (await r.json())["calls"]]
        assert methods == ["sendMessage"]

    updates = await bot.get_updates(timeout=0)
    assert updates[0].message is not None and updates[0].message.text == "/task 3"
    assert updates[1].callback_query is not None
    assert (updates[1].callback_query.id, updates[1].callback_query.data) == (
        query_id,
        "c:reject:3",
    )


async def test_fail_next_answers_an_error_for_a_while_and_changes_nothing(
    sandbox: TelegramSandbox, bot: Bot
) -> None:
    sent = await bot.send_message(CHAT, "card")
    sandbox.fail_next("editMessageText", times=2)
    for _ in range(2):
        with pytest.raises(TelegramServerError, match="Internal Server Error"):
            await bot.edit_message_text("card, later", chat_id=CHAT, message_id=sent.message_id)
        assert sandbox.messages(CHAT)[0].text == "card"
    await bot.edit_message_text("card, later", chat_id=CHAT, message_id=sent.message_id)
    assert sandbox.messages(CHAT)[0].text == "card, later"
    assert sandbox.count("editMessageText", 500) == 2
    failed = next(c for c in sandbox.calls if c.status == 500)
    assert failed.response == {
        "ok": False,
        "error_code": 500,
        "description": "Internal Server Error",
    }

    sandbox.fail_next("deletemessage", 400, "Bad Request: message can't be deleted")
    with pytest.raises(TelegramBadRequest, match="message can't be deleted"):
        await bot.delete_message(CHAT, sent.message_id)
    assert [m.message_id for m in sandbox.messages(CHAT)] == [sent.message_id]

    sandbox.fail_next("sendMessage", times=5)
    sandbox.fail_next("sendMessage", times=0)  # cleared
    await bot.send_message(CHAT, "through")


async def test_fail_next_over_http(sandbox: TelegramSandbox, bot: Bot) -> None:
    failure = {"method": "sendMessage", "status": 502, "description": "Bad Gateway"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sandbox.base_url}/sandbox/fail", json=failure) as r:
            assert r.status == 200
        async with http.post(f"{sandbox.base_url}/sandbox/fail", json={"times": 1}) as r:
            assert r.status == 400
    with pytest.raises(TelegramServerError, match="Bad Gateway"):
        await bot.send_message(CHAT, "lost")
    assert sandbox.messages(CHAT) == []


async def test_updates_are_confirmed_by_the_next_offset(sandbox: TelegramSandbox, bot: Bot) -> None:
    assert sandbox.updates_confirmed()
    sandbox.send_user_message(CHAT, OPERATOR, "/queue")
    assert not sandbox.updates_confirmed()
    [update] = await bot.get_updates(timeout=0)
    assert not sandbox.updates_confirmed()  # fetched, not yet confirmed
    await bot.get_updates(offset=update.update_id + 1, timeout=0)
    assert sandbox.updates_confirmed()


async def test_wait_for_times_out_with_a_clear_message(sandbox: TelegramSandbox) -> None:
    with pytest.raises(TimeoutError, match="still false after 0.05s"):
        await sandbox.wait_for(lambda: False, timeout=0.05)


async def test_runs_standalone_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.sandbox.telegram",
        "--port",
        "0",
        "--token",
        "777:STANDALONE",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        base_url = (await asyncio.wait_for(process.stdout.readline(), 15)).decode().strip()
        assert base_url.startswith("http://127.0.0.1:")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{base_url}/bot777:STANDALONE/getMe") as r,
        ):
            assert (await r.json())["result"]["id"] == 777
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
