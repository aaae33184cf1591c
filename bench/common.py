"""What every benchmark shares: repetition statistics, timing, and bounded subprocesses."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the relative spread ((max - min) / median) of repetitions."""
    values = [float(v) for v in values]
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {
        "median": median,
        "min": low,
        "max": high,
        "spread_pct": (high - low) / median * 100.0 if median else 0.0,
        "n": len(values),
        "values": values,
    }


def fmt_spread(s: dict[str, Any], digits: int = 1, unit: str = "") -> str:
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{unit} (n=1)"
    return (
        f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']}]"
    )


async def run_python(
    *args: str, timeout_s: float, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python args...` from the repository root; kill it if it outlives `timeout_s`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out.decode(), err.decode()


async def run_python_json(*args: str, timeout_s: float) -> dict[str, Any]:
    code, out, err = await run_python(*args, timeout_s=timeout_s)
    if code != 0:
        raise RuntimeError(f"python {' '.join(args[:2])} exited {code}: {err.strip()[-2000:]}")
    return json.loads(out)


@dataclass(frozen=True)
class Row:
    """One line of the results table: what was measured, against which baseline and target."""

    figure: str
    measured: str
    baseline: str
    target: str
    met: bool | None  # None: reported, no target
