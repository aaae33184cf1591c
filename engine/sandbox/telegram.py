"""A local Telegram Bot API server: `python -m engine.sandbox.telegram --port N [--token T]`.

It answers `/bot{token}/{method}` the way api.telegram.org does for the methods Conveyor's bot
uses: the same request encodings (urlencoded, multipart, JSON), the same result objects and the
same error shapes and descriptions, so aiogram raises its real exceptions. A person in a chat is
simulated with `send_user_message` and `press` (or the `/sandbox/...` HTTP endpoints), which
queue updates for `getUpdates`. `fail_next` makes the next calls of one method fail the way
Telegram does when it is in trouble (500 "Internal Server Error", 502 "Bad Gateway"), or with
any other error a test needs, without touching the chat.

Deliberate simplifications: HTML is the only parse mode that is parsed (Markdown text is shown
as sent), webhooks are recorded but never called, and only calls that succeed count against a
chat's rate limit.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import math
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

MAX_TEXT_CHARS = 4096
MAX_CALLBACK_DATA_BYTES = 64
MAX_ANSWER_TEXT_CHARS = 200
MAX_UPDATES = 100
PRIVATE_BURST = 3  # messages a private chat may take back to back; then private_per_second
GROUP_WINDOW_S = 60.0
WAIT_FOR_STEP_S = 0.01

UNAUTHORIZED = "Unauthorized"
NOT_FOUND = "Not Found"
WEBHOOK_ACTIVE = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)
POLL_TERMINATED = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
TEXT_EMPTY = "Bad Request: message text is empty"
TEXT_TOO_LONG = "Bad Request: message is too long"
BUTTON_DATA_INVALID = "Bad Request: BUTTON_DATA_INVALID"
TEXT_BUTTON = (
    "Bad Request: can't parse inline keyboard button: "
    "Text buttons are unallowed in the inline keyboard"
)
BUTTON_TEXT_INVALID = (
    'Bad Request: can\'t parse inline keyboard button: Field "text" must be of type String'
)
KEYBOARD_INVALID = (
    "Bad Request: can't parse inline keyboard markup: "
    'Field "inline_keyboard" must be an Array of Array'
)
EDIT_NOT_FOUND = "Bad Request: message to edit not found"
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
CANT_EDIT = "Bad Request: message can't be edited"
DELETE_NOT_FOUND = "Bad Request: message to delete not found"
REPLY_NOT_FOUND = "Bad Request: message to be replied not found"
QUERY_INVALID = "Bad Request: query is too old and response timeout expired or query ID is invalid"
ANSWER_TOO_LONG = "Bad Request: MESSAGE_TOO_LONG"
CHAT_NOT_FOUND = "Bad Request: chat not found"
CHAT_ID_EMPTY = "Bad Request: chat_id is empty"
UNSUPPORTED_PARSE_MODE = "Bad Request: unsupported parse_mode"

STATUS_BY_PREFIX: dict[str, int] = {
    "Bad Request": 400,
    "Unauthorized": 401,
    "Forbidden": 403,
    "Not Found": 404,
    "Conflict": 409,
    "Too Many Requests": 429,
    "Internal Server Error": 500,
    "Bad Gateway": 502,
}
INTERNAL_ERROR = "Internal Server Error"

# How form fields are decoded: aiogram sends every value as a string, nested objects as JSON.
INT_PARAMS = frozenset(
    {"chat_id", "message_id", "reply_to_message_id", "user_id", "offset", "limit", "cache_time"}
)
FLOAT_PARAMS = frozenset({"timeout"})
BOOL_PARAMS = frozenset(
    {
        "disable_notification",
        "disable_web_page_preview",
        "protect_content",
        "allow_sending_without_reply",
        "show_alert",
        "drop_pending_updates",
    }
)
JSON_PARAMS: dict[str, str] = {  # name -> how Telegram calls it in "can't parse ... JSON object"
    "reply_markup": "reply keyboard markup",
    "entities": "message entities",
    "link_preview_options": "link preview options",
    "reply_parameters": "reply parameters",
    "message_ids": "message identifiers",
    "allowed_updates": "allowed updates",
    "commands": "bot commands",
    "scope": "bot command scope",
}
RATE_LIMITED_METHODS = frozenset({"sendMessage", "editMessageText", "editMessageReplyMarkup"})
# Any of these makes an inline button do something; a button with none is a "text button".
BUTTON_ACTIONS = (
    "callback_data",
    "url",
    "web_app",
    "login_url",
    "switch_inline_query",
    "switch_inline_query_current_chat",
    "switch_inline_query_chosen_chat",
    "copy_text",
    "callback_game",
    "pay",
)
ADMIN_RIGHTS: dict[str, bool] = {
    "can_be_edited": False,
    "is_anonymous": False,
    "can_manage_chat": True,
    "can_delete_messages": True,
    "can_manage_video_chats": True,
    "can_restrict_members": True,
    "can_promote_members": True,
    "can_change_info": True,
    "can_invite_users": True,
    "can_post_stories": True,
    "can_edit_stories": True,
    "can_delete_stories": True,
    "can_send_welcome_messages": True,
    "can_post_messages": True,
    "can_edit_messages": True,
    "can_pin_messages": True,
}
CHAT_FULL_INFO_EXTRAS: dict[str, Any] = {
    "accent_color_id": 0,
    "max_reaction_count": 11,
    "accepted_gift_types": {
        "unlimited_gifts": False,
        "limited_gifts": False,
        "unique_gifts": False,
        "premium_subscription": False,
        "gifts_from_channels": False,
    },
}


class ApiError(Exception):
    """An error answer; the HTTP status follows from the description's prefix unless given."""

    def __init__(
        self, description: str, retry_after: int | None = None, status: int | None = None
    ) -> None:
        super().__init__(description)
        self.description = description
        self.retry_after = retry_after
        self.status = status or STATUS_BY_PREFIX.get(description.split(":")[0], 400)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


# ---------------------------------------------------------------------------------------------
# HTML parse mode


TAG_ENTITY: dict[str, str] = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "span": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}
# (entity type, tag attribute, entity field): the attribute an entity cannot exist without.
REQUIRED_ATTRIBUTE: dict[str, tuple[str, str]] = {
    "text_link": ("href", "url"),
    "custom_emoji": ("emoji-id", "custom_emoji_id"),
}
NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
ENTITY_RE = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z]+);")
ATTRIBUTE_RE = re.compile(r"""([a-zA-Z_-]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?""")
SPECIAL_RE = re.compile(r"[<&]")


class EntityParseError(ValueError):
    pass


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _decode_entity(name: str) -> str | None:
    if not name.startswith("#"):
        return NAMED_ENTITIES.get(name)
    code = int(name[2:], 16) if name[1:2] in ("x", "X") else int(name[1:])
    return chr(code) if 0 < code <= 0x10FFFF else None


def _unescape(text: str) -> str:
    return ENTITY_RE.sub(lambda m: _decode_entity(m.group(1)) or m.group(0), text)


@dataclass
class _OpenTag:
    name: str
    attributes: dict[str, str]
    start: int  # UTF-16 offset in the visible text
    language: str | None = None


class _HtmlParser:
    """Telegram's HTML subset: strict about tags, lenient about unknown `&names;`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0
        self.out: list[str] = []
        self.length = 0  # UTF-16 code units emitted so far
        self.stack: list[_OpenTag] = []
        self.entities: list[dict[str, Any]] = []

    def parse(self) -> tuple[str, list[dict[str, Any]]]:
        while self.pos < len(self.source):
            special = SPECIAL_RE.search(self.source, self.pos)
            end = special.start() if special else len(self.source)
            self._emit(self.source[self.pos : end])
            self.pos = end
            if special and special.group() == "<":
                self._tag()
            elif special:
                self._entity()
        if self.stack:
            name = self.stack[-1].name
            raise EntityParseError(f'Can\'t find end tag corresponding to start tag "{name}"')
        self.entities.sort(key=lambda entity: (entity["offset"], -entity["length"]))
        return "".join(self.out), self.entities

    def _emit(self, text: str) -> None:
        self.out.append(text)
        self.length += _utf16_len(text)

    def _byte_offset(self, pos: int) -> int:
        return len(self.source[:pos].encode("utf-8"))

    def _entity(self) -> None:
        match = ENTITY_RE.match(self.source, self.pos)
        decoded = _decode_entity(match.group(1)) if match else None
        if match and decoded is not None:
            self._emit(decoded)
            self.pos = match.end()
        else:
            self._emit("&")
            self.pos += 1

    def _tag(self) -> None:
        if self.source.startswith("</", self.pos):
            self._end_tag(self.pos)
        else:
            self._start_tag(self.pos)

    def _start_tag(self, begin: int) -> None:
        name_end = begin + 1
        while name_end < len(self.source) and self.source[name_end] not in " \t\r\n>":
            name_end += 1
        offset = self._byte_offset(begin)
        if name_end >= len(self.source):
            raise EntityParseError(f"Unclosed start tag at byte offset {offset}")
        name = self.source[begin + 1 : name_end].lower()
        if name not in TAG_ENTITY:
            raise EntityParseError(f'Unsupported start tag "{name}" at byte offset {offset}')
        close = self._tag_close(name_end)
        if close < 0:
            raise EntityParseError(f"Unclosed start tag at byte offset {offset}")
        attributes = _attributes(self.source[name_end:close])
        if name == "span" and attributes.get("class") != "tg-spoiler":
            raise EntityParseError(
                f'Tag "span" must have class "tg-spoiler" at byte offset {offset}'
            )
        self.stack.append(_OpenTag(name, attributes, self.length))
        self.pos = close + 1

    def _tag_close(self, pos: int) -> int:
        """Index of the `>` ending a start tag, skipping quoted attribute values."""
        quote = ""
        for index in range(pos, len(self.source)):
            char = self.source[index]
            if quote:
                quote = "" if char == quote else quote
            elif char in "\"'":
                quote = char
            elif char == ">":
                return index
        return -1

    def _end_tag(self, begin: int) -> None:
        offset = self._byte_offset(begin)
        close = self.source.find(">", begin)
        if close < 0:
            raise EntityParseError(f"Unclosed end tag at byte offset {offset}")
        name = self.source[begin + 2 : close].strip().lower()
        if not self.stack:
            raise EntityParseError(f"Unexpected end tag at byte offset {offset}")
        top = self.stack[-1].name
        if top != name:
            raise EntityParseError(
                f'Unmatched end tag at byte offset {offset}, expected "</{top}>", found "</{name}>"'
            )
        self._close(self.stack.pop())
        self.pos = close + 1

    def _close(self, tag: _OpenTag) -> None:
        if tag.name == "code" and self.stack and self.stack[-1].name == "pre":
            # <pre><code class="language-x"> is one pre entity with a language
            language = tag.attributes.get("class", "")
            if language.startswith("language-"):
                self.stack[-1].language = language.removeprefix("language-")
            return
        entity = _make_entity(tag, self.length - tag.start)
        if entity is not None:
            self.entities.append(entity)


def _attributes(text: str) -> dict[str, str]:
    return {
        match.group(1).lower(): _unescape(next((g for g in match.groups()[1:] if g), ""))
        for match in ATTRIBUTE_RE.finditer(text)
    }


def _make_entity(tag: _OpenTag, length: int) -> dict[str, Any] | None:
    if length <= 0:
        return None
    kind = TAG_ENTITY[tag.name]
    if kind == "blockquote" and "expandable" in tag.attributes:
        kind = "expandable_blockquote"
    entity: dict[str, Any] = {"type": kind, "offset": tag.start, "length": length}
    if kind in REQUIRED_ATTRIBUTE:
        attribute, key = REQUIRED_ATTRIBUTE[kind]
        if not tag.attributes.get(attribute):
            return None
        entity[key] = tag.attributes[attribute]
    if tag.language:
        entity["language"] = tag.language
    return entity


def parse_html(source: str) -> tuple[str, list[dict[str, Any]]]:
    """Visible text and message entities (UTF-16 offsets) of an HTML-formatted text.

    Raises EntityParseError with the detail Telegram puts after "can't parse entities: ".
    """
    return _HtmlParser(source).parse()


def _trim(text: str, entities: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Telegram strips surrounding whitespace from message text; entities follow the text."""
    stripped = text.strip()
    if stripped == text:
        return text, entities
    shift = _utf16_len(text[: len(text) - len(text.lstrip())])
    size = _utf16_len(stripped)
    trimmed = []
    for entity in entities:
        start = max(entity["offset"] - shift, 0)
        end = min(entity["offset"] + entity["length"] - shift, size)
        if end > start:
            trimmed.append({**entity, "offset": start, "length": end - start})
    return stripped, trimmed


# ---------------------------------------------------------------------------------------------
# Request decoding


def _to_int(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def _to_bool(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


def _decode_param(name: str, value: Any) -> Any:
    if name in JSON_PARAMS and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ApiError(f"Bad Request: can't parse {JSON_PARAMS[name]} JSON object") from None
    if name in INT_PARAMS:
        return _to_int(value)
    if name in FLOAT_PARAMS:
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    if name in BOOL_PARAMS:
        return _to_bool(value)
    return value


async def _request_fields(request: web.Request) -> dict[str, Any]:
    fields: dict[str, Any] = dict(request.query)
    if request.method != "POST" or not request.can_read_body:
        return fields
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ApiError("Bad Request: can't parse JSON object") from None
        if not isinstance(body, dict):
            raise ApiError("Bad Request: can't parse JSON object")
        fields.update(body)
    else:
        form = await request.post()
        fields.update(
            {
                key: v if isinstance(v, str) else getattr(v, "filename", "")
                for key, v in form.items()
            }
        )
    return fields


async def read_params(request: web.Request) -> dict[str, Any]:
    fields = await _request_fields(request)
    return {name: _decode_param(name, value) for name, value in fields.items()}


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class SandboxMessage:
    """What a user sees in a chat."""

    message_id: int
    chat_id: int
    from_bot: bool
    user_id: int | None
    text: str  # the visible text (HTML tags stripped, entities unescaped)
    html: str | None  # the raw text as sent by the bot
    reply_markup: dict[str, Any] | None  # the inline keyboard as sent
    disable_notification: bool
    date: int
    edited: bool = False
    reply_to_message_id: int | None = None
    entities: list[dict[str, Any]] = field(default_factory=list)
    force_reply: bool = False
    username: str | None = None
    edit_date: int | None = None
    deleted: bool = False

    def buttons(self) -> list[tuple[str, str]]:
        """(text, callback_data) of every inline button, row by row; "" for non-callback ones."""
        rows = (self.reply_markup or {}).get("inline_keyboard") or []
        return [(button["text"], button.get("callback_data", "")) for row in rows for button in row]

    def view(self) -> dict[str, Any]:
        data = asdict(self)
        data["buttons"] = [list(button) for button in self.buttons()]
        return data


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    status: int  # 0 while the call is still being answered
    at: float  # wall-clock time.time() when it arrived
    response: dict[str, Any] | None = None  # the body answered, once answered

    @property
    def result(self) -> Any:
        return (self.response or {}).get("result")


@dataclass
class InjectedFailure:
    """An error answered instead of running a method, `times` more times."""

    status: int
    description: str
    times: int


@dataclass
class SlidingWindow:
    limit: int
    period_s: float
    stamps: deque[float] = field(default_factory=deque)

    def wait_s(self, now: float) -> float:
        """Seconds until one more message fits; 0 when it fits now."""
        while self.stamps and self.stamps[0] <= now - self.period_s:
            self.stamps.popleft()
        if len(self.stamps) < self.limit:
            return 0.0
        return self.stamps[0] + self.period_s - now

    def record(self, now: float) -> None:
        self.stamps.append(now)


@dataclass
class _Chat:
    id: int
    type: str
    title: str | None
    messages: dict[int, SandboxMessage] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    window: SlidingWindow | None = None

    def json(self) -> dict[str, Any]:
        if self.type == "private":
            return {"id": self.id, "type": "private", "first_name": self.title or f"User {self.id}"}
        return {"id": self.id, "type": self.type, "title": self.title or f"Chat {self.id}"}

    def visible(self, message_id: Any) -> SandboxMessage | None:
        message = self.messages.get(message_id) if isinstance(message_id, int) else None
        return None if message is None or message.deleted else message


@dataclass
class _Poll:
    superseded: bool = False


def _user_json(user_id: int, username: str | None) -> dict[str, Any]:
    user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": f"User {user_id}"}
    if username:
        user["first_name"] = username
        user["username"] = username
    return user


def _check_button(button: Any) -> None:
    if not isinstance(button, dict) or not isinstance(button.get("text"), str):
        raise ApiError(BUTTON_TEXT_INVALID)
    if not any(key in button for key in BUTTON_ACTIONS):
        raise ApiError(TEXT_BUTTON)
    data = button.get("callback_data")
    if data is not None and not 1 <= len(str(data).encode("utf-8")) <= MAX_CALLBACK_DATA_BYTES:
        raise ApiError(BUTTON_DATA_INVALID)


def parse_markup(markup: Any) -> tuple[dict[str, Any] | None, bool]:
    """(inline keyboard or None, force_reply) of a reply_markup, validated like Telegram does."""
    if markup is None:
        return None, False
    if not isinstance(markup, dict):
        raise ApiError(f"Bad Request: can't parse {JSON_PARAMS['reply_markup']} JSON object")
    rows = markup.get("inline_keyboard")
    if rows is None:
        return None, bool(markup.get("force_reply"))
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise ApiError(KEYBOARD_INVALID)
    for row in rows:
        for button in row:
            _check_button(button)
    return markup, False


# ---------------------------------------------------------------------------------------------
# The server


class TelegramSandbox:
    def __init__(
        self,
        token: str = "123456:SANDBOX",
        *,
        bot_username: str = "conveyor_bot",
        private_per_second: float = 1.0,
        group_per_minute: int = 20,
        enforce_limits: bool = True,
        retry_after_s: int | None = None,
    ) -> None:
        self.token = token
        self.bot_id = int(token.split(":", 1)[0])
        self.bot_username = bot_username
        self.private_per_second = private_per_second
        self.group_per_minute = group_per_minute
        self.enforce_limits = enforce_limits
        self.retry_after_s = retry_after_s
        self.base_url = ""
        self.calls: list[Call] = []
        self.rate_limited = 0
        self.webhook_url = ""
        self.commands: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._chats: dict[int, _Chat] = {}
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._last_update_id = 0
        self._confirmed_update_id = 0
        self._query_ids = itertools.count(1)
        self._open_queries: set[str] = set()
        self._answers: dict[str, dict[str, Any]] = {}
        self._failures: dict[str, InjectedFailure] = {}
        self._wakeup = asyncio.Event()
        self._poll: _Poll | None = None
        self._closing = False
        self._runner: web.AppRunner | None = None
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "getMe": self._get_me,
            "getUpdates": self._get_updates,
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message,
            "deleteMessages": self._delete_messages,
            "answerCallbackQuery": self._answer_callback_query,
            "setMyCommands": self._set_my_commands,
            "deleteMyCommands": self._delete_my_commands,
            "getMyCommands": self._get_my_commands,
            "sendChatAction": self._send_chat_action,
            "getChat": self._get_chat,
            "getChatMember": self._get_chat_member,
        }
        # Telegram matches method names case-insensitively.
        self._methods = {name.lower(): (name, handler) for name, handler in handlers.items()}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_route("GET", "/bot{token}/{method}", self._handle_api)
        app.router.add_route("POST", "/bot{token}/{method}", self._handle_api)
        app.router.add_get("/sandbox/chats/{chat_id}", self._http_chat)
        app.router.add_post("/sandbox/chats/{chat_id}/messages", self._http_user_message)
        app.router.add_post("/sandbox/chats/{chat_id}/press", self._http_press)
        app.router.add_post("/sandbox/fail", self._http_fail)
        app.router.add_get("/sandbox/calls", self._http_calls)
        app.router.add_get("/sandbox/callback_answers", self._http_callback_answers)
        self._closing = False
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        self._closing = True  # pending long polls return at once instead of holding shutdown
        self._wake()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> TelegramSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- inspection --------------------------------------------------------------------------

    def messages(self, chat_id: int) -> list[SandboxMessage]:
        chat = self._chats.get(chat_id)
        if chat is None:
            return []
        return [message for message in chat.messages.values() if not message.deleted]

    def count(self, method: str, status: int | None = None) -> int:
        return sum(
            1
            for call in self.calls
            if call.method == method and (status is None or call.status == status)
        )

    def callback_answers(self) -> dict[str, dict[str, Any]]:
        return dict(self._answers)

    def updates_confirmed(self) -> bool:
        """Whether the bot has confirmed every update queued so far (by a later offset)."""
        return self._confirmed_update_id >= self._last_update_id

    # -- driving -----------------------------------------------------------------------------

    def add_chat(self, chat_id: int, type: str | None = None, title: str | None = None) -> None:
        kind = type or ("private" if chat_id > 0 else "supergroup")
        chat = self._chats.get(chat_id)
        if chat is None:
            self._chats[chat_id] = _Chat(chat_id, kind, title)
        else:
            chat.type, chat.title, chat.window = kind, title or chat.title, None

    def send_user_message(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        *,
        reply_to_message_id: int | None = None,
        username: str | None = None,
    ) -> SandboxMessage:
        chat = self._ensure_chat(chat_id)
        message = SandboxMessage(
            message_id=next(chat.ids),
            chat_id=chat_id,
            from_bot=False,
            user_id=user_id,
            text=text,
            html=None,
            reply_markup=None,
            disable_notification=False,
            date=int(time.time()),
            reply_to_message_id=reply_to_message_id,
            entities=_command_entities(text),
            username=username,
        )
        chat.messages[message.message_id] = message
        self._queue_update("message", self._message_json(message))
        return message

    def press(
        self,
        chat_id: int,
        message_id: int,
        user_id: int,
        *,
        data: str | None = None,
        button_text: str | None = None,
        username: str | None = None,
    ) -> str:
        chat = self._chats.get(chat_id)
        message = chat.visible(message_id) if chat else None
        if message is None:
            raise ValueError(f"no message {message_id} in chat {chat_id}")
        callback_data = _find_button(message, data, button_text)
        query_id = str(next(self._query_ids))
        self._open_queries.add(query_id)
        query = {
            "id": query_id,
            "from": _user_json(user_id, username),
            "message": self._message_json(message),
            "chat_instance": str(chat_id),
            "data": callback_data,
        }
        self._queue_update("callback_query", query)
        return query_id

    def fail_next(
        self,
        method: str,
        status: int = 500,
        description: str = INTERNAL_ERROR,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of `method` with this error; nothing else happens.

        The call is logged with the error and leaves the chat as it was, like a request that
        Telegram's front end refused. A later `fail_next` of the same method replaces this one;
        `times=0` clears it.
        """
        canonical = self._methods.get(method.lower(), (method, None))[0]
        if times <= 0:
            self._failures.pop(canonical, None)
            return
        self._failures[canonical] = InjectedFailure(status, description, times)

    def _injected_failure(self, method: str) -> None:
        failure = self._failures.get(method)
        if failure is None:
            return
        failure.times -= 1
        if failure.times <= 0:
            del self._failures[method]
        raise ApiError(failure.description, status=failure.status)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                recent = ", ".join(f"{c.method}->{c.status}" for c in self.calls[-8:])
                name = getattr(predicate, "__qualname__", repr(predicate))
                raise TimeoutError(
                    f"sandbox: {name} still false after {timeout}s; last calls: {recent or 'none'}"
                )
            await asyncio.sleep(WAIT_FOR_STEP_S)

    # -- HTTP --------------------------------------------------------------------------------

    async def _handle_api(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        canonical, handler = self._methods.get(name.lower(), (name, None))
        call = Call(method=canonical, params={}, status=0, at=time.time())
        try:
            call.params = await read_params(request)
        except ApiError as error:
            self.calls.append(call)
            return self._failed(call, error)
        # Recorded once the body is read: nothing awaits between here and the handler's first
        # await, so a test that sees the call also sees its effect (e.g. a registered long poll).
        self.calls.append(call)
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(UNAUTHORIZED)
            if handler is None:
                raise ApiError(NOT_FOUND)
            self._injected_failure(canonical)
            result = await self._run(canonical, handler, call.params)
        except ApiError as error:
            return self._failed(call, error)
        call.status = 200
        call.response = {"ok": True, "result": result}
        return web.json_response(call.response)

    def _failed(self, call: Call, error: ApiError) -> web.Response:
        if error.status == 429:
            self.rate_limited += 1
        call.status = error.status
        call.response = error.body()
        return web.json_response(call.response, status=error.status)

    async def _run(
        self, method: str, handler: Callable[[dict[str, Any]], Any], params: dict[str, Any]
    ) -> Any:
        window = None
        if self.enforce_limits and method in RATE_LIMITED_METHODS:
            window = self._window(self._chat_of(params))
            self._check_window(window)
        result = handler(params)
        if inspect.isawaitable(result):
            result = await result
        if window is not None:
            window.record(time.monotonic())
        return result

    async def _http_chat(self, request: web.Request) -> web.Response:
        chat_id = _path_chat_id(request)
        chat = self._chats.get(chat_id)
        return web.json_response(
            {
                "chat": chat.json() if chat else None,
                "messages": [message.view() for message in self.messages(chat_id)],
            }
        )

    async def _http_user_message(self, request: web.Request) -> web.Response:
        chat_id = _path_chat_id(request)
        body = await _json_body(request)
        try:
            message = self.send_user_message(
                chat_id,
                int(body["user_id"]),
                str(body["text"]),
                reply_to_message_id=body.get("reply_to_message_id"),
                username=body.get("username"),
            )
        except (KeyError, TypeError, ValueError) as error:
            return _control_error(f"bad message request: {error!r}")
        return web.json_response({"message": message.view()})

    async def _http_press(self, request: web.Request) -> web.Response:
        chat_id = _path_chat_id(request)
        body = await _json_body(request)
        try:
            query_id = self.press(
                chat_id,
                int(body["message_id"]),
                int(body["user_id"]),
                data=body.get("data"),
                button_text=body.get("button_text"),
                username=body.get("username"),
            )
        except (KeyError, TypeError, ValueError) as error:
            return _control_error(str(error) if isinstance(error, ValueError) else repr(error))
        return web.json_response({"callback_query_id": query_id})

    async def _http_fail(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            self.fail_next(
                str(body["method"]),
                int(body.get("status", 500)),
                str(body.get("description", INTERNAL_ERROR)),
                int(body.get("times", 1)),
            )
        except (KeyError, TypeError, ValueError) as error:
            return _control_error(f"bad fail request: {error!r}")
        return web.json_response({"ok": True})

    async def _http_calls(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": [asdict(call) for call in self.calls]})

    async def _http_callback_answers(self, request: web.Request) -> web.Response:
        return web.json_response({"answers": self.callback_answers()})

    # -- chats, updates, limits --------------------------------------------------------------

    def _ensure_chat(self, chat_id: int) -> _Chat:
        if chat_id not in self._chats:
            self.add_chat(chat_id)
        return self._chats[chat_id]

    def _chat_of(self, params: dict[str, Any]) -> _Chat:
        chat_id = params.get("chat_id")
        if chat_id is None or chat_id == "":
            raise ApiError(CHAT_ID_EMPTY)
        if not isinstance(chat_id, int):
            raise ApiError(CHAT_NOT_FOUND)
        return self._ensure_chat(chat_id)

    def _window(self, chat: _Chat) -> SlidingWindow:
        if chat.window is None:
            if chat.type == "private":
                period = PRIVATE_BURST / self.private_per_second
                chat.window = SlidingWindow(PRIVATE_BURST, period)
            else:
                chat.window = SlidingWindow(self.group_per_minute, GROUP_WINDOW_S)
        return chat.window

    def _check_window(self, window: SlidingWindow) -> None:
        wait = window.wait_s(time.monotonic())
        if wait <= 0:
            return
        seconds = self.retry_after_s if self.retry_after_s is not None else math.ceil(wait)
        seconds = max(1, seconds)
        raise ApiError(f"Too Many Requests: retry after {seconds}", retry_after=seconds)

    def _queue_update(self, kind: str, payload: dict[str, Any]) -> None:
        self._last_update_id = next(self._update_ids)
        self._updates.append({"update_id": self._last_update_id, kind: payload})
        self._wake()

    def _wake(self) -> None:
        event, self._wakeup = self._wakeup, asyncio.Event()
        event.set()

    def _bot_user(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Conveyor",
            "username": self.bot_username,
        }

    def _message_json(self, message: SandboxMessage, *, nested: bool = False) -> dict[str, Any]:
        chat = self._chats[message.chat_id]
        sender = (
            self._bot_user()
            if message.from_bot
            else _user_json(message.user_id or 0, message.username)
        )
        data: dict[str, Any] = {
            "message_id": message.message_id,
            "from": sender,
            "chat": chat.json(),
            "date": message.date,
            "text": message.text,
        }
        optional = {
            "entities": message.entities,
            "reply_markup": message.reply_markup,
            "edit_date": message.edit_date,
        }
        data.update({key: value for key, value in optional.items() if value})
        replied = chat.messages.get(message.reply_to_message_id or 0)
        if replied is not None and not nested:
            data["reply_to_message"] = self._message_json(replied, nested=True)
        return data

    # -- methods -----------------------------------------------------------------------------

    def _get_me(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            **self._bot_user(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.webhook_url:
            raise ApiError(WEBHOOK_ACTIVE)
        offset = params.get("offset")
        if isinstance(offset, int) and offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
            self._confirmed_update_id = max(self._confirmed_update_id, offset - 1)
        limit = params.get("limit")
        limit = min(max(limit, 1), MAX_UPDATES) if isinstance(limit, int) else MAX_UPDATES
        timeout = params.get("timeout")
        timeout = max(float(timeout), 0.0) if isinstance(timeout, float) else 0.0
        if self._poll is not None:
            self._poll.superseded = True
            self._wake()
        poll = self._poll = _Poll()
        try:
            await self._wait_for_updates(poll, time.monotonic() + timeout)
        finally:
            if self._poll is poll:
                self._poll = None
        return self._updates[:limit]

    async def _wait_for_updates(self, poll: _Poll, deadline: float) -> None:
        while True:
            if poll.superseded:
                raise ApiError(POLL_TERMINATED)
            remaining = deadline - time.monotonic()
            if self._updates or self._closing or remaining <= 0:
                return
            wakeup = self._wakeup
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _set_webhook(self, params: dict[str, Any]) -> bool:
        self.webhook_url = str(params.get("url") or "")
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    def _delete_webhook(self, params: dict[str, Any]) -> bool:
        self.webhook_url = ""
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    def _get_webhook_info(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": self.webhook_url,
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }

    def _render(self, params: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        raw = params.get("text")
        if raw is None or raw == "":
            raise ApiError(TEXT_EMPTY)
        raw = str(raw)
        mode = str(params.get("parse_mode") or "").lower()
        if mode == "html":
            try:
                text, entities = parse_html(raw)
            except EntityParseError as error:
                raise ApiError(f"Bad Request: can't parse entities: {error}") from None
        elif mode in ("", "markdown", "markdownv2"):
            text, entities = raw, list(params.get("entities") or [])
        else:
            raise ApiError(UNSUPPORTED_PARSE_MODE)
        text, entities = _trim(text, entities)
        if not text:
            raise ApiError(TEXT_EMPTY)
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError(TEXT_TOO_LONG)
        return text, entities

    def _reply_target(self, chat: _Chat, params: dict[str, Any]) -> int | None:
        reply = params.get("reply_parameters")
        reply = reply if isinstance(reply, dict) else {}
        target = params.get("reply_to_message_id") or _to_int(reply.get("message_id"))
        if target is None:
            return None
        if chat.visible(target) is not None:
            return target
        if params.get("allow_sending_without_reply") or reply.get("allow_sending_without_reply"):
            return None
        raise ApiError(REPLY_NOT_FOUND)

    def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = self._chat_of(params)
        text, entities = self._render(params)
        markup, force_reply = parse_markup(params.get("reply_markup"))
        reply_to = self._reply_target(chat, params)
        message = SandboxMessage(
            message_id=next(chat.ids),
            chat_id=chat.id,
            from_bot=True,
            user_id=self.bot_id,
            text=text,
            html=str(params["text"]),
            reply_markup=markup,
            disable_notification=bool(params.get("disable_notification")),
            date=int(time.time()),
            reply_to_message_id=reply_to,
            entities=entities,
            force_reply=force_reply,
        )
        chat.messages[message.message_id] = message
        return self._message_json(message)

    def _editable(self, params: dict[str, Any]) -> SandboxMessage:
        message = self._chat_of(params).visible(params.get("message_id"))
        if message is None:
            raise ApiError(EDIT_NOT_FOUND)
        if not message.from_bot:
            raise ApiError(CANT_EDIT)
        return message

    def _edit_message_text(self, params: dict[str, Any]) -> dict[str, Any]:
        message = self._editable(params)
        text, entities = self._render(params)
        markup, _ = parse_markup(params.get("reply_markup"))
        if (text, entities, markup) == (message.text, message.entities, message.reply_markup):
            raise ApiError(NOT_MODIFIED)
        message.text, message.html, message.entities = text, str(params["text"]), entities
        return self._mark_edited(message, markup)

    def _edit_message_reply_markup(self, params: dict[str, Any]) -> dict[str, Any]:
        message = self._editable(params)
        markup, _ = parse_markup(params.get("reply_markup"))
        if markup == message.reply_markup:
            raise ApiError(NOT_MODIFIED)
        return self._mark_edited(message, markup)

    def _mark_edited(self, message: SandboxMessage, markup: dict[str, Any] | None) -> dict:
        message.reply_markup = markup  # an edit without reply_markup removes the keyboard
        message.edited, message.edit_date = True, int(time.time())
        return self._message_json(message)

    def _delete_message(self, params: dict[str, Any]) -> bool:
        message = self._chat_of(params).visible(params.get("message_id"))
        if message is None:
            raise ApiError(DELETE_NOT_FOUND)
        message.deleted = True
        return True

    def _delete_messages(self, params: dict[str, Any]) -> bool:
        chat = self._chat_of(params)
        ids = params.get("message_ids")
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_UPDATES:
            raise ApiError("Bad Request: message identifiers are not specified")
        for message_id in ids:
            message = chat.visible(_to_int(message_id))
            if message is not None:
                message.deleted = True
        return True

    def _answer_callback_query(self, params: dict[str, Any]) -> bool:
        query_id = str(params.get("callback_query_id") or "")
        if query_id not in self._open_queries:
            raise ApiError(QUERY_INVALID)
        if len(str(params.get("text") or "")) > MAX_ANSWER_TEXT_CHARS:
            raise ApiError(ANSWER_TOO_LONG)
        self._open_queries.discard(query_id)
        self._answers[query_id] = {
            "text": params.get("text"),
            "show_alert": bool(params.get("show_alert")),
            **{k: v for k, v in params.items() if k not in ("callback_query_id", "text")},
        }
        return True

    @staticmethod
    def _commands_key(params: dict[str, Any]) -> tuple[str, str]:
        scope = params.get("scope") or {"type": "default"}
        return json.dumps(scope, sort_keys=True), str(params.get("language_code") or "")

    def _set_my_commands(self, params: dict[str, Any]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise ApiError("Bad Request: can't parse bot commands JSON object")
        self.commands[self._commands_key(params)] = commands
        return True

    def _delete_my_commands(self, params: dict[str, Any]) -> bool:
        self.commands.pop(self._commands_key(params), None)
        return True

    def _get_my_commands(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.commands.get(self._commands_key(params), [])

    def _send_chat_action(self, params: dict[str, Any]) -> bool:
        self._chat_of(params)
        return True

    def _get_chat(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**self._chat_of(params).json(), **CHAT_FULL_INFO_EXTRAS}

    def _get_chat_member(self, params: dict[str, Any]) -> dict[str, Any]:
        self._chat_of(params)
        user_id = params.get("user_id")
        if not isinstance(user_id, int):
            raise ApiError("Bad Request: invalid user_id specified")
        user = self._bot_user() if user_id == self.bot_id else _user_json(user_id, None)
        return {"status": "administrator", "user": user, **ADMIN_RIGHTS}


def _command_entities(text: str) -> list[dict[str, Any]]:
    match = re.match(r"/[A-Za-z0-9_]+(@[A-Za-z0-9_]+)?", text)
    if match is None:
        return []
    return [{"type": "bot_command", "offset": 0, "length": match.end()}]


def _find_button(message: SandboxMessage, data: str | None, button_text: str | None) -> str:
    if data is None and button_text is None:
        raise ValueError("press() needs data= or button_text=")
    for text, callback_data in message.buttons():
        if callback_data and (callback_data == data or text == button_text):
            return callback_data
    wanted = f"data {data!r}" if data is not None else f"text {button_text!r}"
    raise ValueError(
        f"message {message.message_id} in chat {message.chat_id} has no button with {wanted}; "
        f"buttons: {message.buttons()}"
    )


def _path_chat_id(request: web.Request) -> int:
    try:
        return int(request.match_info["chat_id"])
    except ValueError:
        raise web.HTTPBadRequest(text="chat_id must be an integer") from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="expected a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


def _control_error(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


# ---------------------------------------------------------------------------------------------
# Standalone


async def serve(args: argparse.Namespace) -> None:
    sandbox = TelegramSandbox(
        args.token, bot_username=args.bot_username, enforce_limits=not args.no_limits
    )
    url = await sandbox.start(args.host, args.port)
    print(url, flush=True)  # the first stdout line: drivers read the base URL from it
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        await sandbox.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Telegram Bot API sandbox")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="123456:SANDBOX")
    parser.add_argument("--bot-username", default="conveyor_bot")
    parser.add_argument("--no-limits", action="store_true", help="do not answer 429")
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
