"""`conveyor run`: bot, HTTP server, worker and scheduler in one process.

SIGTERM and SIGINT stop everything cleanly: running agents are killed and their
jobs handed back to the queue for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from bot.telegram import TelegramConsole
from engine.api import add_routes
from engine.config import ConfigError, Settings, require
from engine.runtime import Engine
from engine.webhooks import MAX_BODY_BYTES, check_secrets

log = logging.getLogger(__name__)


async def run_app(settings: Settings) -> int:
    require(settings, "projects")
    if settings.telegram_token is not None:
        require(settings, "telegram_chat_id", "telegram_admin_ids")
    else:
        log.warning("ORCH_TELEGRAM_TOKEN is not set: running without the Telegram console")
    unsigned = check_secrets(settings)
    if unsigned and not settings.allow_unsigned_webhooks:
        raise ConfigError(
            "; ".join(f"{name}: is required while that service is configured" for name in unsigned)
            + " (or set ORCH_ALLOW_UNSIGNED_WEBHOOKS=true)"
        )
    if settings.allow_unsigned_webhooks:
        log.warning("ORCH_ALLOW_UNSIGNED_WEBHOOKS is on: unsigned webhooks are accepted")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Engine(settings) as engine:
        console = TelegramConsole(settings, engine) if settings.telegram_token else None
        if console is not None:
            engine.use_notifier(console.notifier)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        add_routes(app, engine)
        engine.intake.mount(app)
        if console is not None:
            console.mount(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
        log.warning("conveyor listening on %s:%s", settings.http_host, settings.http_port)
        if console is not None:
            await console.start()
        engine.start_worker()
        await engine.start_reconciler()
        try:
            await stop.wait()
        finally:
            log.warning("stopping")
            await runner.cleanup()
            if console is not None:
                await console.stop()
    return 0
