"""`python -m chaos`: run the fault classes, print one line each, write the figures.

Each fault class is a coroutine `run(root, seed=..., quick=...) -> list[Outcome]` in a
module of this package, listed in FAULTS in the order they run. A class that raises is
reported as failed with its error; the others still run. The exit code is 0 only when
every invariant held. `--quick` shrinks the counts (for a smoke run), never the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from chaos.harness import Outcome

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "chaos-results.json"

# name -> "module:function"; names are what --only takes
FAULTS: dict[str, str] = {
    "board": "chaos.board:run",
    "duplicates": "chaos.duplicates:run",
    "bounce": "chaos.bounce:run",
    "strangers": "chaos.strangers:run",
    "bad-input": "chaos.bad_input:run",
    "ack-durable": "chaos.crashes:run_ack_durable",
    "crashes": "chaos.crashes:run_crashes",
    "outages": "chaos.outages:run",
}


def _load(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


async def run_all(names: list[str], seed: int, quick: bool) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for name in names:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"conveyor-chaos-{name}-") as scratch:
            try:
                found = await _load(FAULTS[name])(Path(scratch), seed=seed, quick=quick)
            except Exception as error:  # one broken class must not hide the others' figures
                failed = Outcome(name)
                failed.check(False, f"{type(error).__name__}: {error}")
                logging.getLogger("chaos").debug("%s", traceback.format_exc())
                found = [failed]
        for outcome in found:
            if not outcome.seconds:
                outcome.seconds = time.monotonic() - started
            print(outcome.line(), flush=True)
        outcomes.extend(found)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=20261129)
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(FAULTS)}")
    parser.add_argument("--quick", action="store_true", help="smaller counts, same checks")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault class {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"chaos: seed {args.seed}{' (quick)' if args.quick else ''}", flush=True)
    outcomes = asyncio.run(run_all(names, args.seed, args.quick))
    if not args.no_write:
        RESULTS.write_text(
            json.dumps(
                {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "seed": args.seed,
                    "quick": args.quick,
                    "python": platform.python_version(),
                    "outcomes": [
                        {
                            "name": o.name,
                            "ok": o.ok,
                            "figures": o.figures,
                            "failures": o.failures,
                            "seconds": round(o.seconds, 1),
                        }
                        for o in outcomes
                    ],
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
    failed = [o.name for o in outcomes if not o.ok]
    print(
        f"chaos: {len(outcomes) - len(failed)}/{len(outcomes)} held"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
