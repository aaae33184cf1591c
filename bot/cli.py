"""The `conveyor` command: run, demo, doctor."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from engine.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="bot, HTTP server, worker and scheduler in one process")
    demo = commands.add_parser("demo", help="one sample task end to end against the sandbox")
    demo.add_argument("--locale", choices=["ru", "en"], default=None)
    commands.add_parser("doctor", help="check the configuration and each service it names")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            from bot.demo import run_demo

            return asyncio.run(run_demo(args.locale))
        settings = load_settings()
        if args.command == "doctor":
            from bot.doctor import run_doctor

            return asyncio.run(run_doctor(settings))
        from bot.app import run_app

        return asyncio.run(run_app(settings))
    except ConfigError as error:
        print(f"conveyor: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
