"""`python -m bench` (or `make bench`): every benchmark, one table, bench/results.json.

Each benchmark is a module of this package with `measure(quick, log) -> dict` (its raw
figures, repetitions included) and `rows(result) -> list[Row]` (its lines of the table,
each against its own baseline measured in the same run). `--quick` shortens the runs for
a smoke test; its figures are not the ones to record.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Row

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"

BENCHMARKS = ("ingest", "reconcile", "pacing", "overhead", "memory")


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
    }


def table(rows: list[Row]) -> str:
    header = ("figure", "measured", "baseline", "target", "met")
    lines = [header] + [
        (r.figure, r.measured, r.baseline, r.target, {True: "yes", False: "NO", None: "—"}[r.met])
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    ]
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    out = ["| figure | measured | baseline | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        out.append(f"| {r.figure} | {r.measured} | {r.baseline} | {r.target} | {met} |")
    return "\n".join(out)


async def run_all(names: list[str], quick: bool) -> tuple[dict[str, Any], list[Row]]:
    results: dict[str, Any] = {}
    rows: list[Row] = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"bench: {name} …", flush=True)
        started = time.monotonic()
        try:
            result = await module.measure(quick, log=lambda line: print(line, flush=True))
            found = module.rows(result)
        except Exception as error:  # report it and go on with the others
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
            found = [Row(name, "error", "—", "—", False)]
        result["seconds"] = round(time.monotonic() - started, 1)
        results[name] = result
        rows.extend(found)
    return results, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    results, rows = asyncio.run(run_all(names, args.quick))
    about = machine()
    print()
    print(
        f"{about['date']} · {about['cores']} cores · Python {about['python']}"
        f" · {about['platform']}{' · QUICK' if args.quick else ''}"
    )
    print(table(rows))
    payload = {
        "machine": about,
        "quick": args.quick,
        "rows": [r.__dict__ for r in rows],
        "results": results,
        "markdown": markdown(rows),
    }
    RESULTS_JSON.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"\nwritten {RESULTS_JSON.relative_to(HERE.parent)}")
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
