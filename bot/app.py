"""`conveyor run`: the engine, its worker and the HTTP server in one process.

SIGTERM and SIGINT stop everything cleanly: running agents are killed and their
jobs handed back to the queue for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from engine.api import add_routes
from engine.config import Settings, require
from engine.runtime import Engine

log = logging.getLogger(__name__)


async def run_app(settings: Settings) -> int:
    require(settings, "projects")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Engine(settings) as engine:
        app = web.Application(client_max_size=1024 * 1024)
        add_routes(app, engine.store, settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
        log.warning("conveyor listening on %s:%s", settings.http_host, settings.http_port)
        engine.start_worker()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    return 0
